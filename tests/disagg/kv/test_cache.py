from __future__ import annotations

import pytest
import torch

from disagg.kv.cache import KVLayout, PagedKVCache

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=3, block_size=4, dtype=torch.float32)


@pytest.mark.parametrize("block_table", [[2, 3, 4], [5, 1, 3]], ids=["consecutive", "scattered"])
def test_write_range_and_token_range_round_trip(block_table):
    cache = PagedKVCache(LAYOUT, 8, torch.device("cpu"))
    k, v = torch.randn(7, 2, 3), torch.randn(7, 2, 3)
    cache.write_range(1, block_table, 3, k, v)
    got_k, got_v = cache.token_range(1, block_table, 3, 10)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    assert cache.k[0].abs().sum() == 0, "another layer was written"
    untouched = [b for b in range(8) if b not in block_table]
    assert cache.k[1][untouched].abs().sum() == 0, "a block outside the table was written"


def test_token_range_is_a_view_within_consecutive_blocks():
    cache = PagedKVCache(LAYOUT, 8, torch.device("cpu"))
    k, _ = cache.token_range(0, [2, 3], 1, 7)
    assert k.data_ptr() == cache.k[0][2, 1].data_ptr(), (
        "consecutive slots should ship without a copy"
    )
    k_scattered, _ = cache.token_range(0, [5, 1], 1, 7)
    assert k_scattered.shape == (6, 2, 3)
