"""The Triton LoRA kernel (model/triton_lora.py) against the low-rank products, each row
alone; without a GPU under Triton's interpreter, in a process of its own (as
tests/model/triton_cases.py says why); and compiled for real GPU targets, which needs none."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is a test dependency (pip install triton)")

ROOT = Path(__file__).resolve().parents[2]

CASE = """
import json, torch
from gptserve.model.lora import LoRASlots
from gptserve.model.triton_lora import lora_add

g = torch.Generator().manual_seed(0)
slots = LoRASlots(3, 48, 200, 8, torch.device("cpu"))
for s, r in enumerate((8, 3, 0)):
    slots.load(s, (torch.randn(r, 48, generator=g), torch.randn(200, r, generator=g)) if r else None)
rows = [0, -1, 1, 2, 0, 1, -1]
x, y = torch.randn(len(rows), 48, generator=g), torch.randn(len(rows), 200, generator=g)
base, together = y.clone(), y.clone()
lora_add(x, together, torch.tensor(rows), slots.a, slots.b)
ref = base.double()
for n, s in enumerate(rows):
    if s >= 0:
        r = int(slots.ranks[s])
        ref[n] += (x[n].double() @ slots.a[s, :, :r].double()) @ slots.b[s, :r].double()
alone = []
for n in range(len(rows)):
    one = base[n:n + 1].clone()
    lora_add(x[n:n + 1], one, torch.tensor(rows[n:n + 1]), slots.a, slots.b)
    alone.append(bool(torch.equal(one[0], together[n])))
print(json.dumps({"max_err": float((together.double() - ref).abs().max()), "alone": alone,
                  "untouched": [bool(torch.equal(together[n], base[n])) for n, s in enumerate(rows) if s < 0]}))
"""


def test_the_kernel_adds_each_rows_update_and_a_row_is_the_same_alone():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CASE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["max_err"] < 1e-4
    assert all(result["alone"]) and all(result["untouched"])


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from gptserve.model import triton_lora

for kernel, constants in ((triton_lora._shrink, {"BLOCK_K": 64, "BLOCK_R": 16}),
                          (triton_lora._expand, {"BLOCK_R": 16, "BLOCK_O": 128})):
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name == "slots_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "i32"
    index = {(kernel.arg_names.index(n),): v for n, v in constants.items()}
    compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=index),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]
    print("cubin", len(compiled.asm["cubin"]))
"""


def test_the_kernels_compile_for_a_real_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("cubin") == 2
