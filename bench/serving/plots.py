"""PNG plots from records and curves; matplotlib's Agg backend, so no display is needed.

- ttft_cdf.png / itl_cdf.png: per target, with the SLO's bound as a vertical line.
- itl_by_position.png: median and p90 ITL at each output token position.
- throughput_vs_rate.png / latency_vs_rate.png: a sweep's or search's curves.
- attainment_vs_rate.png: SLO attainment per target, max goodput rate marked.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.serving.curve import CurvePoint
from bench.serving.metrics import measured, request_metrics
from bench.serving.record import RequestRecord
from bench.serving.slo import SLO
from bench.serving.table import value

Runs = list[tuple[str, list[RequestRecord]]]


@functools.cache
def _pyplot() -> Any:
    """matplotlib on its Agg backend, imported on the first plot: it costs ~1 s, and every
    `disagg-bench` command imports this module whether or not it plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)
    return path


def _slo_line(axes, slo: SLO, metric: str, label: str) -> None:
    for bound in slo.bounds:
        if bound.metric == metric:
            axes.axvline(bound.limit_ms, color="red", linestyle="--", label=f"{label} SLO")


def _cdf(axes, values: list[float], weights: list[float] | None, label: str) -> None:
    if not values:
        return
    order = np.argsort(values)
    weight = np.ones(len(values)) if weights is None else np.asarray(weights, dtype=float)
    cumulative = np.cumsum(weight[order])
    axes.step(np.asarray(values)[order], cumulative / cumulative[-1], where="post", label=label)


def plot_cdfs(out_dir: Path, runs: Runs, slo: SLO) -> list[Path]:
    """TTFT (from the scheduled send) and per-token ITL CDFs, one line per target."""
    ttft_fig, ttft_axes = _pyplot().subplots(figsize=(6, 4))
    itl_fig, itl_axes = _pyplot().subplots(figsize=(6, 4))
    for name, records in runs:
        ok = [m for m in map(request_metrics, measured(records)) if m.is_ok]
        _cdf(ttft_axes, [m.ttft_sched_ms for m in ok if m.ttft_sched_ms is not None], None, name)
        itl = [v for m in ok for v in m.itl_ms]
        _cdf(itl_axes, itl, [w for m in ok for w in m.itl_weights], name)
    _slo_line(ttft_axes, slo, "ttft", "TTFT")
    _slo_line(itl_axes, slo, "tpot", "TPOT")
    for axes, what in ((ttft_axes, "TTFT from scheduled send"), (itl_axes, "ITL per token")):
        axes.set(xlabel=f"{what} (ms)", ylabel="fraction", ylim=(0, 1.02))
        axes.legend()
    return [_save(ttft_fig, out_dir / "ttft_cdf.png"), _save(itl_fig, out_dir / "itl_cdf.png")]


def itl_by_position(records: list[RequestRecord]) -> dict[int, list[float]]:
    """Output position -> ITLs there; a chunk of n tokens after gap g gives n samples of g/n."""
    by_position: dict[int, list[float]] = defaultdict(list)
    for record in measured(records):
        if not record.is_ok:
            continue
        position = record.chunk_tokens[0] if record.chunk_tokens else 0
        for previous, now, n in zip(record.chunk_ns, record.chunk_ns[1:], record.chunk_tokens[1:]):
            for _ in range(n):
                by_position[position].append((now - previous) / 1e6 / n)
                position += 1
    return by_position


def plot_itl_by_position(out_dir: Path, runs: Runs) -> Path:
    figure, axes = _pyplot().subplots(figsize=(6, 4))
    for name, records in runs:
        by_position = itl_by_position(records)
        positions = sorted(by_position)
        axes.plot(positions, [np.median(by_position[p]) for p in positions], label=f"{name} p50")
        p90 = [np.percentile(by_position[p], 90) for p in positions]
        axes.plot(positions, p90, linestyle=":", label=f"{name} p90")
    axes.set(xlabel="output token position", ylabel="ITL (ms)")
    axes.legend()
    return _save(figure, out_dir / "itl_by_position.png")


def _by_target(points: list[CurvePoint]) -> dict[str, list[CurvePoint]]:
    curves: dict[str, list[CurvePoint]] = defaultdict(list)
    for point in sorted(points, key=lambda p: p.x):
        curves[point.target].append(point)
    return curves


def _series(curve: list[CurvePoint], key: str, stat: str | None = None) -> list[float]:
    return [v if (v := value(p.summary, key, stat)) is not None else np.nan for p in curve]


def plot_curves(out_dir: Path, points: list[CurvePoint], x_label: str) -> list[Path]:
    """Throughput and latency against the swept rate or concurrency."""
    figure, (requests_axes, tokens_axes) = _pyplot().subplots(1, 2, figsize=(10, 4))
    latency_figure, (ttft_axes, tpot_axes) = _pyplot().subplots(1, 2, figsize=(10, 4))
    for name, curve in _by_target(points).items():
        xs = [p.x for p in curve]
        requests_axes.plot(xs, _series(curve, "request_throughput_rps"), "o-", label=name)
        requests_axes.plot(xs, _series(curve, "goodput_rps"), "x--", label=f"{name} goodput")
        tokens_axes.plot(xs, _series(curve, "output_tokens_per_s"), "o-", label=name)
        for axes, key in ((ttft_axes, "ttft_sched_ms"), (tpot_axes, "tpot_ms")):
            axes.plot(xs, _series(curve, key, "p50"), "o-", label=f"{name} p50")
            axes.plot(xs, _series(curve, key, "p99"), "s:", label=f"{name} p99")
    requests_axes.set(xlabel=x_label, ylabel="requests/s")
    tokens_axes.set(xlabel=x_label, ylabel="output tokens/s")
    ttft_axes.set(xlabel=x_label, ylabel="TTFT from scheduled send (ms)")
    tpot_axes.set(xlabel=x_label, ylabel="TPOT (ms)")
    for axes in (requests_axes, tokens_axes, ttft_axes, tpot_axes):
        axes.legend()
    return [
        _save(figure, out_dir / "throughput_vs_rate.png"),
        _save(latency_figure, out_dir / "latency_vs_rate.png"),
    ]


def plot_attainment(
    out_dir: Path, points: list[CurvePoint], attainment: float, max_rates: dict[str, float | None]
) -> Path:
    """Attainment per target against rate; the target fraction and each max rate marked."""
    figure, axes = _pyplot().subplots(figsize=(6, 4))
    for name, curve in _by_target(points).items():
        xs = [p.x for p in curve]
        (line,) = axes.plot(xs, _series(curve, "slo_attainment"), "o-", label=name)
        best = max_rates.get(name)
        if best is not None:
            axes.axvline(best, color=line.get_color(), linestyle=":")
            axes.annotate(f"max goodput\n{best:.3g} req/s", (best, attainment), fontsize=8)
    axes.axhline(attainment, color="red", linestyle="--", label=f"target {attainment:.0%}")
    axes.set(xlabel="request rate (req/s)", ylabel="SLO attainment", ylim=(0, 1.05))
    axes.legend()
    return _save(figure, out_dir / "attainment_vs_rate.png")


def max_attaining_rates(points: list[CurvePoint], attainment: float) -> dict[str, float | None]:
    """Per target, the highest measured rate whose attainment meets the target (for sweeps)."""
    best: dict[str, float | None] = {}
    for name, curve in _by_target(points).items():
        passing = [
            p.x for p in curve if (value(p.summary, "slo_attainment", None) or 0) >= attainment
        ]
        best[name] = max(passing) if passing else None
    return best
