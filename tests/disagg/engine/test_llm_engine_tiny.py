"""The engine on tiny random-weight models of every supported kind, against transformers."""

from __future__ import annotations

import pytest
import torch

from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.errors import InvalidRequestError, OutOfBlocksError
from tests.helpers import random_prompts, reference_tokens, tiny_loaded

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def make_engine(kind: str = "llama", **config: object) -> LLMEngine:
    defaults = {"block_size": 4, "num_kv_blocks": 512, "max_num_batched_tokens": 256}
    return LLMEngine(EngineConfig(**{**defaults, **config}), loaded=tiny_loaded(kind))


def assert_all_blocks_free(engine: LLMEngine) -> None:
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert not engine.has_unfinished


@pytest.mark.slow  # several seconds: the full suite runs it
@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "qwen2"])
def test_batched_greedy_equals_transformers(kind):
    engine = make_engine(kind)
    prompts = random_prompts(6, [1, 3, 17, 40, 65, 130], seed=1)
    seqs = engine.generate(prompts, GREEDY)
    for seq, prompt in zip(seqs, prompts):
        assert seq.output_token_ids == reference_tokens(engine.loaded.model, prompt, 24)
    assert_all_blocks_free(engine)


@pytest.mark.slow  # several seconds: the full suite runs it
def test_chunked_prefill_and_staggered_arrivals_equal_transformers():
    engine = make_engine(max_num_batched_tokens=16)  # every prompt here needs chunks
    prompts = random_prompts(5, [37, 5, 90, 23, 61], seed=2)
    seqs = []
    for prompt in prompts:  # each arrives while the others are mid-flight
        seqs.append(engine.add_request(prompt, GREEDY))
        for _ in range(3):
            engine.step()
    while engine.has_unfinished:
        engine.step()
    for seq, prompt in zip(seqs, prompts):
        assert seq.output_token_ids == reference_tokens(engine.loaded.model, prompt, 24)
    assert_all_blocks_free(engine)


def test_preemption_under_block_pressure_keeps_tokens_exact():
    engine = make_engine(num_kv_blocks=24)  # 96 token slots for 4 sequences of ~50
    prompts = random_prompts(4, [26, 20, 30, 24], seed=3)
    seqs = engine.generate(prompts, GREEDY)
    for seq, prompt in zip(seqs, prompts):
        assert seq.output_token_ids == reference_tokens(engine.loaded.model, prompt, 24)
    assert_all_blocks_free(engine)


def test_many_sequences_with_mixed_stops_leave_every_block_free():
    engine = make_engine(num_kv_blocks=64)
    prompts = random_prompts(40, [3, 11, 29, 7], seed=4)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=1 + i % 13, seed=i) for i in range(40)
    ]
    seqs = engine.generate(prompts, params)
    assert [seq.num_output_tokens for seq in seqs if seq.finish_reason == "length"] == [
        1 + i % 13 for i, seq in enumerate(seqs) if seq.finish_reason == "length"
    ]
    assert_all_blocks_free(engine)


def test_abort_mid_decode_frees_blocks():
    engine = make_engine()
    seq = engine.add_request(
        random_prompts(1, [20])[0], SamplingParams(temperature=0, max_tokens=50)
    )
    for _ in range(4):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.abort(seq.request_id)
    assert seq.finish_reason == "abort"
    assert_all_blocks_free(engine)


def test_stop_token_ids_and_min_tokens():
    engine = make_engine()
    prompt = random_prompts(1, [12], seed=5)[0]
    free_run = engine.generate([prompt], GREEDY)[0].output_token_ids
    stop_at = free_run[5]
    stopped = engine.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=(stop_at,))
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.output_token_ids == free_run[: free_run.index(stop_at) + 1]
    held = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=(stop_at,), min_tokens=24)
    assert stop_at not in engine.generate([prompt], held)[0].output_token_ids


@pytest.mark.parametrize(
    ("prompt", "params", "error", "param"),
    [
        ([], GREEDY, InvalidRequestError, "prompt"),
        ([5] * 1000, SamplingParams(max_tokens=100), InvalidRequestError, "max_tokens"),
        ([99999], GREEDY, InvalidRequestError, "prompt"),
    ],
)
def test_bad_requests_raise_typed_errors_and_leak_nothing(prompt, params, error, param):
    engine = make_engine()
    with pytest.raises(error) as info:
        engine.add_request(prompt, params)
    assert info.value.param == param
    assert_all_blocks_free(engine)


def test_request_larger_than_the_pool_is_out_of_blocks_not_oom():
    engine = make_engine(num_kv_blocks=4)
    with pytest.raises(OutOfBlocksError):
        engine.add_request([5] * 20, GREEDY)
    assert_all_blocks_free(engine)


def test_kv_budget_sizes_the_pool():
    engine = make_engine(num_kv_blocks=None, kv_cache_memory_bytes=1 << 20)
    layout = engine.kv_cache.layout
    assert engine.block_manager.num_blocks == (1 << 20) // layout.bytes_per_block
    assert engine.kv_cache.k[0].shape == (engine.block_manager.num_blocks, 4, 2, 16)


def test_prefill_logits_match_transformers():
    engine = make_engine()
    prompt = random_prompts(1, [50], seed=6)[0]
    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=5))
    engine.step()
    with torch.inference_mode():
        expected = engine.loaded.model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    top = seq.output_logprobs[0].top
    assert [token for token, _ in top] == expected.topk(5).indices.tolist()
    assert torch.allclose(torch.tensor([lp for _, lp in top]), expected.topk(5).values, atol=1e-5)


@pytest.mark.slow  # several seconds: the full suite runs it
def test_engine_serves_the_fast_path_and_it_matches_the_first_engine():
    from disagg.model.llama import LlamaModel

    engine = make_engine()
    assert engine.model.fast and engine.model.attention_method == "auto"
    prompts = random_prompts(5, [9, 2, 33, 17, 70], seed=6)
    fast = [seq.output_token_ids for seq in engine.generate(prompts, GREEDY)]
    engine.runner.model = LlamaModel(engine.loaded.model, fast=False)
    first = [seq.output_token_ids for seq in engine.generate(prompts, GREEDY)]
    assert fast == first
    assert_all_blocks_free(engine)
