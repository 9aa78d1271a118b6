"""KV block accounting: a fixed pool of blocks, ref counts, and a prefix cache.

A full block is identified by hash(parent block's hash, its token ids); equal prompt
prefixes therefore map to the same blocks, which are shared by ref count. A freed block
keeps its hash and content until it is reused: free blocks form an LRU list, so the
cached block unused for the longest time is evicted first.
"""
from __future__ import annotations

from collections import OrderedDict

from gptserve.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set once the block is full and registered
        self.token_ids: tuple[int, ...] = ()


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


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
        hits, parent = [], None
        for i in range((len(seq) - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            parent = h
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        reused_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        new = self.blocks_needed(len(seq)) - len(hits)
        return new + reused_free <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its current tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        hits = self._prefix_hits(seq)
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
        parent = self.blocks[seq.block_table[start - 1]].hash if start else None
        for i in range(start, num_full):
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block.hash, block.token_ids = block_hash(parent, tokens), tokens
            self.cached.setdefault(block.hash, block.block_id)
            parent = block.hash

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
