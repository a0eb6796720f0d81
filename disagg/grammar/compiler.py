"""Turning a `ConstraintSpec` into a compiled grammar for one tokenizer, with xgrammar.

Why xgrammar. The three engines on PyPI with CPU wheels (xgrammar 0.2.9, llguidance 1.9.1,
outlines-core 0.2.14) were run on this project's CPU (AMD EPYC, avx2+fma, 2 shared cores,
one torch thread) with the default model's tokenizer (SmolLM2, vocab 49152): 16 sequences
decoded together under each of six schemas, masks filled per row every step.

- Mask fill per step, 16 rows (median): xgrammar 0.06-0.19 ms, llguidance 0.10-0.15 ms,
  outlines-core 0.07-1.6 ms (slow inside open strings, where almost every token is allowed).
- Compile per schema: xgrammar 0.6-26 ms (then cached per process), llguidance 26-41 ms
  (when its matchers are made), outlines-core 83-388 ms (a regex automaton over the vocabulary).
- Tokenizer set-up, once per process: xgrammar 1-3.5 s, llguidance 8-15 s, outlines-core 1-2 s.
- Coverage (nested objects, arrays with minItems/maxItems, enums, integer and number bounds,
  required/optional, string patterns): every xgrammar output that finished validated, and
  enum/bounds/pattern finished 16/16; llguidance admits properties the schema does not list
  (so 6-9/16 there ran on into extra keys) unless each schema is rewritten; outlines-core
  ignores minimum/maximum (0/16 on bounds: it produced `{"age":-82}` under `"minimum": 18`).
- Only xgrammar has structural tags (free text with triggered, schema-checked tool calls),
  which is how `tool_choice: auto` is enforced without forbidding text.

Reproduce with `python -m bench.grammar_engines`; the cost inside a batch is measured by
`python -m bench.grammar_mask`.

NOTE: the GGUF-converted SmolLM2 tokenizer marks only ids 0-2 as special, so ids 3-16
(`<repo_name>`, `<file_sep>`, ...) would be ordinary text to a grammar engine and could be
generated inside a JSON string. Every added token's text is blanked in the vocabulary handed
to xgrammar, which makes it special: never allowed, except the stop tokens at the end.
"""

from __future__ import annotations

import json
import re
from typing import Any

import xgrammar as xgr

from disagg.errors import InvalidRequestError
from disagg.grammar.spec import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_SUFFIX,
    ConstraintSpec,
    tool_call_prefix,
)

# NOTE: OpenAI's json_object asks for a JSON object (not any JSON value); compact whitespace,
# because a grammar that admits unbounded whitespace lets a weak model loop on it.
_ANY_OBJECT = '{"type": "object"}'
_LOCATION = re.compile(r"^\[[^\]]*\] \S+:\d+: ")


class GrammarCompiler:
    """One per process and tokenizer: compiles specs, caching each compiled grammar."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.tokenizer_info = _shared_tokenizer_info(tokenizer, vocab_size, self.stop_token_ids)
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1)

    def compile(self, spec: ConstraintSpec) -> xgr.CompiledGrammar:
        """The grammar for `spec`; an unsupported schema or bad regex is an InvalidRequestError."""
        try:
            return self._compile(spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            if isinstance(exc, InvalidRequestError):
                raise
            message = f"cannot compile {spec.kind}: {_reason(exc)}"
            raise InvalidRequestError(message, spec.param) from exc

    def _compile(self, spec: ConstraintSpec) -> xgr.CompiledGrammar:
        if spec.kind == "json_object":
            return self._compiler.compile_json_schema(
                _ANY_OBJECT, any_whitespace=False, strict_mode=False
            )
        if spec.kind == "json_schema":
            # NOTE: never sort keys: properties are generated in the schema's own order.
            return self._compiler.compile_json_schema(json.dumps(spec.schema), any_whitespace=False)
        if spec.kind == "regex":
            return self._compiler.compile_regex(spec.regex)
        if spec.kind == "choice":
            return self._compiler.compile_grammar(_choice_ebnf(spec.choices))
        return self._compiler.compile_structural_tag(tool_call_structural_tag(spec))


def _reason(exc: Exception) -> str:
    """xgrammar's message without its `[time] file.cc:line:` prefix."""
    lines = str(exc).strip().splitlines()
    return _LOCATION.sub("", lines[-1]) if lines else type(exc).__name__


_TOKENIZER_INFOS: dict[tuple, xgr.TokenizerInfo] = {}


def _shared_tokenizer_info(
    tokenizer: Any, vocab_size: int, stop_token_ids: list[int]
) -> xgr.TokenizerInfo:
    """One TokenizerInfo per tokenizer files, vocabulary and stop ids in this process.

    Set-up costs 1-3 s; roles that share a process (the in-process test cluster, or the
    coordinator's check and a colocated engine) build it once. The key is the tokenizer's
    source path and size, so two loads of the same files share it too.
    """
    name = getattr(tokenizer, "name_or_path", "") or str(id(tokenizer))
    key = (name, len(tokenizer), vocab_size, tuple(stop_token_ids))
    if key not in _TOKENIZER_INFOS:
        _TOKENIZER_INFOS[key] = _tokenizer_info(tokenizer, vocab_size, stop_token_ids)
    return _TOKENIZER_INFOS[key]


def _tokenizer_info(
    tokenizer: Any, vocab_size: int, stop_token_ids: list[int]
) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary, with every added token blanked (see module NOTE)."""
    encoded = [""] * vocab_size
    for text, token_id in tokenizer.get_vocab().items():
        if token_id < vocab_size:
            encoded[token_id] = text
    for token_id in getattr(tokenizer, "added_tokens_decoder", {}):
        if token_id < vocab_size:
            encoded[token_id] = ""
    vocab_type = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
    ).vocab_type
    return xgr.TokenizerInfo(
        encoded, vocab_type, vocab_size=vocab_size, stop_token_ids=stop_token_ids
    )


def _choice_ebnf(choices: tuple[str, ...]) -> str:
    """root ::= "a" | "b" ..., each choice as a JSON-escaped EBNF string literal."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def tool_call_structural_tag(spec: ConstraintSpec) -> dict:
    """The xgrammar structural tag for spec.tools in the format of `disagg.grammar.spec`.

    Optional calls (`tool_choice: auto`) are triggered tags: free text until the model writes
    `<tool_call>`, then a call checked against its tool's schema. Required calls are tags
    separated by a newline with nothing else around them.
    """
    tags = [
        {
            "type": "tag",
            "begin": tool_call_prefix(tool.name),
            "content": {
                "type": "json_schema",
                "json_schema": tool.parameters,
                "max_whitespace_cnt": 1,
            },
            "end": TOOL_CALL_SUFFIX,
        }
        for tool in spec.tools
    ]
    stop_after_first = not spec.is_parallel
    if spec.is_tool_call_required:
        fmt = {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": "\n",
            "at_least_one": True,
            "stop_after_first": stop_after_first,
        }
    else:
        fmt = {
            "type": "triggered_tags",
            "triggers": [TOOL_CALL_BEGIN],
            "tags": tags,
            "stop_after_first": stop_after_first,
        }
    return {"type": "structural_tag", "format": fmt}
