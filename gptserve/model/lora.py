"""LoRA adapters applied at run time: the model's adapter slots, and one step's rows' slots.

An adapter adds a low-rank update to some of the linear layers: y = W x + s * B (A x),
with A (r, in), B (out, r) and s its scaling (alpha / r, or alpha / sqrt(r) with rsLoRA).
It is not merged into W: one batch mixes rows for the base model and for several
adapters, each row taking the update of its own adapter (S-LoRA, Punica).

`LoRAStack` is the model's adapter memory: for every layer and every target
(`TARGETS`, GPT-2's Conv1D layers), `num_slots` slots of A and B at `max_rank`, zeros where
a slot is empty or its adapter leaves that layer alone. Loading an adapter into a slot
copies its weights in (with the scaling folded into B); the engine decides which adapter
sits in which slot (engine/lora.py). `LoRABatch` is what one step passes the model: the
stack and each row's slot (-1: the base model), and `add(layer, target, x, y)` adds the rows'
updates to a linear layer's output in place.

On the CPU with the compiled kernels the update is `lora_add` (csrc/cpu_kernels.cpp), one
matrix-vector product per row with its slot's weights: a row's result never depends on its
batch, and the one-call decode step (cpu_decode.py) runs the same kernel. On a GPU it is
the same per-row product in Triton (triton_lora.py). Elsewhere (no kernels) it is a pair of
matmuls per adapter present in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gptserve.config import ModelConfig
from gptserve.model.cpu_kernels import panel_kernels

# GPT-2's linear layers an adapter may target, by their names under h.N
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def target_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a target layer."""
    c, m = cfg.n_embd, cfg.mlp_dim
    return {"attn.c_attn": (c, 3 * c), "attn.c_proj": (c, c), "mlp.c_fc": (c, m), "mlp.c_proj": (m, c)}[target]


@dataclass
class LoRAWeights:
    """One adapter's weights: for each (layer, target) it updates, A (r, in) and B (out, r)
    float32, B already multiplied by the scaling."""

    rank: int  # the largest r among its layers
    layers: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    def nbytes(self) -> int:
        return sum(a.numel() * 4 + b.numel() * 4 for a, b in self.layers.values())


class LoRASlots:
    """One linear layer's adapter slots: a (S, in, R) holds A transposed, b (S, R, out) B
    transposed (so both products run along contiguous memory), ranks (S,) each slot's r."""

    def __init__(self, num_slots: int, in_features: int, out_features: int, max_rank: int, device: torch.device):
        self.a = torch.zeros(num_slots, in_features, max_rank, device=device)
        self.b = torch.zeros(num_slots, max_rank, out_features, device=device)
        self.ranks = torch.zeros(num_slots, dtype=torch.int64, device=device)

    def load(self, slot: int, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        if weights is None:
            self.ranks[slot] = 0
            return
        a, b = weights  # (r, in), (out, r)
        r = a.shape[0]
        self.a[slot, :, :r].copy_(a.T)
        self.b[slot, :r, :].copy_(b.T)
        self.ranks[slot] = r

    def add(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor) -> None:
        """y[n] += B_s A_s x[n] for each row n with a slot s (slots[n] >= 0); y in place."""
        kernels = panel_kernels()
        if kernels is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            kernels.lora_add(x.contiguous(), y, slots, self.a, self.b, self.ranks)
            return
        if x.device.type == "cuda":
            from gptserve.model.triton_lora import lora_add  # needs triton: only on a GPU

            lora_add(x, y, slots, self.a, self.b)  # a slot's padded rank columns are zeros
            return
        for slot in slots.unique().tolist():
            if slot < 0:
                continue
            rows = (slots == slot).nonzero().squeeze(1)
            r = int(self.ranks[slot])
            update = (x[rows].float() @ self.a[slot, :, :r]) @ self.b[slot, :r, :]
            y.index_add_(0, rows, update.to(y.dtype))

    def nbytes(self) -> int:
        return (self.a.numel() + self.b.numel()) * 4


class LoRAStack:
    """Every layer's adapter slots: `layers[i][target]` is a LoRASlots."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, device: torch.device):
        self.num_slots, self.max_rank = num_slots, max_rank
        self.layers = [{t: LoRASlots(num_slots, *target_shape(cfg, t), max_rank, device) for t in TARGETS}
                       for _ in range(cfg.n_layer)]

    @staticmethod
    def bytes_needed(cfg: ModelConfig, num_slots: int, max_rank: int) -> int:
        """What a stack of these slots holds (A and B, float32), before it is made."""
        per_layer = sum(sum(target_shape(cfg, t)) for t in TARGETS)
        return num_slots * max_rank * per_layer * cfg.n_layer * 4

    def load(self, slot: int, weights: LoRAWeights | None) -> None:
        """Put an adapter's weights in a slot (None: empty it)."""
        for i, targets in enumerate(self.layers):
            for name, slots in targets.items():
                slots.load(slot, None if weights is None else weights.layers.get((i, name)))

    def nbytes(self) -> int:
        return sum(s.nbytes() for targets in self.layers for s in targets.values())


@dataclass
class LoRABatch:
    """A step's adapters: the stack and each row's slot (N,) int64, -1 for the base model."""

    stack: LoRAStack
    slots: torch.Tensor

    def add(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.stack.layers[layer][target].add(x, y, self.slots)
        return y
