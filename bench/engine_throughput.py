"""Engine throughput against transformers, in one process, on the same requests and threads.

Baseline: `generate` one request at a time (what a plain transformers server does).
Ours: every request submitted at once, continuously batched over the paged cache.
Also: one decode step at batch B, ours against a transformers forward over the
same batch with its dense KV cache, to show what paging costs; and the decode
step of the first engine (separate projections, per-slot K/V gather) against
the fast path, at each of `--step-batches` and `--threads`, with the batch-1
step against the time to read the weights once at the measured bandwidth.
And (`--parts preemption`) what one preemption costs, recomputed or swapped to
host memory, at each of `--contexts` (bench/preemption_cost.py).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from bench.decode_step import copy_bandwidth_gb_s, eager_vs_fast, time_variants, weight_nbytes
from bench.preemption_cost import bench_preemption, print_preemption
from bench.report import write_report
from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.model.device import resolve_device, resolve_dtype
from disagg.model.loader import LoadedModel, load_model

WORDS = [
    *"the model of a system runs on every core and each request waits for its turn".split(),
    *"while tokens stream back to clients who measure latency memory cache and blocks".split(),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtypes", default="auto,float32", help="comma-separated dtypes")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=8, help="timed steps per decode run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--parts", default="end-to-end,step", help="comma-separated: end-to-end, step, preemption"
    )
    parser.add_argument("--contexts", default="128,512,2048", help="preemption: context tokens")
    parser.add_argument("--preemption-repeats", type=int, default=5, help="preemption: rounds")
    parser.add_argument("--device", default="cpu", help="preemption: cpu, cuda or cuda:N")
    parser.add_argument("--step-batches", default="1,16,64", help="batches for eager vs fast")
    parser.add_argument("--threads", default="", help="comma-separated torch thread counts")
    parser.add_argument(
        "--compile", action="store_true", help="also time the step through torch.compile (slow)"
    )
    parser.add_argument("--output", default="bench/results")


def make_prompts(tokenizer: object, num: int, length: int, seed: int) -> list[list[int]]:
    """Real words, tokenized and cut to exactly `length` tokens, different for each request."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        text = " ".join(rng.choice(WORDS) for _ in range(length * 2))
        prompts.append(tokenizer(text)["input_ids"][:length])
    return prompts


def time_ours(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int) -> dict:
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=2048), loaded=loaded)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    seqs = engine.generate(prompts, params)
    total_s = time.perf_counter() - start
    output_tokens = sum(seq.num_output_tokens for seq in seqs)
    stats = engine.stats
    return {
        "total_s": total_s,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / total_s,
        "prefill_tok_s": stats.num_prefill_tokens / stats.prefill_s,
        "decode_tok_s": stats.num_decode_tokens / stats.decode_s,
    }


def time_transformers(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> dict:
    total_s = prefill_s = 0.0
    output_tokens = 0
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            prefill_s += time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
            total_s += time.perf_counter() - start
            output_tokens += out.shape[1] - len(prompt)
    decode_s = total_s - prefill_s
    return {
        "total_s": total_s,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / total_s,
        "prefill_tok_s": sum(map(len, prompts)) / prefill_s,
        "decode_tok_s": (output_tokens - len(prompts)) / decode_s,
    }


def decode_step_ms(loaded: LoadedModel, prompts: list[list[int]], steps: int) -> dict:
    """Median ms of one decode step over the whole batch: ours (paged) vs transformers (dense)."""
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=1 << 16), loaded=loaded)
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    engine.step()  # the whole batch's prefill
    ours = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        ours.append(time.perf_counter() - start)
    for seq in seqs:
        engine.abort(seq.request_id)

    from transformers import DynamicCache

    model = loaded.model
    ids = torch.tensor(prompts)  # equal lengths: no padding for either side
    theirs = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            start = time.perf_counter()
            out = model(next_ids, past_key_values=cache, use_cache=True)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            theirs.append(time.perf_counter() - start)
    return {
        "ours_ms": 1e3 * statistics.median(ours),
        "transformers_ms": 1e3 * statistics.median(theirs),
    }


def bench_steps(args: argparse.Namespace, loaded: LoadedModel) -> dict:
    """Eager vs fast decode step per thread count and batch, plus the batch-1 roofline."""
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [None]
    batches = [int(b) for b in args.step_batches.split(",")]
    prompts = make_prompts(loaded.tokenizer, max(batches), args.prompt_len, args.seed)
    nbytes = weight_nbytes(loaded.model)
    results = []
    for num_threads in threads:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        bandwidth = copy_bandwidth_gb_s()
        floor_ms = 1e3 * nbytes / (bandwidth * 1e9)
        for batch in batches:
            variants = eager_vs_fast(loaded, with_compiled=args.compile)
            compiled = frozenset({"fast_compiled"} if args.compile else ())
            ms = time_variants(loaded, prompts[:batch], variants, args.decode_steps, compiled)
            timings = ", ".join(f"{name} {v:.2f} ms" for name, v in ms.items())
            print(f"threads {torch.get_num_threads()} batch {batch}: {timings}", flush=True)
            results.append(
                {"threads": torch.get_num_threads(), "batch": batch, "step_ms": ms,
                 "copy_gb_s": bandwidth, "weight_read_ms": floor_ms}
            )  # fmt: skip
    return {"weight_nbytes": nbytes, "runs": results}


def print_steps(steps: dict, dtype: str, prompt_len: int) -> None:
    print(f"\n== {dtype}: decode step ms at ~{prompt_len}-token contexts, "
          f"weights {steps['weight_nbytes'] / 1e6:.0f} MB ==")  # fmt: skip
    names = list(steps["runs"][0]["step_ms"])
    print(f"{'threads':>7}{'batch':>6}" + "".join(f"{n:>11}" for n in names)
          + f"{'eager/fast':>11}{'fast tok/s':>11}{'fast/read':>10}")  # fmt: skip
    for run in steps["runs"]:
        ms = run["step_ms"]
        tok_s = 1e3 * run["batch"] / ms["fast"]
        print(f"{run['threads']:>7}{run['batch']:>6}" + "".join(f"{ms[n]:>11.2f}" for n in names)
              + f"{ms['eager'] / ms['fast']:>10.2f}x{tok_s:>11.1f}"
              + f"{ms['fast'] / run['weight_read_ms']:>9.2f}x")  # fmt: skip
    for run in steps["runs"]:
        ms = run["step_ms"]
        if "fast_compiled" in ms:
            print(f"threads {run['threads']} batch {run['batch']}: eager fast / compiled "
                  f"{ms['fast'] / ms['fast_compiled']:.2f}x")  # fmt: skip
    for run in steps["runs"]:
        if run["batch"] == 1:
            print(f"threads {run['threads']}: copy bandwidth {run['copy_gb_s']:.1f} GB/s, "
                  f"weights read once {run['weight_read_ms']:.2f} ms, "
                  f"fast batch-1 step {run['step_ms']['fast']:.2f} ms")  # fmt: skip


def bench_dtype(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    loaded = load_model(args.model, dtype, resolve_device("cpu"))
    parts = args.parts.split(",")
    result: dict = {"dtype": str(dtype).removeprefix("torch.")}
    if "step" in parts:
        result["steps"] = bench_steps(args, loaded)
        print_steps(result["steps"], result["dtype"], args.prompt_len)
    if "preemption" in parts:
        if args.threads:  # NOTE: the first count; --parts step runs them all
            torch.set_num_threads(int(args.threads.split(",")[0]))
        device = resolve_device(args.device)
        on_device = loaded if device.type == "cpu" else load_model(args.model, dtype, device)
        contexts = [int(n) for n in args.contexts.split(",")]
        result["preemption"] = bench_preemption(
            on_device, contexts, args.preemption_repeats, args.device, args.seed
        )
        print_preemption(result["preemption"], result["dtype"])
    if "end-to-end" not in parts:
        return result
    prompts = make_prompts(loaded.tokenizer, args.num_requests, args.prompt_len, args.seed)
    ours = time_ours(loaded, prompts, args.new_tokens)
    theirs = time_transformers(loaded.model, prompts, args.new_tokens)
    step = decode_step_ms(loaded, prompts, args.decode_steps)
    return result | {
        "ours": ours,
        "transformers": theirs,
        "decode_step": step,
        "ratios": {
            "end_to_end": ours["output_tok_s"] / theirs["output_tok_s"],
            "decode_phase": ours["decode_tok_s"] / theirs["decode_tok_s"],
            "prefill": ours["prefill_tok_s"] / theirs["prefill_tok_s"],
            "decode_step_ours_over_dense": step["ours_ms"] / step["transformers_ms"],
        },
    }


def print_table(result: dict, args: argparse.Namespace) -> None:
    ours, theirs, step, ratios = (
        result["ours"], result["transformers"], result["decode_step"], result["ratios"],
    )  # fmt: skip
    print(f"\n== {result['dtype']}: {args.num_requests} requests, {args.prompt_len} prompt + "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads ==")  # fmt: skip
    print(f"{'metric':<28}{'transformers':>14}{'disagg':>12}{'ratio':>9}")
    rows = [
        ("output tok/s (end to end)", "output_tok_s", "end_to_end"),
        ("decode tok/s (decode phase)", "decode_tok_s", "decode_phase"),
        ("prefill tok/s", "prefill_tok_s", "prefill"),
    ]
    for label, key, ratio in rows:
        print(f"{label:<28}{theirs[key]:>14.1f}{ours[key]:>12.1f}{ratios[ratio]:>8.2f}x")
    label = f"decode step @ batch {args.num_requests} (ms)"
    print(f"{label:<28}{step['transformers_ms']:>14.1f}{step['ours_ms']:>12.1f}"
          f"{ratios['decode_step_ours_over_dense']:>8.2f}x ours/dense")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    device = resolve_device("cpu")
    dtypes = list(dict.fromkeys(resolve_dtype(d, device) for d in args.dtypes.split(",")))
    results = []
    for dtype in dtypes:
        result = bench_dtype(args, dtype)
        if "ours" in result:
            print_table(result, args)
        results.append(result)
    write_report(args, "engine_throughput", results)
    return 0
