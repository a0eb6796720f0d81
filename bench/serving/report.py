"""`report` and `compare`: tables and plots recomputed from `requests.jsonl` alone.

Nothing is read from a run's stored summary, so a changed metric definition
applies to old runs too. The SLO comes from `--slo`, else from the run's run.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.serving import plots
from bench.serving.curve import CurvePoint, render_curve
from bench.serving.metrics import summarize_run
from bench.serving.record import read_records
from bench.serving.slo import parse_slo
from bench.serving.table import print_table


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
    parser.add_argument("dir", type=Path, help="a run, sweep or search directory, or a target's")
    parser.add_argument("--slo", default=None, help="override the run's SLO")


def report_main(args: argparse.Namespace) -> int:
    """Tables and plots again: curves for a sweep or search directory, else one run's."""
    if is_curve_dir(args.dir):
        report_curves(args.dir, args.slo)
    else:
        dirs = target_dirs(args.dir)
        print_table([(n, recompute(d, args.slo)) for n, d in zip(labels(dirs), dirs)])
        run_plots(args.dir, args.slo)
    print(f"\nplots in {args.dir}", file=sys.stderr)
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", type=Path, nargs="+", help="run or target directories")
    parser.add_argument("--slo", default=None, help="one SLO for all (default: each run's)")


def compare_main(args: argparse.Namespace) -> int:
    dirs = [d for path in args.dirs for d in target_dirs(path)]
    print_table([(n, recompute(d, args.slo)) for n, d in zip(labels(dirs), dirs)])
    return 0


def run_plots(run_dir: Path, slo_text: str | None = None) -> list[Path]:
    """CDF and ITL-by-position plots of a run directory, from its requests.jsonl files."""
    dirs = target_dirs(run_dir)
    runs = [(n, read_records(d / "requests.jsonl")) for n, d in zip(labels(dirs), dirs)]
    slo = parse_slo(slo_text if slo_text is not None else stored_slo(dirs[0]))
    return [*plots.plot_cdfs(run_dir, runs, slo), plots.plot_itl_by_position(run_dir, runs)]


def curve_plots(out_dir: Path, points: list[CurvePoint], attainment: float, max_rates) -> list:
    """Throughput, latency and attainment against the swept value."""
    is_closed = all(p.load.startswith("closed") for p in points)
    x_label = "concurrent users" if is_closed else "request rate (req/s)"
    made = plots.plot_curves(out_dir, points, x_label)
    if not is_closed:
        made.append(plots.plot_attainment(out_dir, points, attainment, max_rates))
    return made


def recompute_curve(out_dir: Path, stored: list[dict], slo_text: str | None) -> list[CurvePoint]:
    """The stored points with summaries recomputed from each point's requests.jsonl."""
    return [
        CurvePoint(
            p["load"],
            p["x"],
            p["target"],
            recompute(out_dir / p["run_dir"], slo_text),
            p["run_dir"],
        )
        for p in stored
    ]


def report_curves(out_dir: Path, slo_text: str | None) -> None:
    """`report` on a sweep or search directory: the curve table and plots again."""
    if (out_dir / "sweep.json").exists():
        sweep = json.loads((out_dir / "sweep.json").read_text())
        points = recompute_curve(out_dir, sweep["points"], slo_text)
        attainment = sweep["config"].get("attainment", 0.9)
        max_rates = plots.max_attaining_rates(points, attainment)
    else:
        search = json.loads((out_dir / "search.json").read_text())
        stored = [p for answer in search["targets"].values() for p in answer["probes"]]
        points = recompute_curve(out_dir, stored, slo_text)
        attainment = search["config"]["attainment"]
        max_rates = {name: a["max_rate_rps"] for name, a in search["targets"].items()}
    print(render_curve(points))
    curve_plots(out_dir, points, attainment, max_rates)


def is_curve_dir(path: Path) -> bool:
    return (path / "sweep.json").exists() or (path / "search.json").exists()
