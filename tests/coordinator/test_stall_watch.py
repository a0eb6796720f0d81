"""Busy is not hung: a decode stream that goes silent on a worker whose engine still steps (its
heartbeats report a growing step count) is waited for, up to the hard bound; one on a worker
that makes no progress is migrated at the stall timeout, as before."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace

from coordinator.registry import WorkerRegistry
from coordinator.request_timing import RequestTrace
from coordinator.stall_watch import BUSY_STALL_FACTOR, StallWatch
from disagg.engine.sampling_params import SamplingParams
from disagg.rpc import control_pb2 as pb
from tests.coordinator.fake_workers import FakeWorker, expected_tokens, fake_cluster

PROMPT = [5, 6, 7, 8]
MAX_TOKENS = 12
STALL_S = 0.3
BEAT_S = 0.03
"""The fake heartbeats' interval: well inside the stall timeout, as 1 s is inside 10 s."""


def watch_over(progress_s: float | None) -> StallWatch:
    """A watch over one worker "d0" whose engine last made progress at `progress_s` (None:
    the worker is not in the rotation)."""
    record = SimpleNamespace(progress_s=progress_s, step_running_s=0.0)
    record = None if progress_s is None else record
    registry = SimpleNamespace(get=lambda worker_id: record if worker_id == "d0" else None)
    return StallWatch(registry, stall_s=10.0)


def test_a_stream_on_a_worker_without_progress_gets_the_stall_timeout_from_its_last_token():
    watch = watch_over(progress_s=95.0)
    assert watch.wait_s("d0", silent_since_s=100.0, now_s=104.0) == 6.0
    assert watch.wait_s("d0", silent_since_s=100.0, now_s=110.0) == 0.0  # hung: migrate


def test_a_worker_in_progress_moves_the_deadline_to_a_stall_timeout_past_its_last_step():
    watch = watch_over(progress_s=108.0)
    assert watch.wait_s("d0", silent_since_s=100.0, now_s=110.0) == 8.0
    assert "starved" in watch.why("d0", 100.0, 110.0)


def test_progress_never_stretches_the_silence_past_the_hard_bound():
    watch = watch_over(progress_s=129.0)
    assert watch.starved_s == BUSY_STALL_FACTOR * 10.0 == 30.0
    assert watch.wait_s("d0", silent_since_s=100.0, now_s=125.0) == 5.0
    assert watch.wait_s("d0", silent_since_s=100.0, now_s=130.0) == 0.0


def test_a_worker_out_of_the_rotation_gets_the_plain_stall_timeout():
    watch = watch_over(progress_s=None)
    assert watch.wait_s("d0", silent_since_s=100.0, now_s=104.0) == 6.0
    assert "stalled" in watch.why("d0", 100.0, 110.0)


def test_a_heartbeat_marks_progress_only_when_the_step_count_grows():
    async def scenario() -> list[float]:
        registry = WorkerRegistry()
        registry.register(pb.WorkerInfo(worker_id="d0", role="decode", address="127.0.0.1:1"))
        record = registry.get("d0")
        seen = [record.progress_s]
        for num_steps in (0, 5, 5, 6):
            await asyncio.sleep(0.002)  # NOTE: so that each heartbeat has its own time
            registry.heartbeat(pb.HeartbeatRequest(worker_id="d0", num_engine_steps=num_steps))
            seen.append(record.progress_s)
        return seen

    at_register, after_0, after_5, after_5_again, after_6 = asyncio.run(scenario())
    assert after_0 == at_register, "no step yet: the registration is the last progress"
    assert after_5 > after_0
    assert after_5_again == after_5, "the same count is no progress"
    assert after_6 > after_5


def test_a_heartbeat_inside_a_long_step_marks_progress_though_the_count_stands():
    async def scenario() -> list[float]:
        registry = WorkerRegistry()
        registry.register(pb.WorkerInfo(worker_id="d0", role="decode", address="127.0.0.1:1"))
        seen = []
        for step_running_s in (0.0, 0.0, 4.5, 0.0):
            await asyncio.sleep(0.002)
            beat = pb.HeartbeatRequest(
                worker_id="d0", num_engine_steps=7, step_running_s=step_running_s
            )
            registry.heartbeat(beat)
            seen.append(registry.get("d0").progress_s)
        return seen

    first, between, inside, after = asyncio.run(scenario())
    assert between == first and inside > between and after == inside


class PausingWorker(FakeWorker):
    """A decode worker busy for `pause_s` (prefilling in place, say) before its token number
    `pause_after + 1`: the stream is silent, then goes on."""

    def __init__(self, worker_id: str, pause_after: int, pause_s: float) -> None:
        super().__init__(worker_id)
        self.pause_after, self.pause_s = pause_after, pause_s

    def Decode(self, request: pb.DecodeRequest, timeout: float):
        stream = super().Decode(request, timeout)
        stream.events = self._paused(stream.events)
        return stream

    async def _paused(self, events):
        num_sent = 0
        async for event in events:
            if num_sent == self.pause_after:
                await asyncio.sleep(self.pause_s)
            yield event
            num_sent += 1


async def beat(registry: WorkerRegistry, worker_id: str, is_stepping: bool) -> None:
    """Heartbeats every BEAT_S, their step count growing only while `is_stepping`."""
    num_steps = 0
    while True:
        num_steps += is_stepping
        request = pb.HeartbeatRequest(
            worker_id=worker_id, free_kv_blocks=1000, num_engine_steps=num_steps
        )
        registry.heartbeat(request)
        await asyncio.sleep(BEAT_S)


async def timed_run(scheduler, trace: RequestTrace, heartbeats: list[tuple[str, bool]]):
    """The request's updates and the longest gap between two of them, in seconds, while the
    named workers heartbeat (stepping or not)."""
    beats = [asyncio.create_task(beat(scheduler.registry, w, s)) for w, s in heartbeats]
    updates, gaps, last_s = [], [], time.monotonic()
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        async for update in scheduler.generate(PROMPT, params, trace):
            now_s = time.monotonic()
            gaps.append(now_s - last_s)
            last_s = now_s
            updates.append(update)
    finally:
        for task in beats:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return updates, max(gaps)


def check_one_stream(updates: list) -> None:
    assert [u.token_id for u in updates] == expected_tokens(PROMPT, MAX_TOKENS)
    assert [u.finish_reason for u in updates] == [None] * (MAX_TOKENS - 1) + ["length"]


def test_a_busy_worker_keeps_its_silent_stream_past_the_stall_timeout():
    pause_s = 2 * STALL_S  # beyond the stall timeout, inside the hard bound
    busy, spare = PausingWorker("d0", pause_after=3, pause_s=pause_s), FakeWorker("d1")

    async def scenario():
        scheduler = fake_cluster([busy, spare], [FakeWorker("p0")], stall_timeout_s=STALL_S)
        trace = RequestTrace("r")
        return trace, *await timed_run(scheduler, trace, [("d0", True), ("d1", True)])

    trace, updates, max_gap_s = asyncio.run(scenario())
    check_one_stream(updates)
    assert max_gap_s >= pause_s, "the pause really silenced the stream past the stall timeout"
    assert trace.migrations == [], "a busy worker's stream is not taken for hung"
    assert len(busy.allocations) == 1 and spare.allocations == [] and busy.freed == []


def test_a_stream_starved_on_a_busy_worker_is_migrated_at_the_hard_bound():
    starving, spare = FakeWorker("d0", hang_after=3), FakeWorker("d1")

    async def scenario():
        scheduler = fake_cluster([starving, spare], [FakeWorker("p0")], stall_timeout_s=STALL_S)
        trace = RequestTrace("r")
        return trace, *await timed_run(scheduler, trace, [("d0", True), ("d1", True)])

    trace, updates, max_gap_s = asyncio.run(scenario())
    check_one_stream(updates)
    starved_s = BUSY_STALL_FACTOR * STALL_S
    assert starved_s <= max_gap_s < starved_s + 0.5, "waited while busy, up to the bound only"
    assert trace.migrations == ["stall"] and len(spare.allocations) == 1
    assert starving.freed, "the starved stream's handle is given back"


def test_a_worker_that_heartbeats_without_stepping_is_hung_at_the_stall_timeout():
    wedged, spare = FakeWorker("d0", hang_after=3), FakeWorker("d1")

    async def scenario():
        scheduler = fake_cluster([wedged, spare], [FakeWorker("p0")], stall_timeout_s=STALL_S)
        trace = RequestTrace("r")
        return trace, *await timed_run(scheduler, trace, [("d0", False), ("d1", True)])

    trace, updates, max_gap_s = asyncio.run(scenario())
    check_one_stream(updates)
    assert STALL_S <= max_gap_s < STALL_S + 0.25, "no progress: not one wait more than before"
    assert trace.migrations == ["stall"] and len(spare.allocations) == 1


def test_a_busy_worker_that_leaves_the_rotation_loses_its_streams_at_once():
    """Busy past the stall timeout (0.3 s), then dropped at 0.5 s (its heartbeats stop
    counting): the stream moves then, not at the hard bound."""
    dropped, spare = FakeWorker("d0", hang_after=3), FakeWorker("d1")

    async def scenario():
        scheduler = fake_cluster([dropped, spare], [FakeWorker("p0")], stall_timeout_s=STALL_S)
        asyncio.get_running_loop().call_later(0.5, scheduler.registry.drop, "d0", "is gone")
        trace = RequestTrace("r")
        return trace, *await timed_run(scheduler, trace, [("d0", True), ("d1", True)])

    trace, updates, max_gap_s = asyncio.run(scenario())
    check_one_stream(updates)
    assert trace.migrations == ["decode_failed"]
    assert max_gap_s < BUSY_STALL_FACTOR * STALL_S, "the loss, not the hard bound, ended it"
