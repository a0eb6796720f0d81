"""The highest request rate that still meets the SLO: DistServe's goodput, found by search.

Grow the rate x2 from `start_rate` until a probe fails (attainment below the
target), then bisect between the last pass and the first fail until they are
within `tolerance` of each other. If the start already fails, halve it until a
probe passes. The search only sees `measure(rate) -> attainment`, so it runs in
microseconds on a synthetic curve in tests and against servers in `search_main`.

NOTE: a noisy measure can make the curve non-monotone; bisection still ends in
the bracket [last pass, first fail] it was given, which is what we report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MAX_HALVINGS = 10


@dataclass(frozen=True)
class SearchConfig:
    """How to search."""

    attainment: float = 0.9
    """Fraction of requests that must meet the SLO at a passing rate."""
    start_rate: float = 1.0
    """First rate probed, requests/s."""
    max_rate: float = 1024.0
    """Never probe above this; if it passes, the answer is capped here."""
    tolerance: float = 0.05
    """Stop bisecting when (fail - pass) <= tolerance * pass."""

    def __post_init__(self) -> None:
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment must be in (0, 1], got {self.attainment}")
        if not 0 < self.start_rate <= self.max_rate:
            raise ValueError(
                f"need 0 < start_rate <= max_rate, got {self.start_rate}, {self.max_rate}"
            )
        if self.tolerance <= 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")


@dataclass
class SearchResult:
    """The answer and every probe, in the order they ran."""

    max_rate: float | None = None
    """Highest passing rate; None when even the lowest probe failed."""
    is_capped: bool = False
    """True when max_rate is the configured ceiling, not a measured knee."""
    probes: list[tuple[float, float]] = field(default_factory=list)
    """(rate, attainment) per probe."""


def find_max_rate(measure: Callable[[float], float], config: SearchConfig) -> SearchResult:
    result = SearchResult()

    def passes(rate: float) -> bool:
        attainment = measure(rate)
        result.probes.append((rate, attainment))
        return attainment >= config.attainment

    bracket = _bracket(passes, config)
    if bracket is None:
        return result
    good, bad = bracket
    if bad is None:
        result.max_rate, result.is_capped = good, True
        return result
    while bad - good > config.tolerance * good:
        middle = (good + bad) / 2
        good, bad = (middle, bad) if passes(middle) else (good, middle)
    result.max_rate = good
    return result


def _bracket(passes: Callable[[float], bool], config: SearchConfig):
    """(passing rate, failing rate or None if the ceiling passes), or None if nothing passes."""
    rate = config.start_rate
    if not passes(rate):
        for _ in range(MAX_HALVINGS):
            bad, rate = rate, rate / 2
            if passes(rate):
                return rate, bad
        return None
    while rate < config.max_rate:
        higher = min(rate * 2, config.max_rate)
        if not passes(higher):
            return rate, higher
        rate = higher
    return rate, None
