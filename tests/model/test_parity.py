"""Our GPT-2 computes what transformers' GPT2LMHeadModel computes, from the same checkpoint."""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gptserve.config import ModelConfig
from gptserve.model.attention import DenseAttention
from gptserve.model.gpt2 import GPT2
from gptserve.weights.loader import load_model

FLOAT32_TOL = 1e-4  # max abs logit difference against transformers in float32
CACHE_TOL = 1e-5  # the same model, the same float32 math, only grouped differently

# The published GPT-2 family: (n_embd, n_layer, n_head) from each model's config.json,
# and the parameter count with the LM head tied to wte.
GPT2_SHAPES = {
    "distilgpt2": ((768, 6, 12), 81_912_576),
    "gpt2": ((768, 12, 12), 124_439_808),
    "gpt2-medium": ((1024, 24, 16), 354_823_168),
    "gpt2-large": ((1280, 36, 20), 774_030_080),
    "gpt2-xl": ((1600, 48, 25), 1_557_611_200),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(seed))


def our_logits(model: GPT2, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.logits(model(ids, torch.arange(len(ids)), DenseAttention(1)))  # (T, V)


def reference(path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()


def reference_logits(ref: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return ref(ids[None]).logits[0]  # (T, V)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint) -> GPT2:
    return load_model(tiny_checkpoint)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
@pytest.mark.parametrize("shape", ["tiny", "gpt2-small"])
def test_float32_logits_match_transformers(make_checkpoint, shape, weights):
    path = make_checkpoint(shape=shape, weights=weights)
    ids = random_ids(8)
    ours = our_logits(load_model(path), ids)
    theirs = reference_logits(reference(path), ids)
    assert ours.shape == theirs.shape == (8, 50257)
    assert (ours - theirs).abs().max().item() < FLOAT32_TOL


def test_64_greedy_tokens_with_the_kv_cache_equal_transformers_generate(
        tiny_checkpoint, tiny_model, greedy_decode):
    prompt = random_ids(8, seed=1)
    ref = reference(tiny_checkpoint)
    ref.generation_config.eos_token_id = None  # random weights: never stop early
    ref.generation_config.pad_token_id = 0
    with torch.inference_mode():
        theirs = ref.generate(prompt[None], attention_mask=torch.ones(1, 8, dtype=torch.long),
                              do_sample=False, max_new_tokens=64)[0, 8:].tolist()
    ours = greedy_decode(tiny_model, prompt.tolist(), 64)
    assert len(theirs) == 64
    assert ours == theirs


def test_cached_incremental_logits_equal_a_full_recompute(tiny_model):
    ids = random_ids(20, seed=2)
    full = our_logits(tiny_model, ids)
    attn = DenseAttention(1)
    steps = [(0, 11), (11, 12), (12, 15), (15, 16), (16, 20)]  # prefill, then 1- and n-token steps
    with torch.inference_mode():
        cached = torch.cat([tiny_model.logits(tiny_model(ids[a:b], torch.arange(a, b), attn))
                            for a, b in steps])
    assert attn.length == 20
    assert (cached - full).abs().max().item() < CACHE_TOL


def test_a_batch_of_two_sequences_equals_each_alone(tiny_model, greedy_decode):
    a, b = random_ids(12, seed=3), random_ids(12, seed=4)
    attn = DenseAttention(batch_size=2)
    positions = torch.arange(12).repeat(2)
    with torch.inference_mode():
        prefill = tiny_model.logits(tiny_model(torch.cat([a, b]), positions, attn))  # batch-major
        next_ids = prefill.view(2, 12, -1)[:, -1].argmax(-1)  # (2,)
        step = tiny_model.logits(tiny_model(next_ids, torch.tensor([12, 12]), attn))  # (2, V)
    for i, seq in enumerate((a, b)):
        alone = our_logits(tiny_model, torch.cat([seq, next_ids[i:i + 1]]))
        assert (prefill.view(2, 12, -1)[i] - alone[:12]).abs().max().item() < CACHE_TOL
        assert (step[i] - alone[12]).abs().max().item() < CACHE_TOL


# A half-precision logit carries the rounding of the last few operations before it (the
# final LayerNorm's output and the LM-head dot product, accumulated in float32 on the CPU),
# each a relative error of one epsilon (float16 2**-10, bfloat16 2**-7) of the logit scale;
# the two blocks' errors are damped by that LayerNorm. We measure about 1 epsilon times
# max|logit| for both dtypes; 8 epsilons leaves room for other CPUs' kernels while still
# catching a real fault (a wrong cast or an overflow gives errors of order the logits).
HALF_TOL_EPSILONS = 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_loads_and_runs_on_the_cpu_close_to_float32(tiny_checkpoint, tiny_model, dtype):
    model = load_model(tiny_checkpoint, "cpu", dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    ids = random_ids(16, seed=5)
    half = our_logits(model, ids)
    assert half.dtype == dtype
    full = our_logits(tiny_model, ids)
    tol = HALF_TOL_EPSILONS * torch.finfo(dtype).eps * full.abs().max().item()
    assert (half.float() - full).abs().max().item() < tol


@functools.cache
def meta_model(name: str) -> GPT2:
    (n_embd, n_layer, n_head), _ = GPT2_SHAPES[name]
    with torch.device("meta"):
        return GPT2(ModelConfig(n_embd=n_embd, n_layer=n_layer, n_head=n_head))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", GPT2_SHAPES)
def test_every_gpt2_shape_runs_a_forward_on_the_meta_device(name, dtype):
    n_embd = GPT2_SHAPES[name][0][0]
    model = meta_model(name).to(dtype)  # on meta: no memory, only shapes and dtypes
    with torch.device("meta"):
        ids = torch.zeros(2 * 5, dtype=torch.long)
        hidden = model(ids, torch.arange(5).repeat(2), DenseAttention(batch_size=2))
        logits = model.logits(hidden)
    assert hidden.shape == (10, n_embd) and logits.shape == (10, 50257)
    assert hidden.dtype == logits.dtype == dtype
    assert logits.device.type == "meta"


@pytest.mark.parametrize("name", GPT2_SHAPES)
def test_num_parameters_equals_transformers_count(name):
    (n_embd, n_layer, n_head), published = GPT2_SHAPES[name]
    with torch.device("meta"):
        ref = GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head))
    assert ref.lm_head.weight is ref.transformer.wte.weight  # tied: counted once below
    unique = {id(p): p.numel() for p in ref.parameters()}
    theirs = sum(unique.values())
    assert ModelConfig(n_embd=n_embd, n_layer=n_layer, n_head=n_head).num_parameters() == theirs
    assert sum(p.numel() for p in meta_model(name).parameters()) == theirs == published
