"""Token-length distributions: `fixed:L`, `uniform:lo:hi`, `normal:mu:sigma`,
`lognormal:median:sigma`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("fixed", "uniform", "normal", "lognormal")


@dataclass(frozen=True)
class LengthSpec:
    """One length distribution; samples are integers clipped to [min_len, max_len]."""

    kind: str = "fixed"
    """One of `KINDS`."""
    a: float = 128
    """L for fixed, lo for uniform, mu for normal, median for lognormal."""
    b: float = 0
    """hi for uniform, sigma for normal and lognormal; unused for fixed."""
    min_len: int = 1
    """Never sample below this (a zero-token prompt or output is not a request)."""
    max_len: int = 1 << 20
    """Never sample above this."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"length kind must be one of {KINDS}, got {self.kind!r}")
        if self.a <= 0:
            raise ValueError(f"length {self.kind} needs a positive first value, got {self.a}")
        if self.kind == "uniform" and self.b < self.a:
            raise ValueError(f"uniform:lo:hi needs hi >= lo, got {self.a}:{self.b}")
        if self.kind in ("normal", "lognormal") and self.b < 0:
            raise ValueError(f"{self.kind} sigma must be >= 0, got {self.b}")

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        """`n` lengths drawn from `rng`; the same generator state gives the same lengths."""
        if self.kind == "fixed":
            values = np.full(n, self.a)
        elif self.kind == "uniform":
            values = rng.integers(int(self.a), int(self.b), size=n, endpoint=True)
        elif self.kind == "normal":
            values = rng.normal(self.a, self.b, size=n)
        else:
            values = np.exp(rng.normal(np.log(self.a), self.b, size=n))
        clipped = np.clip(np.rint(values), self.min_len, self.max_len)
        return [int(v) for v in clipped]


def parse_length(text: str) -> LengthSpec:
    """`"uniform:64:256"` -> LengthSpec("uniform", 64, 256); errors name the expected shape."""
    kind, *values = text.strip().split(":")
    arity = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2}
    if kind not in arity or len(values) != arity[kind]:
        raise ValueError(
            f"bad length {text!r}: use fixed:L, uniform:lo:hi, normal:mu:sigma or "
            "lognormal:median:sigma"
        )
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"bad length {text!r}: values must be numbers") from None
    return LengthSpec(kind, numbers[0], numbers[1] if len(numbers) > 1 else 0)
