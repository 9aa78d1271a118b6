"""Prefill attention runs through SDPA's fused kernel, not its unfused math fallback.

Only the fused backend is allowed inside each test (SDPBackend.FLASH_ATTENTION is the fused
CPU kernel): if PagedAttention handed SDPA a shape or mask that the fused kernel refuses,
SDPA would raise "No available kernel" instead of quietly running the slow path.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptserve.model.attention import KVPool, PagedAttention, PagedMetadata, PrefillSpan

H, D, BS = 4, 32, 16


def attend_alone(q, k, v, past: int, scale: float) -> torch.Tensor:
    """Plain softmax attention for a chunk of t queries after `past` cached tokens."""
    t, total = q.shape[0], k.shape[0]
    scores = torch.einsum("thd,shd->hts", q.float(), k.float()) * scale
    allowed = torch.ones(t, total, dtype=torch.bool).tril(diagonal=past)
    return torch.einsum("hts,shd->thd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v.float())


def prefill(past: int, chunk: int, dtype: torch.dtype, seed: int = 0):
    """One sequence's chunk after `past` tokens already in the pool; the step's q/k/v, the
    output of PagedAttention, and the sequence's whole K/V as the pool holds it."""
    g = torch.Generator().manual_seed(seed)
    total = past + chunk
    blocks = -(-total // BS)
    pool = KVPool(1, blocks + 2, BS, H, D, dtype, torch.device("cpu"))
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=g).to(dtype))
    table = torch.randperm(blocks + 2, generator=g)[:blocks]
    pos = torch.arange(past, total)
    slots = table[pos // BS] * BS + pos % BS
    q, k, v = (torch.randn(chunk, H, D, generator=g).to(dtype) for _ in range(3))
    meta = PagedMetadata(slot_mapping=slots, prefills=[PrefillSpan(0, chunk, total, table)])
    out = PagedAttention(pool, meta)(0, q, k, v, 0.2)
    k_all = pool.kv[0, 0].index_select(0, table).view(-1, H, D)[:total]
    v_all = pool.kv[0, 1].index_select(0, table).view(-1, H, D)[:total]
    return q, k_all, v_all, out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("past,chunk", [(0, 1), (0, 37), (0, 200), (5, 1), (16, 40), (33, 95)])
def test_prefill_runs_in_the_fused_kernel_and_matches_plain_attention(past, chunk, dtype, tol):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        q, k_all, v_all, out = prefill(past, chunk, dtype)
    want = attend_alone(q, k_all, v_all, past, 0.2)
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)


def test_the_fused_kernel_refuses_what_the_old_three_dimensional_call_passed():
    """The check above can fail: SDPA on (H, T, D), as prefill once called it, has no fused kernel."""
    q = k = v = torch.randn(H, 8, D)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), pytest.raises(RuntimeError, match="No available kernel"):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
