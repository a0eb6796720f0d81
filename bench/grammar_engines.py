"""Choosing a grammar engine: mask-fill cost at batch 16 and JSON Schema coverage.

Runs xgrammar, llguidance and outlines-core (whichever are installed; the last two are only
for this comparison: `pip install llguidance outlines-core`) on the default model's tokenizer.
For each schema, 16 sequences decode together from seeded random logits under the engine's
masks; the table shows compile time, the median time to fill 16 mask rows per step, and how
many of the 16 outputs finished and validate with `jsonschema`. Only the fill differs between
engines; all apply their masks with the same kernel. The result is in
`disagg.grammar.compiler`'s docstring.

    python -m bench.grammar_engines [--steps 400] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jsonschema
import torch
import xgrammar as xgr

from disagg.model.loader import load_model_info

VOCAB_SIZE = 49152
BATCH = 16
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "address": {"type": "object", "properties": {"city": {"type": "string"}}},
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
    "enum": {"type": "object", "properties": {"c": {"enum": ["red", "blue"]}}, "required": ["c"]},
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


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, eos_ids: list[int]) -> None:
        from disagg.grammar.compiler import GrammarCompiler

        self._compiler = GrammarCompiler(tokenizer, VOCAB_SIZE, eos_ids)

    def matchers(self, schema: dict) -> list:
        from disagg.grammar import ConstraintSpec

        compiled = self._compiler.compile(ConstraintSpec("json_schema", schema=schema))
        return [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token_id: int) -> None:
        assert matcher.accept_token(token_id)

    def is_done(self, matcher) -> bool:
        return matcher.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, eos_ids: list[int]) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self._llg, self._torch = llguidance, llguidance.torch
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, VOCAB_SIZE, eos_ids[0])

    def matchers(self, schema: dict) -> list:
        grammar = self._llg.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        return [self._llg.LLMatcher(self._tokenizer, grammar) for _ in range(BATCH)]

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        self._torch.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher, token_id: int) -> None:
        assert matcher.consume_token(token_id), matcher.get_error()

    def is_done(self, matcher) -> bool:
        return matcher.is_stopped()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, eos_ids: list[int]) -> None:
        import outlines_core

        self._oc = outlines_core
        byte_of = _byte_decoder()
        vocab: dict[bytes, list[int]] = {}
        for text, token_id in tokenizer.get_vocab().items():
            if token_id not in tokenizer.added_tokens_decoder:
                vocab.setdefault(bytes(byte_of[c] for c in text), []).append(token_id)
        self._vocab = outlines_core.Vocabulary(eos_ids[0], vocab)

    def matchers(self, schema: dict) -> list:
        regex = self._oc.json_schema.build_regex_from_schema(json.dumps(schema))
        index = self._oc.Index(regex, self._vocab)
        return [self._oc.Guide(index) for _ in range(BATCH)]

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.write_mask_into(bitmask[row].data_ptr(), bitmask.shape[1], 4)

    def accept(self, matcher, token_id: int) -> None:
        matcher.advance(token_id)

    def is_done(self, matcher) -> bool:
        return matcher.is_finished()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def run(engine, schema: dict, tokenizer, eos_ids: list[int], steps: int) -> dict:
    start = time.perf_counter()
    matchers = engine.matchers(schema)
    compile_ms = (time.perf_counter() - start) * 1e3
    bitmask = xgr.allocate_token_bitmask(BATCH, VOCAB_SIZE)
    generator = torch.Generator().manual_seed(0)
    outputs: list[list[int]] = [[] for _ in matchers]
    fill_s = []
    for _ in range(steps):
        live = [i for i, m in enumerate(matchers) if not engine.is_done(m)]
        if not live:
            break
        start = time.perf_counter()
        for i in live:
            engine.fill(matchers[i], bitmask, i)
        fill_s.append(time.perf_counter() - start)
        logits = torch.randn(BATCH, VOCAB_SIZE, generator=generator)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=live)
        token_ids = logits.argmax(dim=-1).tolist()
        for i in live:
            engine.accept(matchers[i], token_ids[i])
            outputs[i].append(token_ids[i])
    num_valid = sum(
        engine.is_done(m) and _is_valid(tokenizer, out, eos_ids, schema)
        for m, out in zip(matchers, outputs)
    )
    fill_ms = statistics.median(fill_s) * 1e3 if fill_s else 0.0
    return {"compile_ms": compile_ms, "fill_16_rows_ms": fill_ms, "num_valid": num_valid}


def _is_valid(tokenizer, token_ids: list[int], eos_ids: list[int], schema: dict) -> bool:
    text = tokenizer.decode([t for t in token_ids if t not in eos_ids])
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = load_model_info("default")
    eos_ids = sorted(info.eos_token_ids)
    engines = []
    for cls in (XGrammar, LLGuidance, OutlinesCore):
        start = time.perf_counter()
        try:
            engines.append(cls(info.tokenizer, eos_ids))
        except ImportError:
            print(f"{cls.name}: not installed")
            continue
        print(f"{cls.name}: tokenizer set-up {time.perf_counter() - start:.2f} s")
    print(f"{'schema':<9} {'engine':<14} {'compile ms':>10} {'fill16 ms':>10} {'valid':>6}")
    for name, schema in SCHEMAS.items():
        for engine in engines:
            try:
                row = run(engine, schema, info.tokenizer, eos_ids, args.steps)
            except Exception as exc:  # an engine that cannot handle a schema is a result
                print(f"{name:<9} {engine.name:<14} failed: {str(exc)[:60]}")
                continue
            print(
                f"{name:<9} {engine.name:<14} {row['compile_ms']:>10.1f} "
                f"{row['fill_16_rows_ms']:>10.3f} {row['num_valid']:>3}/{BATCH}"
            )


if __name__ == "__main__":
    main()
