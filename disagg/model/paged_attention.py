"""Decode attention straight from the paged KV pool: one query per sequence.

Keys are read a whole block at a time (`index_select` over block ids, as
vLLM's PagedAttention reads them, Kwon et al., SOSP 2023) instead of one slot
at a time, which is one large copy per layer in place of B x L tiny ones.

Two ways to do the arithmetic:
- `sdpa`: torch's scaled_dot_product_attention (flash kernel on CPU and CUDA).
- `bmm`: the query heads that share a KV head packed as that head's queries
  ([B, Hkv, groups, D]) against its keys in two batched matmuls.
`auto` is sdpa: on a 2-core avx2 EPYC, at ~130-token contexts and batches of
1 to 64, sdpa was never slower than bmm in float32 or bfloat16 (bmm pays two
layout copies per layer). `gather_slots` is the per-slot gather the engine used
first, kept as the measured baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("auto", "sdpa", "bmm", "gather_slots")


@dataclass
class DecodeKeys:
    """Which keys each sequence of a decode batch sees; built once per step."""

    block_tables: torch.Tensor
    """[B, NB] block ids of each sequence's keys, padded with block 0."""
    key_bias: torch.Tensor | None
    """[B, 1, 1, NB * block_size] float32, 0 where a key is real and -inf on padding,
    added to the scores; None if every slot is real, unless built with always_bias."""

    @classmethod
    def build(
        cls,
        block_tables: torch.Tensor,
        context_lens: list[int],
        block_size: int,
        always_bias: bool = False,
    ):
        """context_lens: keys per sequence (cache plus the new token). always_bias: build
        the bias even when it is all zeros (a compiled step keeps one input signature)."""
        num_keys = block_tables.shape[1] * block_size
        if not always_bias and all(length == num_keys for length in context_lens):
            return cls(block_tables, None)
        device = block_tables.device
        lens = torch.tensor(context_lens, device=device)
        positions = torch.arange(num_keys, device=device)
        mask = (positions.unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        bias.masked_fill_(~mask, float("-inf"))
        return cls(block_tables, bias)


def gather_blocks(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """pool: [num_blocks, bs, Hkv, D]; block_tables: [B, NB] -> [B, NB * bs, Hkv, D]."""
    batch, num_blocks = block_tables.shape
    blocks = pool.index_select(0, block_tables.reshape(-1))
    return blocks.view(batch, num_blocks * pool.shape[1], pool.shape[2], pool.shape[3])


def gather_slots(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """As gather_blocks, one slot at a time (the baseline)."""
    block_size = pool.shape[1]
    positions = torch.arange(block_tables.shape[1] * block_size, device=block_tables.device)
    slots = block_tables[:, positions // block_size] * block_size + positions % block_size
    return pool.view(-1, pool.shape[2], pool.shape[3])[slots]


def choose_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown decode attention method {method!r}; one of {METHODS}")
    return "sdpa" if method == "auto" else method


def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    keys: DecodeKeys,
    scale: float,
    method: str = "auto",
) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, D]; K/V of every layer stay in the pool's blocks."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[2]
    method = choose_method(method)
    gather = gather_slots if method == "gather_slots" else gather_blocks
    k = gather(k_pool, keys.block_tables).transpose(1, 2)  # [B, Hkv, L, D]
    v = gather(v_pool, keys.block_tables).transpose(1, 2)
    q = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, Hkv, G, D]
    if method == "bmm":
        out = _bmm_attention(q, k, v, keys.key_bias, scale)
    else:
        # NOTE: the additive bias, not a bool mask: SDPA would turn a mask into the
        # very same bias at every layer (bit-identical output, ~20 us a layer).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys.key_bias, scale=scale)
    return out.reshape(batch, num_heads, head_dim)


def _bmm_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """q: [B, Hkv, G, D]; k, v: [B, Hkv, L, D]; bias: [B, 1, 1, L] -> [B, Hkv, G, D].

    Softmax runs in float32 whatever the model dtype, as SDPA's CPU kernel does.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, L]
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v)
