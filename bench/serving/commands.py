"""`disagg-bench run`: build the workload and schedule, drive every target, write and print."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

from bench.serving.client import APIS, RequestOptions
from bench.serving.lengths import parse_length
from bench.serving.runner import RunPlan, TargetResult, parse_target, run_all
from bench.serving.schedule import build_schedule, parse_load
from bench.serving.slo import parse_slo
from bench.serving.table import render
from bench.serving.workload import SyntheticConfig, build_synthetic


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str) -> Any:
    """The tokenizer of a `disagg` model spec (`default`, a .gguf, an HF directory)."""
    from disagg.model_loader import load_model_info

    return load_model_info(model).tokenizer


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", action="append", required=True, help="NAME=URL, repeatable")
    parser.add_argument("--workload", default="synthetic", choices=["synthetic"])
    parser.add_argument("--input-len", default="fixed:128", help="fixed:L, uniform:lo:hi, ...")
    parser.add_argument("--output-len", default="fixed:64", help="same forms as --input-len")
    parser.add_argument(
        "--load", default="poisson:1", help="poisson:R[,burst=k], constant:R, closed:C"
    )
    parser.add_argument("--max-inflight", type=int, default=None, help="cap on requests in flight")
    parser.add_argument("--num-requests", type=int, default=100, help="measured requests")
    parser.add_argument(
        "--warmup", type=int, default=0, help="extra leading requests, not measured"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo", default=None, help='e.g. "ttft<=2s,tpot<=200ms"')
    parser.add_argument("--model", default="", help="served model name (default: /v1/models)")
    parser.add_argument("--tokenizer", default="default", help="disagg model spec to tokenize with")
    parser.add_argument("--api", default="completions", choices=list(APIS))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=sys.stderr.isatty(),
        help="a progress line on stderr (default: when stderr is a terminal)",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="run directory")


def build_plan(args: argparse.Namespace) -> tuple[RunPlan, list]:
    """Parse every spec first, so a typo fails before the tokenizer loads."""
    targets = [parse_target(t) for t in args.target]
    if len({t.name for t in targets}) != len(targets):
        raise ValueError("target names must be distinct")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    workload_config = SyntheticConfig(
        parse_length(args.input_len),
        parse_length(args.output_len),
        args.num_requests + args.warmup,
        args.seed,
    )
    load = parse_load(args.load)
    slo = parse_slo(args.slo)
    options = RequestOptions(args.model, args.api, args.ignore_eos, args.temperature, args.timeout)
    schedule = build_schedule(load, workload_config.num_requests, args.seed, args.max_inflight)
    workload = build_synthetic(workload_config, load_tokenizer(args.tokenizer))
    return RunPlan(tuple(workload), schedule, options, args.warmup, slo), targets


def print_result(result: TargetResult) -> None:
    summary = result.summary
    print(
        f"[{result.target.name}] {summary['num_ok']}/{summary['num_requests']} ok in "
        f"{summary['duration_s']:.1f} s, client CPU {result.client_cpu_percent:.0f}%",
        file=sys.stderr,
    )
    for warning in result.warnings:
        print(f"[{result.target.name}] WARNING: {warning}", file=sys.stderr)


def run_main(args: argparse.Namespace) -> int:
    try:
        plan, targets = build_plan(args)
    except ValueError as error:
        print(f"disagg-bench run: error: {error}", file=sys.stderr)
        return 2
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config.pop("func", None)
    results = run_all(plan, targets, args.output, config, print_result, args.progress)
    print(render([(r.target.name, r.summary) for r in results]))
    print(f"\nwrote {args.output}", file=sys.stderr)
    return 0
