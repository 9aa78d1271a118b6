"""Attention backends: how a step's queries see the keys and values of their sequences.

- `DenseAttention`: a simple contiguous KV cache for B equal-length sequences. Used by
  parity tests and by the inspect view, which can also ask it for the attention weights.
- `PagedAttention`: reads and writes K/V through block tables in the engine's paged pool.

Why this paged backend is the fast one on a CPU: the model's matmuls dominate a step,
and PyTorch's scaled_dot_product_attention runs fused kernels. Prefill without a cached
past attends over the chunk's own K/V (no gather at all); decode gathers each sequence's
blocks once per layer into a (B, S, H, D) view and runs one batched SDPA under a length
mask; on the CPU in float32 a small C++ kernel (cpu_kernels.py) reads K/V through the block
tables instead, skipping that gather, which was most of a large decode step; on CUDA a
Triton kernel does the same (triton_attention.py). Prefill runs SDPA on 4-D tensors, the
shape its fused kernels need. A Python loop over sequences happens only for prefill
chunks, of which a step has few.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gptserve.model.cpu_kernels import paged_decode

log = logging.getLogger(__name__)


@functools.cache
def gpu_paged_decode():
    """The Triton paged decode kernel (model/triton_attention.py), or None without triton:
    then decode on CUDA gathers the blocks and runs SDPA, correct but slower."""
    try:
        from gptserve.model.triton_attention import paged_decode_attention
    except ImportError as e:
        log.warning("triton unavailable (%s): CUDA decode attention gathers KV blocks instead", e)
        return None
    return paged_decode_attention


class DenseAttention:
    """Contiguous per-layer K/V for a (B, T) batch; call repeatedly to decode incrementally.

    Tokens arrive flat, (B*t, H, D), ordered batch-major. With `record=True` it keeps each
    layer's attention weights of the last call, (B, H, t, T_total), and the scaled scores
    before the softmax (`scores`, the same shape; a key after its query is -inf).
    """

    def __init__(self, batch_size: int, record: bool = False):
        self.batch_size = batch_size
        self.record = record
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.weights: dict[int, torch.Tensor] = {}
        self.scores: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        b = self.batch_size
        n, h, d = q.shape
        t = n // b
        q, k, v = (x.view(b, t, h, d).transpose(1, 2) for x in (q, k, v))  # (B, H, t, D)
        if layer in self.k:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        total = k.shape[2]
        past = total - t
        # query i (absolute position past+i) may see keys 0..past+i
        mask = torch.ones(t, total, dtype=torch.bool, device=q.device).tril(diagonal=past)
        if self.record:
            scores = ((q.float() @ k.float().transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
            probs = scores.softmax(-1)
            self.weights[layer], self.scores[layer] = probs, scores
            y = (probs.to(v.dtype) @ v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return y.transpose(1, 2).reshape(n, h, d)

    @property
    def length(self) -> int:
        return next(iter(self.k.values())).shape[2] if self.k else 0


@dataclass
class PrefillSpan:
    """One sequence's chunk of new tokens inside the flat batch."""

    start: int  # first row of the chunk in the flat batch
    end: int  # one past the last row
    context_len: int  # tokens of this sequence in the cache after this step (past + chunk)
    block_table: torch.Tensor  # (num_blocks,) long, on the pool's device


@dataclass
class PagedMetadata:
    """Where this step's tokens go in the pool and what they attend to.

    The flat batch holds `num_decode` decode tokens first (one per sequence), then the
    prefill chunks in `prefills`.
    """

    slot_mapping: torch.Tensor  # (N,) long: block_id * block_size + offset for each new token
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # (B, max_blocks) long, padded with 0
    decode_context_lens: torch.Tensor | None = None  # (B,) long, tokens to attend incl. the new one
    decode_max_blocks: int = 0  # blocks to gather (covers the longest decode context)
    prefills: list[PrefillSpan] = field(default_factory=list)


class KVPool:
    """The engine's one KV allocation: (layers, 2, blocks + 1, block_size, heads, head_dim).

    The extra last block is scratch space that no sequence owns (padding rows write there).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        self.kv = torch.zeros(num_layers, 2, num_blocks + 1, block_size, num_heads, head_dim,
                              dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class PagedAttention:
    """Attention over the paged pool for one step, given that step's metadata."""

    def __init__(self, pool: KVPool, meta: PagedMetadata):
        self.pool = pool
        self.meta = meta

    def __call__(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        meta, bs = self.meta, self.pool.block_size
        k_cache, v_cache = self.pool.kv[layer]  # (blocks, bs, H, D) each
        h, d = q.shape[1], q.shape[2]
        k_cache.view(-1, h, d).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, h, d).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            out[:nd] = self._decode(k_cache, v_cache, q[:nd], scale)
        for span in meta.prefills:
            qs = q[span.start:span.end]  # (t, H, D)
            t = qs.shape[0]
            if span.context_len == t:  # no past: attend within the chunk
                ks, vs = k[span.start:span.end], v[span.start:span.end]
            else:
                nblocks = -(-span.context_len // bs)
                table = span.block_table[:nblocks]
                ks = k_cache.index_select(0, table).view(-1, h, d)[:span.context_len]
                vs = v_cache.index_select(0, table).view(-1, h, d)[:span.context_len]
            y = self._causal(qs, ks, vs, scale)
            out[span.start:span.end] = y
        return out

    def _decode(self, k_cache, v_cache, q, scale):
        meta = self.meta
        if q.device.type == "cpu" and q.dtype == torch.float32:
            kernel = paged_decode()
            if kernel is not None:  # reads K/V through the block tables, no gather
                return kernel(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale)
        if q.device.type == "cuda":
            kernel = gpu_paged_decode()
            if kernel is not None:  # Triton: the same, on the GPU, in any dtype, graph-safe
                return kernel(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale)
        b, h, d = q.shape
        tables = meta.decode_block_tables[:, :meta.decode_max_blocks].reshape(-1)  # (B * M,)
        # index_select, not k_cache[tables]: 2-3x faster on the CPU (bench/attention.py)
        ks = k_cache.index_select(0, tables).view(b, -1, h, d).transpose(1, 2)  # (B, H, S, D)
        vs = v_cache.index_select(0, tables).view(b, -1, h, d).transpose(1, 2)
        s = ks.shape[2]
        mask = torch.arange(s, device=q.device)[None, :] < meta.decode_context_lens[:, None]  # (B, S)
        y = F.scaled_dot_product_attention(
            q.unsqueeze(2), ks, vs, attn_mask=mask[:, None, None, :], scale=scale
        )  # (B, H, 1, D)
        return y.squeeze(2)

    @staticmethod
    def _causal(q, k, v, scale):
        t, total = q.shape[0], k.shape[0]
        # 4-D: the fused SDPA kernels (flash on the CPU; flash or memory-efficient on CUDA)
        # accept only (B, H, T, D); 3-D inputs silently fall back to the unfused math path
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, *, D)
        if t == total:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:  # a cached past: query i sees keys 0..past+i (is_causal would align to the top left)
            mask = torch.ones(t, total, dtype=torch.bool, device=q.device).tril(diagonal=total - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return y[0].transpose(0, 1)  # (t, H, D)
