"""When each request is sent, decided before the clock starts.

Open-loop loads (`poisson`, `constant`) fix a send time per request up front, so
a slow server cannot slow the arrivals down (no coordinated omission: TTFT is
also measured from the scheduled time). `closed:C` is C users that each send
their next request when their last one finishes; it has no send times.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

KINDS = ("poisson", "constant", "closed")


@dataclass(frozen=True)
class LoadSpec:
    """One load shape."""

    kind: str = "poisson"
    """One of `KINDS`."""
    rate_rps: float = 1.0
    """Mean requests per second (poisson, constant)."""
    burstiness: float = 1.0
    """Gamma shape k of the gaps: 1 is Poisson, < 1 burstier, > 1 smoother."""
    concurrency: int = 0
    """Users for `closed`; 0 for open loops."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"load kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "closed" and self.concurrency < 1:
            raise ValueError(f"closed:C needs C >= 1, got {self.concurrency}")
        if self.kind != "closed" and self.rate_rps <= 0:
            raise ValueError(f"{self.kind} needs a positive rate, got {self.rate_rps}")
        if self.burstiness <= 0:
            raise ValueError(f"burst must be > 0, got {self.burstiness}")

    @property
    def is_open_loop(self) -> bool:
        return self.kind != "closed"

    def describe(self) -> str:
        if self.kind == "closed":
            return f"closed:{self.concurrency}"
        burst = f",burst={self.burstiness:g}" if self.burstiness != 1 else ""
        return f"{self.kind}:{self.rate_rps:g}{burst}"


@dataclass(frozen=True)
class Schedule:
    """Send offsets from the start of the run, or none for a closed loop."""

    offsets_s: tuple[float, ...] | None
    """Scheduled send time of request i, seconds after the start; None for closed loops."""
    concurrency: int | None
    """Closed-loop users; None for open loops."""
    max_inflight: int | None
    """Cap on requests in flight; a request waiting for a slot keeps its scheduled time."""


def parse_load(text: str) -> LoadSpec:
    """`poisson:4,burst=0.5`, `constant:2`, `closed:8`."""
    head, *options = text.strip().split(",")
    kind, _, value = head.partition(":")
    if kind not in KINDS or not value:
        raise ValueError(f"bad load {text!r}: use poisson:R[,burst=k], constant:R or closed:C")
    try:
        return _load_from(kind, value, options)
    except ValueError as error:
        raise ValueError(f"bad load {text!r}: {error}") from None


def _load_from(kind: str, value: str, options: list[str]) -> LoadSpec:
    burst = 1.0
    for option in options:
        key, _, option_value = option.partition("=")
        if key.strip() != "burst" or kind != "poisson":
            raise ValueError(f"bad option {option!r} (only poisson takes burst=k)")
        burst = float(option_value)
    if kind == "closed":
        return LoadSpec(kind, concurrency=int(value))
    return LoadSpec(kind, rate_rps=float(value), burstiness=burst)


def gaps_s(spec: LoadSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    """Inter-arrival gaps with mean 1/rate; gamma(k, 1/(rate*k)) has CV 1/sqrt(k)."""
    if spec.kind == "constant":
        return np.full(n, 1.0 / spec.rate_rps)
    return rng.gamma(spec.burstiness, 1.0 / (spec.rate_rps * spec.burstiness), size=n)


def build_schedule(
    spec: LoadSpec, num_requests: int, seed: int, max_inflight: int | None = None
) -> Schedule:
    """The first request goes at 0; the same (spec, n, seed) gives identical offsets."""
    if max_inflight is not None and max_inflight < 1:
        raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
    if not spec.is_open_loop:
        return Schedule(None, spec.concurrency, max_inflight)
    rng = np.random.default_rng([seed, 2])
    gaps = gaps_s(spec, rng, num_requests)
    offsets = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    return Schedule(tuple(float(t) for t in offsets), None, max_inflight)


def within(schedule: Schedule, duration_s: float | None) -> Schedule:
    """Only the sends scheduled before `duration_s` (a closed loop stops itself at it)."""
    if duration_s is None or schedule.offsets_s is None:
        return schedule
    return replace(schedule, offsets_s=tuple(t for t in schedule.offsets_s if t < duration_s))
