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

Prefix caching (driven by `disagg.kv.prefix_cache`): a full block whose
content is final can be registered under its chained hash (`block_hash`).
Blocks are reference-counted, so several sequences can share a cached prefix;
a registered block whose last user frees it stays findable among the free
blocks, and is evicted, least recently freed first, only when no plain free
block is left to hand out.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections import Counter, OrderedDict

from disagg.config import KVReservation
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


def reserved_num_tokens(
    num_prompt_tokens: int, max_new_tokens: int, reservation: KVReservation = "on-demand"
) -> int:
    """Tokens a decode worker reserves blocks for at Allocate: on demand, prompt + lookahead;
    `full` (the reservation that blocks on demand replaced, kept as a measured baseline),
    prompt + all of `max_new_tokens`, so the sequence never grows nor is preempted."""
    if reservation == "full":
        return num_prompt_tokens + max_new_tokens
    return initial_num_tokens(num_prompt_tokens, max_new_tokens)


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
        self._ref_counts = [0] * num_blocks
        self._cached_free: OrderedDict[int, int] = OrderedDict()
        """Free blocks that are still findable by hash: block id -> hash, least recent first."""
        self._block_of_hash: dict[int, int] = {}
        self._hash_of_block: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out, cached ones (evicted on demand) included."""
        return len(self._free_ids) + len(self._cached_free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash, in use or free."""
        return len(self._hash_of_block)

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
            block_ids = [self._take_free_block() for _ in range(num_blocks)]
            for block_id in block_ids:
                self._ref_counts[block_id] = 1
            return block_ids

    def _take_free_block(self) -> int:
        """A plain free block, or else the least recently freed cached one, evicted."""
        if self._free_ids:
            return heapq.heappop(self._free_ids)
        block_id, block_hash = self._cached_free.popitem(last=False)
        del self._block_of_hash[block_hash], self._hash_of_block[block_id]
        return block_id

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds is free again (and stays
        findable if it was registered)."""
        with self._lock:
            for block_id, count in Counter(block_ids).items():
                if self._ref_counts[block_id] < count:
                    raise RuntimeError(f"block {block_id} freed twice")
            for block_id in block_ids:
                self._ref_counts[block_id] -= 1
                if self._ref_counts[block_id] > 0:
                    continue
                block_hash = self._hash_of_block.get(block_id)
                if block_hash is None:
                    heapq.heappush(self._free_ids, block_id)
                else:
                    self._cached_free[block_id] = block_hash

    # -- prefix caching ---------------------------------------------------

    def register(self, block_id: int, block_hash: int) -> bool:
        """Make a full, final, held block findable under `block_hash`; False (nothing changes)
        when another block already holds that content or this one is registered."""
        with self._lock:
            if self._ref_counts[block_id] == 0:
                raise RuntimeError(f"block {block_id} is free: only a held block is registered")
            if block_hash in self._block_of_hash or block_id in self._hash_of_block:
                return False
            self._block_of_hash[block_hash] = block_id
            self._hash_of_block[block_id] = block_hash
            return True

    def find_prefix(self, block_hashes: list[int]) -> list[int]:
        """Block ids holding the longest cached run of `block_hashes` from the first one."""
        with self._lock:
            return self._find_locked(block_hashes)

    def _find_locked(self, block_hashes: list[int]) -> list[int]:
        found: list[int] = []
        for block_hash in block_hashes:
            block_id = self._block_of_hash.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def allocate_prefixed(
        self, block_hashes: list[int], num_blocks: int, keep_watermark: bool = False
    ) -> tuple[list[int], int]:
        """`num_blocks` blocks whose first ones are the longest cached run of `block_hashes`
        (shared: one more reference each), the rest fresh; returns (block ids, number shared).

        One lock around lookup and allocation: the engine thread may evict a cached free
        block between a separate `find_prefix` and `acquire`. Cached blocks nobody holds
        count against the free blocks like fresh ones (raises OutOfBlocksError).
        """
        with self._lock:
            cached = self._find_locked(block_hashes[:num_blocks])
            num_revived = sum(self._ref_counts[block_id] == 0 for block_id in cached)
            num_fresh = num_blocks - len(cached)
            if not self.can_allocate(num_fresh + num_revived, keep_watermark):
                raise OutOfBlocksError(
                    f"need {num_fresh + num_revived} KV blocks ({len(cached)} cached), "
                    f"{self.num_free_blocks} of {self.num_blocks} free"
                )
            for block_id in cached:  # NOTE: before taking fresh ones, which may evict
                self._cached_free.pop(block_id, None)
                self._ref_counts[block_id] += 1
            fresh = [self._take_free_block() for _ in range(num_fresh)]
            for block_id in fresh:
                self._ref_counts[block_id] = 1
            return cached + fresh, len(cached)

    def acquire(self, block_ids: list[int]) -> None:
        """Take one reference to each cached block (as `find_prefix` returned them): a free
        one leaves the free blocks; one in use is shared. Its content must not change."""
        with self._lock:
            for block_id in block_ids:
                if block_id not in self._hash_of_block:
                    raise RuntimeError(f"block {block_id} is not cached")
            for block_id in block_ids:
                self._cached_free.pop(block_id, None)
                self._ref_counts[block_id] += 1

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
