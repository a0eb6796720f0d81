"""The bytes each token stands for: the `bytes` of OpenAI's logprobs.

Why not `decode([token_id]).encode()`: a byte-level BPE token (GPT-2's scheme, used by
SmolLM2, Llama 3, Qwen) may hold part of one UTF-8 character; decoded alone it is U+FFFD,
whose bytes are not the token's. OpenAI's `bytes` exist so that clients can join the tokens
of such a character. So the bytes come from the token's piece: through GPT-2's byte-to-unicode
table for byte-level vocabularies, a SentencePiece byte-fallback piece (`<0xE2>`) is its byte,
and any other piece is its text with SentencePiece's `▁` as a space.
"""

from __future__ import annotations

import functools
import re
from typing import Any

BYTE_LEVEL_SPACE = "\u0120"
"""GPT-2's stand-in for the space byte ("Ġ"): a vocabulary that has it is byte-level."""
SENTENCEPIECE_SPACE = "\u2581"
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's table (Radford et al. 2019, `bytes_to_unicode`), inverted: the printable
    Latin-1 characters stand for themselves; the other 68 bytes are shifted to U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


BYTE_DECODER = gpt2_byte_decoder()


class TokenBytes:
    """token id -> its bytes, for one tokenizer; each token is worked out once."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._is_byte_level = BYTE_LEVEL_SPACE in tokenizer.get_vocab()
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        raw = self._cache.get(token_id)
        if raw is None:
            raw = self._cache[token_id] = self._bytes(token_id)
        return raw

    def _bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return self._tokenizer.decode([token_id]).encode()
        if self._is_byte_level and all(c in BYTE_DECODER for c in piece):
            return bytes(BYTE_DECODER[c] for c in piece)
        if match := BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(match[1], 16)])
        return piece.replace(SENTENCEPIECE_SPACE, " ").encode()


@functools.lru_cache(maxsize=4)
def token_bytes_for(tokenizer: Any) -> TokenBytes:
    """One table per tokenizer, shared by every response (reading the vocabulary takes ~0.2 s)."""
    return TokenBytes(tokenizer)
