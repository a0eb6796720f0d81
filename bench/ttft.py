"""TTFT of one long request, disaggregated against colocated, in one run on this machine.

Each setup is a real `disagg serve`. The headline pair gives the prefill the
same threads on both sides (disaggregated: a 1-thread prefill worker and a
1-thread decode worker; colocated: one 1-thread worker), so the difference is
what moving the KV costs. Colocated with all the machine's threads is shown
too, as the same-total-threads view.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
import urllib.request

from bench.local_cluster import LocalCluster
from bench.report import write_report
from disagg.model.loader import load_model_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-transport", default="ipc", choices=["ipc", "tcp"])
    parser.add_argument("--output", default="bench/results")


def time_to_first_chunk(url: str, prompt_ids: list[int]) -> tuple[float, dict]:
    """Client-side TTFT of a streamed completion, and the server's timings and usage.

    NOTE: the server sends its timings only in the usage chunk, so the request asks for it.
    """
    body = {
        "prompt": prompt_ids,
        "max_tokens": 2,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    ttft_s, metrics = None, {}
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            ttft_s = ttft_s or time.perf_counter() - start
            chunk = json.loads(line[len(b"data: ") :])
            if chunk.get("metrics"):
                metrics = chunk["metrics"][0]
    return ttft_s, metrics


def measure(
    args: argparse.Namespace, label: str, serve_args: list[str], prompts: list[list[int]]
) -> dict:
    common = ["--model", args.model, "--dtype", args.dtype, "--kv-transport", args.kv_transport]
    with LocalCluster(*serve_args, *common) as cluster:
        time_to_first_chunk(cluster.url, prompts[0])  # warm-up
        runs = [time_to_first_chunk(cluster.url, p) for p in prompts[1:]]
    ttfts = [ttft for ttft, _ in runs]
    return {
        "setup": label,
        "ttft_s_median": statistics.median(ttfts),
        "ttft_s": ttfts,
        "prefill_s_median": statistics.median(m["prefill_s"] for _, m in runs),
        "kv_transfer_s_median": statistics.median(m["kv_transfer_s"] for _, m in runs),
        "kv_bytes": runs[0][1]["kv_bytes"],
    }


def main(args: argparse.Namespace) -> int:
    tokenizer = load_model_info(args.model).tokenizer
    rng = random.Random(0)
    vocab = list(range(1000, 20000))
    # distinct prompts, so nothing could be served from any cache
    prompts = [
        [rng.choice(vocab) for _ in range(args.prompt_tokens)] for _ in range(args.repeats + 1)
    ]
    assert len(tokenizer) > max(vocab)
    threads = os.cpu_count() or 1
    setups = [
        (
            "disaggregated 1P+1D, 1 thread each",
            ["--mode", "disaggregated", "--worker-threads", "1"],
        ),
        ("colocated, 1 thread", ["--mode", "colocated", "--worker-threads", "1"]),
        (f"colocated, {threads} threads", ["--mode", "colocated"]),
    ]
    results = [measure(args, label, serve_args, prompts) for label, serve_args in setups]
    ratio = results[0]["ttft_s_median"] / results[1]["ttft_s_median"]
    print(f"\n== TTFT of one {args.prompt_tokens}-token request ({args.dtype}, KV over "
          f"{args.kv_transport}), median of {args.repeats} ==")  # fmt: skip
    print(f"{'setup':<38}{'TTFT s':>9}{'prefill s':>11}{'KV xfer s':>11}{'KV MB':>8}")
    for r in results:
        print(f"{r['setup']:<38}{r['ttft_s_median']:>9.3f}{r['prefill_s_median']:>11.3f}"
              f"{r['kv_transfer_s_median']:>11.4f}{r['kv_bytes'] / 1e6:>8.1f}")  # fmt: skip
    print(f"disaggregated / colocated (same prefill threads): {ratio:.3f}x "
          f"(transfer adds {100 * (ratio - 1):+.1f}%)")  # fmt: skip
    write_report(args, "ttft", results, ratio=ratio)
    return 0
