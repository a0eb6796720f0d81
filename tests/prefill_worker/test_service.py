"""The prefill service in-process: KV shipped to a real decode service, and no stalls."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from disagg.engine.sampling_params import SamplingParams
from tests.helpers import random_prompts, reference_tokens, tiny_loaded
from tests.worker_harness import RpcAborted, decode_side, prefill_side

GREEDY = SamplingParams(temperature=0, max_tokens=8)


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_prefill_ships_kv_that_decodes_to_the_reference_tokens(tmp_path: Path):
    prompts = random_prompts(3, [5, 23, 40], seed=3)

    async def scenario() -> list[list[int]]:
        async with decode_side(tmp_path) as decode, prefill_side() as prefill:

            async def one(prompt: list[int]) -> list[int]:
                handle = await decode.allocate(prompt, GREEDY)
                reply = await prefill.prefill(prompt, GREEDY, handle)
                assert reply.kv_bytes > 0 and reply.queue_s >= 0
                events = [e async for e in decode.decode(handle, reply.first_token_id)]
                return [reply.first_token_id] + [e.token_id for e in events]

            tokens = await asyncio.gather(*(one(p) for p in prompts))
            await wait_for(lambda: prefill.is_idle() and decode.is_idle())
            return tokens

    tokens = asyncio.run(scenario())
    model = tiny_loaded().model
    assert tokens == [reference_tokens(model, p, 8) for p in prompts]


def test_a_receiver_that_never_reads_does_not_block_another_prefill(tmp_path: Path):
    """KV send completion waits off the engine thread: a stuck handle stalls only itself."""
    # 640 tokens x 2 kv heads x 16 dims x 4 bytes = 80 KiB a layer, computed in one step:
    # sent zero-copy, so the frames of a handle whose endpoint nobody reads never complete.
    stuck_prompt = random_prompts(1, [640], seed=4)[0]
    prompt = random_prompts(1, [12], seed=5)[0]

    async def scenario() -> None:
        async with (
            decode_side(tmp_path) as decode,
            prefill_side(send_timeout_s=3.0, max_num_batched_tokens=1024) as prefill,
        ):
            stuck_handle = await decode.allocate(stuck_prompt, GREEDY)
            stuck_handle.zmq_endpoint = f"ipc://{tmp_path}/nobody-reads-here.sock"
            stuck = asyncio.create_task(prefill.prefill(stuck_prompt, GREEDY, stuck_handle))
            await wait_for(lambda: prefill.completions.num_pending == 1)
            handle = await decode.allocate(prompt, GREEDY)
            reply = await asyncio.wait_for(prefill.prefill(prompt, GREEDY, handle), 2.0)
            assert not stuck.done(), "the stuck send should still be waiting"
            assert reply.kv_bytes > 0
            [_ async for _ in decode.decode(handle, reply.first_token_id)]
            with pytest.raises(TimeoutError):
                await stuck
            await wait_for(prefill.is_idle)

    asyncio.run(scenario())


def test_a_prompt_larger_than_the_pool_is_an_invalid_argument(tmp_path: Path):
    async def scenario() -> None:
        async with decode_side(tmp_path) as decode, prefill_side() as prefill:
            handle = await decode.allocate([5] * 8, GREEDY)
            huge = [5] * (prefill.engine.block_manager.num_blocks * 4 + 1)
            handle.num_prompt_tokens = len(huge)
            with pytest.raises(RpcAborted) as info:
                await prefill.prefill(huge, GREEDY, handle)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert prefill.is_idle()

    asyncio.run(scenario())
