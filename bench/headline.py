"""`disagg-bench headline` (`make bench`): does disaggregation pay on this machine?

One command runs the same seeded workloads against `disagg serve --mode
colocated` and `--mode disaggregated` with the same total CPU threads, and
against the peer a user would otherwise pick on such a box, `transformers serve
--continuous-batching`, with the same weights and dtype. Each server runs alone:
it is started just before its turn and stopped after, so nothing competes for
the cores. Two scenarios:

- `mixed`: open-loop Poisson arrivals of mixed lengths under an SLO, the
  colocated-or-disaggregated question;
- `streams16`: 16 concurrent streams (closed loop), the question against the peer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.local_cluster import LocalCluster, ServerProcess
from bench.peer import TransformersServe
from bench.serving import commands
from bench.serving.report import run_plots
from bench.serving.runner import Target, TargetResult, run_target, write_result
from bench.serving.table import print_table
from bench.serving.workload import write_workload


@dataclass(frozen=True)
class Scenario:
    """A workload, a load and the servers it is run against."""

    name: str
    load: str
    num_requests: int
    servers: tuple[str, ...]
    input_len: str = "uniform:64:512"
    output_len: str = "uniform:32:128"
    slo: str = "ttft<=2s,tpot<=150ms"
    warmup: int = 2


SERVERS = ("colocated", "disaggregated", "transformers")
SCENARIOS = {
    "mixed": Scenario("mixed", "poisson:0.3", 30, SERVERS[:2]),
    "streams16": Scenario("streams16", "closed:16", 32, SERVERS),
}


def server_factories(args: argparse.Namespace) -> dict[str, Callable[[], ServerProcess]]:
    """Context managers with a `.url`, each a server on free local ports."""
    common = ("--model", args.model, "--dtype", args.dtype)
    return {
        "colocated": lambda: LocalCluster("--mode", "colocated", *common),
        "disaggregated": lambda: LocalCluster(
            "--mode", "disaggregated", "--prefill-workers", "1", "--decode-workers", "1", *common
        ),
        "transformers": lambda: TransformersServe(args.model, args.dtype),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", default="all", choices=["all", *SCENARIOS])
    parser.add_argument("--model", default="default", help="disagg model spec")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--servers",
        default=None,
        help=f"comma-separated subset of {','.join(SERVERS)}",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-requests", type=int, default=None, help="override per scenario")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench/results/headline"))


def run_args(scenario: Scenario, args: argparse.Namespace, out: Path) -> argparse.Namespace:
    """The `disagg-bench run` arguments of one scenario, as its own parser would give them."""
    parser = argparse.ArgumentParser()
    commands.add_run_arguments(parser)
    argv = [
        "--target", "placeholder=http://127.0.0.1:1",
        "--input-len", scenario.input_len, "--output-len", scenario.output_len,
        "--load", scenario.load, "--num-requests", str(args.num_requests or scenario.num_requests),
        "--warmup", str(scenario.warmup), "--seed", str(args.seed), "--slo", scenario.slo,
        "--tokenizer", args.model, "--progress" if sys.stderr.isatty() else "--no-progress",
        "-o", str(out),
    ]  # fmt: skip
    return parser.parse_args(argv)


def run_scenario(
    scenario: Scenario, args: argparse.Namespace, servers: list[str]
) -> list[TargetResult]:
    """Every server in turn on the scenario's one workload; each started and stopped alone."""
    out = args.output / scenario.name
    scenario_args = run_args(scenario, args, out)
    plan, _ = commands.build_plan(scenario_args)
    out.mkdir(parents=True, exist_ok=True)
    write_workload(out / "workload.jsonl", list(plan.workload))
    factories = server_factories(args)
    results = []
    for name in servers:
        print(f"[{scenario.name}] starting {name}", file=sys.stderr)
        with factories[name]() as server:
            target = Target(name, server.url, server.extra_body)
            result = run_target(plan, target, scenario_args.progress)
        config = commands.run_config(scenario_args, scenario=scenario.name, server=name)
        write_result(out, result, config)
        commands.print_result(result)
        results.append(result)
    print(f"\n== {scenario.name}: {scenario.load}, SLO {scenario.slo} ==")
    print_table([(r.target.name, r.summary) for r in results])
    run_plots(out, scenario.slo)
    return results


def main(args: argparse.Namespace) -> int:
    chosen = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    wanted = args.servers.split(",") if args.servers else None
    unknown = set(wanted or ()) - set(SERVERS)
    if unknown:
        print(f"disagg-bench headline: error: unknown servers {sorted(unknown)}", file=sys.stderr)
        return 2
    for name in chosen:
        scenario = SCENARIOS[name]
        servers = [s for s in scenario.servers if wanted is None or s in wanted]
        if servers:
            run_scenario(scenario, args, servers)
    print(f"\nwrote {args.output}", file=sys.stderr)
    return 0
