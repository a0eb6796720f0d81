"""The preemption benchmark times real work: a swap round trip restores the very K/V that
recompute wrote, and recompute fills the cache as the engine's own prefill does."""

from __future__ import annotations

import torch

from bench.preemption_cost import HostSwapSpace, bench_preemption, recompute, swap_in, swap_out
from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from tests.helpers import random_prompts, tiny_loaded


def test_swap_round_trip_restores_the_recomputed_kv_in_other_blocks():
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4), loaded=tiny_loaded())
    (prompt,) = random_prompts(1, [21], seed=3)
    # the reference: the engine's own prefill of the prompt
    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=2))
    engine.step()
    kv = engine.kv_cache
    expected = [kv.token_range(layer, seq.block_table, 0, 21) for layer in range(2)]
    manager = engine.block_manager
    blocks, resumed = manager.allocate(6), manager.allocate(6)
    recompute(engine, prompt, blocks)
    host = HostSwapSpace.for_blocks(kv, 6)
    swap_out(kv, torch.tensor(blocks), host)
    swap_in(kv, torch.tensor(resumed), host)
    assert host.nbytes == 6 * kv.layout.bytes_per_block
    for layer, (k, v) in enumerate(expected):
        got_k, got_v = kv.token_range(layer, resumed, 0, 21)
        torch.testing.assert_close(got_k, k)
        torch.testing.assert_close(got_v, v)


def test_bench_reports_each_context_with_its_swap_bytes():
    result = bench_preemption(tiny_loaded(), [8, 40], repeats=1, device="cpu", num_kv_blocks=16)
    assert [run["num_tokens"] for run in result["runs"]] == [8, 40]
    for run in result["runs"]:
        assert run["ms"]["recompute"] > 0 and run["ms"]["swap"] > 0
        assert run["swap_nbytes"] == -(-run["num_tokens"] // 16) * 16 * result["bytes_per_token"]
