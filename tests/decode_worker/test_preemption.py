"""A decode pool too small for every sequence's whole budget: sequences grow block by
block, the youngest are preempted and recomputed, and every client still gets
transformers' tokens; afterwards every block is free."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from disagg.engine.sampling_params import SamplingParams
from disagg.kv.block_manager import LOOKAHEAD_TOKENS
from tests.helpers import random_prompts, reference_tokens, tiny_loaded
from tests.worker_harness import BLOCK_SIZE, decode_side, prefill_side

MAX_TOKENS = 24


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_sequences_preempted_on_the_decode_worker_resume_with_the_reference_tokens(
    tmp_path: Path,
):
    prompts = random_prompts(3, [5, 6, 7], seed=14)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    # 20 blocks of 4 tokens: each request is admitted with prompt + lookahead (<= 6 blocks),
    # all three at once, but their whole budgets (8 blocks each) cannot fit together
    num_blocks = 20
    assert num_blocks > 3 * -(-(7 + LOOKAHEAD_TOKENS) // BLOCK_SIZE)
    assert sum(-(-(len(p) + MAX_TOKENS) // BLOCK_SIZE) for p in prompts) > num_blocks

    async def scenario() -> tuple[list[list[int]], int]:
        async with (
            decode_side(tmp_path, num_kv_blocks=num_blocks) as decode,
            prefill_side() as prefill,
        ):
            handles = [await decode.allocate(p, params) for p in prompts]  # all admitted

            async def one(prompt: list[int], handle) -> list[int]:
                reply = await prefill.prefill(prompt, params, handle)
                events = [e async for e in decode.decode(handle, reply.first_token_id)]
                assert events[-1].finish_reason == "length"
                return [reply.first_token_id] + [e.token_id for e in events if e.token_id]

            tokens = await asyncio.gather(*(one(p, h) for p, h in zip(prompts, handles)))
            await wait_for(lambda: prefill.is_idle() and decode.is_idle())
            return tokens, decode.engine.scheduler.num_preemptions

    tokens, num_preemptions = asyncio.run(scenario())
    assert num_preemptions > 0
    model = tiny_loaded().model
    assert tokens == [reference_tokens(model, p, MAX_TOKENS) for p in prompts]
