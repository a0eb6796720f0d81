"""One decode step, timed per variant on the same batch, interleaved, and the roofline.

Every variant runs the very same step (same sequences, same context, same KV
pool), round-robin, so a busy machine slows them alike and the ratios hold.
The batch-1 floor is the time to read every weight once at the bandwidth a
large tensor copy reaches on this machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.model.compiled_decode import compile_decode
from disagg.model.llama import LlamaModel
from disagg.model.loader import LoadedModel

COPY_NBYTES = 1 << 28


def copy_bandwidth_gb_s(nbytes: int = COPY_NBYTES, repeats: int = 5) -> float:
    """Best of `repeats` copies of an `nbytes` buffer: bytes read plus written per second."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best_s = min(best_s, time.perf_counter() - start)
    return 2 * nbytes / best_s / 1e9


def weight_nbytes(model: torch.nn.Module) -> int:
    """Bytes a step reads: every distinct parameter once (tied embeddings count once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def time_variants(
    loaded: LoadedModel,
    prompts: list[list[int]],
    variants: dict[str, Callable[[], LlamaModel]],
    steps: int,
    compiled: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """Median ms of one decode step over `prompts` for each variant; the variants named in
    `compiled` run their forward through torch.compile (compiled on their warm-up round)."""
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=1 << 16), loaded=loaded)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    engine.step()  # the whole batch's prefill
    batch = engine.scheduler.schedule().decode  # blocks for the next token are in place
    assert len(batch) == len(seqs), "the whole batch must decode together"
    runner = engine.runner
    models = {name: build() for name, build in variants.items()}
    forwards = {name: compile_decode(models[name]) for name in compiled}
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(steps + 1):
        for name, model in models.items():
            runner.model = model
            runner.compiled_decode = forwards.get(name)
            start = time.perf_counter()
            runner.decode(batch)  # rewrites the same slot: the step stays identical
            if round_index:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    runner.compiled_decode = None
    for seq in seqs:
        engine.abort(seq.request_id)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def eager_vs_fast(
    loaded: LoadedModel, with_compiled: bool = False
) -> dict[str, Callable[[], LlamaModel]]:
    """The engine as it first was against the fast path (sdpa), the fast path with bmm and,
    `with_compiled`, the fast path through torch.compile (`fast_compiled`)."""
    hf = loaded.model
    variants = {
        "eager": lambda: LlamaModel(hf, fast=False),
        "fast": lambda: LlamaModel(hf, fast=True),
        "fast_bmm": lambda: LlamaModel(hf, fast=True, attention_method="bmm"),
    }
    if with_compiled:
        variants["fast_compiled"] = lambda: LlamaModel(hf, fast=True)
    return variants
