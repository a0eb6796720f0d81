"""`disagg-bench search`: find each target's max goodput rate under an SLO, by running probes.

Each probe is a full `run` of the same workload at one rate, written to
`DIR/<target>/probe-<i>-<load>/`; `DIR/search.json` holds every probe's summary
and the answer per target.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.serving import commands
from bench.serving.curve import CurvePoint, render_curve
from bench.serving.report import curve_plots
from bench.serving.runner import RunPlan, Target, run_all
from bench.serving.schedule import LoadSpec, parse_load
from bench.serving.search import SearchConfig, SearchResult, find_max_rate
from bench.serving.sweep import point_dir


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    commands.add_run_arguments(parser)
    parser.add_argument("--attainment", type=float, default=0.9, help="fraction meeting the SLO")
    parser.add_argument("--start-rate", type=float, default=1.0, help="first rate probed (req/s)")
    parser.add_argument("--max-rate", type=float, default=1024.0, help="highest rate probed")
    parser.add_argument("--tolerance", type=float, default=0.05, help="bisect to this relative gap")


def search_target(
    plan: RunPlan, target: Target, template: LoadSpec, config: SearchConfig, args
) -> tuple[SearchResult, list[CurvePoint]]:
    """Run probes against one target; its curve points come back in probe order."""
    points: list[CurvePoint] = []

    def measure(rate: float) -> float:
        load = LoadSpec(template.kind, rate_rps=rate, burstiness=template.burstiness)
        out = point_dir(args.output / target.name, len(points), load)
        run_config = commands.run_config(args, load=load.describe())
        probe_plan = commands.with_load(plan, load, args)
        [result] = run_all(probe_plan, [target], out, run_config, is_progress_shown=args.progress)
        attainment = result.summary["slo_attainment"] or 0.0
        print(f"[{target.name}] {load.describe()}: attainment {attainment:.1%}", file=sys.stderr)
        run_dir = f"{target.name}/{out.name}/{target.name}"
        points.append(CurvePoint(load.describe(), rate, target.name, result.summary, run_dir))
        return attainment

    return find_max_rate(measure, config), points


def answer_json(result: SearchResult, points: list[CurvePoint]) -> dict:
    """The answer for one target, with the goodput measured at that rate."""
    best = next((p for p in points if p.x == result.max_rate), None)
    return {
        "max_rate_rps": result.max_rate,
        "is_capped": result.is_capped,
        "goodput_rps": best.summary["goodput_rps"] if best else None,
        "probes": [p.to_json() for p in points],
    }


def search_main(args: argparse.Namespace) -> int:
    try:
        template = parse_load(args.load)
        if not template.is_open_loop:
            raise ValueError("search varies the request rate: use --load poisson:R or constant:R")
        if not args.slo:
            raise ValueError('search needs --slo, e.g. "ttft<=2s,tpot<=200ms"')
        config = SearchConfig(args.attainment, args.start_rate, args.max_rate, args.tolerance)
        if args.workload == "trace":
            raise ValueError("a trace brings its own send times: use `run` to replay it")
        plan, targets = commands.build_plan(args)
    except ValueError as error:
        print(f"disagg-bench search: error: {error}", file=sys.stderr)
        return 2
    answers, curve = {}, []
    for target in targets:
        result, points = search_target(plan, target, template, config, args)
        answers[target.name] = answer_json(result, points)
        curve += sorted(points, key=lambda p: p.x)
    write_search(args.output, answers, commands.run_config(args))
    print(render_curve(curve))
    print(render_answers(answers, args.slo, args.attainment))
    max_rates = {name: answer["max_rate_rps"] for name, answer in answers.items()}
    curve_plots(args.output, curve, args.attainment, max_rates)
    return 0


def write_search(out_dir: Path, answers: dict, config: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    search = {"config": config, "targets": answers}
    (out_dir / "search.json").write_text(json.dumps(search, indent=2) + "\n")


def render_answers(answers: dict, slo: str, attainment: float) -> str:
    lines = [f"\nmax rate with >= {attainment:.0%} of requests meeting {slo}:"]
    for name, answer in answers.items():
        rate = answer["max_rate_rps"]
        text = "none (even the lowest probe failed)" if rate is None else f"{rate:.2f} req/s"
        capped = " (capped by --max-rate)" if answer["is_capped"] else ""
        goodput = answer["goodput_rps"]
        tail = f", goodput {goodput:.2f} req/s" if goodput is not None else ""
        lines.append(f"  {name}: {text}{capped}{tail}")
    return "\n".join(lines)
