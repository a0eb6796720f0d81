"""The prefix cache over a real block manager: what is shared, what is left to compute."""

from __future__ import annotations

import pytest

from disagg.errors import OutOfBlocksError
from disagg.kv.block_manager import BlockManager
from disagg.kv.prefix_cache import PrefixCache


def make_cache(num_blocks: int = 16) -> PrefixCache:
    return PrefixCache(BlockManager(num_blocks, block_size=4, watermark_fraction=0.0), "m")


def test_a_registered_prefix_is_shared_and_the_last_token_is_never_cached():
    cache = make_cache()
    prompt = list(range(12))  # three full blocks
    blocks, num_cached = cache.allocate(prompt, 12)
    assert num_cached == 0 and len(blocks) == 3
    cache.register(blocks, prompt)
    again, num_cached = cache.allocate(prompt, 12)
    assert num_cached == 8  # the third block holds the last token: recomputed, fresh
    assert again[:2] == blocks[:2] and again[2] not in blocks
    longer, num_cached = cache.allocate([*prompt, 99, 98], 14)
    assert num_cached == 12 and longer[:3] == blocks


def test_a_different_prefix_shares_nothing_after_the_first_difference():
    cache = make_cache()
    prompt = list(range(12))
    blocks, _ = cache.allocate(prompt, 12)
    cache.register(blocks, prompt)
    other = [0, 1, 2, 3, 0, 0, 0, 0, 8, 9, 10, 11, 12]
    shared, num_cached = cache.allocate(other, 13)
    assert num_cached == 4 and shared[0] == blocks[0] and blocks[2] not in shared


def test_freed_blocks_stay_findable_and_everything_counts_free():
    cache = make_cache(num_blocks=4)
    manager = cache.block_manager
    prompt = list(range(9))
    blocks, _ = cache.allocate(prompt, 9)
    cache.register(blocks, prompt)
    manager.free(blocks)
    assert manager.num_free_blocks == 4 and manager.num_cached_blocks == 2
    again, num_cached = cache.allocate(prompt, 9)
    assert num_cached == 8 and again[:2] == blocks[:2]
    manager.free(again)
    assert manager.num_free_blocks == 4


def test_no_room_takes_nothing_and_a_full_pool_evicts_the_cached_blocks():
    cache = make_cache(num_blocks=3)
    manager = cache.block_manager
    prompt = list(range(9))
    blocks, _ = cache.allocate(prompt, 9)
    cache.register(blocks, prompt)
    with pytest.raises(OutOfBlocksError):
        cache.allocate(list(range(100, 104)), 4)
    assert manager.num_free_blocks == 0
    manager.free(blocks)
    fresh, num_cached = cache.allocate(list(range(100, 112)), 12)  # needs all three
    assert num_cached == 0 and sorted(fresh) == sorted(blocks)
    assert manager.num_cached_blocks == 0


def test_hit_and_query_tokens_are_counted():
    cache = make_cache()
    prompt = list(range(10))
    blocks, _ = cache.allocate(prompt, 10)
    cache.register(blocks, prompt)
    cache.allocate(prompt, 10)
    assert (cache.num_query_tokens, cache.num_hit_tokens) == (20, 8)
