"""A token's bytes: the raw bytes it stands for, even when that is part of one character."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from coordinator.token_bytes import TokenBytes

TEXT = "🙂 héllo 東京 — x <|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_byte_level_tokens_join_into_the_text_even_inside_a_character(tokenizer):
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer(TEXT)["input_ids"]
    assert b"".join(token_bytes(i) for i in ids) == TEXT.encode()
    assert tokenizer.decode([ids[0]]) == "\ufffd", "the first token is half of the emoji"
    assert token_bytes(ids[0]) == "🙂".encode()[:2]


def test_sentencepiece_pieces_byte_fallback_and_word_boundaries():
    pieces = {0: "\u2581the", 1: "<0xE2>", 2: "<0x80>", 3: "<0x94>", 4: "</s>"}
    tokenizer = SimpleNamespace(
        get_vocab=lambda: {p: i for i, p in pieces.items()},
        convert_ids_to_tokens=pieces.__getitem__,
        decode=lambda ids: "",
    )
    token_bytes = TokenBytes(tokenizer)
    assert b"".join(token_bytes(i) for i in range(4)) == " the—".encode()
    assert token_bytes(4) == b"</s>"
