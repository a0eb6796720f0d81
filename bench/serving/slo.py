"""Service-level objectives like `ttft<=2s,tpot<=200ms`, checked per request.

A request meets the SLO when it succeeded and every bound holds; a metric a
request does not have (TPOT of a one-token answer) cannot violate its bound.
`ttft` is measured from the scheduled send, as a user waiting since arrival sees it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.serving.metrics import RequestMetrics

# SLO key -> RequestMetrics attribute
METRICS = {
    "ttft": "ttft_sched_ms",
    "ttft_sent": "ttft_ms",
    "tpot": "tpot_ms",
    "e2e": "e2e_ms",
    "stall": "max_stall_ms",
    "first_gap": "first_decode_gap_ms",
}
UNITS_MS = {"s": 1000.0, "ms": 1.0, "us": 0.001}
_BOUND = re.compile(r"^\s*(\w+)\s*(<=|<)\s*([0-9.eE+-]+)\s*(s|ms|us)\s*$")


@dataclass(frozen=True)
class Bound:
    """One `metric <= value` (or `<`) bound, in milliseconds."""

    metric: str
    limit_ms: float
    is_strict: bool = False

    def holds(self, value_ms: float | None) -> bool:
        if value_ms is None:
            return True
        return value_ms < self.limit_ms if self.is_strict else value_ms <= self.limit_ms


@dataclass(frozen=True)
class SLO:
    """All bounds must hold; the empty SLO is met by every successful request."""

    bounds: tuple[Bound, ...] = ()
    text: str = ""

    def is_met(self, metrics: RequestMetrics) -> bool:
        if not metrics.is_ok:
            return False
        return all(b.holds(getattr(metrics, METRICS[b.metric])) for b in self.bounds)


def parse_slo(text: str | None) -> SLO:
    """`"ttft<=2s,tpot<=200ms"`; units s, ms or us; keys from METRICS."""
    if not text:
        return SLO()
    bounds = []
    for part in text.split(","):
        match = _BOUND.match(part)
        if not match or match.group(1) not in METRICS:
            raise ValueError(
                f"bad SLO bound {part!r}: use KEY<=VALUE UNIT with KEY in {tuple(METRICS)} "
                f"and UNIT in {tuple(UNITS_MS)}, e.g. ttft<=2s"
            )
        key, op, value, unit = match.groups()
        bounds.append(Bound(key, float(value) * UNITS_MS[unit], op == "<"))
    return SLO(tuple(bounds), text)
