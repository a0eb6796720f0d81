"""Decoding under grammars on the default model's real tokenizer, with stand-in logits.

Any logits must give valid output once masked, so random logits stand in for the model. Free
strings end only when a quote is drawn, so `_structural_bias` favours tokens with a quote in
them; the grammar still decides which of those may come.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from disagg.errors import InvalidRequestError
from disagg.grammar import ConstraintSpec, GrammarCompiler, GrammarState, TokenMasker
from disagg.model.loader import load_model_info

VOCAB_SIZE = 49152
BATCH = 16
MAX_STEPS = 200

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}
        },
        "required": ["tags"],
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M"]}},
        "required": ["color", "size"],
    },
    "bounds": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 120},
            "score": {"type": "number", "minimum": 0.5, "maximum": 1},
        },
        "required": ["age", "score"],
    },
    "optional": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
        "required": ["a"],
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
    },
}


@pytest.fixture(scope="module")
def info():
    return load_model_info("default")


@pytest.fixture(scope="module")
def compiler(info):
    return GrammarCompiler(info.tokenizer, VOCAB_SIZE, sorted(info.eos_token_ids))


@pytest.fixture(scope="module")
def bias(info):
    return _structural_bias(info.tokenizer)


def _structural_bias(tokenizer) -> torch.Tensor:
    """+4 on every token whose text has a quote: [V]."""
    bias = torch.zeros(VOCAB_SIZE)
    for text, token_id in tokenizer.get_vocab().items():
        if '"' in text and token_id < VOCAB_SIZE:
            bias[token_id] = 4.0
    return bias


def _decode(states, logits_fn, pick, max_steps=MAX_STEPS) -> list[list[int]]:
    """Run a batch to termination: states[i] None means row i is unconstrained."""
    masker = TokenMasker(VOCAB_SIZE, len(states))
    outputs: list[list[int]] = [[] for _ in states]
    for step in range(max_steps):
        live = [i for i, s in enumerate(states) if s is not None and not s.is_terminated]
        if not live:
            break
        logits = logits_fn(step)  # [B, V]
        masker.apply(logits, states)
        token_ids = pick(logits)
        for i in live:
            assert states[i].accept_token(token_ids[i])
            outputs[i].append(token_ids[i])
    return outputs


def _text(info, token_ids: list[int]) -> str:
    assert token_ids[-1] in info.eos_token_ids, "grammar did not finish"
    return info.tokenizer.decode(token_ids[:-1])


def _random_logits(bias: torch.Tensor, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return lambda step: torch.randn(BATCH, VOCAB_SIZE, generator=generator) + bias


def _greedy(logits: torch.Tensor) -> list[int]:
    return logits.argmax(dim=-1).tolist()


def _sampled(seed: int, temperature: float = 0.5):
    """Draws from softmax(logits / temperature) by the Gumbel-max trick (multinomial is slow
    at this width); temperature 0.5 keeps free strings short enough for the step budget."""
    generator = torch.Generator().manual_seed(seed)

    def pick(logits: torch.Tensor) -> list[int]:
        uniform = torch.rand(logits.shape, generator=generator).clamp_(min=1e-20)
        gumbel = uniform.log_().neg_().log_().neg_()
        return (logits / temperature + gumbel).argmax(dim=-1).tolist()

    return pick


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_every_row_of_a_batch_validates_against_its_schema(info, compiler, bias, name, mode):
    schema = SCHEMAS[name]
    compiled = compiler.compile(ConstraintSpec("json_schema", schema=schema))
    states = [GrammarState(compiled) for _ in range(BATCH)]
    pick = _greedy if mode == "greedy" else _sampled(1)
    outputs = _decode(states, _random_logits(bias, seed=7), pick)
    for token_ids in outputs:
        jsonschema.validate(json.loads(_text(info, token_ids)), schema)


@pytest.mark.parametrize("name", ["enum", "bounds", "pattern"])
def test_uniform_logits_give_the_first_allowed_tokens_and_still_validate(info, compiler, name):
    compiled = compiler.compile(ConstraintSpec("json_schema", schema=SCHEMAS[name]))
    states = [GrammarState(compiled) for _ in range(BATCH)]
    outputs = _decode(states, lambda step: torch.zeros(BATCH, VOCAB_SIZE), _greedy)
    texts = {_text(info, t) for t in outputs}
    assert len(texts) == 1
    jsonschema.validate(json.loads(texts.pop()), SCHEMAS[name])


def test_json_object_regex_and_choice(info, compiler, bias):
    specs = [
        ConstraintSpec("json_object"),
        ConstraintSpec("regex", regex=r"[a-z]{2,5}-\d{1,3}"),
        ConstraintSpec("choice", choices=("yes", "no", 'say "hi"')),
    ]
    states = [GrammarState(compiler.compile(specs[i % 3])) for i in range(BATCH)]
    outputs = _decode(states, _random_logits(bias, seed=3), _greedy)
    for i, token_ids in enumerate(outputs):
        text = _text(info, token_ids)
        if i % 3 == 0:
            assert isinstance(json.loads(text), dict)
        elif i % 3 == 1:
            assert re.fullmatch(r"[a-z]{2,5}-\d{1,3}", text), text
        else:
            assert text in specs[2].choices


def test_json_object_admits_any_properties(info, compiler):
    token_ids = info.tokenizer.encode('{"a": [1, {"b": null}], "c": "d"}') + [2]
    state = GrammarState.from_tokens(compiler.compile(ConstraintSpec("json_object")), token_ids)
    assert state.is_terminated


def test_unconstrained_rows_keep_their_logits_bit_for_bit(compiler, bias):
    compiled = compiler.compile(ConstraintSpec("json_schema", schema=SCHEMAS["nested"]))
    states = [GrammarState(compiled) if i % 2 else None for i in range(BATCH)]
    logits = torch.randn(BATCH, VOCAB_SIZE)
    masked = logits.clone()
    rows = TokenMasker(VOCAB_SIZE, 4).apply(masked, states)
    assert rows == list(range(1, BATCH, 2))
    assert torch.equal(masked[0::2], logits[0::2])
    assert torch.isinf(masked[1::2]).any(dim=-1).all()
    # The first token of an object is "{" alone or with more of the object.
    allowed = torch.isfinite(masked[1]).nonzero()[:, 0].tolist()
    assert allowed and all(compiler_token(compiler, t).startswith("{") for t in allowed)


def compiler_token(compiler, token_id: int) -> str:
    return compiler.tokenizer_info.decoded_vocab[token_id].decode("utf-8", "replace")


def test_added_tokens_are_never_allowed_inside_a_string(info, compiler):
    """The GGUF tokenizer marks only ids 0-2 special; ids 3-16 (<repo_name>, ...) must not leak."""
    compiled = compiler.compile(ConstraintSpec("json_schema", schema=SCHEMAS["optional"]))
    state = GrammarState.from_tokens(compiled, info.tokenizer.encode('{"a": "'))
    logits = torch.zeros(1, VOCAB_SIZE)
    TokenMasker(VOCAB_SIZE, 1).apply(logits, [state])
    assert torch.isinf(logits[0, :17]).all()
    assert torch.isfinite(logits[0, 17:]).sum() > 40000  # almost any text fits in a string


def test_rebuilding_from_the_first_token_continues_exactly(info, compiler, bias):
    """What a decode worker does: compile the wire spec itself and replay the first token."""
    spec = ConstraintSpec("json_schema", schema=SCHEMAS["nested"])
    reference = _decode([GrammarState(compiler.compile(spec))], _row_logits(bias, 11), _greedy)[0]
    decode_compiler = GrammarCompiler(info.tokenizer, VOCAB_SIZE, sorted(info.eos_token_ids))
    received = ConstraintSpec.from_wire(spec.to_wire())
    state = GrammarState.from_tokens(decode_compiler.compile(received), reference[:1])
    logits_fn = _row_logits(bias, 11)
    logits_fn(0)  # the prefill worker's step
    rest = _decode([state], lambda step: logits_fn(step + 1), _greedy)[0]
    assert reference[:1] + rest == reference


def _row_logits(bias: torch.Tensor, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return lambda step: torch.randn(1, VOCAB_SIZE, generator=generator) + bias


def test_replaying_a_forbidden_token_is_an_error(info, compiler):
    compiled = compiler.compile(ConstraintSpec("json_schema", schema=SCHEMAS["enum"]))
    with pytest.raises(InvalidRequestError, match="does not follow the grammar"):
        GrammarState.from_tokens(compiled, info.tokenizer.encode("hello"))


def test_a_rejected_token_leaves_the_state_unchanged(info, compiler):
    state = GrammarState(compiler.compile(ConstraintSpec("choice", choices=("yes", "no"))))
    assert not state.accept_token(info.tokenizer.encode("maybe")[0])
    assert state.num_accepted_tokens == 0
    for token_id in info.tokenizer.encode("no"):
        assert state.accept_token(token_id)
    assert state.can_stop and not state.is_terminated
    assert state.accept_token(2) and state.is_terminated


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ConstraintSpec("regex", regex="(unclosed", param="guided_regex"), "parenthesis"),
        (ConstraintSpec("json_schema", schema={"type": "frobnicate"}), "frobnicate"),
    ],
)
def test_compile_errors_are_bad_requests_naming_the_field(compiler, spec, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        compiler.compile(spec)
    assert info.value.param == spec.param
    assert "/project/" not in info.value.message


def test_logits_of_another_width_are_refused(compiler):
    state = GrammarState(compiler.compile(ConstraintSpec("json_object")))
    with pytest.raises(ValueError, match="columns"):
        TokenMasker(VOCAB_SIZE, 1).apply(torch.zeros(1, VOCAB_SIZE + 64), [state])
    TokenMasker(VOCAB_SIZE, 1).apply(torch.zeros(1, VOCAB_SIZE + 64), [None])  # nothing to do
