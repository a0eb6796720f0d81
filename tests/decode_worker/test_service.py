"""The decode service in-process: Allocate keeps the request, Decode streams, nothing leaks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from decode_worker.kv_handle import HandleState
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.sequence import SequenceStatus
from disagg.rpc import control_pb2 as pb
from disagg.rpc.prefill_reply import PrefillAborted
from tests.helpers import random_prompts, reference_tokens, tiny_loaded
from tests.worker_harness import FakeContext, RpcAborted, colocated_prefill, decode_side

GREEDY = SamplingParams(temperature=0, max_tokens=6)


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def prefill_request(prompt: list[int], handle: pb.KVHandle) -> pb.PrefillRequest:
    return pb.PrefillRequest(request_id="r", prompt_token_ids=prompt, handle=handle)


def test_allocate_keeps_the_request_waiting_for_its_kv(tmp_path: Path):
    async def scenario() -> None:
        async with decode_side(tmp_path) as decode:
            params = SamplingParams(temperature=0.5, seed=7, max_tokens=3)
            handle = await decode.allocate([3, 4, 5], params)
            kept = decode.table.get(handle.handle_id).sequence
            assert kept.prompt_token_ids == [3, 4, 5] and kept.params == params
            assert kept.status == SequenceStatus.WAITING_FOR_KV
            free = pb.FreeRequest(handle_id=handle.handle_id, reason="cancelled")
            assert (await decode.service.Free(free, FakeContext())).freed
            assert decode.is_idle()

    asyncio.run(scenario())


def test_a_request_that_can_never_fit_is_invalid_not_exhausted(tmp_path: Path):
    async def scenario() -> None:
        async with decode_side(tmp_path, num_kv_blocks=8) as decode:
            with pytest.raises(RpcAborted) as never:
                await decode.allocate([5] * 20, SamplingParams(max_tokens=20))
            assert never.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert never.value.trailers == {"disagg-param": "max_tokens"}
            held = await decode.allocate([5] * 20, SamplingParams(max_tokens=8))  # 7 blocks
            with pytest.raises(RpcAborted) as later:
                await decode.allocate([5] * 4, SamplingParams(max_tokens=4))  # 2 blocks
            assert later.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            decode.table.release(held.handle_id)
            assert decode.is_idle()

    asyncio.run(scenario())


def test_colocated_prefill_then_decode_equals_the_reference(tmp_path: Path):
    prompt = random_prompts(1, [19], seed=8)[0]

    async def scenario() -> list[int]:
        async with decode_side(tmp_path, colocated=True) as decode:
            handle = await decode.allocate(prompt, GREEDY)
            reply = await colocated_prefill(decode).Prefill(
                prefill_request(prompt, handle), FakeContext()
            )
            assert decode.table.get(handle.handle_id).state == HandleState.READY
            events = [e async for e in decode.decode(handle, reply.first_token_id)]
            assert events[-1].finish_reason == "length"
            await wait_for(decode.is_idle)
            return [reply.first_token_id] + [e.token_id for e in events]

    assert asyncio.run(scenario()) == reference_tokens(tiny_loaded().model, prompt, 6)


def test_a_decode_stream_closed_early_frees_its_blocks(tmp_path: Path):
    prompt = random_prompts(1, [9], seed=9)[0]
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def scenario() -> None:
        async with decode_side(tmp_path, colocated=True) as decode:
            handle = await decode.allocate(prompt, long)
            reply = await colocated_prefill(decode).Prefill(
                prefill_request(prompt, handle), FakeContext()
            )
            stream = decode.decode(handle, reply.first_token_id)
            await stream.__anext__()
            await stream.aclose()  # what a cancelled RPC does to the handler
            await wait_for(decode.is_idle)
            assert decode.table.end_reason(handle.handle_id) == "cancelled"

    asyncio.run(scenario())


def test_a_prefill_cancelled_while_queued_leaves_nothing_behind(tmp_path: Path):
    prompts = random_prompts(6, [120], seed=10)

    async def scenario() -> None:
        async with decode_side(tmp_path, colocated=True) as decode:
            handles = [await decode.allocate(p, GREEDY) for p in prompts]
            service = colocated_prefill(decode)
            tasks = [
                asyncio.create_task(service.Prefill(prefill_request(p, h), FakeContext()))
                for p, h in zip(prompts, handles)
            ]
            await asyncio.sleep(0)
            for task in tasks[1:]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for handle in handles:
                decode.table.release(handle.handle_id, "cancelled")
            await wait_for(decode.is_idle)

    asyncio.run(scenario())


def test_a_handle_freed_during_its_in_place_prefill_keeps_its_blocks_until_the_engine_is_done(
    tmp_path: Path,
):
    """A Free (or a lapsed lease) can end a handle while the engine still writes its prompt's
    K/V into the blocks: they must not go to another request until that write is over, or
    the other request decodes from this one's K/V."""
    first, second = random_prompts(2, [23, 23], seed=12)
    gate = threading.Event()

    async def scenario() -> list[int]:
        async with decode_side(tmp_path, colocated=True) as decode:
            step = decode.engine.step
            decode.engine.step = lambda *args: gate.wait(10) and step(*args)
            service = colocated_prefill(decode)
            freed = await decode.allocate(first, GREEDY)
            prefill = asyncio.create_task(
                service.Prefill(prefill_request(first, freed), FakeContext())
            )
            await wait_for(lambda: decode.loop.num_sequences == 1)
            free = pb.FreeRequest(handle_id=freed.handle_id, reason="cancelled")
            assert (await decode.service.Free(free, FakeContext())).freed
            handle = await decode.allocate(second, GREEDY)
            assert not set(handle.block_ids) & set(freed.block_ids), "blocks still written to"
            gate.set()
            with pytest.raises(PrefillAborted):
                await prefill  # its handle is gone: the RPC fails, the blocks come back
            reply = await service.Prefill(prefill_request(second, handle), FakeContext())
            events = [e async for e in decode.decode(handle, reply.first_token_id)]
            await wait_for(decode.is_idle)
            return [reply.first_token_id] + [e.token_id for e in events]

    assert asyncio.run(scenario()) == reference_tokens(tiny_loaded().model, second, 6)


def test_calls_naming_a_previous_incarnations_handle_are_refused(tmp_path: Path):
    stale_id = "decode-0-e1/" + "0" * 32

    async def scenario() -> None:
        async with decode_side(tmp_path, colocated=True, worker_id="decode-0-e2") as decode:
            handle = await decode.allocate([3, 4, 5], GREEDY)
            assert handle.handle_id.startswith("decode-0-e2/")
            stale = pb.KVHandle(handle_id=stale_id)
            calls = [
                decode.service.Free(pb.FreeRequest(handle_id=stale_id), FakeContext()),
                colocated_prefill(decode).Prefill(prefill_request([3, 4, 5], stale), FakeContext()),
                anext(decode.decode(stale, 7)),
            ]
            for call in calls:
                with pytest.raises(RpcAborted) as refused:
                    await call
                assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
                assert "decode-0-e1" in refused.value.details and "stale" in refused.value.details
            assert decode.table.get(handle.handle_id).state == HandleState.ALLOCATED
            decode.table.release(handle.handle_id)
            assert decode.is_idle()

    asyncio.run(scenario())


def test_a_decoding_handle_whose_lease_lapses_is_aborted_and_a_renewed_one_decodes_on(
    tmp_path: Path,
):
    """The coordinator renews the handles of live requests; one it stopped renewing (it died,
    or lost the request) is ended within the lease, mid-decode, and its blocks come back."""
    prompt = random_prompts(1, [9], seed=11)[0]
    long = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
    lease_s = 0.3

    async def start(decode) -> tuple[pb.KVHandle, AsyncIterator]:
        handle = await decode.allocate(prompt, long, lease_s=lease_s)
        reply = await colocated_prefill(decode).Prefill(
            prefill_request(prompt, handle), FakeContext()
        )
        stream = decode.decode(handle, reply.first_token_id)
        await anext(stream)
        return handle, stream

    async def scenario() -> None:
        async with decode_side(tmp_path, num_kv_blocks=1024, colocated=True) as decode:
            sweeper = asyncio.create_task(decode.service.expire_leases(0.05))
            live, live_stream = await start(decode)
            abandoned, abandoned_stream = await start(decode)
            started_s = time.monotonic()
            while time.monotonic() - started_s < 4 * lease_s:  # the coordinator's heartbeats
                decode.table.renew([live.handle_id], lease_s)
                await asyncio.sleep(0.05)
            assert decode.table.end_reason(abandoned.handle_id) == "lease_expired"
            assert [e.finish_reason async for e in abandoned_stream][-1] == "abort"
            assert decode.table.get(live.handle_id).state == HandleState.DECODING
            await live_stream.aclose()
            sweeper.cancel()
            await wait_for(decode.is_idle)

    asyncio.run(scenario())
