"""Fixed-size KV blocks: who owns which, and how many are free.

Check/act pairs (`can_allocate` / `allocate`) let the scheduler decide without
side effects; `allocate` raises `OutOfBlocksError` instead of ever overcommitting.
Every mutation holds a lock: on a decode worker, gRPC handlers allocate while
the engine thread frees.

Blocks are handed out on demand (as in vLLM's PagedAttention, Kwon et al., SOSP
2023): a new sequence gets blocks for its prompt and a short lookahead, and
grows one block at a time as it decodes. New sequences are admitted only while
`watermark_blocks` stay free afterwards, so the running ones have room to grow
before anything must be preempted.
"""

from __future__ import annotations

import heapq
import math
import threading

from disagg.engine.sequence import Sequence
from disagg.errors import OutOfBlocksError

LOOKAHEAD_TOKENS = 16
"""Tokens past the prompt a new decoding sequence gets blocks for at admission: its first
steps then need no allocation, and the rest of its budget is taken one block at a time."""

WATERMARK_FRACTION = 0.01
"""Share of the pool kept free at admission for running sequences to grow into."""


def initial_num_tokens(num_prompt_tokens: int, max_new_tokens: int) -> int:
    """Tokens a new decoding sequence holds blocks for at admission (prompt + lookahead)."""
    return num_prompt_tokens + min(max_new_tokens, LOOKAHEAD_TOKENS)


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, watermark_fraction: float = WATERMARK_FRACTION
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = math.ceil(num_blocks * watermark_fraction)
        # NOTE: a min-heap hands out low ids first, so a fresh sequence tends to get
        # a contiguous run of blocks, which the KV wire can ship without a gather.
        self._free_ids: list[int] = list(range(num_blocks))
        self._is_free = [True] * num_blocks
        self._lock = threading.Lock()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int, keep_watermark: bool = False) -> bool:
        """Room for `num_blocks` now; with `keep_watermark` (admitting a new sequence), room
        that still leaves the watermark free, unless the pool is empty: a sequence that fits
        the pool alone is never refused for the sake of others."""
        if num_blocks == 0:
            return True
        if keep_watermark and self.num_used_blocks > 0:
            return num_blocks + self.watermark_blocks <= self.num_free_blocks
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int, keep_watermark: bool = False) -> list[int]:
        with self._lock:
            if not self.can_allocate(num_blocks, keep_watermark):
                raise OutOfBlocksError(
                    f"need {num_blocks} KV blocks (keeping {self.watermark_blocks} free for "
                    f"growth: {keep_watermark}), {self.num_free_blocks} of {self.num_blocks} free"
                )
            block_ids = [heapq.heappop(self._free_ids) for _ in range(num_blocks)]
            for block_id in block_ids:
                self._is_free[block_id] = False
            return block_ids

    def free(self, block_ids: list[int]) -> None:
        with self._lock:
            for block_id in block_ids:
                if self._is_free[block_id]:
                    raise RuntimeError(f"block {block_id} freed twice")
            for block_id in block_ids:
                self._is_free[block_id] = True
                heapq.heappush(self._free_ids, block_id)

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still lacks to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int, keep_watermark: bool = False) -> bool:
        return self.can_allocate(self.num_missing_blocks(seq, num_tokens), keep_watermark)

    def grow(self, seq: Sequence, num_tokens: int, keep_watermark: bool = False) -> None:
        """Extend the sequence's block table to hold `num_tokens` tokens."""
        missing = self.num_missing_blocks(seq, num_tokens)
        seq.block_table.extend(self.allocate(missing, keep_watermark))

    def release(self, seq: Sequence) -> None:
        if seq.owns_blocks:
            self.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
