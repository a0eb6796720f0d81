"""`disagg-bench`: benchmarks that run the baseline and ours in one run and print the ratio."""

from __future__ import annotations

import argparse
import sys

from bench import engine_throughput, kv_transfer, ttft


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
