from __future__ import annotations

import pytest

from disagg.engine.sampling_params import SamplingParams
from disagg.engine.sequence import Sequence
from disagg.errors import OutOfBlocksError
from disagg.kv.block_manager import BlockManager


def make_seq(num_tokens: int) -> Sequence:
    return Sequence(list(range(num_tokens)), SamplingParams(temperature=0))


def test_allocate_hands_out_distinct_low_blocks_first():
    manager = BlockManager(num_blocks=8, block_size=4)
    first, second = manager.allocate(3), manager.allocate(2)
    assert first == [0, 1, 2] and second == [3, 4]
    assert manager.num_free_blocks == 3


def test_out_of_blocks_is_a_distinct_error_and_changes_nothing():
    manager = BlockManager(num_blocks=2, block_size=4)
    assert not manager.can_allocate(3)
    with pytest.raises(OutOfBlocksError):
        manager.allocate(3)
    assert manager.num_free_blocks == 2


def test_grow_allocates_only_missing_blocks_and_release_frees_all():
    manager = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(5)
    manager.grow(seq, 5)
    assert len(seq.block_table) == 2
    manager.grow(seq, 8)
    assert len(seq.block_table) == 2
    manager.grow(seq, 9)
    assert len(seq.block_table) == 3
    manager.release(seq)
    assert seq.block_table == [] and manager.num_free_blocks == 10


def test_double_free_is_caught():
    manager = BlockManager(num_blocks=4, block_size=4)
    blocks = manager.allocate(2)
    manager.free(blocks)
    with pytest.raises(RuntimeError):
        manager.free(blocks)


def test_the_watermark_holds_back_new_sequences_but_not_growth_or_an_empty_pool():
    manager = BlockManager(num_blocks=10, block_size=4, watermark_fraction=0.2)
    assert manager.can_allocate(10, keep_watermark=True)  # empty: fits alone
    manager.allocate(7)
    assert not manager.can_allocate(2, keep_watermark=True)
    assert manager.can_allocate(1, keep_watermark=True) and manager.can_allocate(3)
    with pytest.raises(OutOfBlocksError):
        manager.allocate(2, keep_watermark=True)
    assert manager.num_free_blocks == 3


def test_a_freed_registered_block_stays_findable_until_plain_free_blocks_run_out():
    manager = BlockManager(num_blocks=4, block_size=4)
    first, second = manager.allocate(2)
    assert manager.register(first, 111) and manager.register(second, 222)
    assert not manager.register(manager.allocate(1)[0], 111)  # that content has a block
    manager.free([first, second])
    assert manager.num_free_blocks == 3 and manager.num_cached_blocks == 2
    assert manager.find_prefix([111, 222, 333]) == [first, second]
    assert manager.find_prefix([222]) == [second]  # a lookup starts at a prefix's first
    assert manager.allocate(1) == [3]  # the plain free block goes first
    assert manager.allocate(1) == [first]  # then the least recently freed cached one
    assert manager.find_prefix([111, 222]) == []
    assert manager.find_prefix([222]) == [second]


def test_a_shared_cached_block_is_freed_by_its_last_holder_and_never_handed_out_before():
    manager = BlockManager(num_blocks=2, block_size=4)
    (block,) = manager.allocate(1)
    manager.register(block, 7)
    manager.acquire(manager.find_prefix([7]))  # a second sequence shares it
    manager.free([block])
    assert manager.num_free_blocks == 1
    assert manager.allocate(1) != [block]  # in use: not handed out, not evicted
    assert not manager.can_allocate(1)
    manager.free([block])
    manager.acquire([block])  # free and cached: taking it back removes it from the free
    assert manager.num_free_blocks == 0
    manager.free([block])
    with pytest.raises(RuntimeError):
        manager.free([block])
