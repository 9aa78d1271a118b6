"""CPU kernels, compiled on first use: paged decode attention, the greedy argmax, and
linear layers with weights in 32, 16 or 8 bits, and a whole decode step in one call.

Decode attention on the CPU is bound by memory traffic: each new token reads its
sequence's whole K/V. Done with PyTorch ops it must first gather the sequence's blocks
into one tensor (index_select), which reads and writes all of it once more before
attention reads it again: at 64 sequences of ~400 tokens that gather was 60% of a GPT-2
small step. This kernel reads K/V straight from the pool through the block table, once.

Greedy sampling takes each row's argmax over the vocabulary; torch.argmax scans a row
one element at a time (3.3 ms for 64 x 50,257 logits here, ~1.5% of that decode step),
where a max pass the compiler vectorises, then a search for its first index, takes a
fraction of that. Same answer as torch.argmax, NaN rows included.

Linear layers read their weights in the format they are held in (float32, bfloat16,
float16 or int8 with a scale per output channel) from panels of 16 output channels
(`panel_linear`; panel_linear.py says why), widen them to float32 and do float32 math with
fused multiply-adds, in an order that does not depend on the number of rows. The tied
embedding's lookup reads the LM head's panels (`panel_rows`). The inner loops come in
variants, one picked at start by what the CPU has (cpuid). `avx512` (AVX-512F), `avx2`
(AVX2 + FMA + F16C) and `scalar` (a plain loop) widen every weight to float32 and sum in the
same order with fused multiply-adds, so they give the same bits. `avx512_dot` (AVX-512 with
BF16, VNNI and VBMI) multiplies bfloat16 weights by activations rounded to bfloat16
(vdpbf16ps) and int8 weights by activations quantized to int8, one scale per 32 values of a
row (vpdpbusd); `scalar_dot` is its reference, the same bits on any CPU. `simd()` names the
one in use (the start-up log and `gptserve info` show it), `variants()` those this CPU runs,
best first; GPTSERVE_CPU_KERNELS=avx512 (or avx2, scalar, ...) picks another. `DecodeStack`
runs a whole decode step (cpu_decode.py).

The C++ is csrc/cpu_kernels.cpp beside this file (one translation unit, so torch's headers
are compiled once), built with torch.utils.cpp_extension.load, so compiler errors name its
lines (a failed build's warning quotes the first). A C++ compiler and ninja are needed. The build is cached per machine for the sources
at one path: loading them from elsewhere (another checkout, an installed copy) rebuilds it.
Where they can't be built, or GPTSERVE_NO_KERNELS=1 is set, `paged_decode()`, `row_argmax()`
and `panel_kernels()` are None and the PyTorch path is used. Attention and argmax are
float32 only. All release the GIL while they run, so other Python threads (the server's event
loop) keep going meanwhile.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / "cpu_kernels.cpp"]
# a new name for each change of the bindings or of how they are built, so that an old cached
# build isn't loaded
EXTENSION = "gptserve_cpu_kernels_v12"
# torch's build lock; a build takes a minute at most, so an older lock was left by a build
# that was killed, and would make every later start wait for it forever
STALE_LOCK_S = 600

PagedDecode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                       torch.Tensor]
RowArgmax = Callable[[torch.Tensor], torch.Tensor]


PANEL = 16  # output channels per panel of a linear layer's weight
FEW_ROWS = 4  # up to this many rows a linear layer widens its weights in registers, past it in a buffer


def panel_kernels() -> ModuleType | None:
    """The compiled module's linear-layer kernels (`panel_linear`, `panel_rows`, `simd`), or None
    where they can't be had."""
    return _module()


def cpu_kernel_variant() -> str:
    """Which vector code the linear-layer kernels run on this CPU ("avx512_dot", "avx512",
    "avx2", "scalar" or "scalar_dot"), or why there are none."""
    module = _module()
    if module is None:
        return "none (disabled by GPTSERVE_NO_KERNELS)" if not kernels_enabled() else "none (no build)"
    return module.simd()


def kernels_enabled() -> bool:
    """False when GPTSERVE_NO_KERNELS is set: no compiled kernels, no packed layers."""
    return os.environ.get("GPTSERVE_NO_KERNELS", "") in ("", "0")


def paged_decode() -> PagedDecode | None:
    """The compiled attention kernel, or None where it can't be had (then use the PyTorch path)."""
    module = _module()
    return None if module is None else module.paged_decode


def row_argmax() -> RowArgmax | None:
    """The compiled greedy argmax, or None where it can't be had (then use torch.argmax)."""
    module = _module()
    return None if module is None else module.row_argmax


@functools.cache
def _module() -> ModuleType | None:
    if not kernels_enabled():
        return None
    try:
        return _build()
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja: the PyTorch path still works
        log.warning("CPU kernels unavailable (%s); using the PyTorch path", _reason(e))
        return None


def _build() -> ModuleType:
    """Compiles SOURCES, or loads this machine's cached build of them."""
    from torch.utils.cpp_extension import load

    return load(name=EXTENSION, sources=[str(p) for p in SOURCES],
                extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
                extra_ldflags=["-fopenmp"], build_directory=str(_build_directory()), verbose=False)


def _build_directory() -> Path:
    """This checkout's build folder under torch's extensions root: `load` rebuilds when the
    sources' path changes, so two checkouts (or an installed copy and a source tree) each
    keep a build of their own instead of replacing each other's."""
    from torch.utils.cpp_extension import get_default_build_root

    tag = hashlib.sha256(str(SOURCES[0].resolve()).encode()).hexdigest()[:10]
    folder = Path(get_default_build_root()) / f"{EXTENSION}_py{sys.version_info[0]}{sys.version_info[1]}_{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        log.warning("removing %s, left by a kernel build that did not finish", lock)
        lock.unlink(missing_ok=True)
    return folder


def _reason(e: Exception) -> str:
    """Why the build failed, in a line: the compiler's first error (file:line:column: error: ...)
    where there is one (a failed compile's message starts with the whole compile command), else
    the message's start."""
    errors = [line for line in str(e).splitlines() if "error:" in line]
    return (errors[0] if errors else str(e))[:200]
