"""The Triton decode kernel's cases, run in a process of their own by test_triton_attention.py.

Triton's interpreter (TRITON_INTERPRET=1) must be on before triton is first imported, and
in a test session something else may import triton first; so without a GPU the cases run
in a child process: `python -m tests.model.triton_cases` prints each case's result as JSON.
With a GPU the tests call `run` directly and the kernel runs compiled.
"""
from __future__ import annotations

import json
import os
import sys

import torch

CASES = {  # id: (context lengths (0: a padding row), dtype, block size, head dim, scale)
    **{f"{'-'.join(map(str, lens))}-{dtype}": (lens, dtype, 16, 64, 0.125)
       for lens in ([1], [16], [17], [7, 33, 48, 5], [31, 32, 1, 64, 65])
       for dtype in ("float32", "float16", "bfloat16")},
    "padding-rows-float32": ([9, 0, 40, 0], "float32", 16, 64, 0.125),
    "padding-rows-bfloat16": ([9, 0, 40, 0], "bfloat16", 16, 64, 0.125),
    "block-size-12-head-dim-80": ([1, 12, 13, 50], "float32", 12, 80, 0.3),
}


def decode_batch(lens: list[int], dtype: torch.dtype, block_size: int, head_dim: int, device: torch.device,
                 heads: int = 4, seed: int = 0):
    """A pool with random K/V, one decode row per entry of `lens` (0: a padding row whose table
    is all the scratch block), and the step's new q/k/v; tables are shuffled, padded with 0."""
    from gptserve.model.attention import KVPool, PagedMetadata

    g = torch.Generator().manual_seed(seed)
    width = max(1, max(-(-n // block_size) for n in lens))
    num_blocks = len(lens) * width + 3
    pool = KVPool(1, num_blocks, block_size, heads, head_dim, dtype, device)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=g).to(dtype))
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lens), width, dtype=torch.long)
    slots = []
    for i, n in enumerate(lens):
        used = -(-n // block_size)
        tables[i, :used] = order[i * width:i * width + used]
        if n == 0:
            tables[i] = pool.scratch_block
        last = max(n - 1, 0)
        slots.append(int(tables[i, last // block_size]) * block_size + last % block_size)
    q, k, v = (torch.randn(len(lens), heads, head_dim, generator=g).to(dtype).to(device) for _ in range(3))
    meta = PagedMetadata(slot_mapping=torch.tensor(slots, device=device), num_decode=len(lens),
                         decode_block_tables=tables.to(device), decode_context_lens=torch.tensor(lens, device=device),
                         decode_max_blocks=width)
    return pool, meta, q, k, v


def run(case: str, device: torch.device) -> dict:
    """The kernel against PagedAttention's PyTorch path (gather + SDPA; no C++ or Triton
    kernel), which also writes the step's K/V. Padding rows are left out of the reference
    (it has no answer for an empty row): the kernel must give them zeros."""
    from gptserve.model import attention
    from gptserve.model.attention import PagedAttention, PagedMetadata
    from gptserve.model.triton_attention import paged_decode_attention

    lens, dtype_name, block_size, head_dim, scale = CASES[case]
    dtype = getattr(torch, dtype_name)
    pool, meta, q, k, v = decode_batch(lens, dtype, block_size, head_dim, device)
    real = [i for i, n in enumerate(lens) if n]
    alone = PagedMetadata(meta.slot_mapping[real], len(real), meta.decode_block_tables[real],
                          meta.decode_context_lens[real], meta.decode_max_blocks)
    kernels = attention.paged_decode, attention.gpu_paged_decode
    attention.paged_decode = attention.gpu_paged_decode = lambda: None
    try:
        want = PagedAttention(pool, alone)(0, q[real], k[real], v[real], scale)
    finally:
        attention.paged_decode, attention.gpu_paged_decode = kernels
    k_cache, v_cache = pool.kv[0]
    got = paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale)
    padding = [i for i, n in enumerate(lens) if not n]
    return {"dtype": str(got.dtype).removeprefix("torch."), "shape": list(got.shape),
            "max_err": (got[real].float() - want.float()).abs().max().item(),
            "padding_rows_zero": not got[padding].any().item() if padding else None}


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    json.dump({case: run(case, torch.device("cpu")) for case in CASES}, sys.stdout)
