"""`disagg-bench`: benchmarks that run the baseline and ours in one run and print the ratio."""

from __future__ import annotations

import argparse
import sys

from bench import disagg_policy, engine_throughput, headline, kv_transfer, prefix_ttft, ttft
from bench.serving import calibrate as serving_calibrate
from bench.serving import commands as serving
from bench.serving import report as serving_report
from bench.serving import search_command as serving_search
from bench.serving import sweep as serving_sweep

# (name, help, adds the subcommand's options, runs it)
SUBCOMMANDS = [
    ("engine", "engine vs transformers generate, one process",
     engine_throughput.add_arguments, engine_throughput.main),
    ("kv-transfer", "KV data plane vs raw ZeroMQ, one process",
     kv_transfer.add_arguments, kv_transfer.main),
    ("ttft", "one long request: disaggregated vs colocated", ttft.add_arguments, ttft.main),
    ("prefix-ttft", "TTFT with a cached system prompt vs a new one",
     prefix_ttft.add_arguments, prefix_ttft.main),
    ("run", "drive OpenAI-compatible targets with one workload",
     serving.add_run_command_arguments, serving.run_main),
    ("sweep", "one run per rate or concurrency, curves out",
     serving_sweep.add_sweep_arguments, serving_sweep.sweep_main),
    ("search", "highest request rate meeting an SLO (goodput)",
     serving_search.add_search_arguments, serving_search.search_main),
    ("report", "re-render a run's tables and plots from requests.jsonl",
     serving_report.add_report_arguments, serving_report.report_main),
    ("compare", "side-by-side tables of runs, with ratios",
     serving_report.add_compare_arguments, serving_report.compare_main),
    ("headline", "colocated vs disaggregated vs transformers serve, on this machine",
     headline.add_arguments, headline.main),
    ("disagg-policy", "--disagg-policy always vs never vs auto on a mixed workload",
     disagg_policy.add_arguments, disagg_policy.main),
    ("calibrate", "the client's own ceiling, on loopback",
     serving_calibrate.add_calibrate_arguments, serving_calibrate.calibrate_main),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in SUBCOMMANDS:
        subcommand = commands.add_parser(name, help=help_text)
        add_arguments(subcommand)
        subcommand.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
