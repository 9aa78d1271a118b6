"""oneDNN-packed linear layers (float32 on the CPU) compute what nn.Linear computes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gptserve.model.packed_linear import PackedLinear, pack_for_cpu
from gptserve.weights.loader import load_model
from tests.model.test_parity import FLOAT32_TOL, our_logits, random_ids, reference, reference_logits


def linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]


@pytest.mark.parametrize("rows", [1, 3, 17, 300])
def test_a_packed_layer_equals_nn_linear(rows):
    g = torch.Generator().manual_seed(rows)
    layer = nn.Linear(96, 200)
    x = torch.randn(rows, 96, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(layer.weight, layer.bias)(x), layer(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(PackedLinear(layer.weight)(x), x @ layer.weight.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", ["tiny", "gpt2-small"])
def test_a_packed_model_matches_transformers_and_the_plain_model(make_checkpoint, shape):
    path = make_checkpoint(shape=shape)
    ids = random_ids(8, seed=3)
    plain = our_logits(load_model(path), ids)
    model = load_model(path)
    assert pack_for_cpu(model)
    assert all(isinstance(m, PackedLinear) for m in linears(model))
    assert isinstance(model.lm_head, PackedLinear)
    packed = our_logits(model, ids)
    assert (packed - plain).abs().max().item() < 1e-5
    assert (packed - reference_logits(reference(path), ids)).abs().max().item() < FLOAT32_TOL


def test_packed_greedy_tokens_equal_the_plain_models(tiny_checkpoint, greedy_decode):
    prompt = random_ids(12, seed=4).tolist()
    model = load_model(tiny_checkpoint)
    want = greedy_decode(model, prompt, 48)
    assert pack_for_cpu(model)
    assert greedy_decode(model, prompt, 48) == want


def test_nothing_is_packed_in_half_precision_or_when_kernels_are_off(tiny_checkpoint, monkeypatch):
    half = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert not pack_for_cpu(half)
    assert all(isinstance(m, nn.Linear) for m in linears(half)) and half.lm_head is None
    monkeypatch.setenv("GPTSERVE_NO_KERNELS", "1")
    plain = load_model(tiny_checkpoint)
    assert not pack_for_cpu(plain)
    assert all(isinstance(m, nn.Linear) for m in linears(plain)) and plain.lm_head is None


def test_inputs_are_padded_to_few_row_counts_and_the_answer_is_unchanged():
    """oneDNN keeps buffers per row count it has seen: the engine's 1..2048 rows become few."""
    from gptserve.model.packed_linear import PackedLinear, padded_rows

    counts = {padded_rows(n) for n in range(1, 2049)}
    assert len(counts) == 23 and all(padded_rows(n) >= n for n in range(1, 2049))
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    packed = PackedLinear(weight, bias)
    for n in (1, 3, 5, 31, 33, 127, 129, 300):
        x = torch.randn(n, 32)
        with torch.inference_mode():
            got = packed(x)
        assert got.shape == (n, 48)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias), rtol=1e-4, atol=1e-4)
