"""Decode attention from the paged pool equals attention over each sequence's dense K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from disagg.model.paged_attention import DecodeKeys, choose_method, decode_attention

BLOCK_SIZE, NUM_KV_HEADS, GROUPS, HEAD_DIM = 4, 2, 3, 8


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: q [Hq, D] over k, v [L, Hkv, D], K/V heads repeated per query head."""
    k = k.repeat_interleave(GROUPS, dim=1).transpose(0, 1)  # [Hq, L, D]
    v = v.repeat_interleave(GROUPS, dim=1).transpose(0, 1)
    return F.scaled_dot_product_attention(q.unsqueeze(1), k, v, scale=scale).squeeze(1)


@pytest.mark.parametrize("method", ["sdpa", "bmm", "gather_slots", "auto"])
@pytest.mark.parametrize("context_lens", [[5], [9, 1, 16, 7, 12, 3], [8, 8]])
def test_every_method_equals_dense_attention(method, context_lens):
    torch.manual_seed(0)
    num_blocks = 32
    k_pool = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    v_pool = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    max_blocks = -(-max(context_lens) // BLOCK_SIZE)
    free = torch.randperm(num_blocks).tolist()  # scattered blocks, as after churn
    tables = [[free.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in context_lens]
    padded = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])
    keys = DecodeKeys.build(padded, context_lens, BLOCK_SIZE)
    q = torch.randn(len(context_lens), NUM_KV_HEADS * GROUPS, HEAD_DIM)
    scale = HEAD_DIM**-0.5
    got = decode_attention(q, k_pool, v_pool, keys, scale, method)
    for row, (table, n) in enumerate(zip(tables, context_lens)):
        k = k_pool[table].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n]
        v = v_pool[table].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n]
        torch.testing.assert_close(got[row], reference(q[row], k, v, scale))


def test_full_blocks_need_no_mask():
    keys = DecodeKeys.build(torch.tensor([[1, 2], [3, 4]]), [8, 8], BLOCK_SIZE)
    assert keys.key_bias is None


def test_auto_is_sdpa_and_unknown_methods_are_rejected():
    assert choose_method("auto") == "sdpa"
    assert choose_method("bmm") == "bmm"
    with pytest.raises(ValueError, match="unknown decode attention method"):
        choose_method("flash")
