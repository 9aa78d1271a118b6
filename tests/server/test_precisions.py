"""Every feature works at every weight precision the CPU offers: float32, bfloat16, float16
and int8 weights (float32 compute). Each test is a real request to a real server at that
precision, answered 200 with sane content: echo and prompt logprobs, max_tokens 0, n > 1,
logprobs and top_logprobs, structured output, speculative decoding (ngram), embeddings
and the inspect route."""
from __future__ import annotations

import json
import math
from typing import Iterator

import httpx
import numpy as np
import pytest

from gptserve.config import SpeculativeConfig
from tests.server.conftest import RunningServer, start_server

PRECISIONS = {"float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"},
              "float16": {"dtype": "float16"}, "int8": {"quantization": "int8"}}
PROMPT = "And God said"


@pytest.fixture(scope="module", params=list(PRECISIONS))
def precision(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def running(tiny_checkpoint, precision) -> Iterator[RunningServer]:
    server = start_server(tiny_checkpoint, PRECISIONS[precision])
    yield server
    server.stop()


@pytest.fixture
def api(running) -> Iterator[httpx.Client]:
    """An HTTP client of the server at this module's precision."""
    with running.http() as client:
        yield client


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def is_logprob(value: float) -> bool:
    return math.isfinite(value) and value <= 0


def test_the_server_runs_at_its_precision(running, precision):
    assert running.serving.engine.dtype.startswith(precision)  # e.g. "int8 weights, float32 compute"


def test_echo_with_prompt_logprobs(api):
    body = ok(api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "echo": True, "logprobs": 2,
                                                 "temperature": 0}))
    [choice] = body["choices"]
    lp = choice["logprobs"]
    assert choice["text"].startswith(PROMPT) and "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"][0] is None and all(map(is_logprob, lp["token_logprobs"][1:]))
    assert all(1 <= len(top) <= 3 and all(map(is_logprob, top.values())) for top in lp["top_logprobs"][1:])


def test_max_tokens_0_scores_the_prompt(api):
    body = ok(api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}))
    [choice] = body["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    assert all(map(is_logprob, choice["logprobs"]["token_logprobs"][1:]))


def test_n_choices(api):
    body = ok(api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}],
                                                      "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 1}))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert body["usage"]["completion_tokens"] > 0


def test_logprobs_and_top_logprobs(api):
    body = ok(api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}],
                                                      "max_tokens": 6, "temperature": 0, "logprobs": True,
                                                      "top_logprobs": 3}))
    content = body["choices"][0]["logprobs"]["content"]
    assert content
    for item in content:
        assert is_logprob(item["logprob"]) and len(item["top_logprobs"]) == 3
        assert [t["logprob"] for t in item["top_logprobs"]] == sorted((t["logprob"] for t in item["top_logprobs"]),
                                                                       reverse=True)
        assert item["top_logprobs"][0]["token"] == item["token"]  # greedy: the likeliest


def test_structured_output_json_object(api):
    # '"' and '}' favoured, so that a random model closes its object within max_tokens
    body = ok(api.post("/v1/completions", json={"prompt": "{", "max_tokens": 100, "n": 2, "seed": 3,
                                                 "logit_bias": {"1": 8, "92": 8},
                                                 "response_format": {"type": "json_object"}}))
    for choice in body["choices"]:
        assert choice["text"].lstrip().startswith("{")
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["text"]), dict)


def test_speculative_decoding_gives_plain_decodings_text(tiny_checkpoint, precision, api):
    ngram = start_server(tiny_checkpoint, {**PRECISIONS[precision], "speculative": SpeculativeConfig("ngram")})
    try:
        body = {"prompt": "In the beginning", "max_tokens": 40, "temperature": 0}
        plain = ok(api.post("/v1/completions", json=body))["choices"][0]["text"]
        with ngram.http() as client:
            assert ok(client.post("/v1/completions", json=body))["choices"][0]["text"] == plain
            stats = ngram.serving.engine.stats()
        assert sum(stats.spec_draft_tokens.values()) > 0  # guesses were made and verified
    finally:
        ngram.stop()


def test_embeddings_are_unit_vectors_near_float32s(api, float32_server):
    body = {"model": "tiny-gpt2", "input": [PROMPT, "light"]}
    got = [np.array(d["embedding"]) for d in ok(api.post("/v1/embeddings", json=body))["data"]]
    with float32_server.http() as client:
        want = [np.array(d["embedding"]) for d in ok(client.post("/v1/embeddings", json=body))["data"]]
    for g, w in zip(got, want, strict=True):
        assert g.shape == (64,) and np.isfinite(g).all()
        assert abs(np.linalg.norm(g) - 1) < 1e-5 and float(g @ w) > 0.99


def test_inspect(api, running):
    body = ok(api.post("/v1/inspect", json={"prompt": PROMPT, "top_k": 5}))
    config = running.serving.engine.model_config
    n = len(body["tokens"])
    attention = np.array(body["attention"])
    assert attention.shape == (config.n_layer, config.n_head, n, n)
    assert np.allclose(attention.sum(-1), 1, atol=n * 5e-5)
    probs = [t["prob"] for t in body["top_next_tokens"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
