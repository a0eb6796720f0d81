"""The engine under grammars, on the tiny model with the real tokenizer: constrained rows
finish with valid output and `stop`, equal the single-process reference, and leave the
unconstrained rows of their batch bit for bit as they were."""

from __future__ import annotations

import json

import jsonschema
import pytest

from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.sequence import Sequence, SequenceStatus
from disagg.errors import InvalidRequestError
from disagg.grammar import ConstraintSpec, GrammarState
from tests.disagg.grammar.reference import constrained_greedy

# NOTE: bounded schemas only: random weights would wander in a free string until max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "age": {"type": "integer", "minimum": 18, "maximum": 120},
    },
    "required": ["color", "age"],
}
SPEC = ConstraintSpec("json_schema", schema=SCHEMA)
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def engine(tiny_fp32) -> LLMEngine:
    config = EngineConfig(block_size=4, num_kv_blocks=512, max_num_batched_tokens=256)
    return LLMEngine(config, loaded=tiny_fp32)


def _params(spec: ConstraintSpec | None) -> SamplingParams:
    wire = spec.to_wire() if spec is not None else ""
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, constraint=wire)


def _text(engine: LLMEngine, seq: Sequence) -> str:
    ids = [t for t in seq.output_token_ids if t not in engine.eos_token_ids]
    return engine.tokenizer.decode(ids)


@pytest.mark.slow  # several seconds: the full suite runs it
def test_mixed_batch_constrained_rows_validate_and_free_rows_are_unchanged(engine):
    prompts = [[1, 2, 3, 4 + i] for i in range(6)]
    alone = engine.generate(prompts, _params(None))
    mixed_params = [_params(SPEC if i % 2 else None) for i in range(6)]
    mixed = engine.generate(prompts, mixed_params)
    for i, seq in enumerate(mixed):
        if i % 2:
            assert seq.finish_reason == "stop"
            jsonschema.validate(json.loads(_text(engine, seq)), SCHEMA)
        else:
            assert seq.output_token_ids == alone[i].output_token_ids


def test_greedy_under_grammar_equals_the_reference(engine, tiny_fp32):
    prompt = [1, 9, 8, 7]
    (seq,) = engine.generate([prompt], _params(SPEC))
    state = GrammarState(engine.grammars.compiled(SPEC.to_wire()))
    vocab_size = engine.model.lm_head.out_features
    expected = constrained_greedy(tiny_fp32.model, prompt, state, vocab_size, MAX_TOKENS)
    assert seq.output_token_ids == expected


def test_choice_and_regex_finish_with_stop(engine):
    choice = ConstraintSpec("choice", choices=("yes", "no"))
    regex = ConstraintSpec("regex", regex=r"[0-9]{3}-[a-c]{2}")
    seqs = engine.generate([[5, 6, 7], [5, 6, 8]], [_params(choice), _params(regex)])
    assert [s.finish_reason for s in seqs] == ["stop", "stop"]
    assert _text(engine, seqs[0]) in ("yes", "no")
    assert len(_text(engine, seqs[1])) == 6


def test_grammar_that_cannot_finish_ends_with_length(engine):
    spec = ConstraintSpec("regex", regex=r"a{30}")
    (seq,) = engine.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, constraint=spec.to_wire())
    )
    assert seq.finish_reason == "length"


def test_decode_side_rebuilds_the_state_from_the_first_token(engine):
    prompt = [1, 9, 8, 7]
    (whole,) = engine.generate([prompt], _params(SPEC))
    prefill = Sequence(list(prompt), _params(SPEC), is_prefill_only=True)
    engine.add_sequence(prefill)
    while prefill.status != SequenceStatus.PREFILLED:
        engine.step()
    engine.block_manager.free(prefill.block_table)
    # the decode side: a fresh sequence with the first token, recomputing the prompt here
    decode = Sequence(list(prompt), _params(SPEC))
    decode.output_token_ids.append(prefill.output_token_ids[0])
    engine.add_sequence(decode)
    while not decode.is_finished:
        engine.step()
    assert decode.output_token_ids == whole.output_token_ids


def test_a_first_token_outside_the_grammar_is_refused(engine):
    seq = Sequence([1, 2, 3], _params(SPEC))
    seq.output_token_ids.append(engine.tokenizer.encode("x")[0])
    with pytest.raises(InvalidRequestError):
        engine.add_sequence(seq)


@pytest.mark.parametrize("num_resumed", [1, 5])
def test_a_resumed_sequence_continues_the_same_document(engine, num_resumed):
    """A migration re-admits prompt + output so far as the prompt: the grammar replays that
    tail, so the rest equals the undisturbed run instead of starting a second object."""
    prompt = [1, 9, 8, 7]
    (whole,) = engine.generate([prompt], _params(SPEC))
    assert len(whole.output_token_ids) > num_resumed + 1
    done = whole.output_token_ids[:num_resumed]
    resumed = SamplingParams(
        temperature=0,
        max_tokens=MAX_TOKENS - num_resumed,
        constraint=SPEC.to_wire(),
        num_resumed_tokens=num_resumed,
    )
    (rest,) = engine.generate([prompt + done], resumed)
    assert done + rest.output_token_ids == whole.output_token_ids
    assert rest.finish_reason == "stop"


def test_a_resumed_tail_longer_than_the_prompt_is_refused(engine):
    params = SamplingParams(temperature=0, constraint=SPEC.to_wire(), num_resumed_tokens=4)
    with pytest.raises(InvalidRequestError, match="num_resumed_tokens"):
        engine.add_sequence(Sequence([1, 2, 3], params))
