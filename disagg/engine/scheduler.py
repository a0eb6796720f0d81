"""Which sequences run in the next step: pure policy, no torch, no sockets.

Algorithm: a step is either a prefill step or a decode step.
- Prefill first: waiting sequences are admitted in arrival order while the
  token budget and free blocks allow. A prompt longer than the remaining budget
  is cut into chunks; the rest waits at the head of the queue for the next step.
- Otherwise every running sequence decodes one token. A sequence that needs a
  new block when none is free preempts the most recently admitted one, whose
  blocks are freed and which is prefilled again later (recompute), so no
  sequence ever waits for memory that will not come.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from disagg.config import SchedulerConfig
from disagg.engine.sequence import FinishReason, Sequence, SequenceStatus
from disagg.kv.block_manager import BlockManager


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
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Join a sequence whose KV is already in its blocks (a disaggregated decode)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def schedule(self) -> SchedulerOutput:
        chunks = self._schedule_prefill()
        if chunks:
            return SchedulerOutput(prefill=chunks)
        return SchedulerOutput(decode=self._schedule_decode())

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out, wherever it is, and free its blocks."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.release(seq)
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
        if completes:
            self.waiting.remove(seq)
            if seq.is_prefill_only:
                seq.status = SequenceStatus.PREFILLED
            else:
                self.add_running(seq)

    def _schedule_prefill(self) -> list[ScheduledChunk]:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for seq in self.waiting:
            if budget == 0 or len(self.running) + len(chunks) >= self.config.max_num_seqs:
                break
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            target = seq.num_computed_tokens + num_tokens
            if not self.block_manager.can_grow(seq, target):
                break
            self.block_manager.grow(seq, target)
            chunks.append(ScheduledChunk(seq, num_tokens))
            budget -= num_tokens
            if num_tokens < seq.num_uncomputed_tokens:
                break  # the rest of this prompt goes first next step
        return chunks

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        queue = list(self.running)
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

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
