"""KV block accounting: allocation, ref-counted prefix sharing, LRU eviction."""
from __future__ import annotations

from gptserve.engine.block_manager import BlockManager
from gptserve.engine.sampling_params import SamplingParams
from gptserve.engine.sequence import Sequence


def seq(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, tokens, SamplingParams())


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """Pretend the model ran over all of s's tokens."""
    s.num_computed_tokens = len(s)
    bm.commit_computed(s)
    return s


def test_allocate_takes_one_block_per_started_block_of_tokens():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq(list(range(9)))
    assert bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 7
    bm.free_seq(s)
    assert bm.num_free_blocks == 10 and s.block_table == []


def test_equal_prefixes_share_full_blocks_by_ref_count():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(list(range(10)))
    bm.allocate(a)
    computed(bm, a)
    b = seq(list(range(8)) + [99, 98, 97])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.num_used_blocks == 3 + 1  # a's three, b's own third
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_used_blocks == 0


def test_the_last_prompt_token_is_never_a_cache_hit():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = computed(bm, _alloc(bm, seq(list(range(8)))))
    b = seq(list(range(8)))  # identical, exactly two full blocks
    bm.allocate(b)
    assert b.num_computed_tokens == 4  # the second block is recomputed to get logits
    bm.free_seq(a), bm.free_seq(b)


def test_freed_blocks_stay_cached_until_reused_least_recent_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    old = computed(bm, _alloc(bm, seq([1, 2, 3])))
    bm.free_seq(old)
    new = computed(bm, _alloc(bm, seq([7, 8, 9])))
    bm.free_seq(new)
    again = seq([1, 2, 5])
    bm.allocate(again)  # the prefix [1, 2] is still cached
    assert again.num_computed_tokens == 2
    bm.free_seq(again)
    filler = _alloc(bm, seq([0] * 6))  # three blocks: evicts the least recently used
    assert bm.prefix_hits == 2
    probe = seq([7, 8, 0])
    assert bm._prefix_hits(probe) == []  # [7, 8] was the LRU cached block: evicted
    bm.free_seq(filler)


def test_a_hash_collision_is_not_a_hit():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = computed(bm, _alloc(bm, seq([1, 2, 3])))
    block = bm.blocks[a.block_table[0]]
    block.token_ids = (5, 5)  # as if another content had the same hash
    b = seq([1, 2, 4])
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    bm.free_seq(a), bm.free_seq(b)


def test_allocate_counts_cached_free_blocks_it_would_reuse_and_takes_nothing_when_short():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = computed(bm, _alloc(bm, seq([1, 2, 3, 4, 5])))
    bm.free_seq(a)
    big = seq([1, 2, 3, 4, 6, 7, 8])  # needs 4 blocks, 2 of them cached: still too many
    assert not bm.allocate(big)
    assert big.block_table == [] and bm.num_free_blocks == 3
    fits = seq([1, 2, 3, 4, 6])  # 3 blocks, 2 cached
    assert bm.allocate(fits) and fits.num_computed_tokens == 4


def _alloc(bm: BlockManager, s: Sequence) -> Sequence:
    assert bm.allocate(s)
    return s
