"""Which sequences run in the next step: pure policy, no torch, no sockets.

Algorithm: a step is either a prefill step or a decode step.
- Prefill first, but never twice in a row while sequences decode: waiting
  sequences are admitted in arrival order while the token budget and free
  blocks allow. With sequences decoding, the budget shrinks to
  `decode_interleave_tokens` and each prefill step is followed by a decode step,
  so a burst of long prompts delays a running stream's next token by one chunk,
  not by the whole burst (the stall-free idea of Sarathi-Serve's chunked prefills,
  Agrawal et al., OSDI 2024, in alternating steps rather than mixed batches: a
  decode step keeps its kernels, and its tokens, whatever arrives). A sequence
  gets the blocks for all its tokens when its first chunk is scheduled, and only
  if the block manager's watermark stays free afterwards (room for the running
  ones to grow), so a half-prefilled prompt never waits for blocks that decoding
  took meanwhile. A prompt longer than the remaining budget is cut into chunks;
  the rest waits at the head of the queue for the next step.
- Otherwise every running sequence decodes one token, growing by one block when
  its last one is full. A sequence that needs a block when none is free preempts
  the youngest running one (latest arrival), whose blocks are freed and which
  goes back to the head of the waiting queue: its KV is recomputed later from its
  prompt and the tokens it has so far, by a (chunked) prefill, and it decodes on
  with the same tokens (vLLM's recompute preemption, Kwon et al., SOSP 2023). No
  sequence ever waits for memory that will not come, and none is lost.
- With a prefix cache, a sequence's first blocks come from the cache when their
  tokens were computed before (disagg/kv/prefix_cache.py): it is admitted with
  those tokens already computed, and its prefill starts after them. Every chunk
  computed makes its full blocks findable for the sequences that follow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from disagg.config import SchedulerConfig
from disagg.engine.sequence import FinishReason, Sequence, SequenceStatus
from disagg.errors import OutOfBlocksError
from disagg.kv.block_manager import BlockManager
from disagg.kv.prefix_cache import PrefixCache


@dataclass
class ScheduledChunk:
    """Prefill `num_tokens` tokens of `seq`, from its first uncomputed one."""

    seq: Sequence
    num_tokens: int

    @property
    def completes_prompt(self) -> bool:
        return self.num_tokens == self.seq.num_uncomputed_tokens

    @property
    def start(self) -> int:
        """First token position of the chunk (valid until the chunk is recorded as computed)."""
        return self.seq.num_computed_tokens

    @property
    def end(self) -> int:
        return self.seq.num_computed_tokens + self.num_tokens


@dataclass
class SchedulerOutput:
    prefill: list[ScheduledChunk] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        """Sequences preempted (blocks freed, KV to recompute) over the scheduler's life."""
        self._prefilled_last = False
        """The last step was a prefill step: with sequences decoding, a decode step is next."""

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def has_preempted(self) -> bool:
        """A preempted sequence waits to resume: new ones should not take the blocks it needs.
        Safe to read from another thread (a copy of a deque is taken under the GIL)."""
        return any(seq.num_output_tokens > 0 for seq in list(self.waiting))

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Join a sequence whose KV is already in its blocks (a disaggregated decode)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def schedule(self) -> SchedulerOutput:
        interleaving = bool(self.running) and self.config.decode_interleave_tokens > 0
        if not (interleaving and self._prefilled_last):
            budget = self.config.max_num_batched_tokens
            if interleaving:
                budget = min(budget, self.config.decode_interleave_tokens)
            chunks = self._schedule_prefill(budget)
            if chunks:
                self._prefilled_last = True
                return SchedulerOutput(prefill=chunks)
        self._prefilled_last = False
        return SchedulerOutput(decode=self._schedule_decode())

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out, wherever it is, and free its blocks."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq, keep_cached=reason != FinishReason.ERROR)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str) -> Sequence | None:
        for seq in [*self.waiting, *self.running]:
            if seq.request_id == request_id:
                self.finish(seq, FinishReason.ABORT)
                return seq
        return None

    def on_prefilled(self, chunk: ScheduledChunk) -> None:
        """Record a chunk's K/V as computed. A finished prompt joins the running batch, or,
        for a prefill-only sequence, leaves the scheduler holding its blocks (PREFILLED)."""
        seq = chunk.seq
        completes = chunk.completes_prompt
        seq.num_computed_tokens += chunk.num_tokens
        if self.prefix_cache is not None:
            self.prefix_cache.register(seq.block_table, seq.token_ids[: seq.num_computed_tokens])
        if completes:
            self.waiting.remove(seq)
            if seq.is_prefill_only:
                seq.status = SequenceStatus.PREFILLED
            else:
                self.add_running(seq)

    def _schedule_prefill(self, budget: int) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        for seq in self.waiting:
            if budget == 0 or len(self.running) + len(chunks) >= self.config.max_num_seqs:
                break
            if not self._reserve_blocks(seq):
                break
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            chunks.append(ScheduledChunk(seq, num_tokens))
            budget -= num_tokens
            if num_tokens < seq.num_uncomputed_tokens:
                break  # the rest of this prompt goes first next step
        return chunks

    def _reserve_blocks(self, seq: Sequence) -> bool:
        """Blocks for all of `seq`'s tokens, or False (nothing taken) when there is no room.
        A new sequence keeps the watermark free, and starts from its cached prefix."""
        is_new = seq.num_computed_tokens == 0
        if is_new and not seq.block_table and self.prefix_cache is not None:
            try:
                seq.block_table, seq.num_cached_tokens = self.prefix_cache.allocate(
                    seq.token_ids, seq.num_tokens, keep_watermark=True
                )
            except OutOfBlocksError:
                return False
            seq.num_computed_tokens = seq.num_cached_tokens
            return True
        if not self.block_manager.can_grow(seq, seq.num_tokens, keep_watermark=is_new):
            return False
        self.block_manager.grow(seq, seq.num_tokens, keep_watermark=is_new)
        return True

    def _schedule_decode(self) -> list[Sequence]:
        """Oldest first; the youngest give up their blocks when the pool runs out."""
        scheduled: list[Sequence] = []
        queue = sorted(self.running, key=lambda seq: seq.seq_id)
        while queue:
            seq = queue.pop(0)
            while not self.block_manager.can_grow(seq, seq.num_tokens):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.grow(seq, seq.num_tokens)
                scheduled.append(seq)
        return scheduled

    def _release(self, seq: Sequence, keep_cached: bool) -> None:
        """Free the sequence's blocks; with `keep_cached`, its full blocks of computed tokens
        (output included: a chat's next turn resends it) stay findable until evicted."""
        if keep_cached and seq.owns_blocks and self.prefix_cache is not None:
            self.prefix_cache.register(seq.block_table, seq.token_ids[: seq.num_computed_tokens])
        self.block_manager.release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self._release(seq, keep_cached=True)  # resuming, it may find its own blocks again
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
