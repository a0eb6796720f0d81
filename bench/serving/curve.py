"""Curves over load points (a sweep, or a search's probes): one row per (point, target).

A curve is a list of `CurvePoint`s; the table and the plots both read it, and
`report` rebuilds it from the points' requests.jsonl alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.serving.table import value

# (header, summary key, stat or None, format)
COLUMNS: tuple[tuple[str, str, str | None, str], ...] = (
    ("offered req/s", "offered_rate_rps", None, "{:.2f}"),
    ("req/s", "request_throughput_rps", None, "{:.2f}"),
    ("out tok/s", "output_tokens_per_s", None, "{:.1f}"),
    ("TTFT p50 ms", "ttft_sched_ms", "p50", "{:.1f}"),
    ("TTFT p99 ms", "ttft_sched_ms", "p99", "{:.1f}"),
    ("TPOT p50 ms", "tpot_ms", "p50", "{:.2f}"),
    ("TPOT p99 ms", "tpot_ms", "p99", "{:.2f}"),
    ("goodput req/s", "goodput_rps", None, "{:.2f}"),
    ("attainment", "slo_attainment", None, "{:.1%}"),
)


@dataclass(frozen=True)
class CurvePoint:
    """One target's summary at one load point."""

    load: str
    """The load as written, e.g. `poisson:4` or `closed:8`."""
    x: float
    """The swept value: request rate, or concurrency for closed loops."""
    target: str
    summary: dict
    run_dir: str = ""
    """The target's run directory, relative to the sweep or search directory."""

    def to_json(self) -> dict:
        return {
            "load": self.load,
            "x": self.x,
            "target": self.target,
            "run_dir": self.run_dir,
            "summary": self.summary,
        }


def _cell(number: float | None, fmt: str) -> str:
    return "-" if number is None or number != number else fmt.format(number)


def render_curve(points: list[CurvePoint]) -> str:
    """A plain-text table, points in order, one row per target."""
    rows = [["load", "target", *(c[0] for c in COLUMNS)]]
    for point in points:
        cells = [_cell(value(point.summary, key, stat), fmt) for _, key, stat, fmt in COLUMNS]
        rows.append([point.load, point.target, *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
