"""Cache-aware placement: send a prompt where its prefix's KV most likely still is.

Workers keep the KV of prompts they saw as cached blocks (disagg/kv/prefix_cache.py),
found by chained block hashes. The coordinator does not ask them what they hold; it
keeps an approximate index of what it sent where (as SGLang's cache-aware router
does): per worker, the block hashes of the prompts placed there, least recently
used first out once the index holds as many blocks as the worker's pool. A worker
may have evicted what the index still lists, or hold more; a wrong guess costs only
a cache miss, never a wrong token.

Placement weighs reuse against load, in one unit per role (after Dynamo's KV
router, whose cost adds blocks to prefill and blocks in use):
- decode: blocks left to receive minus blocks free: the most cached prefix wins
  unless another worker has that many more blocks free; with no hits anywhere
  this is "most free blocks first", the placement without the index.
- prefill: tokens left to compute plus prompt tokens already in flight there.
Multi-turn chat resends the conversation so far, so its next turn lands where the
previous one was.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence

from coordinator.registry import WorkerRecord
from disagg.kv.block_hash import block_hashes


class PrefixIndex:
    def __init__(self) -> None:
        self._blocks: dict[str, OrderedDict[int, None]] = {}
        """Per worker id: block hashes placed there, least recently used first."""

    def forget(self, worker_id: str) -> None:
        """The worker left: whatever it held is gone with it."""
        self._blocks.pop(worker_id, None)

    def record(self, worker: WorkerRecord, prompt_ids: Sequence[int]) -> None:
        """`prompt_ids` were placed on `worker`: its full blocks will be cached there."""
        blocks = self._blocks.setdefault(worker.worker_id, OrderedDict())
        for block_hash in _hashes(worker, prompt_ids):
            blocks[block_hash] = None
            blocks.move_to_end(block_hash)
        while len(blocks) > max(1, worker.info.total_kv_blocks):
            blocks.popitem(last=False)

    def num_cached_tokens(self, worker: WorkerRecord, prompt_ids: Sequence[int]) -> int:
        """Leading prompt tokens the worker likely holds (whole blocks, never the last token,
        which a worker always computes)."""
        blocks = self._blocks.get(worker.worker_id)
        if not blocks:
            return 0
        num_found = 0
        num_lookup = (len(prompt_ids) - 1) // _block_size(worker)
        for block_hash in _hashes(worker, prompt_ids)[:num_lookup]:
            if block_hash not in blocks:
                break
            num_found += 1
        return num_found * _block_size(worker)

    def order_decode(
        self, candidates: list[WorkerRecord], prompt_ids: Sequence[int]
    ) -> list[WorkerRecord]:
        """Decode workers best first: fewest blocks left to receive, net of blocks free."""

        def cost(worker: WorkerRecord) -> int:
            uncached = len(prompt_ids) - self.num_cached_tokens(worker, prompt_ids)
            return -(-uncached // _block_size(worker)) - worker.free_blocks_estimate

        return sorted(candidates, key=cost)

    def pick_prefill(
        self, candidates: list[WorkerRecord], prompt_ids: Sequence[int]
    ) -> WorkerRecord:
        """The prefill worker with the fewest tokens to compute: this prompt's uncached
        ones plus the prompt tokens it already has in flight."""

        def cost(worker: WorkerRecord) -> int:
            uncached = len(prompt_ids) - self.num_cached_tokens(worker, prompt_ids)
            return uncached + worker.prompt_tokens_in_flight

        return min(candidates, key=cost)


def _block_size(worker: WorkerRecord) -> int:
    return max(1, worker.info.block_size)  # NOTE: 0 from a worker that does not say


def _hashes(worker: WorkerRecord, token_ids: Sequence[int]) -> list[int]:
    return _memo_hashes(tuple(token_ids), _block_size(worker), worker.info.model)


@functools.lru_cache(maxsize=64)
def _memo_hashes(token_ids: tuple[int, ...], block_size: int, model: str) -> list[int]:
    """NOTE: one placement hashes a prompt for every candidate worker and again to record
    it; on an 8k-token prompt each pass costs milliseconds of the event loop."""
    return block_hashes(token_ids, block_size, model)
