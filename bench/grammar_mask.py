"""Grammar masking cost at the sampler: a batch of 16 with 0, 1 and 16 constrained rows.

Each step is what the engine adds before sampling, plus the greedy pick itself: fill the
bitmask rows of the constrained sequences, apply them to logits [B, V] in place, argmax,
and advance each grammar by its token. Configurations run interleaved, step by step, so
the machine's noise hits them alike; the table shows medians and the ratio to 0 rows.

It also measures how a decode worker gets a sequence's grammar state: compile the wire spec
(cold, and from the per-process cache) and replay the tokens so far, against deserializing a
compiled grammar shipped with the KV handle.

    python -m bench.grammar_mask [--steps 300] [--threads 1] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import xgrammar as xgr

from disagg.grammar import ConstraintSpec, GrammarCompiler, GrammarState, TokenMasker
from disagg.model.loader import load_model_info

VOCAB_SIZE = 49152
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "tags", "address"],
}
# NOTE: maxLength makes each string position its own grammar state, whose masks xgrammar
# mostly checks token by token at run time; without it, string states are precomputed. The
# two variants bracket the cost.
FREE_STRINGS = json.loads(
    json.dumps(SCHEMA).replace(', "maxLength": 16', "").replace(', "maxLength": 12', "")
)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


class Batch:
    """One batch configuration: `num_constrained` grammar rows out of `batch` rows."""

    def __init__(self, compiled, batch: int, num_constrained: int) -> None:
        self.compiled = compiled
        self.states = [
            GrammarState(compiled) if i < num_constrained else None for i in range(batch)
        ]
        self.masker = TokenMasker(VOCAB_SIZE, batch)
        self.mask_s: list[float] = []
        self.step_s: list[float] = []

    def step(self, logits: torch.Tensor) -> None:
        start = time.perf_counter()
        self.masker.apply(logits, self.states)
        masked = time.perf_counter()
        token_ids = logits.argmax(dim=-1).tolist()
        for i, state in enumerate(self.states):
            if state is not None:
                state.accept_token(token_ids[i])
        self.mask_s.append(masked - start)
        self.step_s.append(time.perf_counter() - start)
        for i, state in enumerate(self.states):  # a finished sequence is replaced by a new one
            if state is not None and state.is_terminated:
                self.states[i] = GrammarState(self.compiled)


def measure_masking(compiled, batch: int, steps: int) -> dict:
    configs = {n: Batch(compiled, batch, n) for n in (0, 1, batch)}
    generator = torch.Generator().manual_seed(0)
    pool = [torch.randn(batch, VOCAB_SIZE, generator=generator) for _ in range(8)]
    for step in range(steps):
        for config in configs.values():
            config.step(pool[step % len(pool)].clone())
    base = _median_ms(configs[0].step_s)
    return {
        n: {
            "mask_ms": _median_ms(c.mask_s),
            "step_ms": _median_ms(c.step_s),
            "step_vs_unconstrained": _median_ms(c.step_s) / base,
        }
        for n, c in configs.items()
    }


def measure_kernel(batch: int, steps: int) -> dict:
    """The apply kernel alone, on a random bitmask: what of `mask_ms` is not the fill."""
    generator = torch.Generator().manual_seed(1)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, VOCAB_SIZE // 32), generator=generator)
    bitmask = bitmask.to(torch.int32)
    logits = torch.randn(batch, VOCAB_SIZE, generator=generator)
    result = {}
    for num_rows in (1, batch):
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=list(range(num_rows)))
            samples.append(time.perf_counter() - start)
        result[f"apply_kernel_{num_rows}_rows_ms"] = _median_ms(samples)
    return result


def measure_rebuild(info, compiler: GrammarCompiler, repeats: int) -> dict:
    spec = ConstraintSpec("json_schema", schema=SCHEMA)
    text = '{"name": "Ada", "age": 36, "tags": ["a", "b"], "address": {"city": "London"}}'
    token_ids = info.tokenizer.encode(text)
    compiled = compiler.compile(spec)
    serialized = compiled.serialize_json()
    timings: dict[str, list[float]] = {k: [] for k in _REBUILDS}
    for _ in range(repeats):
        for name, fn in _REBUILDS.items():
            start = time.perf_counter()
            fn(info, spec, compiled, serialized, token_ids)
            timings[name].append(time.perf_counter() - start)
    result = {name: _median_ms(samples) for name, samples in timings.items()}
    result["serialized_nbytes"] = len(serialized.encode())
    result["wire_spec_nbytes"] = len(spec.to_wire().encode())
    result["num_replayed_tokens"] = len(token_ids)
    return result


def _cold_compile(info, spec, compiled, serialized, token_ids) -> None:
    fresh = xgr.GrammarCompiler(compiled.tokenizer_info, max_threads=1, cache_enabled=False)
    fresh.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)


_CACHED = {}


def _cached_compile_replay_1(info, spec, compiled, serialized, token_ids) -> None:
    compiler = _CACHED["compiler"]
    GrammarState.from_tokens(
        compiler.compile(ConstraintSpec.from_wire(spec.to_wire())), token_ids[:1]
    )


def _cached_compile_replay_all(info, spec, compiled, serialized, token_ids) -> None:
    received = ConstraintSpec.from_wire(spec.to_wire())
    GrammarState.from_tokens(_CACHED["compiler"].compile(received), token_ids)


def _deserialize_replay_1(info, spec, compiled, serialized, token_ids) -> None:
    shipped = xgr.CompiledGrammar.deserialize_json(serialized, compiled.tokenizer_info)
    GrammarState.from_tokens(shipped, token_ids[:1])


_REBUILDS = {
    "cold_compile_ms": _cold_compile,
    "cached_compile_and_replay_1_token_ms": _cached_compile_replay_1,
    "cached_compile_and_replay_all_tokens_ms": _cached_compile_replay_all,
    "deserialize_and_replay_1_token_ms": _deserialize_replay_1,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=20, help="rebuild measurements")
    parser.add_argument("--json-out", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = load_model_info("default")
    compiler = GrammarCompiler(info.tokenizer, VOCAB_SIZE, sorted(info.eos_token_ids))
    _CACHED["compiler"] = compiler
    masking = {}
    for name, schema in (("bounded strings", SCHEMA), ("free strings", FREE_STRINGS)):
        compiled = compiler.compile(ConstraintSpec("json_schema", schema=schema))
        masking[name] = measure_masking(compiled, args.batch, args.steps)
    results = {
        "threads": args.threads,
        "dtype": "float32",
        "batch": args.batch,
        "masking": masking,
        "kernel": measure_kernel(args.batch, args.steps),
        "rebuild": measure_rebuild(info, compiler, args.repeats),
    }
    _print(results)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


def _print(results: dict) -> None:
    print(f"batch {results['batch']}, float32 logits, {results['threads']} torch thread(s)")
    print(f"{'schema':<16} {'constrained rows':>17} {'mask ms':>9} {'step ms':>9} {'x vs 0':>8}")
    for schema, rows in results["masking"].items():
        for n, row in rows.items():
            print(
                f"{schema:<16} {n:>17} {row['mask_ms']:>9.3f} {row['step_ms']:>9.3f} "
                f"{row['step_vs_unconstrained']:>8.2f}"
            )
    for name, value in [*results["kernel"].items(), *results["rebuild"].items()]:
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
    main()
