"""`disagg-bench calibrate`: the client's own ceiling, against a server that costs nothing.

A zero-delay loopback SSE server runs in its own process; the client drives it
closed-loop as hard as it can. The achieved requests/s and chunks/s are the most
any run on this machine can measure; a run near them measures the client.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.serving.client import RequestOptions
from bench.serving.runner import RunPlan, Target, run_target
from bench.serving.schedule import build_schedule, parse_load
from bench.serving.workload import WorkloadRequest

PROMPT = "calibration " * 16


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--load", default="closed:32", help="as for run; closed:C finds the ceiling"
    )
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--output-len", type=int, default=64, help="tokens (chunks) per request")
    parser.add_argument("-o", "--output", type=Path, default=None, help="write calibrate.json here")


def start_loopback() -> tuple[subprocess.Popen, int]:
    """The loopback server in a child process, and its port once it listens."""
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.serving.loopback"], stdout=subprocess.PIPE, text=True
    )
    line = child.stdout.readline()  # the child prints PORT as soon as it listens, or exits
    if not line.startswith("PORT "):
        child.kill()
        raise RuntimeError(f"loopback server failed to start: {line!r}")
    return child, int(line.split()[1])


def calibrate(load: str, num_requests: int, output_len: int) -> dict:
    workload = tuple(WorkloadRequest(i, PROMPT, 16, output_len) for i in range(num_requests))
    schedule = build_schedule(parse_load(load), num_requests, seed=0)
    plan = RunPlan(workload, schedule, RequestOptions("loopback", timeout_s=60))
    child, port = start_loopback()
    try:
        result = run_target(plan, Target("loopback", f"http://127.0.0.1:{port}/ok"))
    finally:
        child.kill()
        child.wait()
    summary = result.summary
    return {
        "load": load,
        "num_requests": num_requests,
        "output_len": output_len,
        "num_errors": summary["num_errors"],
        "requests_per_s": summary["request_throughput_rps"],
        "chunks_per_s": summary["output_tokens_per_s"],
        "dispatch_lag_p99_ms": summary["dispatch_lag_ms"]["p99"],
        "ttft_p50_ms": summary["ttft_ms"]["p50"],
        "itl_p99_ms": summary["itl_ms"]["p99"],
        "client_cpu_percent": result.client_cpu_percent,
    }


def calibrate_main(args: argparse.Namespace) -> int:
    ceiling = calibrate(args.load, args.num_requests, args.output_len)
    for key, number in ceiling.items():
        print(f"{key:22} {number:.2f}" if isinstance(number, float) else f"{key:22} {number}")
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "calibrate.json").write_text(json.dumps(ceiling, indent=2) + "\n")
    return 0 if ceiling["num_errors"] == 0 else 1
