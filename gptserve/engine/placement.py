"""Where the weights and the KV pool live, in what dtype, and how big the pool is."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from gptserve.model.cpu_kernels import few_rows_linear

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16}
CPU_DEFAULT_KV_BYTES = 2 * 1024**3


class PlacementError(ValueError):
    pass


def resolve_device(device: str) -> torch.device:
    """auto: the first CUDA GPU, else Apple's MPS, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise PlacementError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlacementError(f"--device {device} asked for, but no CUDA GPU is available")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise PlacementError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) present")
        if dev.index is None:
            dev = torch.device("cuda:0")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PlacementError("--device mps asked for, but MPS is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on GPUs that support it, else float16; float32 on the CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise PlacementError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    return DTYPES[dtype]


@dataclass(frozen=True)
class Precision:
    """How a model computes and holds its weights. `compute`: activations, layer norms,
    attention and the KV cache; `weights`: the linear layers and the LM head."""

    compute: torch.dtype
    weights: str  # "float32", "bfloat16", "float16" or "int8"

    def __str__(self) -> str:
        name = str(self.compute).removeprefix("torch.")
        return name if self.weights == name else f"{self.weights} weights, {name} compute"


def resolve_precision(dtype: str, quantization: str | None, device: torch.device) -> Precision:
    """On the CPU, 16-bit dtypes and int8 quantization change only how the linear layers
    hold their weights (model/compact_linear.py): the math stays float32, which CPUs
    without 16-bit dot products do fastest. `auto` on the CPU is bfloat16 weights where
    the compiled few-rows kernel runs: measured faster than float32 at every concurrency
    (1.7-1.9x at one to four streams, 1.07-1.13x at 16 and 64; BENCHMARKS.md) and within
    the tested bfloat16 tolerance; float32 where the kernel can't be had. Elsewhere the
    whole model runs in the dtype, and quantization is not offered."""
    if quantization not in (None, "int8"):
        raise PlacementError(f"unknown quantization {quantization!r}: use int8")
    compute = resolve_dtype(dtype, device)
    if device.type != "cpu":
        if quantization is not None:
            raise PlacementError(f"--quantization {quantization} runs on the CPU only")
        return Precision(compute, str(compute).removeprefix("torch."))
    if quantization == "int8":
        if compute != torch.float32:
            raise PlacementError("--quantization int8 holds int8 weights and computes in float32; "
                                 f"drop --dtype {dtype}")
        return Precision(torch.float32, "int8")
    if dtype == "auto":  # the kernel is compiled (or its cached build loaded) on first use
        return Precision(torch.float32, "bfloat16" if few_rows_linear() is not None else "float32")
    return Precision(torch.float32, str(compute).removeprefix("torch."))


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1.5G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise PlacementError(f"cannot read {text!r} as a size; write e.g. 2GiB or 512MB")
    value, unit = float(m.group(1)), m.group(2).upper()
    return int(value * 1024 ** "_KMGT".index(unit)) if unit else int(value)


def kv_cache_bytes(device: torch.device, requested: int | None, utilization: float,
                   weights_bytes: int) -> int:
    """Bytes for the KV pool: as asked, else a share of free GPU memory, else a CPU default."""
    if requested is not None:
        return requested
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free
        budget = int(total * utilization) - used_by_others - weights_bytes // 4  # activations headroom
        if budget <= 0:
            raise PlacementError("no GPU memory left for the KV cache; lower the model size or raise "
                                 "--gpu-memory-utilization")
        return budget
    return CPU_DEFAULT_KV_BYTES
