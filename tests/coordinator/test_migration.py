"""Request migration on fake workers: a request whose worker fails, hangs or leaves the rotation
continues elsewhere, and the client's stream has every token once, in order, with one finish."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from coordinator.errors import WorkerError
from coordinator.metrics import Metrics
from coordinator.migration import resumed_params, resumed_seed
from coordinator.request_timing import RequestTrace, timings
from disagg.engine.sampling_params import SamplingParams
from tests.coordinator.fake_workers import FakeWorker, expected_tokens, fake_cluster

PROMPT = [5, 6, 7, 8]
MAX_TOKENS = 12


async def run(scheduler, trace: RequestTrace, **params: object) -> list:
    sampling = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **params)
    return [update async for update in scheduler.generate(PROMPT, sampling, trace)]


def check_one_stream(updates: list) -> None:
    """The client's view: the undisturbed run's tokens, and a finish on the last one only."""
    assert [u.token_id for u in updates] == expected_tokens(PROMPT, MAX_TOKENS)
    assert [u.finish_reason for u in updates] == [None] * (MAX_TOKENS - 1) + ["length"]


def test_a_decode_stream_that_breaks_continues_on_another_worker_with_the_rest():
    broken, healthy = FakeWorker("d0", break_after=4), FakeWorker("d1")  # d0 is picked first

    async def scenario():
        scheduler = fake_cluster([broken, healthy], [FakeWorker("p0")])
        trace = RequestTrace("r")
        updates = await run(scheduler, trace)
        await asyncio.sleep(0.01)  # the Free of the broken handle runs in a task of its own
        return scheduler, trace, updates

    scheduler, trace, updates = asyncio.run(scenario())
    check_one_stream(updates)
    num_sent = 1 + 4  # the prefill's token and 4 decode tokens reached the client
    again = healthy.allocations[0]
    assert list(again.prompt_token_ids) == PROMPT + expected_tokens(PROMPT, num_sent)
    assert again.sampling.max_tokens == MAX_TOKENS - num_sent
    assert again.sampling.num_resumed_tokens == num_sent, "penalties count them as output"
    assert broken.freed == ["d0-h1"], "the broken stream's handle is given back"
    assert scheduler.registry.get("d0") is None, "UNAVAILABLE takes a worker out at once"
    assert trace.migrations == ["decode_failed"] and len(trace.recovery_s) == 1
    assert timings(trace)["migrations"] == 1


def test_a_stalled_decode_stream_is_migrated_within_the_stall_timeout():
    stalled, healthy = FakeWorker("d0", hang_after=3), FakeWorker("d1")
    stall_s = 0.3

    async def scenario():
        scheduler = fake_cluster([stalled, healthy], [FakeWorker("p0")], stall_timeout_s=stall_s)
        trace = RequestTrace("r")
        gaps, last_s = [], time.monotonic()
        updates = []
        async for update in scheduler.generate(
            PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), trace
        ):
            now_s = time.monotonic()
            gaps.append(now_s - last_s)
            last_s = now_s
            updates.append(update)
        return trace, updates, gaps

    trace, updates, gaps = asyncio.run(scenario())
    check_one_stream(updates)
    assert trace.migrations == ["stall"]
    assert stall_s <= max(gaps) < stall_s + 0.5, "the stall is caught at its deadline"
    assert stalled.freed, "the stalled stream's handle is given back"
    assert trace.recovery_s[0] < 0.5, "from the stall's detection to the next token"


def test_a_worker_leaving_the_rotation_interrupts_its_streams_at_once():
    stalled, healthy = FakeWorker("d0", hang_after=2), FakeWorker("d1")

    async def scenario():
        scheduler = fake_cluster([stalled, healthy], [FakeWorker("p0")], stall_timeout_s=60)
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, scheduler.registry.drop, "d0", "missed its heartbeats")
        trace = RequestTrace("r")
        start_s = time.monotonic()
        updates = await run(scheduler, trace)
        return trace, updates, time.monotonic() - start_s

    trace, updates, elapsed_s = asyncio.run(scenario())
    check_one_stream(updates)
    assert trace.migrations == ["decode_failed"]
    assert elapsed_s < 5, "the lost worker's stream must not wait for the stall timeout"


def test_a_failed_prefill_runs_again_on_another_prefill_worker():
    decode = FakeWorker("d0")
    failing, healthy = FakeWorker("p0", fail_prefill=True), FakeWorker("p1")

    async def scenario():
        scheduler = fake_cluster([decode], [failing, healthy])
        scheduler.registry.get("p1").prompt_tokens_in_flight = 1  # p0 is picked first
        trace = RequestTrace("r")
        updates = await run(scheduler, trace)
        await asyncio.sleep(0.01)
        return trace, updates

    trace, updates = asyncio.run(scenario())
    check_one_stream(updates)
    assert len(failing.prefills) == 1 and len(healthy.prefills) == 1
    assert decode.freed == ["d0-h1"], "the first attempt's KV handle is freed"
    assert trace.migrations == ["prefill_failed"]
    assert trace.prefill_worker == "p1"


def test_a_hung_prefill_moves_once_its_worker_leaves_the_rotation():
    decode = FakeWorker("d0")
    hung, healthy = FakeWorker("p0", hang_prefill=True), FakeWorker("p1")

    async def scenario():
        scheduler = fake_cluster([decode], [hung, healthy])
        scheduler.registry.get("p1").prompt_tokens_in_flight = 1  # p0 is picked first
        asyncio.get_running_loop().call_later(0.2, scheduler.registry.drop, "p0", "is silent")
        trace = RequestTrace("r")
        return trace, await asyncio.wait_for(run(scheduler, trace), 5)

    trace, updates = asyncio.run(scenario())
    check_one_stream(updates)
    assert trace.migrations == ["prefill_failed"] and trace.prefill_worker == "p1"


def test_worker_channels_have_keepalive():
    async def scenario():
        scheduler = fake_cluster([FakeWorker("d0")], [], keepalive_s=2.5)
        return dict(scheduler.registry.channel_options)

    options = asyncio.run(scenario())
    assert options["grpc.keepalive_time_ms"] == 2500
    assert options["grpc.keepalive_timeout_ms"] == 2500


def test_with_no_prefill_worker_left_the_decode_worker_prefills_in_place():
    decode, failing = FakeWorker("d0"), FakeWorker("p0", fail_prefill=True)

    async def scenario():
        scheduler = fake_cluster([decode], [failing])
        trace = RequestTrace("r")
        return trace, await run(scheduler, trace)

    trace, updates = asyncio.run(scenario())
    check_one_stream(updates)
    assert len(decode.prefills) == 1 and trace.prefill_worker == "d0"


def test_migrations_are_bounded_then_the_request_fails_cleanly():
    workers = [FakeWorker(f"d{i}", break_after=1, num_faults=9) for i in range(4)]

    async def scenario():
        scheduler = fake_cluster(workers, [FakeWorker("p0")], max_migrations=2)
        trace = RequestTrace("r")
        received = []
        with pytest.raises(WorkerError, match="after 2 migrations"):
            async for update in scheduler.generate(
                PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), trace
            ):
                received.append(update.token_id)
        return trace, received

    trace, received = asyncio.run(scenario())
    assert trace.migrations == ["decode_failed"] * 2
    assert received == expected_tokens(PROMPT, len(received)), "no token repeated or lost"
    assert len(received) == 3 * 2, "each of the 3 attempts sent its first token and 1 more"


def test_budgets_count_across_a_migration():
    params = SamplingParams(max_tokens=10, min_tokens=6, seed=3, stop_token_ids=(2,))
    rest = resumed_params(params, 4)
    assert (rest.max_tokens, rest.min_tokens, rest.stop_token_ids) == (6, 2, (2,))
    assert rest.num_resumed_tokens == 4 and resumed_params(rest, 3).num_resumed_tokens == 7
    assert resumed_params(params, 8).min_tokens == 0
    assert resumed_params(params, 0) is params


def test_a_resumed_request_says_how_much_of_its_prompt_is_output_and_the_wire_keeps_it():
    """The new workers replay that tail into the request's grammar (disagg/engine/grammars.py)."""
    from disagg.rpc.convert import sampling_from_proto, sampling_to_proto

    params = SamplingParams(max_tokens=10, constraint='{"kind":"json_object"}')
    rest = resumed_params(params, 4)
    assert rest.num_resumed_tokens == 4
    assert resumed_params(rest, 3).num_resumed_tokens == 7
    assert sampling_from_proto(sampling_to_proto(rest)) == rest


def test_a_resumed_seed_continues_the_same_draws():
    """The sampler seeds position i's draw from (seed, i) (disagg/engine/sampler.py); the
    resumed seed at position i must give the original seed's draw at position n + i."""
    from disagg.engine.sampler import _generator

    def draw_seed(seed: int, position: int) -> int:
        seq = SimpleNamespace(params=SimpleNamespace(seed=seed), num_output_tokens=position)
        return _generator(seq).initial_seed()

    for seed, num_produced in ((0, 1), (3, 4), (2**40 + 7, 1000)):
        shifted = resumed_seed(seed, num_produced)
        for position in range(3):
            assert draw_seed(shifted, position) == draw_seed(seed, num_produced + position)


def test_migrations_and_recovery_reach_the_metrics():
    metrics = Metrics("m")
    trace = RequestTrace("r", migrations=["stall", "decode_failed"], recovery_s=[0.4, 0.2])
    metrics.record(trace, "default", "finished", 4, 8, 1.0)
    text = metrics.registry
    assert text.get_sample_value("disagg_migrations_total", {"model": "m", "cause": "stall"}) == 1
    assert text.get_sample_value("disagg_recovery_seconds_count", {"model": "m"}) == 2


def test_a_stall_on_the_last_decode_worker_left_retries_it_instead_of_failing():
    """A host cut off takes one decode worker away; the survivor, slow under the moved load,
    then misses the stall deadline once. It is still in the rotation, so the request goes
    back to it rather than failing for want of a worker it has not seen fail."""
    gone, slow = FakeWorker("d0", break_after=2), FakeWorker("d1", hang_after=2)

    async def scenario():
        scheduler = fake_cluster([gone, slow], [FakeWorker("p0")], stall_timeout_s=0.2)
        trace = RequestTrace("r")
        return trace, await run(scheduler, trace)

    trace, updates = asyncio.run(scenario())
    check_one_stream(updates)
    assert trace.migrations == ["decode_failed", "stall"]
    assert len(slow.allocations) == 2, "the slow survivor serves the request's last attempt"


def test_a_stall_on_the_only_decode_worker_left_retries_there_rather_than_failing():
    slow = FakeWorker("d0", hang_after=3)  # one stall, then it behaves

    async def scenario():
        scheduler = fake_cluster([slow], [FakeWorker("p0")], stall_timeout_s=0.2)
        trace = RequestTrace("r")
        return trace, await run(scheduler, trace)

    trace, updates = asyncio.run(scenario())
    check_one_stream(updates)
    assert trace.migrations == ["stall"] and len(slow.allocations) == 2
