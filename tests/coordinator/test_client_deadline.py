"""The client's deadline, carried down: worker calls get it as their gRPC timeout, and a
request still running when it passes ends with DeadlineExceededError, not a migration, its
KV handle given back."""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.client_deadline import (
    OPENAI_TIMEOUT_HEADER,
    call_timeout_s,
    deadline_after,
    openai_deadline_s,
)
from coordinator.errors import DeadlineExceededError, classify
from coordinator.request_timing import RequestTrace
from disagg.engine.sampling_params import SamplingParams
from tests.coordinator.fake_workers import FakeWorker, fake_cluster

PARAMS = SamplingParams(temperature=0, max_tokens=12)


class TimedWorker(FakeWorker):
    """Records the gRPC timeout of every Prefill and Decode call."""

    def __init__(self, worker_id: str, **faults: object) -> None:
        super().__init__(worker_id, **faults)
        self.timeouts_s: list[float] = []

    async def Prefill(self, request, timeout: float):
        self.timeouts_s.append(timeout)
        return await super().Prefill(request, timeout)

    def Decode(self, request, timeout: float):
        self.timeouts_s.append(timeout)
        return super().Decode(request, timeout)


def run_with_deadline(decode: list, prefill: list, deadline_in_s: float):
    async def scenario():
        scheduler = fake_cluster(decode, prefill, stall_timeout_s=30.0)
        trace = RequestTrace("r", deadline_s=time.monotonic() + deadline_in_s)
        updates, started_s = [], time.monotonic()
        with pytest.raises(DeadlineExceededError):
            async for update in scheduler.generate([5, 6, 7], PARAMS, trace):
                updates.append(update)
        elapsed_s = time.monotonic() - started_s
        await asyncio.sleep(0.05)  # the Free runs in a task of its own
        return trace, updates, elapsed_s

    return asyncio.run(scenario())


def test_a_hung_decode_ends_at_the_deadline_with_its_handle_freed_and_no_migration():
    deadline_in_s = 0.3
    hung, spare = TimedWorker("d0", hang_after=3), TimedWorker("d1")
    prefill = TimedWorker("p0")
    trace, updates, elapsed_s = run_with_deadline([hung, spare], [prefill], deadline_in_s)
    assert len(updates) == 4, "the prefill's token and 3 decode tokens came before the hang"
    assert deadline_in_s <= elapsed_s < deadline_in_s + 0.5
    assert trace.migrations == [] and spare.allocations == []
    assert hung.freed == ["d0-h1"]
    assert all(0 < t <= deadline_in_s for t in prefill.timeouts_s + hung.timeouts_s)


def test_a_hung_prefill_ends_at_the_deadline_not_on_another_worker():
    decode, prefill = TimedWorker("d0"), TimedWorker("p0", hang_prefill=True)
    trace, updates, _ = run_with_deadline([decode], [prefill], 0.3)
    assert updates == [] and trace.migrations == []
    assert decode.freed == ["d0-h1"] and len(decode.allocations) == 1


def test_the_call_timeout_is_the_configured_one_cut_to_what_is_left():
    assert call_timeout_s(300.0, None) == 300.0
    assert 1.5 < call_timeout_s(300.0, time.monotonic() + 2.0) <= 2.0
    assert call_timeout_s(5.0, time.monotonic() + 100.0) == 5.0
    assert call_timeout_s(5.0, time.monotonic() - 1.0) > 0  # already past: fails at once


def test_the_openai_sdk_timeout_header_is_a_deadline_for_whole_responses_only():
    now_s = time.monotonic()
    deadline_s = openai_deadline_s({OPENAI_TIMEOUT_HEADER: "2.5"}, is_stream=False)
    assert now_s + 2.4 < deadline_s < now_s + 3.0
    assert openai_deadline_s({OPENAI_TIMEOUT_HEADER: "2.5"}, is_stream=True) is None
    for bad in ("soon", "nan", "inf", "-1", "0"):
        assert openai_deadline_s({OPENAI_TIMEOUT_HEADER: bad}, is_stream=False) is None
    assert openai_deadline_s({}, is_stream=False) is None
    assert deadline_after(None) is None


def test_a_passed_deadline_is_a_504():
    assert classify(DeadlineExceededError("late")).status == 504
