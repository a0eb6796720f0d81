"""The engine reuses cached prefixes and still produces transformers' tokens."""

from __future__ import annotations

import torch

from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from tests.helpers import random_prompts, reference_tokens, tiny_loaded

GREEDY = SamplingParams(temperature=0, max_tokens=12)
SYSTEM = random_prompts(1, [70], seed=7)[0]  # 17 full blocks of 4 and a partial one


def make_engine(**config: object) -> LLMEngine:
    defaults = {"block_size": 4, "num_kv_blocks": 256, "max_num_batched_tokens": 256}
    return LLMEngine(EngineConfig(**{**defaults, **config}), loaded=tiny_loaded())


def with_system(suffixes: list[list[int]]) -> list[list[int]]:
    return [SYSTEM + suffix for suffix in suffixes]


def test_a_cached_prefix_is_not_recomputed_and_tokens_equal_transformers():
    engine = make_engine()
    prompts = with_system(random_prompts(3, [5, 9, 1], seed=8))
    first = engine.generate(prompts[:1], GREEDY)[0]
    assert first.num_cached_tokens == 0
    computed = engine.stats.num_prefill_tokens
    rest = engine.generate(prompts[1:], GREEDY)
    assert [seq.num_cached_tokens for seq in rest] == [68, 68]  # 17 blocks of SYSTEM
    assert engine.stats.num_prefill_tokens - computed == sum(len(p) - 68 for p in prompts[1:])
    for seq, prompt in zip([first, *rest], prompts):
        assert seq.output_token_ids == reference_tokens(engine.loaded.model, prompt, 12)
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks and manager.num_cached_blocks > 17


def test_the_same_prompt_again_recomputes_only_its_last_block():
    engine = make_engine()
    prompt = SYSTEM[:64]  # ends exactly on a block boundary
    first = engine.generate([prompt], GREEDY)[0]
    again = engine.generate([prompt], GREEDY)[0]
    assert again.num_cached_tokens == 60
    assert again.output_token_ids == first.output_token_ids
    assert first.output_token_ids == reference_tokens(engine.loaded.model, prompt, 12)


def test_chunked_prompts_share_a_prefix_computed_chunk_by_chunk():
    engine = make_engine(max_num_batched_tokens=16)
    prompts = with_system(random_prompts(2, [7, 30], seed=9))
    seqs = engine.generate(prompts[:1], GREEDY) + engine.generate(prompts[1:], GREEDY)
    assert seqs[1].num_cached_tokens == 68
    for seq, prompt in zip(seqs, prompts):
        assert seq.output_token_ids == reference_tokens(engine.loaded.model, prompt, 12)


def test_shared_blocks_are_never_written_while_in_use():
    engine = make_engine()
    prompts = with_system(random_prompts(2, [3, 6], seed=10))
    engine.generate(prompts[:1], GREEDY)
    shared_ids = engine.block_manager.find_prefix(engine.scheduler.prefix_cache.hashes(SYSTEM))
    before = [engine.kv_cache.k[layer][shared_ids].clone() for layer in range(2)]
    seqs = [engine.add_request(prompt, GREEDY) for prompt in prompts]  # both share, at once
    while engine.has_unfinished:
        engine.step()
    after = [engine.kv_cache.k[layer][shared_ids] for layer in range(2)]
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    assert [seq.num_cached_tokens for seq in seqs] == [72, 68]  # the first one, whole
    for seq, prompt in zip(seqs, prompts):
        assert seq.output_token_ids == reference_tokens(engine.loaded.model, prompt, 12)


def test_switched_off_nothing_is_cached():
    engine = make_engine(no_prefix_caching=True)
    prompts = with_system(random_prompts(2, [5, 9], seed=8))
    seqs = engine.generate(prompts[:1], GREEDY) + engine.generate(prompts[1:], GREEDY)
    assert [seq.num_cached_tokens for seq in seqs] == [0, 0]
    assert engine.block_manager.num_cached_blocks == 0


def test_a_next_turn_reuses_the_previous_turns_output_too():
    engine = make_engine()
    prompt = SYSTEM[:40]
    first = engine.generate([prompt], GREEDY)[0]  # its 12 output tokens are cached as well
    next_turn = prompt + first.output_token_ids + [5, 6, 7]
    again = engine.generate([next_turn], GREEDY)[0]
    assert again.num_cached_tokens == (40 + 11) // 4 * 4  # the last output has no KV
    assert again.output_token_ids == reference_tokens(engine.loaded.model, next_turn, 12)
