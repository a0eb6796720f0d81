"""`report` and `compare`: tables recomputed from `requests.jsonl` alone.

Nothing is read from a run's stored summary, so a changed metric definition
applies to old runs too. The SLO comes from `--slo`, else from the run's run.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.serving.metrics import summarize_run
from bench.serving.record import read_records
from bench.serving.slo import parse_slo
from bench.serving.table import render


def target_dirs(path: Path) -> list[Path]:
    """`path` itself if it holds requests.jsonl, else its subdirectories that do, in run order.

    NOTE: targets run one after another, so their files' times give the order of --target.
    """
    if (path / "requests.jsonl").exists():
        return [path]
    files = sorted(path.glob("*/requests.jsonl"), key=lambda p: (p.stat().st_mtime_ns, p))
    found = [p.parent for p in files]
    if not found:
        raise FileNotFoundError(f"no requests.jsonl in {path} or its subdirectories")
    return found


def stored_slo(target_dir: Path) -> str | None:
    run_json = target_dir / "run.json"
    if not run_json.exists():
        return None
    return json.loads(run_json.read_text()).get("config", {}).get("slo")


def recompute(target_dir: Path, slo_text: str | None = None) -> dict:
    """The summary of one target's run from its requests.jsonl."""
    slo = parse_slo(slo_text if slo_text is not None else stored_slo(target_dir))
    return summarize_run(read_records(target_dir / "requests.jsonl"), slo)


def labels(dirs: list[Path]) -> list[str]:
    """Target directory names, prefixed with their run directory where names repeat."""
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.parent.name}/{d.name}" for d in dirs]


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="a run directory, or one target's directory")
    parser.add_argument("--slo", default=None, help="override the run's SLO")


def report_main(args: argparse.Namespace) -> int:
    dirs = target_dirs(args.dir)
    print(render([(n, recompute(d, args.slo)) for n, d in zip(labels(dirs), dirs)]))
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", type=Path, nargs="+", help="run or target directories")
    parser.add_argument("--slo", default=None, help="one SLO for all (default: each run's)")


def compare_main(args: argparse.Namespace) -> int:
    dirs = [d for path in args.dirs for d in target_dirs(path)]
    print(render([(n, recompute(d, args.slo)) for n, d in zip(labels(dirs), dirs)]))
    return 0
