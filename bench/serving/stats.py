"""Mean, percentiles and max, optionally weighted.

Percentiles use the inverted CDF: pXX is the smallest observed value with at
least XX% of the (weighted) samples at or below it, so it is always a value that
actually occurred, and the weighted and unweighted forms agree.
"""

from __future__ import annotations

import numpy as np

QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    position = np.searchsorted(cumulative, q * cumulative[-1] * (1 - 1e-12), side="left")
    return float(values[order][min(position, len(values) - 1)])


def summarize(values: list[float], weights: list[float] | None = None) -> dict:
    """{count, mean, p50, p90, p99, max}; all None but count when there are no samples."""
    if weights is not None:
        pairs = [(v, w) for v, w in zip(values, weights) if w > 0]
        values, weights = [v for v, _ in pairs], [w for _, w in pairs]
    if not values:
        return {"count": 0, "mean": None, **dict.fromkeys(QUANTILES), "max": None}
    array = np.asarray(values, dtype=float)
    weight_array = np.ones_like(array) if weights is None else np.asarray(weights, dtype=float)
    return {
        "count": len(values),
        "mean": float(np.average(array, weights=weight_array)),
        **{name: weighted_percentile(array, weight_array, q) for name, q in QUANTILES.items()},
        "max": float(array.max()),
    }
