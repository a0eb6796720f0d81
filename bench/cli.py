"""`disagg-bench`: benchmarks that run the baseline and ours in one run and print the ratio."""

from __future__ import annotations

import argparse
import sys

from bench import engine_throughput, kv_transfer, ttft
from bench.serving import calibrate as serving_calibrate
from bench.serving import commands as serving
from bench.serving import report as serving_report
from bench.serving import search_command as serving_search
from bench.serving import sweep as serving_sweep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    engine = commands.add_parser("engine", help="engine vs transformers generate, one process")
    engine_throughput.add_arguments(engine)
    engine.set_defaults(func=engine_throughput.main)
    transfer = commands.add_parser("kv-transfer", help="KV data plane vs raw ZeroMQ, one process")
    kv_transfer.add_arguments(transfer)
    transfer.set_defaults(func=kv_transfer.main)
    ttft_parser = commands.add_parser("ttft", help="one long request: disaggregated vs colocated")
    ttft.add_arguments(ttft_parser)
    ttft_parser.set_defaults(func=ttft.main)
    run = commands.add_parser("run", help="drive OpenAI-compatible targets with one workload")
    serving.add_run_arguments(run)
    run.set_defaults(func=serving.run_main)
    sweep = commands.add_parser("sweep", help="one run per rate or concurrency, curves out")
    serving_sweep.add_sweep_arguments(sweep)
    sweep.set_defaults(func=serving_sweep.sweep_main)
    search = commands.add_parser("search", help="highest request rate meeting an SLO (goodput)")
    serving_search.add_search_arguments(search)
    search.set_defaults(func=serving_search.search_main)
    report = commands.add_parser("report", help="re-render a run's tables from requests.jsonl")
    serving_report.add_report_arguments(report)
    report.set_defaults(func=serving_report.report_main)
    compare = commands.add_parser("compare", help="side-by-side tables of runs, with ratios")
    serving_report.add_compare_arguments(compare)
    compare.set_defaults(func=serving_report.compare_main)
    calibrate = commands.add_parser("calibrate", help="the client's own ceiling, on loopback")
    serving_calibrate.add_calibrate_arguments(calibrate)
    calibrate.set_defaults(func=serving_calibrate.calibrate_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
