"""The real default model, greedy, under grammars: the outputs parse and validate."""

from __future__ import annotations

import json

import jsonschema
import pytest

from disagg.grammar import ConstraintSpec, GrammarCompiler, GrammarState
from disagg.model.tokenizer import apply_chat_template
from tests.disagg.grammar.reference import constrained_greedy

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"enum": ["en", "fr", "de"]}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
}


@pytest.fixture(scope="module")
def compiler(default_fp32):
    vocab_size = default_fp32.model.config.vocab_size
    return GrammarCompiler(
        default_fp32.tokenizer, vocab_size, [default_fp32.tokenizer.eos_token_id]
    )


def _prompt(loaded, text: str) -> list[int]:
    return apply_chat_template(loaded.tokenizer, [{"role": "user", "content": text}])


def test_greedy_json_schema_output_validates(default_fp32, compiler):
    state = GrammarState(compiler.compile(ConstraintSpec("json_schema", schema=PERSON)))
    prompt = _prompt(default_fp32, "Describe a French programmer as JSON.")
    vocab_size = default_fp32.model.config.vocab_size
    token_ids = constrained_greedy(default_fp32.model, prompt, state, vocab_size, 96)
    assert token_ids[-1] == default_fp32.tokenizer.eos_token_id, "the grammar did not finish"
    text = default_fp32.tokenizer.decode(token_ids[:-1])
    jsonschema.validate(json.loads(text), PERSON)


def test_greedy_choice_output_is_a_choice(default_fp32, compiler):
    state = GrammarState(
        compiler.compile(ConstraintSpec("choice", choices=("positive", "negative")))
    )
    prompt = _prompt(default_fp32, "Is 'I love this movie' positive or negative?")
    vocab_size = default_fp32.model.config.vocab_size
    token_ids = constrained_greedy(default_fp32.model, prompt, state, vocab_size, 8)
    assert default_fp32.tokenizer.decode(token_ids[:-1]) in ("positive", "negative")
