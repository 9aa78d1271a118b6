"""Paged decode attention for the GPU, in Triton: one query token per sequence attends to
its K/V where they lie in the pool, read through its block table, with no gather.

Why a kernel: the PyTorch path gathers each row's blocks into a padded (B, S, H, D) copy
before one SDPA call, and inside a CUDA graph S must cover max_model_len, so every decode
step copied the whole possible context of every row (for gpt2-xl at 256 sequences, about
0.8 GB per layer call). Here each program reads only its own row's blocks, up to that row's
context length, which the kernel reads from a tensor, so one compiled kernel serves any
batch in a captured graph: fixed shapes (padded batch, block tables padded to a bound),
variable lengths. A row of context length 0 (padding) reads nothing and writes zeros.

Softmax is the online (streaming) one, in float32 whatever the cache's dtype (float16,
bfloat16, float32). Importing this module needs triton; gptserve.model.attention imports
it lazily, so the package works without it. Tests run it on the CPU under Triton's
interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKENS_PER_TILE = 32  # keys scored per loop step; any block size works (tokens are addressed one by one)


@triton.jit
def _paged_decode_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, scale,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_tb,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
):
    row = tl.program_id(0)  # one (sequence, head) per program
    head = tl.program_id(1)
    ctx = tl.load(lens_ptr + row)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + row * stride_qb + head * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
    t = tl.arange(0, TILE)
    m = tl.max(tl.full([TILE], float("-inf"), tl.float32), axis=0)  # running max of the scores
    l = tl.sum(tl.zeros([TILE], tl.float32), axis=0)  # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, ctx, TILE):
        pos = start + t  # (TILE,) token positions in the sequence
        ok = pos < ctx
        block = tl.load(tables_ptr + row * stride_tb + pos // BLOCK_SIZE, mask=ok, other=0)
        slot = pos % BLOCK_SIZE
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_kt + head * stride_kh + d[None, :],
                    mask=kv_ok, other=0.0).to(tl.float32)  # (TILE, BLOCK_D)
        s = tl.where(ok, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))  # (TILE,)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vt + head * stride_vh + d[None, :],
                    mask=kv_ok, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    y = acc / tl.where(l > 0, l, 1.0)  # l == 0 only for an empty row: acc is 0, so is y
    tl.store(out_ptr + row * stride_ob + head * stride_oh + d, y.to(out_ptr.dtype.element_ty), mask=d_ok)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: (B, H, D); k_cache, v_cache: (blocks, block_size, H, D); block_tables: (B, max_blocks)
    long; context_lens: (B,) long, tokens each row attends (0: a padding row). -> (B, H, D)."""
    b, h, d = q.shape
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        if x.stride(-1) != 1:
            raise ValueError(f"paged_decode_attention: {name} needs a contiguous last dimension")
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    _paged_decode_kernel[(b, h)](
        out, q, k_cache, v_cache, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), TILE=TOKENS_PER_TILE,
    )
    return out
