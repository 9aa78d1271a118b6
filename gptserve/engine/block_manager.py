"""KV block accounting: a fixed pool of blocks, ref counts, and a prefix cache.

A full block is identified by hash(parent block's hash, its token ids); equal prompt
prefixes therefore map to the same blocks, which are shared by ref count. A freed block
keeps its hash and content until it is reused: free blocks form an LRU list, so the
cached block unused for the longest time is evicted first. The first block's parent is the
sequence's `cache_root`: None for the base model, its adapter's own for a LoRA adapter, so
KV computed through one adapter is never reused by another.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

from gptserve.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set once the block is full and registered
        self.token_ids: tuple[int, ...] = ()


def chained_block_hashes(token_ids: list[int], block_size: int, stop: int, start: int = 0,
                         parent: int | None = None) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(hash, token ids) of the full blocks start..stop-1 of token_ids, each hash chained to
    the block's before it (`parent`: the hash of block start-1). The prefix cache and Ray's
    prefix-affinity router (deploy/router.py) name blocks by these; Python hashes tuples of
    ints the same way in every process."""
    for i in range(start, stop):
        tokens = tuple(token_ids[i * block_size:(i + 1) * block_size])
        parent = hash((parent, tokens))
        yield parent, tokens


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.cached: dict[int, int] = {}  # hash -> block_id
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- admission -----------------------------------------------------------------
    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks matching seq's leading full blocks (never its last token: it needs logits)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs:
            return []
        hits = []
        for h, tokens in chained_block_hashes(seq.token_ids, self.block_size, (len(seq) - 1) // self.block_size,
                                              parent=seq.cache_root):
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence) -> bool:
        """Give seq blocks for all its current tokens, reusing cached prefix blocks, if they
        fit; False, and nothing taken, if they don't."""
        assert not seq.block_table
        hits = self._prefix_hits(seq)
        reused_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # cached, but counted as free
        if self.blocks_needed(len(seq)) - len(hits) + reused_free > len(self.free):
            return False
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(self.blocks_needed(len(seq)) - len(hits)):
            seq.block_table.append(self._take_free_block())
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_cached_tokens == 0 and seq.num_output_tokens == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
            self.prefix_queries += len(seq)
            self.prefix_hits += seq.num_computed_tokens
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)  # least recently used
        block = self.blocks[block_id]
        if block.hash is not None:  # evict it from the prefix cache
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    # ---- growth --------------------------------------------------------------------
    def can_append(self, seq: Sequence, extra: int = 0) -> bool:
        """Room for the K/V of seq's tokens not yet in the cache, and of `extra` more
        (speculative guesses)?"""
        return self.blocks_needed(len(seq) + extra) - len(seq.block_table) <= len(self.free)

    def append_slots(self, seq: Sequence, extra: int = 0) -> None:
        while len(seq.block_table) < self.blocks_needed(len(seq) + extra):
            seq.block_table.append(self._take_free_block())

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past seq's tokens (those reserved for guesses that did not
        stand); they hold nothing reusable."""
        while len(seq.block_table) > self.blocks_needed(len(seq)):
            self._release(seq.block_table.pop())

    def commit_computed(self, seq: Sequence) -> None:
        """Register seq's blocks that became full in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        start = num_full  # walk back to the last block already registered
        while start > 0 and self.blocks[seq.block_table[start - 1]].hash is None:
            start -= 1
        parent = self.blocks[seq.block_table[start - 1]].hash if start else seq.cache_root
        hashes = chained_block_hashes(seq.token_ids, bs, num_full, start, parent)
        for block_id, (h, tokens) in zip(seq.block_table[start:num_full], hashes):
            block = self.blocks[block_id]
            block.hash, block.token_ids = h, tokens
            self.cached.setdefault(h, block_id)

    # ---- release -------------------------------------------------------------------
    def free_seq(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # tail blocks are evicted before heads
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _release(self, block_id: int) -> None:
        """One reference fewer; at none the block is free (first in line if it holds nothing reusable)."""
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None
            if block.hash is None:
                self.free.move_to_end(block_id, last=False)
