"""The `full` KV reservation (the baseline blocks on demand replaced): Allocate takes the
blocks for prompt + max_tokens at once, so a sequence never grows and is never preempted,
fewer requests fit, and a request that does not fit is refused (the coordinator queues
it) until blocks come back. Greedy tokens stay transformers'."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from disagg.engine.sampling_params import SamplingParams
from disagg.kv.block_manager import reserved_num_tokens
from tests.helpers import random_prompts, reference_tokens, tiny_loaded
from tests.worker_harness import BLOCK_SIZE, RpcAborted, decode_side, prefill_side

MAX_TOKENS = 24
NUM_BLOCKS = 20
"""Room for two whole budgets (8 blocks each), not three; on demand, all three fit."""


def test_reserved_tokens_are_the_whole_budget_only_when_full():
    assert reserved_num_tokens(7, 24, "full") == 31
    assert reserved_num_tokens(7, 8000, "full") == 8007
    assert reserved_num_tokens(7, 24) == reserved_num_tokens(7, 24, "on-demand") < 31


def blocks_for(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_SIZE)


def test_full_reservation_holds_the_budget_never_grows_and_keeps_the_tokens(tmp_path: Path):
    prompts = random_prompts(3, [5, 6, 7], seed=14)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    budgets = [blocks_for(len(p) + MAX_TOKENS) for p in prompts]
    assert budgets[0] + budgets[1] <= NUM_BLOCKS < sum(budgets)

    async def scenario() -> tuple[list[list[int]], list[int], int]:
        async with (
            decode_side(tmp_path, num_kv_blocks=NUM_BLOCKS, reservation="full") as decode,
            prefill_side() as prefill,
        ):
            manager = decode.engine.block_manager
            first = [await decode.allocate(p, params) for p in prompts[:2]]
            assert [len(h.block_ids) for h in first] == budgets[:2]
            with pytest.raises(RpcAborted) as refused:  # the coordinator queues it
                await decode.allocate(prompts[2], params)
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            num_free = manager.num_free_blocks
            taken: list[int] = []
            allocate = manager.allocate
            manager.allocate = lambda n, *args: taken.append(n) or allocate(n, *args)

            async def one(prompt: list[int], handle) -> list[int]:
                reply = await prefill.prefill(prompt, params, handle)
                events = [e async for e in decode.decode(handle, reply.first_token_id)]
                assert events[-1].finish_reason == "length"
                return [reply.first_token_id] + [e.token_id for e in events if e.token_id]

            both = asyncio.gather(*(one(p, h) for p, h in zip(prompts, first)))
            tokens = await asyncio.wait_for(both, 60)
            assert not any(taken), "a fully reserved sequence grew"
            assert num_free == NUM_BLOCKS - sum(budgets[:2])
            third = await decode.allocate(prompts[2], params)  # the blocks came back
            tokens.append(await asyncio.wait_for(one(prompts[2], third), 60))
            await asyncio.wait_for(_idle(prefill, decode), 10)
            return tokens, taken, decode.engine.scheduler.num_preemptions

    tokens, taken, num_preemptions = asyncio.run(scenario())
    assert num_preemptions == 0
    model = tiny_loaded().model
    assert tokens == [reference_tokens(model, p, MAX_TOKENS) for p in prompts]


async def _idle(prefill, decode) -> None:
    while not (prefill.is_idle() and decode.is_idle()):
        await asyncio.sleep(0.01)
