"""The paged KV pool: per layer, one K and one V tensor of fixed-size blocks.

Layout per layer: `k[layer]` and `v[layer]` are `[num_blocks, block_size,
num_kv_heads, head_dim]`, so one block's K (or V) for one layer is a
contiguous run of `block_nbytes` bytes, and a run of consecutive block ids is
one contiguous slice: the KV wire ships these bytes without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token_per_layer(self) -> int:
        """K and V together."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_kv_heads * self.head_dim * element_size

    @property
    def bytes_per_block(self) -> int:
        """One block across every layer, K and V."""
        return self.num_layers * self.block_size * self.bytes_per_token_per_layer

    def blocks_in_budget(self, nbytes: int) -> int:
        return nbytes // self.bytes_per_block


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.k = [
            torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)
        ]

    def slot_ids(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Flat slot index (block * block_size + offset) of token positions [start, end)."""
        size = self.layout.block_size
        return [block_table[pos // size] * size + pos % size for pos in range(start, end)]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' K/V. k, v: [T, Hkv, D]; slots: [T]."""
        self._flat(self.k[layer]).index_copy_(0, slots, k)
        self._flat(self.v[layer]).index_copy_(0, slots, v)

    def write_range(
        self, layer: int, block_table: list[int], start: int, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store K/V of positions [start, start + n). k, v: [n, Hkv, D], any device.

        NOTE: within consecutive blocks this is one straight copy into the pool,
        which is how arriving KV usually lands; otherwise a scatter.
        """
        end = start + k.shape[0]
        slots = self.slot_ids(block_table, start, end)
        first, count = slots[0], len(slots)
        if slots[-1] - first == count - 1:
            self._flat(self.k[layer])[first : first + count].copy_(k)
            self._flat(self.v[layer])[first : first + count].copy_(v)
            return
        index = torch.tensor(slots, device=self.k[layer].device)
        self.write(layer, index, k.to(index.device), v.to(index.device))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the given slots. slots: [...]; returns [..., Hkv, D] each."""
        k = self._flat(self.k[layer])[slots]
        v = self._flat(self.v[layer])[slots]
        return k, v

    def gather_blocks(
        self, layer: int, block_ids: torch.Tensor, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the first `num_tokens` positions held by `block_ids` ([nb]), [n, Hkv, D] each.

        NOTE: whole blocks are copied with one index_select per tensor, far
        cheaper than indexing every slot (one offset per token) on CPU.
        """
        k = self.k[layer].index_select(0, block_ids)
        v = self.v[layer].index_select(0, block_ids)
        return self._flat(k)[:num_tokens], self._flat(v)[:num_tokens]

    def token_range(
        self, layer: int, block_table: list[int], start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of positions [start, end), [n, Hkv, D] each: a view of the pool (no copy)
        when the slots are consecutive, which they are within consecutive blocks."""
        slots = self.slot_ids(block_table, start, end)
        first, count = slots[0], len(slots)
        if slots[-1] - first == count - 1:
            k, v = self._flat(self.k[layer]), self._flat(self.v[layer])
            return k[first : first + count], v[first : first + count]
        return self.gather(layer, torch.tensor(slots, device=self.k[layer].device))

    @staticmethod
    def _flat(cache: torch.Tensor) -> torch.Tensor:
        return cache.view(-1, cache.shape[2], cache.shape[3])
