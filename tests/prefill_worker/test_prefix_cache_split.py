"""A cached prefix on the prefill side, the decode side, both or neither: the prefill worker
computes only past its own, ships only past the decode worker's, and the tokens are exact."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from disagg.engine.sampling_params import SamplingParams
from disagg.rpc import control_pb2 as pb
from disagg.rpc.convert import sampling_to_proto
from tests.helpers import random_prompts, reference_tokens, tiny_loaded
from tests.worker_harness import (
    BLOCK_SIZE,
    FakeContext,
    colocated_prefill,
    decode_side,
    prefill_side,
)

GREEDY = SamplingParams(temperature=0, max_tokens=8)
SYSTEM = random_prompts(1, [30], seed=11)[0]  # 7 full blocks of 4 and a partial one
NUM_SHARED = len(SYSTEM) // BLOCK_SIZE * BLOCK_SIZE  # 28


@pytest.mark.parametrize(
    ("prefill_caches", "decode_caches"),
    [(True, True), (True, False), (False, True), (False, False)],
)
def test_a_cached_prefix_anywhere_gives_the_reference_tokens(
    tmp_path: Path, prefill_caches: bool, decode_caches: bool
):
    first, second = SYSTEM + [3, 4, 5], SYSTEM + [6, 7, 8, 9, 10, 11]

    async def scenario() -> list[tuple]:
        async with (
            decode_side(tmp_path, prefix_caching=decode_caches) as decode,
            prefill_side(prefix_caching=prefill_caches) as prefill,
        ):
            results = []
            for prompt in (first, second):
                handle = await decode.allocate(prompt, GREEDY)
                reply = await prefill.prefill(prompt, GREEDY, handle)
                events = [e async for e in decode.decode(handle, reply.first_token_id)]
                tokens = [reply.first_token_id] + [e.token_id for e in events]
                results.append((tokens, handle.num_cached_tokens, reply))
            await wait_idle(prefill, decode)
            return results

    (cold_tokens, _, cold), (warm_tokens, decode_cached, warm) = asyncio.run(scenario())
    model = tiny_loaded().model
    assert cold_tokens == reference_tokens(model, first, 8)
    assert warm_tokens == reference_tokens(model, second, 8)
    assert cold.num_cached_tokens == 0
    assert warm.num_cached_tokens == (NUM_SHARED if prefill_caches else 0)
    assert decode_cached == (NUM_SHARED if decode_caches else 0)
    bytes_per_token = cold.kv_bytes // len(first)
    assert warm.kv_bytes == bytes_per_token * (len(second) - decode_cached)


async def wait_idle(prefill, decode, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if prefill.is_idle() and decode.is_idle():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("workers did not go idle: blocks leaked?")


def test_a_decode_worker_prefilling_in_place_computes_only_past_its_cached_prefix(tmp_path):
    first, second = SYSTEM + [3, 4, 5], SYSTEM + [6, 7]

    async def scenario() -> list[tuple]:
        async with decode_side(tmp_path, colocated=True) as decode:
            in_place = colocated_prefill(decode)
            results = []
            for prompt in (first, second):
                handle = await decode.allocate(prompt, GREEDY)
                request = pb.PrefillRequest(
                    request_id="r",
                    prompt_token_ids=prompt,
                    sampling=sampling_to_proto(GREEDY),
                    handle=handle,
                )
                reply = await in_place.Prefill(request, FakeContext())
                events = [e async for e in decode.decode(handle, reply.first_token_id)]
                tokens = [reply.first_token_id] + [e.token_id for e in events]
                results.append((tokens, handle.num_cached_tokens, reply.num_cached_tokens))
            for _ in range(1000):
                if decode.is_idle():
                    break
                await asyncio.sleep(0.01)
            assert decode.is_idle()
            return results

    (cold, _, _), (warm, handle_cached, reply_cached) = asyncio.run(scenario())
    model = tiny_loaded().model
    assert cold == reference_tokens(model, first, 8) and warm == reference_tokens(model, second, 8)
    assert handle_cached == reply_cached == NUM_SHARED
