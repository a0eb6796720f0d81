"""`disagg-bench run`: build the workload and schedule, drive every target, write and print."""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.serving.client import APIS, RequestOptions
from bench.serving.conversation import MultiTurnConfig, build_conversations
from bench.serving.datasets import (
    LengthFilter,
    SharedPrefixConfig,
    build_shared_prefix,
    load_sharegpt,
    load_trace,
)
from bench.serving.fault_run import print_fault_table, run_with_faults
from bench.serving.faults import parse_fault
from bench.serving.lengths import parse_length
from bench.serving.report import run_plots
from bench.serving.runner import (
    RunPlan,
    TargetResult,
    parse_target,
    run_all,
    with_extra_bodies,
)
from bench.serving.schedule import LoadSpec, Schedule, build_schedule, parse_load, within
from bench.serving.slo import SLO, parse_slo
from bench.serving.structured import load_schema
from bench.serving.table import print_table
from bench.serving.workload import SyntheticConfig, WorkloadRequest, build_synthetic

WORKLOADS = ("synthetic", "sharegpt", "shared-prefix", "trace", "multi-turn")
DEFAULT_NUM_REQUESTS = 100
DEFAULT_NUM_CONVERSATIONS = 8
DEFAULT_DURATION_CAP = 1000


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str) -> Any:
    """The tokenizer of a `disagg` model spec (`default`, a .gguf, an HF directory)."""
    from disagg.model.loader import load_model_info

    return load_model_info(model).tokenizer


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", action="append", required=True, help="NAME=URL, repeatable")
    parser.add_argument(
        "--extra-body",
        action="append",
        default=[],
        help="NAME=JSON merged into that target's request bodies; null drops a field",
    )
    parser.add_argument("--workload", default="synthetic", choices=WORKLOADS)
    parser.add_argument("--dataset", type=Path, default=None, help="sharegpt JSON or trace JSONL")
    parser.add_argument(
        "--input-len",
        default="fixed:128",
        help="fixed:L, uniform:lo:hi, ... (shared-prefix: suffix; multi-turn: each user message)",
    )
    parser.add_argument("--output-len", default="fixed:64", help="same forms as --input-len")
    parser.add_argument(
        "--load",
        default="poisson:1",
        help="poisson:R[,burst=k], constant:R, closed:C (multi-turn: R conversations/s, or C "
        "conversations at once)",
    )
    add_dataset_arguments(parser)
    parser.add_argument("--max-inflight", type=int, default=None, help="cap on requests in flight")
    parser.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help=f"measured requests (default {DEFAULT_NUM_REQUESTS}; "
        f"with --duration, a cap, default {DEFAULT_DURATION_CAP})",
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds to send for, instead of a count"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="passes per target; >1 adds bootstrap 95%% CIs"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="extra leading requests (multi-turn: conversations), not measured",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo", default=None, help='e.g. "ttft<=2s,tpot<=200ms"')
    parser.add_argument("--model", default="", help="served model name (default: /v1/models)")
    parser.add_argument("--tokenizer", default="default", help="disagg model spec to tokenize with")
    parser.add_argument("--api", default="completions", choices=list(APIS))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--json-schema-fraction",
        type=float,
        default=0.0,
        help="share of requests constrained to JSON by response_format json_schema (0-1)",
    )
    parser.add_argument(
        "--json-schema", type=Path, default=None, help="their JSON Schema file (default: built in)"
    )
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=sys.stderr.isatty(),
        help="a progress line on stderr (default: when stderr is a terminal)",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="run directory")


def add_run_command_arguments(parser: argparse.ArgumentParser) -> None:
    """`disagg-bench run`'s options: the shared ones, plus fault injection (run only)."""
    add_run_arguments(parser)
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        help="ACTION:ROLE@at=T|every=T, e.g. kill:decode@every=10s (repeatable); "
        "each target then runs twice, without and with the faults",
    )


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the non-synthetic workloads."""
    for bound in ("min", "max"):
        for what in ("input", "output"):
            parser.add_argument(
                f"--{bound}-{what}-len",
                type=int,
                default=None,
                help=f"sharegpt: {bound} {what} tokens",
            )
    parser.add_argument("--prefix-groups", type=int, default=4, help="shared-prefix: G groups")
    parser.add_argument("--prompts-per-group", type=int, default=8, help="shared-prefix: P prompts")
    parser.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: prefix tokens")
    parser.add_argument("--time-scale", type=float, default=1.0, help="trace: send at t * scale")
    parser.add_argument(
        "--num-conversations",
        type=int,
        default=DEFAULT_NUM_CONVERSATIONS,
        help="multi-turn: measured conversations (instead of --num-requests)",
    )
    parser.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    parser.add_argument(
        "--system-prompt-len", type=int, default=256, help="multi-turn: system prompt tokens"
    )
    parser.add_argument(
        "--system-prompts",
        type=int,
        default=1,
        help="multi-turn: distinct system prompts, shared round-robin by the conversations",
    )
    parser.add_argument(
        "--think-time",
        type=float,
        default=0.0,
        help="multi-turn: seconds between an answer and the conversation's next turn",
    )


def length_filter(args: argparse.Namespace) -> LengthFilter:
    defaults = LengthFilter()
    return LengthFilter(
        args.min_input_len or defaults.min_input,
        args.max_input_len or defaults.max_input,
        args.min_output_len or defaults.min_output,
        args.max_output_len or defaults.max_output,
    )


def build_workload(
    args: argparse.Namespace, num_requests: int
) -> tuple[list[WorkloadRequest], tuple[float, ...] | None]:
    """The workload, and the trace's send offsets when it is a trace (else None)."""
    tokenizer = load_tokenizer(args.tokenizer)
    if args.workload in ("sharegpt", "trace") and args.dataset is None:
        raise ValueError(f"--workload {args.workload} needs --dataset PATH")
    if args.workload == "sharegpt":
        return load_sharegpt(
            args.dataset, tokenizer, num_requests, args.seed, length_filter(args)
        ), None
    if args.workload == "trace":
        return load_trace(args.dataset, tokenizer, num_requests, args.seed, args.time_scale)
    input_len, output_len = parse_length(args.input_len), parse_length(args.output_len)
    if args.workload == "shared-prefix":
        config = SharedPrefixConfig(
            args.prefix_groups, args.prompts_per_group, args.prefix_len, input_len, output_len
        )
        return build_shared_prefix(config, tokenizer, num_requests, args.seed), None
    config = SyntheticConfig(input_len, output_len, num_requests, args.seed)
    return build_synthetic(config, tokenizer), None


def build_plan(args: argparse.Namespace) -> tuple[RunPlan, list]:
    """Parse every spec first, so a typo fails before the tokenizer loads."""
    targets = [parse_target(t) for t in args.target]
    if len({t.name for t in targets}) != len(targets):
        raise ValueError("target names must be distinct")
    targets = with_extra_bodies(targets, args.extra_body)
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.duration is not None and args.duration <= 0:
        raise ValueError(f"--duration must be > 0 seconds, got {args.duration}")
    parse_length(args.input_len), parse_length(args.output_len)  # fail before the tokenizer loads
    load = parse_load(args.load)
    slo = parse_slo(args.slo)
    options = request_options(args)
    if args.workload == "multi-turn":
        return multi_turn_plan(args, load, options, slo), targets
    default = DEFAULT_NUM_REQUESTS if args.duration is None else DEFAULT_DURATION_CAP
    measured = default if args.num_requests is None else args.num_requests
    if measured < 1:
        raise ValueError(f"--num-requests must be >= 1, got {measured}")
    num_requests = measured + args.warmup
    schedule = build_schedule(load, num_requests, args.seed, args.max_inflight)
    workload, trace_offsets_s = build_workload(args, num_requests)
    if trace_offsets_s is not None:
        schedule = Schedule(trace_offsets_s, None, args.max_inflight)
    schedule = within(schedule, args.duration)
    plan = RunPlan(
        tuple(workload), schedule, options, args.warmup, slo, args.repeats, args.duration
    )
    return plan, targets


def request_options(args: argparse.Namespace) -> RequestOptions:
    return RequestOptions(
        args.model,
        args.api,
        args.ignore_eos,
        args.temperature,
        args.timeout,
        args.json_schema_fraction,
        load_schema(args.json_schema),
    )


def multi_turn_plan(
    args: argparse.Namespace, load: LoadSpec, options: RequestOptions, slo: SLO
) -> RunPlan:
    """Conversations of `--turns` turns; the schedule times conversations, and --warmup
    counts whole conversations (bench/serving/conversation.py)."""
    if args.num_requests is not None:
        raise ValueError("--workload multi-turn counts --num-conversations, not --num-requests")
    if args.num_conversations < 1:
        raise ValueError(f"--num-conversations must be >= 1, got {args.num_conversations}")
    if args.think_time < 0:
        raise ValueError(f"--think-time must be >= 0 seconds, got {args.think_time}")
    config = MultiTurnConfig(
        args.num_conversations + args.warmup,
        args.turns,
        args.system_prompt_len,
        args.system_prompts,
        parse_length(args.input_len),
        parse_length(args.output_len),
    )
    schedule = build_schedule(load, config.num_conversations, args.seed, args.max_inflight)
    tokenizer = load_tokenizer(args.tokenizer)
    workload, conversations = build_conversations(config, tokenizer, args.seed)
    return RunPlan(
        tuple(workload),
        within(schedule, args.duration),
        options,
        args.warmup * config.num_turns,
        slo,
        args.repeats,
        args.duration,
        tuple(conversations),
        args.think_time,
    )


def with_load(plan: RunPlan, load: LoadSpec, args: argparse.Namespace) -> RunPlan:
    """The same workload on another load: sweep points and search probes differ only here."""
    num_sends = len(plan.conversations) or len(plan.workload)  # multi-turn: conversation starts
    schedule = build_schedule(load, num_sends, args.seed, args.max_inflight)
    return replace(plan, schedule=within(schedule, plan.duration_s))


def run_config(args: argparse.Namespace, **overrides: Any) -> dict:
    """The CLI arguments as JSON-able config for run.json, with per-point overrides."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config.pop("func", None)
    return {**config, **overrides}


def print_result(result: TargetResult) -> None:
    summary = result.summary
    print(
        f"[{result.target.name}] {summary['num_ok']}/{summary['num_requests']} ok in "
        f"{summary['duration_s']:.1f} s, client CPU {result.client_cpu_percent:.0f}%",
        file=sys.stderr,
    )
    running = result.decode_running
    if running is not None:
        print(
            f"[{result.target.name}] decode workers' running batch: mean {running['mean']:.1f}, "
            f"median {running['median']:g}, max {running['max']} "
            f"({running['num_samples']} samples)",
            file=sys.stderr,
        )
    for warning in result.warnings:
        print(f"[{result.target.name}] WARNING: {warning}", file=sys.stderr)


def run_main(args: argparse.Namespace) -> int:
    try:
        faults = [parse_fault(spec) for spec in args.fault]
        plan, targets = build_plan(args)
    except ValueError as error:
        print(f"disagg-bench run: error: {error}", file=sys.stderr)
        return 2
    if faults:
        rows = run_with_faults(plan, targets, faults, args.output, run_config(args), args.progress)
        print_fault_table(rows)
        return 0
    results = run_all(plan, targets, args.output, run_config(args), print_result, args.progress)
    print_table([(r.target.name, r.summary) for r in results])
    run_plots(args.output, args.slo)
    print(f"\nwrote {args.output} (tables, requests, plots)", file=sys.stderr)
    return 0
