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
