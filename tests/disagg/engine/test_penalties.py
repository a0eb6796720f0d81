"""Penalties and logit_bias: the batched tensor ops against a plain per-token reference, and
greedy decoding with repetition_penalty against transformers' generate."""

from __future__ import annotations

import pytest
import torch

from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.penalties import apply_penalties
from disagg.engine.sampler import sample
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.sequence import Sequence
from disagg.errors import InvalidRequestError
from disagg.rpc.convert import sampling_from_proto, sampling_to_proto
from tests.helpers import random_prompts

VOCAB = 40


def reference(row: list[float], prompt: list[int], output: list[int], p: SamplingParams):
    """OpenAI's and transformers' formulas, one token at a time, in double precision."""
    logits = list(row)
    for token_id, bias in p.logit_bias:
        logits[token_id] += bias
    for token_id in set(prompt) | set(output):
        penalty = p.repetition_penalty
        logits[token_id] = (
            logits[token_id] / penalty if logits[token_id] > 0 else logits[token_id] * penalty
        )
    for token_id in set(output):
        logits[token_id] -= output.count(token_id) * p.frequency_penalty + p.presence_penalty
    return logits


def seq(prompt: list[int], output: list[int], **params: object) -> Sequence:
    made = Sequence(list(prompt), SamplingParams(**{"temperature": 0, **params}))
    made.output_token_ids = list(output)
    return made


MIXED = [
    dict(presence_penalty=0.7),
    dict(frequency_penalty=-1.3),
    dict(repetition_penalty=1.8),
    dict(logit_bias=((3, 5.0), (39, -100.0))),
    dict(),
    dict(
        presence_penalty=2.0, frequency_penalty=0.5, repetition_penalty=0.6, logit_bias=((7, 1.5),)
    ),
]


def test_a_mixed_batch_equals_the_reference_row_by_row():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(MIXED), VOCAB, generator=gen) * 4
    seqs = [
        seq(
            torch.randint(0, VOCAB, (9,), generator=gen).tolist(),
            torch.randint(0, VOCAB, (12,), generator=gen).tolist(),
            **params,
        )
        for params in MIXED
    ]
    adjusted = apply_penalties(logits, seqs)
    for row, s in enumerate(seqs):
        expected = reference(logits[row].tolist(), s.prompt_token_ids, s.output_token_ids, s.params)
        assert adjusted[row].tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(adjusted[4], logits[4])  # the neutral row is untouched


def test_a_batch_without_penalties_is_left_alone():
    logits = torch.randn(2, VOCAB)
    assert apply_penalties(logits, [seq([1, 2], [3]), seq([4], [])]) is logits


def test_logit_bias_minus_100_removes_the_greedy_token_and_plus_100_forces_one():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(-1).tolist()
    banned = [
        seq([1], [], logit_bias=((greedy[0], -100.0),)),
        seq([1], [], logit_bias=((17, 100.0),)),
    ]
    out = sample(logits.clone(), banned).token_ids
    assert out[0] != greedy[0] and out[0] == logits[0].topk(2).indices[1].item()
    assert out[1] == 17


def test_logprobs_stay_those_of_the_model():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2))
    out = sample(logits.clone(), [seq([1], [], logprobs=2, logit_bias=((5, 100.0),))])
    raw = logits[0].log_softmax(-1)
    assert out.token_ids == [5]
    assert out.logprobs[0].logprob == pytest.approx(raw[5].item(), abs=1e-6)
    assert [t for t, _ in out.logprobs[0].top] == raw.topk(2).indices.tolist()


def test_output_moved_into_the_prompt_by_a_migration_still_counts_as_output():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    penalties = dict(presence_penalty=1.0, frequency_penalty=0.4, repetition_penalty=1.2)
    before = seq([1, 2, 3], [4, 4, 5], **penalties)
    after = seq([1, 2, 3, 4, 4], [5], num_resumed_tokens=2, **penalties)
    assert torch.equal(apply_penalties(logits, [before]), apply_penalties(logits, [after]))


def test_seeded_draws_with_penalties_do_not_depend_on_the_batch():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(6))
    penalties = dict(temperature=1.0, seed=11, frequency_penalty=1.0, repetition_penalty=1.3)

    def draws(num_others: int) -> list[int]:
        target = seq([1, 2, 3], [], **penalties)
        others = [seq([4], [], temperature=0.8, presence_penalty=0.5) for _ in range(num_others)]
        for _ in range(15):
            batch = torch.stack([logits] * (num_others + 1))
            token = sample(batch, [*others, target]).token_ids[-1]
            target.output_token_ids.append(token)
        return target.output_token_ids

    assert draws(0) == draws(5)


def test_penalties_cross_the_control_plane_unchanged():
    params = SamplingParams(
        presence_penalty=-0.3,
        frequency_penalty=1.1,
        repetition_penalty=1e-6,
        logit_bias=((2, -100.0), (9, 0.25)),
        num_resumed_tokens=4,
    )
    assert sampling_from_proto(sampling_to_proto(params)) == params
    assert sampling_from_proto(sampling_to_proto(SamplingParams())).repetition_penalty == 1.0


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 1e7}, "repetition_penalty"),
        ({"logit_bias": ((1, 100.5),)}, "logit_bias"),
        ({"logit_bias": ((1, 1.0), (1, 2.0))}, "logit_bias"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
    ],
)
def test_out_of_range_penalties_name_their_field(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def transformers_tokens(model, prompt: list[int], max_new_tokens: int, penalty: float):
    """transformers' greedy generate with its RepetitionPenaltyLogitsProcessor."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=penalty,
        )
    return out[0, len(prompt) :].tolist()


def assert_repetition_penalty_equals_transformers(engine, prompts, num_tokens, penalty):
    greedy = SamplingParams(temperature=0, max_tokens=num_tokens)
    plain = [s.output_token_ids for s in engine.generate(prompts, greedy)]
    params = SamplingParams(temperature=0, max_tokens=num_tokens, repetition_penalty=penalty)
    penalized = [s.output_token_ids for s in engine.generate(prompts, params)]
    assert penalized != plain  # the penalty changes these outputs: the comparison means something
    for prompt, tokens in zip(prompts, penalized):
        assert tokens == transformers_tokens(engine.loaded.model, prompt, num_tokens, penalty)


def test_greedy_repetition_penalty_equals_transformers_tiny(tiny_fp32):
    engine = LLMEngine(EngineConfig(block_size=4, num_kv_blocks=128), loaded=tiny_fp32)
    prompts = random_prompts(2, [5, 40], seed=4)
    # NOTE: below 1 the penalty favours seen tokens: a random model then echoes its prompt
    assert_repetition_penalty_equals_transformers(engine, prompts, 16, 0.5)


def test_greedy_repetition_penalty_equals_transformers_default(default_fp32):
    """The real model in float32, on a prompt it would otherwise repeat itself on."""
    engine = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=64), loaded=default_fp32)
    prompt = default_fp32.tokenizer("List the days of the week: Monday, Tuesday,")["input_ids"]
    assert_repetition_penalty_equals_transformers(engine, [prompt], 16, 1.3)
