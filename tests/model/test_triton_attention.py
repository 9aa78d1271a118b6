"""The Triton paged decode kernel equals PagedAttention's PyTorch path (gather + SDPA).

Without a GPU the kernel runs on the CPU under Triton's interpreter, in a process of its
own (tests/model/triton_cases.py says why); with one it runs compiled on it. It is also
compiled for real GPU targets here, which needs no GPU: only triton's own compiler.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.model.triton_cases import CASES, run

pytest.importorskip("triton", reason="triton is a test dependency (pip install triton)")

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


@pytest.fixture(scope="module")
def results() -> dict:
    if torch.cuda.is_available():
        return {case: run(case, torch.device("cuda")) for case in CASES}
    done = subprocess.run([sys.executable, "-m", "tests.model.triton_cases"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("padding")])
def test_kernel_equals_the_pytorch_path(case, results):
    lens, dtype, *_ = CASES[case]
    r = results[case]
    assert r["dtype"] == dtype and r["shape"][0] == len(lens)
    assert r["max_err"] <= TOLERANCE[dtype]


@pytest.mark.parametrize("case", ["padding-rows-float32", "padding-rows-bfloat16"])
def test_padding_rows_of_context_length_zero_give_zeros_and_leave_the_others_alone(case, results):
    r = results[case]
    assert r["padding_rows_zero"] is True
    assert r["max_err"] <= TOLERANCE[CASES[case][1]]


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from gptserve.model.triton_attention import TOKENS_PER_TILE, _paged_decode_kernel as kernel

constants = {"BLOCK_SIZE": 16, "HEAD_DIM": 64, "BLOCK_D": 64, "TILE": TOKENS_PER_TILE}
for arch in (80, 90):
    for ty in ("fp32", "fp16", "bf16"):
        signature = {}
        for name in kernel.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            elif name in ("tables_ptr", "lens_ptr"):
                signature[name] = "*i64"
            elif name.endswith("_ptr"):
                signature[name] = "*" + ty
            else:
                signature[name] = "fp32" if name == "scale" else "i32"
        index = {(kernel.arg_names.index(n),): v for n, v in constants.items()}
        compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=index),
                                  target=GPUTarget("cuda", arch, 32))
        assert compiled.asm["cubin"], (arch, ty)
        print("sm_%d %s: %d bytes of cubin" % (arch, ty, len(compiled.asm["cubin"])))
"""


def test_the_kernel_compiles_for_real_gpus_in_every_dtype(tmp_path):
    """Triton's compiler, ptxas included, runs without a GPU: the kernel the interpreter checked
    also compiles, for A100 (sm_80) and H100/H200 (sm_90)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("cubin") == 6
