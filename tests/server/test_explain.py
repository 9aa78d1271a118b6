"""POST /v1/explain: the serving model's own numbers at each of the five steps, checked
against transformers' GPT-2 on the same weights (float32, 1e-4); bounds and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.server.conftest import API_KEY, MODEL_NAME

PROMPT = "The quick brown fox jumps over the lazy dog because"
TOL = 1e-4


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()


def explain(server, **body) -> dict:
    with server.http() as http:
        r = http.post("/v1/explain", json={"prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()


def residual_norms(seen: dict, i: int, position: int) -> tuple:
    before = seen[("in", i)][position]
    return before.norm(), (before + seen[("attn", i)][position]).norm(), seen[("out", i)][position].norm()


def first(out):
    """A module's output tensor (transformers' blocks return a tuple in some versions)."""
    return out[0] if isinstance(out, tuple) else out


def reference(hf, ids: list[int], position: int) -> dict:
    """The same steps, computed with transformers' modules and hooks."""
    seen: dict = {}
    hooks = []
    def keep(kind: str, i: int):
        return lambda module, args, out: seen.__setitem__((kind, i), first(out)[0])

    for i, block in enumerate(hf.transformer.h):
        hooks.append(block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(("in", i), args[0][0])))
        hooks += [block.attn.register_forward_hook(keep("attn", i)), block.register_forward_hook(keep("out", i)),
                  block.mlp.act.register_forward_hook(keep("act", i))]
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True)
        scores = []
        for i, block in enumerate(hf.transformer.h):
            q, k, _ = block.attn.c_attn(block.ln_1(seen[("in", i)])).split(hf.config.n_embd, dim=-1)
            heads = hf.config.n_head
            q = q.view(len(ids), heads, -1).transpose(0, 1)
            k = k.view(len(ids), heads, -1).transpose(0, 1)
            row = q[:, position:position + 1] @ k[:, :position + 1].transpose(-1, -2)  # (heads, 1, keys)
            scores.append(row[:, 0] / q.shape[-1] ** 0.5)
    for h in hooks:
        h.remove()
    tok = hf.transformer.wte.weight[ids].detach()
    pos = hf.transformer.wpe.weight[:len(ids)].detach()
    return {"tok": tok, "pos": pos, "scores": scores,
            "weights": [a[0, :, position, :position + 1] for a in out.attentions],
            "act": [seen[("act", i)][position] for i in range(len(hf.transformer.h))],
            "residual": [residual_norms(seen, i, position) for i in range(len(hf.transformer.h))],
            "logits": out.logits[0, position]}


@pytest.mark.parametrize("position", [None, 3])
def test_every_step_equals_the_same_computation_in_transformers(float32_server, hf, position):
    got = explain(float32_server, position=position, top_k=20)
    ids = [t["id"] for t in got["tokens"]]
    p = len(ids) - 1 if position is None else position
    assert got["position"] == p
    ref = reference(hf, ids, p)
    np.testing.assert_allclose(got["embeddings"]["token"], ref["tok"].numpy(), atol=TOL)
    np.testing.assert_allclose(got["embeddings"]["position"], ref["pos"].numpy(), atol=TOL)
    norms = torch.stack([ref["tok"].norm(dim=1), ref["pos"].norm(dim=1), (ref["tok"] + ref["pos"]).norm(dim=1)], 1)
    np.testing.assert_allclose(got["embeddings"]["norms"], norms.numpy(), atol=TOL)
    for layer in range(hf.config.n_layer):
        np.testing.assert_allclose(got["attention"]["scores"][layer], ref["scores"][layer].numpy(), atol=TOL)
        np.testing.assert_allclose(got["attention"]["weights"][layer], ref["weights"][layer].numpy(), atol=TOL)
        np.testing.assert_allclose(got["feed_forward"]["residual"][layer], [float(x) for x in ref["residual"][layer]],
                                   atol=TOL, rtol=1e-5)
        neurons = got["feed_forward"]["neurons"][layer]
        act = ref["act"][layer]
        assert [n["index"] for n in neurons] == act.topk(len(neurons)).indices.tolist()
        np.testing.assert_allclose([n["activation"] for n in neurons], act.topk(len(neurons)).values.numpy(), atol=TOL)
    top = ref["logits"].topk(20)
    assert [t["id"] for t in got["next_token"]] == top.indices.tolist()
    np.testing.assert_allclose([t["logit"] for t in got["next_token"]], top.values.numpy(), atol=TOL)


def test_the_projection_is_the_prompts_first_two_principal_axes(float32_server, hf):
    got = explain(float32_server)
    ids = [t["id"] for t in got["tokens"]]
    x = (hf.transformer.wte.weight[ids] + hf.transformer.wpe.weight[:len(ids)]).detach().double().numpy()
    u, s, _ = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    expected = u[:, :2] * s[:2]
    expected *= np.sign(expected[np.abs(expected).argmax(axis=0), [0, 1]])  # each axis: its largest value positive
    np.testing.assert_allclose(got["embeddings"]["projection"], expected, atol=TOL)


def test_a_chinese_prompts_tokens_carry_the_bytes_of_its_characters(server):
    prompt = "你好，世界！🙂"
    got = explain(server, prompt=prompt)
    assert b"".join(bytes(t["bytes"]) for t in got["tokens"]).decode("utf-8") == prompt
    assert any("\ufffd" in t["text"] for t in got["tokens"])  # some token holds part of a character


def test_the_default_precision_explains_too_and_strips_are_bounded(server):
    got = explain(server)
    assert got["model"] == MODEL_NAME and got["n_layer"] == len(got["attention"]["scores"])
    assert got["embeddings"]["cells"] <= 128 and len(got["next_token"]) == 50
    for row in got["attention"]["weights"][0]:
        assert sum(row) == pytest.approx(1, abs=1e-3)


@pytest.mark.parametrize("body, status, param", [
    ({"position": 99}, 400, "position"),
    ({"position": -1}, 400, "position"),
    ({"prompt": "word " * 200}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"top_k": 101}, 400, "top_k"),
    ({"model": "nope"}, 404, "model"),
], ids=["position-past-the-end", "negative-position", "too-long", "empty", "too-many-logits", "unknown-model"])
def test_bad_input_is_a_4xx_naming_the_field(server, body, status, param):
    with server.http() as http:
        r = http.post("/v1/explain", json={"prompt": PROMPT, **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("which", ["bundled", "gpt2-small"])
def test_the_bundled_model_and_gpt2_small_are_explained_at_the_default_precision(which, gpt2_small_checkpoint):
    from gptserve.config import EngineConfig
    from gptserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(None if which == "bundled" else str(gpt2_small_checkpoint),
                       EngineConfig(device="cpu", kv_cache_memory=16 * 2**20, enforce_eager=True))
    ids = engine.tokenizer.encode(PROMPT)
    seen = engine.explain(ids, 4, 50, 4)
    cfg = engine.model_config
    group = -(-cfg.n_embd // 128)  # values averaged into a cell
    assert len(seen.token_vectors) == len(ids) and len(seen.token_vectors[0]) == -(-cfg.n_embd // group) <= 128
    assert len(seen.scores) == cfg.n_layer and len(seen.scores[0]) == cfg.n_head and len(seen.scores[0][0]) == 5
    assert len(seen.neurons) == cfg.n_layer and all(0 <= i < cfg.mlp_dim for i, _ in seen.neurons[0])
    assert len(seen.logits) == 50 and seen.logits[0][1] >= seen.logits[-1][1]


def test_explain_needs_the_api_key_when_the_server_has_one(keyed_server):
    with keyed_server.http() as http:
        assert http.post("/v1/explain", json={"prompt": PROMPT}).status_code == 401
        ok = http.post("/v1/explain", json={"prompt": PROMPT}, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200, ok.text
