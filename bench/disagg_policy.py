"""`disagg-bench disagg-policy`: where should a prompt be prefilled?

One seeded mixed workload, open-loop Poisson arrivals under an SLO, against
`disagg serve --mode disaggregated` (1 prefill + 1 decode worker) with each
`--disagg-policy`: always (every prompt on the prefill worker), never (every
prompt in place on the decode worker) and auto (the cost model of
coordinator/disagg_policy.py). Each server runs alone, started just before its
turn and stopped after. The mix, in a seeded shuffled order:

- short fresh prompts, where the hop and the KV transfer are most of the cost;
- long fresh prompts, whose prefill in place would stall the running streams;
- follow-ups on a few shared long prefixes: the first of each group is a long
  uncached prompt, the rest have only a short suffix left to compute.

Goodput (requests meeting the SLO per second) is the verdict; the table also
counts where each server prefilled (from its `disagg_prefill_placements_total`).
On a shared machine the background load drifts, so `--rounds 2` (the default)
runs the policies in order, then in reverse (always, never, auto, auto, never,
always), and each column sums both of its turns (one pass each).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.local_cluster import LocalCluster
from bench.serving import commands
from bench.serving.datasets import SharedPrefixConfig, build_shared_prefix
from bench.serving.lengths import parse_length
from bench.serving.metrics import summarize_run
from bench.serving.runner import RunPlan, Target, TargetResult, run_target, write_result
from bench.serving.server_metrics import series_total
from bench.serving.table import print_table
from bench.serving.workload import (
    SyntheticConfig,
    WorkloadRequest,
    build_synthetic,
    write_workload,
)

POLICIES = ("always", "never", "auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="disagg model spec")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, in order")
    parser.add_argument("--num-requests", type=int, default=24, help="measured, per turn")
    parser.add_argument("--rounds", type=int, default=2, help="turns per policy, order reversed")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--load", default="poisson:0.25")
    parser.add_argument("--short-len", default="uniform:16:48", help="short prompts' tokens")
    parser.add_argument("--long-len", default="uniform:256:512", help="long prompts' tokens")
    parser.add_argument("--prefix-len", type=int, default=256, help="shared prefixes' tokens")
    parser.add_argument("--prefix-groups", type=int, default=3)
    parser.add_argument("--output-len", default="uniform:16:32")
    parser.add_argument("--slo", default="ttft<=4s,tpot<=300ms")
    parser.add_argument(
        "--in-place-stall-weight", type=float, default=None, help="auto's (default: the server's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=Path("bench/results/disagg_policy"))


def mixed_workload(args: argparse.Namespace, num_requests: int) -> list[WorkloadRequest]:
    """A third short fresh, a third long fresh, a third follow-ups on shared prefixes."""
    tokenizer = commands.load_tokenizer(args.model)
    output_len = parse_length(args.output_len)
    num_each = -(-num_requests // 3)
    short = SyntheticConfig(parse_length(args.short_len), output_len, num_each, args.seed)
    long = SyntheticConfig(parse_length(args.long_len), output_len, num_each, args.seed + 1)
    groups = SharedPrefixConfig(
        args.prefix_groups,
        -(-num_each // args.prefix_groups),
        args.prefix_len,
        parse_length(args.short_len),
        output_len,
    )
    requests = [
        *build_synthetic(short, tokenizer),
        *build_synthetic(long, tokenizer),
        *build_shared_prefix(groups, tokenizer, num_each, args.seed),
    ]
    order = np.random.default_rng([args.seed, 7]).permutation(len(requests))[:num_requests]
    return [replace(requests[int(j)], index=i) for i, j in enumerate(order)]


def run_args(args: argparse.Namespace, out: Path) -> argparse.Namespace:
    """The `disagg-bench run` arguments, as its own parser would give them."""
    parser = argparse.ArgumentParser()
    commands.add_run_arguments(parser)
    argv = [
        "--target", "placeholder=http://127.0.0.1:1", "--load", args.load,
        "--num-requests", str(args.num_requests), "--warmup", str(args.warmup),
        "--seed", str(args.seed), "--slo", args.slo, "--tokenizer", args.model,
        "--progress" if sys.stderr.isatty() else "--no-progress", "-o", str(out),
    ]  # fmt: skip
    return parser.parse_args(argv)


def server(args: argparse.Namespace, policy: str) -> LocalCluster:
    weight = args.in_place_stall_weight
    tuned = ("--in-place-stall-weight", str(weight)) if weight is not None else ()
    return LocalCluster(
        "--mode", "disaggregated", "--prefill-workers", "1", "--decode-workers", "1",
        "--model", args.model, "--dtype", args.dtype,
        "--worker-threads", str(args.worker_threads), "--disagg-policy", policy, *tuned,
    )  # fmt: skip


def placements(results: list[TargetResult]) -> dict[str, float]:
    """Prefills in place and remote, over the server's turns (from its own counter)."""
    name = "disagg_prefill_placements_total"
    return {
        where: sum(
            series_total(r.server_metrics or {}, name, f'placement="{where}"') for r in results
        )
        for where in ("in_place", "remote")
    }


def run_turn(
    args: argparse.Namespace,
    plan: RunPlan,
    scenario_args: argparse.Namespace,
    policy: str,
    turn: int,
) -> TargetResult:
    """One policy's server started, driven with the workload once, stopped."""
    print(f"[disagg-policy] turn {turn}: starting {policy}", file=sys.stderr)
    with server(args, policy) as cluster:
        result = run_target(plan, Target(policy, cluster.url), scenario_args.progress)
    config = commands.run_config(scenario_args, server=policy, turn=turn)
    write_result(args.output / f"turn{turn}", result, config)
    commands.print_result(result)
    return result


def combined(results: list[TargetResult], plan: RunPlan) -> TargetResult:
    """One policy's turns as one result: each turn's records as one pass."""
    records = [
        replace(record, repeat=turn) for turn, r in enumerate(results) for record in r.records
    ]
    first = results[0]
    return replace(first, records=records, summary=summarize_run(records, plan.slo))


def main(args: argparse.Namespace) -> int:
    policies = args.policies.split(",")
    unknown = set(policies) - set(POLICIES)
    if unknown:
        print(f"disagg-bench disagg-policy: error: unknown {sorted(unknown)}", file=sys.stderr)
        return 2
    out = args.output
    scenario_args = run_args(args, out)
    plan, _ = commands.build_plan(scenario_args)
    plan = replace(plan, workload=tuple(mixed_workload(args, len(plan.workload))))
    out.mkdir(parents=True, exist_ok=True)
    write_workload(out / "workload.jsonl", list(plan.workload))
    turns: dict[str, list[TargetResult]] = {policy: [] for policy in policies}
    for turn in range(args.rounds):
        for policy in policies if turn % 2 == 0 else policies[::-1]:
            turns[policy].append(run_turn(args, plan, scenario_args, policy, turn))
    results = [combined(turns[policy], plan) for policy in policies]
    print(f"\n== disagg-policy: {args.load}, SLO {args.slo}, {args.rounds} turns each ==")
    print_table([(r.target.name, r.summary) for r in results])
    for policy in policies:
        counts = placements(turns[policy])
        in_place, remote = counts["in_place"], counts["remote"]
        print(f"{policy}: prefilled in place {in_place:.0f}, remote {remote:.0f}")
    return 0
