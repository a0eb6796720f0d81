"""Cache-aware placement and the disaggregation policy, on fake workers: a prompt goes where
its prefix went before, unless load outweighs it; `never`/`auto` prefill on the decode worker."""

from __future__ import annotations

import asyncio

from coordinator.request_timing import RequestTrace
from disagg.engine.sampling_params import SamplingParams
from tests.coordinator.fake_workers import FakeWorker, fake_cluster

SYSTEM = list(range(100, 164))  # 4 full blocks of 16


async def run(scheduler, prompt: list[int]) -> RequestTrace:
    trace = RequestTrace(f"r{len(prompt)}-{prompt[-1]}")
    sampling = SamplingParams(temperature=0, max_tokens=3)
    [_ async for _ in scheduler.generate(prompt, sampling, trace)]
    await asyncio.sleep(0.01)  # Free runs in a task of its own
    return trace


def test_a_shared_prefix_follows_its_first_placement_and_a_new_one_spreads():
    decode = [FakeWorker("d0"), FakeWorker("d1")]
    prefill = [FakeWorker("p0"), FakeWorker("p1")]

    async def scenario() -> list[RequestTrace]:
        scheduler = fake_cluster(decode, prefill)
        first = await run(scheduler, SYSTEM + [1])
        # the first placement's worker now looks busier: a new prompt goes elsewhere...
        busier = scheduler.registry.get(first.decode_worker)
        scheduler.registry.reserve_blocks(
            busier, 32
        )  # 2 blocks: more than the new prompt's 0, less than the follow-up's 4
        scheduler.registry.get(first.prefill_worker).prompt_tokens_in_flight = 30
        other = await run(scheduler, list(range(500, 540)))
        # ...but a prompt sharing the cached prefix still goes back to it
        follow_up = await run(scheduler, SYSTEM + [2, 3, 4])
        return [first, other, follow_up]

    first, other, follow_up = asyncio.run(scenario())
    assert other.decode_worker != first.decode_worker
    assert other.prefill_worker != first.prefill_worker
    assert follow_up.decode_worker == first.decode_worker
    assert follow_up.prefill_worker == first.prefill_worker


def test_a_lost_worker_is_forgotten_by_the_index():
    decode = [FakeWorker("d0")]

    async def scenario() -> int:
        scheduler = fake_cluster(decode, [FakeWorker("p0")])
        await run(scheduler, SYSTEM + [1])
        record = scheduler.registry.get("d0")
        assert scheduler.prefix_index.num_cached_tokens(record, SYSTEM + [9]) == 64
        scheduler.registry.drop("d0", "is gone")
        return scheduler.prefix_index.num_cached_tokens(record, SYSTEM + [9])

    assert asyncio.run(scenario()) == 0


def test_policy_never_prefills_on_the_decode_worker():
    decode, prefill = FakeWorker("d0"), FakeWorker("p0")

    async def scenario() -> RequestTrace:
        return await run(fake_cluster([decode], [prefill], disagg_policy="never"), SYSTEM)

    trace = asyncio.run(scenario())
    assert trace.prefill_worker == "d0" and len(decode.prefills) == 1 and not prefill.prefills


def test_policy_auto_prefills_a_short_uncached_suffix_in_place_and_ships_a_long_one():
    decode, prefill = FakeWorker("d0"), FakeWorker("p0")

    async def scenario() -> list[RequestTrace]:
        scheduler = fake_cluster([decode], [prefill], disagg_policy="auto")
        return [await run(scheduler, SYSTEM[:20]), await run(scheduler, SYSTEM)]

    short, long = asyncio.run(scenario())
    assert short.prefill_worker == "d0" and long.prefill_worker == "p0"
