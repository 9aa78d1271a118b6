"""Linear layers holding their weights in 16 or 8 bits on the CPU, with float32 math.

At low concurrency a CPU decode step reads every weight once to make a few rows of
output: its time is the weights' bytes over the memory's bandwidth. Held in bfloat16 or
float16 the weights are half the bytes of float32; as int8, with one float32 scale per
output channel (symmetric, absmax / 127, quantized at load from the float checkpoint), a
quarter. `compact_for_cpu(model, fmt)` swaps every nn.Linear, and the tied LM head (a
copy of the token embedding in the same format; the lookup keeps the float32 table), for
a CompactLinear. Activations, layer norms, attention and the KV cache stay float32:
CPUs without 16-bit or 8-bit dot-product instructions (AVX2 ones) compute no faster in
those formats, and float32 keeps the error to the rounding of the weights alone.

Up to FEW_ROWS rows the compiled kernel (cpu_kernels.few_rows_linear) widens each weight
in registers. More rows (prefill, and decode at higher concurrency) are compute-bound, and
there a CPU without 16-bit or 8-bit dot products gains nothing from small weights: those
rows go through oneDNN on a float32 copy of the widened weights, packed once
(packed_linear.py), as fast as the float32 model. The numbers multiplied are the same on
both paths (the weights as rounded to the format), so a request's results do not depend
on which path its batch took beyond float32 rounding. The price is memory: the compact
weights plus a float32 copy, 1.25x (int8) or 1.5x (16-bit) the float32 model's linear
layers. Where oneDNN is missing, the weight is widened a chunk at a time for each matmul.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from gptserve.model.cpu_kernels import FEW_ROWS, few_rows_linear
from gptserve.model.packed_linear import PackedLinear, can_pack

log = logging.getLogger(__name__)

WEIGHT_FORMATS = {"bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
CHUNK = 4096  # output channels widened at a time on the many-rows path (12 MB for GPT-2's 768 inputs)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q, scale) with weight ~= q * scale[:, None]."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class CompactLinear(nn.Module):
    """y = x @ W.T + b for float32 x (N, in), W held as `fmt` (see WEIGHT_FORMATS)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str):
        super().__init__()
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}: use one of {', '.join(WEIGHT_FORMATS)}")
        self.fmt = fmt
        self.out_features, self.in_features = weight.shape
        if fmt == "int8":
            q, scale = quantize_int8(weight)
        else:
            q, scale = weight.detach().to(WEIGHT_FORMATS[fmt]).contiguous(), None
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._kernel = few_rows_linear()
        # many rows: oneDNN on the widened weights (None where it can't be had)
        packable = can_pack(weight.device, torch.float32)
        self.many_rows = PackedLinear(self.widened_weight(), self.bias) if packable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows == 0:  # a step with no row to project (the kernel takes 1 to FEW_ROWS)
            return x.new_empty(0, self.out_features)
        if rows <= FEW_ROWS and self._kernel is not None:
            return self._kernel(x, self.weight, self.scale, self.bias)
        if self.many_rows is not None:
            return self.many_rows(x)
        return self._widened_matmul(x)

    def _widened_matmul(self, x: torch.Tensor) -> torch.Tensor:
        pieces = [x @ self.weight[o:o + CHUNK].float().T for o in range(0, self.out_features, CHUNK)]
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        if self.scale is not None:
            y = y * self.scale
        return y if self.bias is None else y + self.bias

    def widened_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32 (for tests and error measurements)."""
        w = self.weight.float()
        return w if self.scale is None else w * self.scale[:, None]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weights={self.fmt}")


def compact_for_cpu(model: nn.Module, fmt: str) -> None:
    """Every linear layer of `model`, and its LM head, held as `fmt`; call once, after the
    float32 weights are loaded. The float32 copies are freed."""
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, CompactLinear(child.weight, child.bias, fmt))
        model.lm_head = CompactLinear(model.wte.weight, None, fmt)
    if few_rows_linear() is None:
        log.warning("the CPU kernels are unavailable: %s weights are widened for every matmul (slow)", fmt)
