"""The rows' low-rank updates (model/lora.py): the compiled `lora_add` against a plain
PyTorch computation, each row independent of its batch, and the PyTorch path where the
kernels are absent."""
from __future__ import annotations

import pytest
import torch

from gptserve.config import ModelConfig
from gptserve.model.cpu_kernels import panel_kernels
from gptserve.model.lora import LoRASlots, LoRAStack, LoRAWeights

needs_kernels = pytest.mark.skipif(panel_kernels() is None, reason="the CPU kernels are not built here")


def filled_slots(in_features=48, out_features=80, num_slots=3, max_rank=8, ranks=(8, 3, 0), seed=0) -> LoRASlots:
    g = torch.Generator().manual_seed(seed)
    slots = LoRASlots(num_slots, in_features, out_features, max_rank, torch.device("cpu"))
    for s, r in enumerate(ranks):
        weights = (torch.randn(r, in_features, generator=g), torch.randn(out_features, r, generator=g)) if r else None
        slots.load(s, weights)
    return slots


def reference(slots: LoRASlots, x: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    """y[n] = B_s A_s x[n] in float64, row by row."""
    out = torch.zeros(x.shape[0], slots.b.shape[2], dtype=torch.float64)
    for n, s in enumerate(row_slots):
        if s >= 0:
            r = int(slots.ranks[s])
            out[n] = (x[n].double() @ slots.a[s, :, :r].double()) @ slots.b[s, :r].double()
    return out


@needs_kernels
def test_lora_add_equals_the_low_rank_products():
    slots = filled_slots()
    row_slots = [0, -1, 1, 2, 0, 1, -1]
    x = torch.randn(len(row_slots), 48)
    y = torch.randn(len(row_slots), 80)
    base = y.clone()
    slots.add(x, y, torch.tensor(row_slots))
    torch.testing.assert_close((y - base).double(), reference(slots, x, row_slots), atol=1e-4, rtol=1e-5)
    for n, s in enumerate(row_slots):
        if s < 0 or int(slots.ranks[s]) == 0:
            assert torch.equal(y[n], base[n])  # no adapter, or one that leaves this layer alone


@needs_kernels
def test_a_row_gets_the_same_bits_in_any_batch():
    slots = filled_slots()
    row_slots = torch.tensor([1, 0, 0, -1, 1, 0, 1, 0, 1, 1, 0])
    x, y = torch.randn(len(row_slots), 48), torch.randn(len(row_slots), 80)
    together = y.clone()
    slots.add(x, together, row_slots)
    for n in range(len(row_slots)):
        alone = y[n:n + 1].clone()
        slots.add(x[n:n + 1], alone, row_slots[n:n + 1])
        assert torch.equal(alone[0], together[n])


def test_the_pytorch_path_computes_the_same_update(monkeypatch):
    slots = filled_slots()
    row_slots = [2, 0, 1, -1, 0]
    x, y = torch.randn(len(row_slots), 48), torch.zeros(len(row_slots), 80)
    monkeypatch.setattr("gptserve.model.lora.panel_kernels", lambda: None)
    slots.add(x, y, torch.tensor(row_slots))
    torch.testing.assert_close(y.double(), reference(slots, x, row_slots), atol=1e-4, rtol=1e-5)


def test_a_stack_loads_each_layer_and_target_of_an_adapter_and_empties_a_slot():
    cfg = ModelConfig(vocab_size=100, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    stack = LoRAStack(cfg, num_slots=2, max_rank=4, device=torch.device("cpu"))
    a, b = torch.randn(3, 16), torch.randn(64, 3)
    stack.load(1, LoRAWeights(3, {(1, "mlp.c_fc"): (a, b)}))
    loaded = stack.layers[1]["mlp.c_fc"]
    assert torch.equal(loaded.a[1, :, :3], a.T) and torch.equal(loaded.b[1, :3], b.T) and int(loaded.ranks[1]) == 3
    assert int(stack.layers[0]["mlp.c_fc"].ranks[1]) == 0 and int(stack.layers[1]["attn.c_attn"].ranks[1]) == 0
    stack.load(1, None)
    assert int(loaded.ranks[1]) == 0 and not loaded.a.any() and not loaded.b.any()
