"""Engine decode step time with 0%, 50% and 100% of 16 streams under a JSON schema.

What constrained decoding costs a real batch: the default model in an `LLMEngine`, 16
sequences decoding together, of which 0, 8 or 16 carry a schema (the masks are filled and
applied in the engine's own sampling path). Rounds run the three mixes interleaved, so the
machine's noise hits them alike; each round times the decode steps taken while all 16
sequences are running (constrained ones may finish first), and within them the masking
alone (the runner's `mask_logits` hook), which is the part constrained rows add: on a
shared machine the step's own noise can exceed it. Prints medians and ratios.

    python -m bench.grammar_step [--rounds 3] [--tokens 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from disagg.config import EngineConfig
from disagg.engine.llm_engine import LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.grammar import ConstraintSpec
from disagg.model.tokenizer import apply_chat_template

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string"},
        "languages": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "languages"],
}
FRACTIONS = (0.0, 0.5, 1.0)


def _timed_masking(engine: LLMEngine, mask_s: list[float]) -> None:
    """Record each full-batch call of the engine's masking hook into `mask_s` (seconds)."""
    mask = engine.runner.mask_logits

    def timed(logits: torch.Tensor, seqs: list) -> None:
        start = time.perf_counter()
        mask(logits, seqs)
        if len(seqs) == 16:
            mask_s.append(time.perf_counter() - start)

    engine.runner.mask_logits = timed


def _round(engine: LLMEngine, prompt: list[int], num_constrained: int, tokens: int) -> list[float]:
    """Decode step times (s) of one batch of 16 while all 16 run."""
    wire = ConstraintSpec("json_schema", schema=SCHEMA).to_wire()
    seqs = []
    for i in range(16):
        constraint = wire if i < num_constrained else ""
        params = SamplingParams(
            max_tokens=tokens, temperature=0, ignore_eos=not constraint, constraint=constraint
        )
        seqs.append(engine.add_request(prompt, params))
    times = []
    while engine.has_unfinished:
        start = time.perf_counter()
        output = engine.step()
        elapsed = time.perf_counter() - start
        if len(output.decoded) == 16:
            times.append(elapsed)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(model="default", dtype="float32", num_kv_blocks=2048))
    prompt = apply_chat_template(
        engine.tokenizer, [{"role": "user", "content": "Describe a programmer as JSON."}]
    )
    _round(engine, prompt, 16, 4)  # warm-up: compiler set-up and the schema's compile
    mask_s: list[float] = []
    _timed_masking(engine, mask_s)
    samples: dict[float, list[float]] = {f: [] for f in FRACTIONS}
    masks: dict[float, list[float]] = {f: [] for f in FRACTIONS}
    for _ in range(args.rounds):
        for fraction in FRACTIONS:
            mask_s.clear()
            samples[fraction] += _round(engine, prompt, int(16 * fraction), args.tokens)
            masks[fraction] += mask_s
    base = statistics.median(samples[0.0])
    print(f"threads={args.threads} dtype=float32 batch=16 steps/mix={len(samples[0.0])}")
    for fraction in FRACTIONS:
        median = statistics.median(samples[fraction])
        print(
            f"{int(fraction * 100):3d}% constrained: step {median * 1e3:7.2f} ms "
            f"({len(samples[fraction])} steps), {16 / median:7.1f} tok/s, x{median / base:.3f}; "
            f"masking {statistics.median(masks[fraction]) * 1e3:.3f} ms"
        )


if __name__ == "__main__":
    main()
