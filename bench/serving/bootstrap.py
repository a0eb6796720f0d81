"""Bootstrap 95% confidence intervals for a run with `--repeats` > 1.

Numbers vary for two reasons: passes differ (the server's state, a noisy
machine), and each pass saw only a finite sample of requests. So each resample
draws the passes with replacement, then each drawn pass's requests with
replacement, and recomputes the statistic on what it drew. The interval is the
2.5th to 97.5th percentile of the resampled statistic. Rates divide by the drawn
passes' own durations, as the run's pooled rates do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bench.serving.stats import QUANTILES, weighted_percentile

if TYPE_CHECKING:
    from bench.serving.metrics import RequestMetrics
    from bench.serving.slo import SLO

ITERATIONS = 1000
LATENCIES = ("ttft_ms", "ttft_sched_ms", "tpot_ms", "e2e_ms", "max_stall_ms")


@dataclass(frozen=True)
class PassArrays:
    """One pass's requests as columns, so a resample is an index array."""

    is_ok: np.ndarray
    is_good: np.ndarray
    output_tokens: np.ndarray
    latencies: dict[str, np.ndarray]
    """NaN where a request has no such value."""
    itl: list[tuple[np.ndarray, np.ndarray]]
    """(gaps, weights) per request; empty for failed requests."""
    duration_s: float


def pass_arrays(metrics: list[RequestMetrics], duration_s: float, slo: SLO) -> PassArrays:
    def column(name: str) -> np.ndarray:
        values = [getattr(m, name) if m.is_ok else None for m in metrics]
        return np.array([np.nan if v is None else v for v in values], dtype=float)

    return PassArrays(
        is_ok=np.array([m.is_ok for m in metrics]),
        is_good=np.array([slo.is_met(m) for m in metrics]),
        output_tokens=np.array([m.output_tokens for m in metrics], dtype=float),
        latencies={name: column(name) for name in LATENCIES},
        itl=[
            (np.asarray(m.itl_ms, float), np.asarray(m.itl_weights, float))
            if m.is_ok
            else (np.empty(0), np.empty(0))
            for m in metrics
        ],
        duration_s=duration_s,
    )


def statistics(draws: list[tuple[PassArrays, np.ndarray]]) -> dict[str, float]:
    """The CI'd statistics of one resample: (pass, drawn request indices) pairs."""
    seconds = sum(p.duration_s for p, _ in draws) or float("nan")
    ok = np.concatenate([p.is_ok[i] for p, i in draws])
    good = np.concatenate([p.is_good[i] for p, i in draws])
    tokens = np.concatenate([p.output_tokens[i] for p, i in draws])
    stats = {
        "request_throughput_rps": ok.sum() / seconds,
        "output_tokens_per_s": tokens[ok].sum() / seconds,
        "goodput_rps": good.sum() / seconds,
        "slo_attainment": good.mean(),
    }
    for name in LATENCIES:
        values = np.concatenate([p.latencies[name][i] for p, i in draws])
        values = values[~np.isnan(values)]
        if values.size:
            stats[f"{name}.mean"] = float(values.mean())
            for q_name, q in QUANTILES.items():
                stats[f"{name}.{q_name}"] = weighted_percentile(values, np.ones_like(values), q)
    gaps = [p.itl[k] for p, i in draws for k in i]
    values = np.concatenate([g for g, _ in gaps]) if gaps else np.empty(0)
    weights = np.concatenate([w for _, w in gaps]) if gaps else np.empty(0)
    if weights.sum() > 0:
        for q_name, q in QUANTILES.items():
            stats[f"itl_ms.{q_name}"] = weighted_percentile(values, weights, q)
    return {k: float(v) for k, v in stats.items()}


def confidence_intervals(
    passes: list[list[RequestMetrics]],
    durations_s: list[float],
    slo: SLO,
    iterations: int = ITERATIONS,
    seed: int = 0,
) -> dict[str, list[float]]:
    """`{"output_tokens_per_s": [lo, hi], "ttft_ms.p99": [lo, hi], ...}` at 95%."""
    arrays = [pass_arrays(m, d, slo) for m, d in zip(passes, durations_s) if m]
    if not arrays:
        return {}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(iterations):
        chosen = [arrays[k] for k in rng.integers(len(arrays), size=len(arrays))]
        draws = [(p, rng.integers(len(p.is_ok), size=len(p.is_ok))) for p in chosen]
        for name, value in statistics(draws).items():
            if value == value:  # NaN: this resample has no such value
                samples.setdefault(name, []).append(value)
    return {
        name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
        for name, v in samples.items()
    }
