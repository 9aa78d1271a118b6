"""Linear layers with weights reordered once for oneDNN: float32 on the CPU.

A decode step's matmuls have one row per running sequence, so on a CPU they are
small-batch and bound by streaming the weights. On a plain row-major weight PyTorch's
default (MKL sgemm) streams them slowly at those sizes; oneDNN, given a weight it has
reordered once into its own blocked layout, does the same math 1.4-2.3x faster from 1
to 32 rows and still 1.2x at 128 (`python bench/linear.py`, GPT-2 small's 48 layers,
2 threads, AMD EPYC; BENCHMARKS.md). From ~256 rows (prefill chunks) the two are within
~10% either way.

`pack_for_cpu(model)` swaps every nn.Linear for a PackedLinear holding only the packed
weight (no second copy), and gives the tied LM head its own packed copy of the token
embedding (the embedding lookup still needs the plain table: +vocab x n_embd floats,
154 MB for GPT-2 small). The LM head only ever sees the rows being sampled, where the
packed head is 1.2-3.8x faster at every size measured.

oneDNN keeps buffers for every input row count it has been given, shared by all layers
and never freed (~1 MB per row count for GPT-2 small at decode sizes, ~10 MB at a few
hundred rows): fed every row count a serving engine's steps produce, 1 to 2048, a process
grew by gigabytes. So inputs are padded to a few row counts (`padded_rows`: powers of two
up to 128, then multiples of 128), which bounds that memory (~250 MB for GPT-2 small) and
costs little: up to 128 rows a matmul is bound by reading the weight, not by its rows.

PyTorch's oneDNN linear ops (the ones torch.compile's CPU backend uses) are
`torch.ops.mkldnn`; where they are missing, or GPTSERVE_NO_KERNELS=1 is set, nothing is
packed and nn.Linear runs as before.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from gptserve.model.cpu_kernels import kernels_enabled

log = logging.getLogger(__name__)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def padded_rows(n: int) -> int:
    """The row count oneDNN sees for n rows: a power of two up to 128, then a multiple of 128."""
    if n <= 128:
        return 1 << max(0, n - 1).bit_length()
    return -(-n // 128) * 128


class PackedLinear(nn.Module):
    """y = x @ weight.T + bias, with the weight held in oneDNN's layout (x: (N, in))."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = _pack(weight)  # an opaque oneDNN tensor: not a parameter, never moved
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == 0:  # nothing to multiply: oneDNN is not asked
            return x.new_empty(0, self.out_features)
        rows = padded_rows(n)
        if rows != n:
            x = torch.cat([x, x.new_zeros(rows - n, x.shape[1])])
        return _linear(x.contiguous(), self.packed, self.bias)[:n]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype != torch.float32:
        return False
    if not kernels_enabled():
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_for_cpu(model: nn.Module) -> bool:
    """Pack `model`'s linear layers and LM head in place; False (and nothing changed)
    where packing doesn't apply. Call once, after the weights are loaded."""
    first = next(model.parameters())
    if not can_pack(first.device, first.dtype):
        return False
    try:
        probe = PackedLinear(torch.zeros(2, 2))
        probe(torch.ones(1, 2))
    except Exception as e:  # noqa: BLE001 - an unusual build: the plain path still works
        log.warning("oneDNN packed linear layers unavailable (%s); using nn.Linear", str(e)[:200])
        return False
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, PackedLinear(child.weight, child.bias))
        model.lm_head = PackedLinear(model.wte.weight)
    return True
