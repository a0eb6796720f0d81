"""Automatic prefix caching: reuse the KV of full blocks whose tokens were seen before.

What is shared and when (vLLM's automatic prefix caching, SGLang's radix cache):
- A block is findable by the chained hash of its prefix (`block_hash`) once its K/V
  are final: computed here (prefill chunk done) or arrived whole (KV handle READY).
- A new sequence takes the longest cached run of its leading full blocks, sharing
  them by reference count, and computes or receives only the rest.
- The lookup never covers the last token: its forward yields the first output token,
  so at least one token is always computed. Only full blocks are shared, so no
  sequence ever writes into a shared block (no copy-on-write needed).
- A sequence that ends leaves its registered blocks cached among the free ones,
  evicted least recently freed first when fresh blocks run out (the block manager).

Both the prefill worker's engine (compute only the uncached suffix) and the decode
worker's KV handles (receive only the uncached suffix) go through this class.
"""

from __future__ import annotations

from collections.abc import Sequence

from disagg.kv.block_hash import block_hashes
from disagg.kv.block_manager import BlockManager


class PrefixCache:
    def __init__(self, block_manager: BlockManager, model: str) -> None:
        """model: names the weights in every hash, so two models never share blocks."""
        self.block_manager = block_manager
        self.model = model
        self.block_size = block_manager.block_size
        self.num_query_tokens = 0
        """Tokens looked up, over the cache's life (the denominator of its hit rate)."""
        self.num_hit_tokens = 0
        """Tokens found cached, over the cache's life."""

    def hashes(self, token_ids: Sequence[int]) -> list[int]:
        """Chained hashes of the full blocks of `token_ids`."""
        return block_hashes(token_ids, self.block_size, self.model)

    def allocate(
        self, token_ids: Sequence[int], num_tokens: int, keep_watermark: bool = False
    ) -> tuple[list[int], int]:
        """Blocks for `num_tokens` tokens (at least `token_ids`), the leading ones shared from
        the cache; returns (block ids, number of leading tokens whose K/V they already hold).
        Raises OutOfBlocksError, with nothing taken, when there is no room."""
        # NOTE: the last token is always computed (it yields the next token), so the
        # cached run stops at the last full block before it.
        lookup = token_ids[: (len(token_ids) - 1) // self.block_size * self.block_size]
        num_blocks = self.block_manager.blocks_for(num_tokens)
        block_ids, num_shared = self.block_manager.allocate_prefixed(
            self.hashes(lookup), num_blocks, keep_watermark
        )
        self.num_query_tokens += len(token_ids)
        self.num_hit_tokens += num_shared * self.block_size
        return block_ids, num_shared * self.block_size

    def register(self, block_ids: list[int], token_ids: Sequence[int]) -> int:
        """Make the full blocks of `token_ids` (held in `block_ids`, K/V final) findable;
        returns how many are findable now. A block whose content another block already
        holds stays private and goes back to the plain free blocks when freed."""
        hashes = self.hashes(token_ids)
        for block_id, block_hash in zip(block_ids, hashes):
            self.block_manager.register(block_id, block_hash)
        return len(hashes)
