"""Where one request's time went: TTFT, TBT, queueing, prefill and KV transfer.

The cluster scheduler fills a `RequestTrace` as the request crosses the workers; `Metrics`
turns finished traces into Prometheus histograms, and every protocol returns `timings()`
in a field its standard clients ignore. All times are seconds; instants are `time.time()`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RequestTrace:
    """Where one request's time went; the basis of TTFT/TBT and the per-response timings."""

    request_id: str
    arrival_s: float = field(default_factory=time.time)
    tenant: str = "default"
    """Whose share of the KV wait queue the request waits in (coordinator/fair_queue.py)."""
    priority: int = 0
    """Order among the tenant's own waiting requests, lower first."""
    queue_s: float = 0.0
    prefill_s: float = 0.0
    prefill_queue_s: float = 0.0
    """Waiting for a batch slot on the prefill worker (part of TTFT)."""
    kv_transfer_s: float = 0.0
    kv_bytes: int = 0
    num_cached_tokens: int = 0
    """Leading prompt tokens the prefill side found in its prefix cache: not computed."""
    num_kv_cached_tokens: int = 0
    """Leading prompt tokens the decode worker already held: their KV was not transferred."""
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    prefill_worker: str = ""
    decode_worker: str = ""
    prefill_placement: str = ""
    """in_place (the decode worker prefilled it) or remote (a prefill worker did)."""
    placement_reason: str = ""
    """Why there (coordinator/disagg_policy.py `Decision.reason`)."""
    migrations: list[str] = field(default_factory=list)
    """The cause of each move to another worker after a fault (see coordinator/migration.py)."""
    recovery_s: list[float] = field(default_factory=list)
    """Seconds from each fault's detection to the next token the client got."""
    deadline_s: float | None = None
    """time.monotonic() after which the client no longer wants the answer; None: no limit."""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tbt_s(self) -> list[float]:
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def mean_tbt_s(self) -> float | None:
        gaps = self.tbt_s
        return sum(gaps) / len(gaps) if gaps else None


def timings(trace: RequestTrace) -> dict:
    """Per-response timings, for a key or header that standard clients ignore."""
    return {
        "ttft_s": trace.ttft_s,
        "mean_tbt_s": trace.mean_tbt_s,
        "queue_s": trace.queue_s,
        "prefill_queue_s": trace.prefill_queue_s,
        "prefill_s": trace.prefill_s,
        "kv_transfer_s": trace.kv_transfer_s,
        "first_decode_gap_s": next(iter(trace.tbt_s), None),
        "kv_bytes": trace.kv_bytes,
        "cached_tokens": trace.num_cached_tokens,
        "kv_cached_tokens": trace.num_kv_cached_tokens,
        "prefill_worker": trace.prefill_worker,
        "decode_worker": trace.decode_worker,
        "prefill_placement": trace.prefill_placement,
        "placement_reason": trace.placement_reason,
        "migrations": len(trace.migrations),
        "e2e_s": time.time() - trace.arrival_s,
    }


def merged_timings(traces: Sequence[RequestTrace]) -> dict[str, float | int | str]:
    """A batch's timings as flat scalars (what KServe parameters can hold).

    The response is as slow as its slowest prompt, so each time is the maximum;
    `kv_bytes` and `migrations` are sums and the worker names are the distinct ones,
    comma-separated.
    """
    rows = [timings(trace) for trace in traces]
    merged: dict[str, float | int | str] = {}
    for key in rows[0] if rows else ():
        values = [row[key] for row in rows if row[key] not in (None, "")]
        if not values:
            continue
        if key in ("kv_bytes", "migrations", "cached_tokens", "kv_cached_tokens"):
            merged[key] = sum(values)
        elif isinstance(values[0], str):
            merged[key] = ",".join(sorted(set(values)))
        else:
            merged[key] = max(values)
    return merged
