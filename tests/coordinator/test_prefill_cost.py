"""The conditional-disaggregation cost model and the placement it drives, on plain figures and
registry records (no model, no workers): where a prompt is prefilled, and why."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.disagg_policy import observe_prefill, place_prefill
from coordinator.prefill_cost import PrefillSite, estimate
from coordinator.prefix_routing import PrefixIndex
from coordinator.registry import WorkerRecord, WorkerRegistry
from disagg.config import DispatchConfig
from disagg.rpc import control_pb2 as pb

RATE = 1000.0  # prompt tokens per second


def test_an_idle_decode_worker_prefills_in_place_what_would_cost_a_hop_remotely():
    remote = PrefillSite(RATE, num_uncached_tokens=200, overhead_s=0.05)
    in_place = PrefillSite(RATE, num_uncached_tokens=200)
    figures = estimate(remote, in_place, decode_step_s=0.02, num_running=0)
    assert figures.remote_s == pytest.approx(0.25)
    assert figures.in_place_s == pytest.approx(0.2)
    assert figures.stall_s == 0 and figures.is_in_place


def test_running_streams_make_a_long_suffix_cheaper_on_the_prefill_worker():
    remote = PrefillSite(RATE, num_uncached_tokens=1000, overhead_s=0.05)
    in_place = PrefillSite(RATE, num_uncached_tokens=1000)
    figures = estimate(remote, in_place, decode_step_s=0.02, num_running=4)
    assert figures.in_place_s == pytest.approx(1.02)  # waits out the running step
    assert figures.stall_s == pytest.approx(4.0)  # 4 streams, 1 s each
    assert not figures.is_in_place


def test_a_short_suffix_stays_in_place_despite_running_streams():
    remote = PrefillSite(RATE, num_uncached_tokens=20, overhead_s=0.1)
    in_place = PrefillSite(RATE, num_uncached_tokens=20)
    assert estimate(remote, in_place, decode_step_s=0.02, num_running=4).is_in_place


def test_a_queue_on_the_prefill_worker_tips_a_long_suffix_in_place():
    in_place = PrefillSite(RATE, num_uncached_tokens=1000)
    idle = PrefillSite(RATE, num_uncached_tokens=1000, overhead_s=0.05)
    busy = PrefillSite(RATE, num_queued_tokens=8000, num_uncached_tokens=1000, overhead_s=0.05)
    assert not estimate(idle, in_place, decode_step_s=0.02, num_running=2).is_in_place
    assert estimate(busy, in_place, decode_step_s=0.02, num_running=2).is_in_place


def test_the_stall_weight_scales_what_running_streams_count_for():
    remote = PrefillSite(RATE, num_uncached_tokens=500, overhead_s=0.05)
    in_place = PrefillSite(RATE, num_uncached_tokens=500)
    assert not estimate(remote, in_place, 0.02, num_running=1, stall_weight=1.0).is_in_place
    assert estimate(remote, in_place, 0.02, num_running=1, stall_weight=0.0).is_in_place


def record(registry: WorkerRegistry, worker_id: str, role: str, **figures: float) -> WorkerRecord:
    info = pb.WorkerInfo(
        worker_id=worker_id, role=role, address="127.0.0.1:1", total_kv_blocks=100, block_size=16
    )
    registry.register(info)
    worker = registry.get(worker_id)
    registry.heartbeat(pb.HeartbeatRequest(worker_id=worker_id, free_kv_blocks=100, **figures))
    return worker


def place(
    num_tokens: int,
    num_kv_cached: int = 0,
    decode_figures: dict | None = None,
    prefill_figures: dict | None = None,
    **dispatch: object,
):
    async def scenario():
        registry = WorkerRegistry()
        decode = record(registry, "d0", "decode", **(decode_figures or {}))
        prefill = record(registry, "p0", "prefill", **(prefill_figures or {}))
        config = DispatchConfig(**{"disagg_policy": "auto", **dispatch})
        prompt = list(range(num_tokens))
        worker, decision = place_prefill(
            config, decode, [prefill], prompt, num_kv_cached, PrefixIndex()
        )
        return worker.worker_id, decision

    return asyncio.run(scenario())


def test_before_any_rate_is_measured_auto_falls_back_to_the_length_threshold():
    assert place(40, num_kv_cached=16) == ("d0", place(40, 16)[1])
    worker, decision = place(40, num_kv_cached=16)
    assert (worker, decision.reason, decision.placement) == ("d0", "threshold", "in_place")
    worker, decision = place(200)
    assert (worker, decision.reason, decision.placement) == ("p0", "threshold", "remote")


def test_measured_rates_from_heartbeats_decide_by_cost():
    busy_decode = {"decode_step_s": 0.03, "num_running_sequences": 8}
    prefill = {"prefill_tokens_per_s": 2000.0}
    worker, decision = place(600, decode_figures=busy_decode, prefill_figures=prefill)
    assert (worker, decision.reason) == ("p0", "cost")
    assert decision.estimate.stall_s == pytest.approx(8 * 600 / 2000)
    # the same long prompt on an idle decode worker: no stall, no hop
    worker, decision = place(600, prefill_figures=prefill)
    assert (worker, decision.reason, decision.placement) == ("d0", "cost", "in_place")


def test_the_decode_workers_own_rate_is_used_once_measured():
    slow_decode = {"prefill_tokens_per_s": 100.0}
    worker, decision = place(600, decode_figures=slow_decode, prefill_figures={
        "prefill_tokens_per_s": 2000.0})  # fmt: skip
    assert worker == "p0" and decision.estimate.in_place_s == pytest.approx(6.0)


def test_always_and_never_ignore_the_figures():
    figures = {"prefill_tokens_per_s": 2000.0}
    assert place(8, disagg_policy="always", prefill_figures=figures)[0] == "p0"
    worker, decision = place(4000, disagg_policy="never", prefill_figures=figures)
    assert (worker, decision.reason) == ("d0", "policy")


def test_a_colocated_worker_or_no_prefill_worker_prefills_in_place():
    async def scenario():
        registry = WorkerRegistry()
        colocated = record(registry, "c0", "colocated")
        decode = record(registry, "d0", "decode")
        config = DispatchConfig(disagg_policy="always")
        index = PrefixIndex()
        return (
            place_prefill(config, colocated, [], [1, 2, 3], 0, index)[1].reason,
            place_prefill(config, decode, [], [1, 2, 3], 0, index)[1].reason,
        )

    assert asyncio.run(scenario()) == ("colocated", "no_prefill_worker")


def test_prefill_overhead_is_the_call_beyond_queue_and_forward():
    async def scenario() -> WorkerRecord:
        worker = record(WorkerRegistry(), "p0", "prefill")
        observe_prefill(worker, 0.5, pb.PrefillResponse(queue_s=0.1, prefill_s=0.3))
        first = worker.prefill_overhead_s
        observe_prefill(worker, 0.6, pb.PrefillResponse(queue_s=0.1, prefill_s=0.3))
        return first, worker.prefill_overhead_s

    first, second = asyncio.run(scenario())
    assert first == pytest.approx(0.1)
    assert first < second < 0.2  # a moving average, not the last sample
