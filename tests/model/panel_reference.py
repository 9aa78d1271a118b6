"""What the panel kernels compute, for tests: the widening variants, a float32 matmul of the
widened weight; the dot-product variants (avx512_dot, scalar_dot), that matmul on activations
rounded to the weights' format first. And a way to run a test under a chosen variant."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from gptserve.model.cpu_kernels import panel_kernels
from gptserve.model.panel_linear import PanelLinear

DOT_GROUP = {"bfloat16": 2, "int8": 4}  # K a multiple of this takes the dot path


@contextlib.contextmanager
def kernel_variant(name: str):
    """The panel kernels' instruction-set variant `name` for the duration (skips the test where
    this CPU cannot run it)."""
    kernels = panel_kernels()
    if name not in kernels.variants():
        pytest.skip(f"this CPU cannot run the {name} kernels (it runs {', '.join(kernels.variants())})")
    in_use = kernels.simd()
    kernels.use_variant(name)
    try:
        yield
    finally:
        kernels.use_variant(in_use)


def best_variant(dot: bool) -> str:
    """The fastest variant this CPU runs of the widening kind, or of the dot-product kind (at
    worst scalar_dot, which runs on any CPU)."""
    return next(v for v in panel_kernels().variants() if v.endswith("_dot") == dot)


def uses_dot_products(layer: PanelLinear) -> bool:
    """Whether the kernel in use multiplies this layer with dot products (rounding the activations)."""
    kernels = panel_kernels()
    group = DOT_GROUP.get(layer.fmt)
    return (kernels is not None and layer._kernels is not None and kernels.simd().endswith("_dot")
            and group is not None and layer.in_features % group == 0)


def widened_matmul(layer: PanelLinear, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ layer.widened_weight().double().T
    return (y if layer.bias is None else y + layer.bias.double()).float()


def dot_reference(layer: PanelLinear, x: torch.Tensor) -> torch.Tensor:
    """What the dot-product variants compute: the activations rounded to the weights' format
    (bfloat16; or int8 with one scale, the block's largest |x| / 127, per 32 values of a row),
    times the widened weight, in float64."""
    if layer.fmt == "bfloat16":
        rounded = x.bfloat16().float()
    else:
        padded = F.pad(x, (0, -x.shape[1] % 32)).view(x.shape[0], (x.shape[1] + 31) // 32, 32)
        amax = padded.abs().amax(-1, keepdim=True)
        q = (padded * torch.where(amax > 0, 127.0 / amax, 0.0)).round().clamp(-127, 127)
        rounded = (q * (amax / 127.0)).flatten(1)[:, :x.shape[1]]
    y = rounded.double() @ layer.widened_weight().double().T
    return (y if layer.bias is None else y + layer.bias.double()).float()


def kernel_reference(layer: PanelLinear, x: torch.Tensor) -> torch.Tensor:
    """What `layer(x)` computes under the variant in use."""
    return dot_reference(layer, x) if uses_dot_products(layer) else widened_matmul(layer, x)
