"""`disagg-bench run --fault ...`: each target twice, undisturbed and under faults, side by side.

The undisturbed pass runs first, so the faults cannot leave it a degraded
cluster. Its results go to `<out>/<name>/`, the faulted pass's to
`<out>/<name>-faults/` with a `faults.json` of what each fault did. The table
reports requests lost (sent and not completed), goodput and, per fault, how
long the cluster took to register a replacement worker.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bench.serving.faults import FaultEvent, FaultInjector, FaultSpec, write_events
from bench.serving.runner import (
    RunPlan,
    Target,
    TargetResult,
    run_target,
    write_inputs,
    write_result,
)
from bench.serving.stats import summarize

FAULTS_SUFFIX = "-faults"


def run_with_faults(
    plan: RunPlan,
    targets: list[Target],
    specs: list[FaultSpec],
    out_dir: Path,
    config: dict,
    is_progress_shown: bool = False,
) -> list[tuple[TargetResult, TargetResult, list[FaultEvent]]]:
    """(undisturbed, faulted, fault events) per target, each written under `out_dir`."""
    write_inputs(out_dir, plan)
    rows = []
    for target in targets:
        baseline = run_target(plan, target, is_progress_shown)
        write_result(out_dir, baseline, config)
        faulted_target = replace(target, name=target.name + FAULTS_SUFFIX)
        with FaultInjector(target.url, specs) as injector:
            faulted = run_target(plan, faulted_target, is_progress_shown)
        target_dir = write_result(out_dir, faulted, config)
        write_events(target_dir / "faults.json", injector.events)
        rows.append((baseline, faulted, injector.events))
    return rows


def num_lost(summary: dict) -> int:
    """Requests sent and not completed: an error, a cut stream, a timeout."""
    return summary["num_requests"] - summary["num_ok"]


def fault_lines(events: list[FaultEvent]) -> list[str]:
    lines = []
    for event in events:
        if event.skipped:
            lines.append(f"  {event.at_s:7.1f} s  {event.spec}: skipped ({event.skipped})")
            continue
        back = (
            f"replacement registered after {event.recovered_after_s:.1f} s"
            if event.recovered_after_s is not None
            else "no replacement registered in time"
        )
        victim = f"{event.worker_id} (pid {event.pid})"
        lines.append(f"  {event.at_s:7.1f} s  {event.spec}: {victim}; {back}")
    return lines


def recovery_summary(events: list[FaultEvent]) -> str:
    stats = summarize([e.recovered_after_s for e in events if e.recovered_after_s is not None])
    if not stats["count"]:
        return "recovery: none measured"
    return (
        f"recovery (fault to replacement registered): p50 {stats['p50']:.1f} s, "
        f"p99 {stats['p99']:.1f} s over {stats['count']} faults"
    )


def print_fault_table(rows: list[tuple[TargetResult, TargetResult, list[FaultEvent]]]) -> None:
    header = f"{'run':<24} {'sent':>6} {'ok':>6} {'lost':>6} {'goodput rps':>12} {'out tok/s':>10}"
    print(header)
    for baseline, faulted, events in rows:
        for result in (baseline, faulted):
            s = result.summary
            print(
                f"{result.target.name:<24} {s['num_requests']:>6} {s['num_ok']:>6} "
                f"{num_lost(s):>6} {s['goodput_rps']:>12.2f} {s['output_tokens_per_s']:>10.1f}"
            )
        print(f"faults on {baseline.target.name}: {len(events)}")
        for line in fault_lines(events):
            print(line)
        print(recovery_summary(events))
