"""Fixed-size KV blocks: who owns which, and how many are free.

Check/act pairs (`can_allocate` / `allocate`) let the scheduler decide without
side effects; `allocate` raises `OutOfBlocksError` instead of ever overcommitting.
Every mutation holds a lock: on a decode worker, gRPC handlers allocate while
the engine thread frees.
"""

from __future__ import annotations

import heapq
import threading

from disagg.engine.sequence import Sequence
from disagg.errors import OutOfBlocksError


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
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

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        with self._lock:
            if not self.can_allocate(num_blocks):
                raise OutOfBlocksError(
                    f"need {num_blocks} KV blocks, {self.num_free_blocks} of {self.num_blocks} free"
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

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.can_allocate(self.num_missing_blocks(seq, num_tokens))

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend the sequence's block table to hold `num_tokens` tokens."""
        seq.block_table.extend(self.allocate(self.num_missing_blocks(seq, num_tokens)))

    def release(self, seq: Sequence) -> None:
        if seq.owns_blocks:
            self.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
