"""Is a silent decode stream hung, or is its worker only busy? The per-stream stall deadline.

A decode stream that gets no token for `stall_timeout_s` was taken for hung and its
sequence migrated. But a worker can be busy without being hung: prefilling long prompts in
place (no prefill worker left, or `--disagg-policy never|auto`; its decode steps wait
behind each prefill chunk, disagg/engine/scheduler.py), or stepping a big batch on a slow
CPU. Moving such a worker's healthy streams throws their KV away, loads the other workers
further, and under load ran requests out of their migrations.

So every worker reports in its heartbeat how many engine steps that computed something it
has completed (`num_engine_steps`), and how long it has been inside the step it runs now
(`step_running_s`, 0 between steps: one long step is work too, which no count shows until
it ends). The registry notes when a heartbeat last showed either
(`WorkerRecord.progress_s`). The heartbeat is sent from the worker's asyncio thread while the
engine steps on a thread of its own, so a heartbeat says the process lives, not that its
engine moves: the step counter says that. A stream silent for `stall_s`:

- whose worker's engine was at work within the last `stall_s` is busy: it is waited for;
- whose worker's engine was not is hung, and is migrated at once, as before: a SIGSTOPped
  process (no heartbeats at all) or a dead engine thread (heartbeats, a frozen step count,
  no step running);
- silent for `busy_factor * stall_s` (BUSY_STALL_FACTOR, 3: 30 s with the default 10 s
  stall timeout) is starved and migrated whatever its worker does: a live engine that
  never serves this sequence, or one stuck inside a step. This bounds how long a busy
  worker may keep a stream silent (the issue's per-stream progress deadline).

Resolution: progress is seen at the worker's next heartbeat (every `heartbeat_interval_s`,
1 s by default), so the stall timeout should well exceed that interval.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TypeVar

from coordinator.migration import Interrupted, LostFlag, first_of
from coordinator.registry import WorkerRegistry

T = TypeVar("T")

BUSY_STALL_FACTOR = 3.0
"""A stream may stay silent this many stall timeouts while its worker's engine steps."""


@dataclass(frozen=True)
class StallWatch:
    registry: WorkerRegistry
    stall_s: float
    """The stall timeout: silence allowed with no sign of progress, in seconds."""
    busy_factor: float = BUSY_STALL_FACTOR

    @property
    def starved_s(self) -> float:
        """The hard bound on a stream's silence, busy worker or not, in seconds."""
        return self.busy_factor * self.stall_s

    def wait_s(self, worker_id: str, silent_since_s: float, now_s: float) -> float:
        """How much longer a stream silent since `silent_since_s` (time.monotonic()) may stay
        silent; <= 0: it is hung (or starved), migrate it.

        The deadline is `stall_s` past the later of the stream's last token and its worker's
        last progress, capped at `starved_s` past the last token. Waiting until then is
        exact: before it, nothing that could make the stream hung can have happened.
        """
        deadline_s = silent_since_s + self.stall_s
        worker = self.registry.get(worker_id)
        if worker is not None:
            deadline_s = max(deadline_s, worker.progress_s + self.stall_s)
        return min(deadline_s, silent_since_s + self.starved_s) - now_s

    def why(self, worker_id: str, silent_since_s: float, now_s: float) -> str:
        """Why a stream given up on was: its worker stalled, or kept it starved while busy."""
        silent_s = now_s - silent_since_s
        worker = self.registry.get(worker_id)
        idle_s = None if worker is None else now_s - worker.progress_s
        if idle_s is not None and idle_s < self.stall_s:
            step = f", {worker.step_running_s:.1f} s into one step" if worker.step_running_s else ""
            return f"sent no token for {silent_s:.1f} s while its engine worked{step} (starved)"
        idle = "" if idle_s is None else f", its engine idle for {idle_s:.1f} s"
        return f"stalled (no token for {silent_s:.1f} s{idle})"

    async def next_event(
        self, read: asyncio.Future[T], lost: LostFlag, worker_id: str, silent_since_s: float
    ) -> T:
        """`read`'s result (the stream's next event) when it comes in time.

        Interrupted(lost) when the worker leaves the rotation, Interrupted(None) when the
        stream is hung or starved (`wait_s` ran out). The read is kept across the waits
        while the worker is busy (cancelling it would end the gRPC stream), and cancelled
        on any way out but its own result.
        """
        try:
            while True:
                wait_s = self.wait_s(worker_id, silent_since_s, time.monotonic())
                if wait_s <= 0:
                    raise Interrupted(None)
                try:
                    return await first_of(asyncio.shield(read), [lost], wait_s)
                except Interrupted as stop:
                    if stop.flag is not None:
                        raise
        except BaseException:
            read.cancel()
            raise
