"""LoRA adapters in the engine: each adapter's greedy tokens equal transformers + peft's
(the adapter unmerged and merged), a batch mixing adapters equals each request alone,
adapters never share prefix-cache blocks, slots are shared LRU, and an adapter that can't
be applied is refused by name."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from gptserve.config import EngineConfig
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.outputs import AdapterError, AdapterNotFoundError
from gptserve.engine.sampling_params import SamplingParams
from tests.engine.conftest import tolerance

PROMPTS = ["Hello world, this is", "The quick brown fox", "In the beginning God created"]
NEW_TOKENS = 10

# adapter settings peft can save, each applied as peft applies it
ADAPTERS = {
    "all-layers": dict(seed=1),
    "attention-only-rslora": dict(seed=2, r=4, lora_alpha=8, target_modules=["c_attn"], use_rslora=True),
    "rank-and-alpha-patterns": dict(seed=3, r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                    rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 32}),
    "mlp-out-only-one-layer": dict(seed=4, r=16, lora_alpha=4, target_modules=["mlp.c_proj"],
                                   layers_to_transform=[1]),
}


def engine_for(checkpoint, adapters: dict, **config) -> LLMEngine:
    settings = dict(dtype="float32", kv_cache_memory=16 * 2**20, lora_modules={k: str(v) for k, v in adapters.items()})
    return LLMEngine(str(checkpoint), EngineConfig(**{**settings, **config}))


def greedy(adapter: str | None, n: int = NEW_TOKENS, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, adapter=adapter, **extra)


def peft_greedy(checkpoint, adapter_folder, prompt: list[int], merged: bool, n: int = NEW_TOKENS) -> list[int]:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(checkpoint), adapter_folder).eval()
    if merged:
        model = model.merge_and_unload()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=50256)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, make_adapter) -> dict:
    return {name: make_adapter(tiny_checkpoint, **settings) for name, settings in ADAPTERS.items()}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, adapters) -> LLMEngine:
    return engine_for(tiny_checkpoint, adapters)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_greedy_tokens_equal_peft(engine, tiny_checkpoint, adapters, name, merged):
    for text in PROMPTS:
        prompt = engine.tokenizer.encode(text)
        [[ours]] = engine.generate([prompt], greedy(name))
        assert ours == peft_greedy(tiny_checkpoint, adapters[name], prompt, merged)


def test_each_adapter_changes_the_output(engine):
    prompt = engine.tokenizer.encode(PROMPTS[0])
    outputs = [engine.generate([prompt], greedy(name))[0][0] for name in [None, *ADAPTERS]]
    assert len({tuple(o) for o in outputs}) == len(outputs)


def test_gpt2_small_adapter_equals_peft(gpt2_small_checkpoint, make_adapter):
    folder = make_adapter(gpt2_small_checkpoint, seed=5, r=8, lora_alpha=16)
    engine = engine_for(gpt2_small_checkpoint, {"small": folder}, kv_cache_memory=64 * 2**20)
    prompt = engine.tokenizer.encode(PROMPTS[2])
    [[ours]] = engine.generate([prompt], greedy("small", n=6))
    assert ours == peft_greedy(gpt2_small_checkpoint, folder, prompt, merged=False, n=6)


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_a_batch_mixing_base_and_three_adapters_equals_each_alone(tiny_checkpoint, adapters, dtype):
    engine = engine_for(tiny_checkpoint, adapters, dtype=dtype)
    names = [None, "all-layers", "attention-only-rslora", "rank-and-alpha-patterns"]
    requests = [(engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)]), name) for i, name in enumerate(names * 2)]
    params = [greedy(name, logprobs=0) for _, name in requests]
    alone = [run_with_logprobs(engine, [prompt], [p])[0] for (prompt, _), p in zip(requests, params)]
    together = run_with_logprobs(engine, [prompt for prompt, _ in requests], params)
    for (tokens, logprobs), (tokens_alone, logprobs_alone) in zip(together, alone):
        assert tokens == tokens_alone
        assert logprobs == pytest.approx(logprobs_alone, abs=tolerance(engine.model))


def run_with_logprobs(engine: LLMEngine, prompts, params) -> list[tuple[list[int], list[float]]]:
    ids = [f"r{i}-{id(prompts)}" for i in range(len(prompts))]
    got = {rid: ([], []) for rid in ids}
    for rid, prompt, p in zip(ids, prompts, params):
        engine.add_request(rid, prompt, p)
    while engine.has_unfinished():
        for out in engine.step():
            for choice in out.choices:
                got[out.request_id][0].extend(choice.token_ids)
                got[out.request_id][1].extend(lp.logprob for lp in choice.logprobs or [])
    return [got[rid] for rid in ids]


def test_the_one_call_decode_step_applies_adapters_as_the_python_path_does(tiny_checkpoint, adapters):
    compiled, eager = engine_for(tiny_checkpoint, adapters), engine_for(tiny_checkpoint, adapters, enforce_eager=True)
    prompts = [compiled.tokenizer.encode(t) for t in PROMPTS]
    params = [greedy(name, logprobs=0) for name in ("all-layers", None, "mlp-out-only-one-layer")]
    assert run_with_logprobs(compiled, prompts, params) == run_with_logprobs(eager, prompts, params)


def test_adapters_never_share_prefix_cache_blocks(tiny_checkpoint, adapters):
    engine = engine_for(tiny_checkpoint, adapters, block_size=4)
    prompt = engine.tokenizer.encode(" ".join(PROMPTS))  # several full blocks

    def cached_tokens(adapter):
        engine.add_request(f"c{id(object())}", prompt, greedy(adapter, n=1))
        while engine.has_unfinished():
            outputs = engine.step()
        return outputs[-1].num_cached_tokens

    assert cached_tokens("all-layers") == 0
    assert cached_tokens("all-layers") > 0  # the same adapter reuses its own blocks
    assert cached_tokens("attention-only-rslora") == 0
    assert cached_tokens(None) == 0


def test_more_adapters_than_slots_take_turns_and_each_equals_alone(tiny_checkpoint, adapters):
    engine = engine_for(tiny_checkpoint, adapters, max_loras=1)
    prompt = engine.tokenizer.encode(PROMPTS[1])
    names = list(ADAPTERS)
    alone = [engine.generate([prompt], greedy(name))[0][0] for name in names]
    together = engine.generate([prompt] * len(names), [greedy(name) for name in names])
    assert [t[0] for t in together] == alone
    assert engine.adapters.loads > len(names)  # swapped in and out of the one slot


def test_unloading_lets_running_requests_finish_and_refuses_new_ones(tiny_checkpoint, adapters):
    engine = engine_for(tiny_checkpoint, adapters)
    prompt = engine.tokenizer.encode(PROMPTS[0])
    [[expected]] = engine.generate([prompt], greedy("all-layers"))
    engine.add_request("running", prompt, greedy("all-layers"))
    tokens = [t for out in engine.step() for c in out.choices for t in c.token_ids]
    engine.unload_lora("all-layers")
    while engine.has_unfinished():
        for out in engine.step():
            tokens += [t for c in out.choices for t in c.token_ids]
    assert tokens == expected
    with pytest.raises(AdapterNotFoundError, match="all-layers"):
        engine.add_request("new", prompt, greedy("all-layers"))
    assert all(a is None or a.name != "all-layers" for a in engine.adapters.slots)  # its slot was emptied
    engine.load_lora("all-layers", str(adapters["all-layers"]))  # the name is free again
    assert engine.generate([prompt], greedy("all-layers"))[0][0] == expected


def test_an_adapter_reloaded_with_other_weights_does_not_reuse_the_old_blocks(tiny_checkpoint, adapters):
    engine = engine_for(tiny_checkpoint, {"a": adapters["all-layers"]}, block_size=4)
    prompt = engine.tokenizer.encode(" ".join(PROMPTS))
    engine.generate([prompt], greedy("a", n=1))
    engine.unload_lora("a")
    engine.load_lora("a", str(adapters["rank-and-alpha-patterns"]))
    engine.add_request("again", prompt, greedy("a", n=1))
    while engine.has_unfinished():
        outputs = engine.step()
    assert outputs[-1].num_cached_tokens == 0


# ---- adapters that can't be applied ---------------------------------------------------------

def broken_copy(folder, tmp_path, change) -> str:
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    change(copy)
    return str(copy)


def set_config(**fields):
    def change(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return change


@pytest.mark.parametrize("change, message", [
    (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
    (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    (lambda f: (f / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 40), "cannot read adapter_model.safetensors"),
    (set_config(use_dora=True), "DoRA"),
    (set_config(bias="lora_only"), "biases"),
    (set_config(modules_to_save=["lm_head"]), "modules_to_save"),
    (set_config(peft_type="IA3"), "not LoRA"),
], ids=["no-config", "no-weights", "bad-json", "corrupt-weights", "dora", "bias", "modules-to-save", "not-lora"])
def test_a_broken_adapter_is_refused_with_the_reason(engine, adapters, tmp_path, change, message):
    path = broken_copy(adapters["all-layers"], tmp_path, change)
    with pytest.raises(AdapterError, match=message):
        engine.load_lora("broken", path)
    assert "broken" not in engine.lora_adapters()


def test_an_adapter_of_another_shape_is_refused(engine, make_checkpoint, make_adapter):
    other = make_adapter(make_checkpoint(n_embd=32, n_head=4), seed=1)
    with pytest.raises(AdapterError, match="don't fit the base model"):
        engine.load_lora("other-shape", str(other))


def test_an_adapter_of_layers_other_than_the_linear_ones_is_refused(engine, tiny_checkpoint, make_adapter):
    embedding = make_adapter(tiny_checkpoint, seed=1, target_modules=["wte"])
    with pytest.raises(AdapterError, match="only LoRA A/B weights of the layers"):
        engine.load_lora("embedding", str(embedding))


def test_an_adapter_over_the_rank_limit_is_refused(tiny_checkpoint, make_adapter):
    engine = engine_for(tiny_checkpoint, {}, enable_lora=True, max_lora_rank=4)
    with pytest.raises(AdapterError, match="rank 8; this server takes ranks up to 4"):
        engine.load_lora("big", str(make_adapter(tiny_checkpoint, seed=1)))


def test_a_name_already_taken_and_a_missing_folder_are_refused(engine, adapters, tmp_path):
    with pytest.raises(AdapterError, match="already loaded"):
        engine.load_lora("all-layers", str(adapters["all-layers"]))
    with pytest.raises(AdapterError, match="no adapter folder"):
        engine.load_lora("nowhere", str(tmp_path / "missing"))
    with pytest.raises(AdapterNotFoundError):
        engine.unload_lora("never-loaded")


def test_without_lora_enabled_an_adapter_name_is_unknown(tiny_checkpoint):
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(dtype="float32", kv_cache_memory=16 * 2**20))
    with pytest.raises(AdapterNotFoundError):
        engine.add_request("x", [1, 2, 3], greedy("anything"))
    with pytest.raises(AdapterError, match="--enable-lora"):
        engine.load_lora("x", "/nowhere")
