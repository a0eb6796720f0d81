"""`--disagg-policy auto` through the cluster scheduler, on fake workers whose measured figures
are set as heartbeats would set them: each request is placed by the cost model, the decision
is in its trace, its timings, its log line and the placement counter."""

from __future__ import annotations

import asyncio
import json
import logging

from coordinator.metrics import Metrics
from coordinator.request_timing import RequestTrace, timings
from disagg.engine.sampling_params import SamplingParams
from tests.coordinator.fake_workers import FakeWorker, expected_tokens, fake_cluster

LONG = [i % 900 + 50 for i in range(1000)]  # 1000 tokens, below the fake vocabulary
SHORT = list(range(100, 105))


async def run(scheduler, prompt: list[int]) -> tuple[RequestTrace, list[int]]:
    trace = RequestTrace(f"r{len(prompt)}")
    sampling = SamplingParams(temperature=0, max_tokens=3)
    tokens = [update.token_id async for update in scheduler.generate(prompt, sampling, trace)]
    await asyncio.sleep(0.01)  # Free runs in a task of its own
    return trace, tokens


def busy_cluster():
    """Decode worker d0 runs 4 streams; prefill worker p0 has 2000 prompt tokens queued."""
    decode, prefill = FakeWorker("d0"), FakeWorker("p0")
    scheduler = fake_cluster([decode], [prefill], disagg_policy="auto")
    d0, p0 = scheduler.registry.get("d0"), scheduler.registry.get("p0")
    d0.num_running_sequences, d0.decode_step_s = 4, 0.01
    p0.prefill_tokens_per_s, p0.prompt_tokens_in_flight = 1000.0, 2000
    return scheduler


def test_auto_prefills_a_short_prompt_in_place_and_a_long_one_remotely_by_cost():
    async def scenario():
        scheduler = busy_cluster()
        return [await run(scheduler, SHORT), await run(scheduler, LONG)]

    (short, short_tokens), (long, long_tokens) = asyncio.run(scenario())
    # short: 0.01 + 0.005 s in place + 4 x 0.005 s stalled < (2000 + 5) / 1000 s remote
    assert (short.prefill_worker, short.prefill_placement) == ("d0", "in_place")
    # long: 0.01 + 1 s in place + 4 x 1 s stalled > (2000 + 1000) / 1000 s remote
    assert (long.prefill_worker, long.prefill_placement) == ("p0", "remote")
    assert short.placement_reason == long.placement_reason == "cost"
    assert short_tokens == expected_tokens(SHORT, 3) and long_tokens == expected_tokens(LONG, 3)
    assert timings(short)["prefill_placement"] == "in_place"
    assert timings(long)["placement_reason"] == "cost"


def test_a_prefill_call_updates_the_workers_measured_overhead():
    async def scenario() -> float:
        scheduler = busy_cluster()
        await run(scheduler, LONG)
        return scheduler.registry.get("p0").prefill_overhead_s

    assert asyncio.run(scenario()) > 0


def test_each_decision_is_counted_and_logged(caplog):
    trace = RequestTrace("r1", prefill_placement="in_place", placement_reason="cost")
    trace.first_token_s = trace.arrival_s + 0.1
    metrics = Metrics("m")
    with caplog.at_level(logging.INFO, logger="disagg.requests"):
        metrics.record(trace, "default", "ok", 10, 3, 0.5)
        metrics.record(trace, "default", "ok", 10, 3, 0.5)
    line = json.loads(caplog.records[-1].getMessage())
    assert (line["prefill_placement"], line["placement_reason"]) == ("in_place", "cost")
    sample = metrics.registry.get_sample_value(
        "disagg_prefill_placements_total",
        {"model": "m", "placement": "in_place", "reason": "cost"},
    )
    assert sample == 2
