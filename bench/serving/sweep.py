"""`disagg-bench sweep`: one `run` per load point, the same workload at each, and the curves.

Point i is written exactly like a `run` to `DIR/point-<i>-<load>/`, so `report`
and `compare` work on any single point; `DIR/sweep.json` lists the points in
order with each target's summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.serving import commands, plots
from bench.serving.curve import CurvePoint, render_curve
from bench.serving.report import curve_plots
from bench.serving.runner import run_all
from bench.serving.schedule import LoadSpec, parse_load


def parse_numbers(text: str, kind: type) -> list:
    """`"1,2,4"` -> [1, 2, 4]; every value positive."""
    try:
        numbers = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"bad list {text!r}: use comma-separated numbers, e.g. 1,2,4") from None
    if not numbers or any(n <= 0 for n in numbers):
        raise ValueError(f"bad list {text!r}: need one or more positive numbers")
    return numbers


def sweep_loads(template: LoadSpec, rates: str | None, concurrency: str | None) -> list[LoadSpec]:
    """Rates keep the template's kind and burstiness (closed becomes poisson); else closed:C."""
    if rates is not None:
        kind = "poisson" if template.kind == "closed" else template.kind
        burst = template.burstiness
        return [LoadSpec(kind, rate_rps=r, burstiness=burst) for r in parse_numbers(rates, float)]
    return [LoadSpec("closed", concurrency=c) for c in parse_numbers(concurrency or "", int)]


def x_of(load: LoadSpec) -> float:
    return float(load.concurrency) if load.kind == "closed" else load.rate_rps


def point_dir(out_dir: Path, i: int, load: LoadSpec) -> Path:
    return out_dir / f"point-{i:02d}-{load.describe().replace(':', '-').replace(',', '-')}"


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    commands.add_run_arguments(parser)
    points = parser.add_mutually_exclusive_group(required=True)
    points.add_argument("--rates", help="open-loop rates, e.g. 1,2,4 (kind from --load)")
    points.add_argument("--concurrency", help="closed-loop users, e.g. 1,8,32")
    parser.add_argument(
        "--attainment", type=float, default=0.9, help="SLO fraction marked on the attainment plot"
    )


def write_sweep(out_dir: Path, points: list[CurvePoint], config: dict) -> None:
    sweep = {"config": config, "points": [p.to_json() for p in points]}
    (out_dir / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")


def sweep_main(args: argparse.Namespace) -> int:
    try:
        loads = sweep_loads(parse_load(args.load), args.rates, args.concurrency)
        if args.workload == "trace":
            raise ValueError("a trace brings its own send times: use `run` to replay it")
        plan, targets = commands.build_plan(args)
    except ValueError as error:
        print(f"disagg-bench sweep: error: {error}", file=sys.stderr)
        return 2
    points = []
    for i, load in enumerate(loads):
        print(f"point {i}: {load.describe()}", file=sys.stderr)
        config = commands.run_config(args, load=load.describe())
        point_plan = commands.with_load(plan, load, args)
        out = point_dir(args.output, i, load)
        results = run_all(point_plan, targets, out, config, commands.print_result, args.progress)
        points += [
            CurvePoint(
                load.describe(), x_of(load), r.target.name, r.summary, f"{out.name}/{r.target.name}"
            )
            for r in results
        ]
    write_sweep(args.output, points, commands.run_config(args))
    print(render_curve(points))
    max_rates = plots.max_attaining_rates(points, args.attainment)
    curve_plots(args.output, points, args.attainment, max_rates)
    print(f"\nwrote {args.output}", file=sys.stderr)
    return 0
