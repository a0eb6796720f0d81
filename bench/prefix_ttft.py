"""TTFT of a request whose long system prompt is cached, against one whose prompt is not.

One real `disagg serve` (disaggregated, 1 prefill + 1 decode worker). Cold and
cached requests alternate, so both see the same machine load: a cold request
starts with a system prompt never sent before (nothing to reuse on either side);
a cached one starts with the shared system prompt, sent once beforehand, then a
question of its own. Both are the same length, so the difference is what the
prefix cache saves: computing the prefix on the prefill worker and moving its KV
to the decode worker.
"""

from __future__ import annotations

import argparse
import random
import statistics

from bench.local_cluster import LocalCluster
from bench.report import write_report
from bench.ttft import time_to_first_chunk
from disagg.model.loader import load_model_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--system-tokens", type=int, default=500)
    parser.add_argument("--question-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--output", default="bench/results")


def summarize(label: str, runs: list[tuple[float, dict]]) -> dict:
    return {
        "requests": label,
        "ttft_s_median": statistics.median(ttft for ttft, _ in runs),
        "ttft_s": [ttft for ttft, _ in runs],
        "prefill_s_median": statistics.median(m["prefill_s"] for _, m in runs),
        "kv_transfer_s_median": statistics.median(m["kv_transfer_s"] for _, m in runs),
        "kv_bytes_median": statistics.median(m["kv_bytes"] for _, m in runs),
        "cached_tokens_median": statistics.median(m["cached_tokens"] for _, m in runs),
    }


def main(args: argparse.Namespace) -> int:
    tokenizer = load_model_info(args.model).tokenizer
    vocab = list(range(1000, 20000))
    assert len(tokenizer) > max(vocab)
    rng = random.Random(0)

    def draw(num_tokens: int) -> list[int]:
        return [rng.choice(vocab) for _ in range(num_tokens)]

    shared = draw(args.system_tokens)
    serve_args = [
        "--model", args.model, "--dtype", args.dtype, "--mode", "disaggregated",
        "--worker-threads", str(args.worker_threads),
    ]  # fmt: skip
    num_tokens = args.system_tokens + args.question_tokens
    cold, cached = [], []
    with LocalCluster(*serve_args) as cluster:
        time_to_first_chunk(cluster.url, draw(num_tokens))  # warm-up
        time_to_first_chunk(cluster.url, shared + draw(args.question_tokens))  # caches `shared`
        for _ in range(args.repeats):  # interleaved: both see the same load
            cold.append(time_to_first_chunk(cluster.url, draw(num_tokens)))
            cached.append(time_to_first_chunk(cluster.url, shared + draw(args.question_tokens)))
    results = [summarize("cold (new system prompt)", cold), summarize("cached prefix", cached)]
    ratio = results[0]["ttft_s_median"] / results[1]["ttft_s_median"]
    print(f"\n== TTFT, {args.system_tokens}-token system prompt + {args.question_tokens}-token "
          f"question ({args.dtype}, {args.worker_threads} thread(s) per worker, 1P+1D), "
          f"median of {args.repeats} ==")  # fmt: skip
    print(f"{'requests':<28}{'TTFT s':>9}{'prefill s':>11}{'KV xfer s':>11}{'KV MB':>8}"
          f"{'cached':>8}")  # fmt: skip
    for r in results:
        print(f"{r['requests']:<28}{r['ttft_s_median']:>9.3f}{r['prefill_s_median']:>11.3f}"
              f"{r['kv_transfer_s_median']:>11.4f}{r['kv_bytes_median'] / 1e6:>8.2f}"
              f"{r['cached_tokens_median']:>8.0f}")  # fmt: skip
    print(f"cold / cached TTFT: {ratio:.2f}x")
    write_report(args, "prefix_ttft", results, ratio=ratio)
    return 0
