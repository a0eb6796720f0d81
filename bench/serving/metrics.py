"""Every number the benchmark reports, as pure functions of request records.

Per request (all from the client's perf_counter_ns):
- ttft_ms: first token-carrying chunk - actual send.
- ttft_sched_ms: first token-carrying chunk - scheduled send (no coordinated omission).
- tpot_ms: (last chunk - first chunk) / (output tokens - 1); None below 2 tokens.
- itl: per token; a chunk carrying n tokens after a gap g gives n samples of g/n; the
  extra tokens of the first chunk give zero gaps, so a request's mean ITL equals its TPOT.
- first_decode_gap_ms: second chunk - first chunk (holds the KV transfer when disaggregated).
- max_stall_ms: the longest gap between consecutive chunks.
- e2e_ms: end of stream - actual send.
- dispatch_lag_ms: actual send - when it could go (scheduled time, or a freed in-flight slot).
- ttft_breakdown_ms (servers that report their own timings, like disagg): the client's
  TTFT split into queue (waiting for KV room), prefill (the prompt's forward), KV
  transfer (after the forward until the last KV byte left), server other (placement,
  RPCs, waiting for a prefill batch: the server's TTFT minus those three) and network
  (the client's TTFT minus the server's: HTTP, parsing, the stream's first flush).
  The phases of a request add up to its TTFT, so their means add up to the mean TTFT.
- prefix_reuse: the share of prompt tokens the server found in its prefix cache,
  sum(usage.prompt_tokens_details.cached_tokens) / sum(usage.prompt_tokens) over the
  successful requests whose server reports both (token-weighted, as a hit rate is).
- turns (multi-turn workloads): per turn number, from 1, its TTFT and prefix reuse.
When the server does not stream usage, chunks count 1 token each and their weights are
rescaled so they sum to the final `usage.completion_tokens`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from bench.serving.bootstrap import confidence_intervals
from bench.serving.record import ERROR_CLASSES, RequestRecord
from bench.serving.slo import SLO
from bench.serving.stats import summarize

NS_PER_MS = 1e6
TTFT_SERVER_PHASES = ("queue", "prefill", "kv_transfer")


@dataclass(frozen=True)
class RequestMetrics:
    """Latencies of one request in milliseconds; None where the request has no such value."""

    index: int
    is_ok: bool
    error: str | None
    input_tokens: int
    output_tokens: int
    ttft_ms: float | None
    ttft_sched_ms: float | None
    tpot_ms: float | None
    first_decode_gap_ms: float | None
    max_stall_ms: float | None
    e2e_ms: float
    dispatch_lag_ms: float
    itl_ms: tuple[float, ...]
    itl_weights: tuple[float, ...]


def token_weights(record: RequestRecord) -> list[float]:
    """Tokens per chunk, rescaled to the server's final count when chunks were only counted."""
    counted = sum(record.chunk_tokens)
    total = record.completion_tokens
    if record.is_usage_streamed or not total or not counted or total == counted:
        return [float(n) for n in record.chunk_tokens]
    return [n * total / counted for n in record.chunk_tokens]


def inter_token_latencies(chunk_ns: list[int], weights: list[float]) -> tuple[list, list]:
    """(gap per token in ms, weight) pairs; see the module docstring."""
    if not chunk_ns:
        return [], []
    values, out_weights = [0.0], [max(weights[0] - 1.0, 0.0)]
    for previous, now, n in zip(chunk_ns, chunk_ns[1:], weights[1:]):
        values.append((now - previous) / NS_PER_MS / n)
        out_weights.append(n)
    return values, out_weights


def request_metrics(record: RequestRecord) -> RequestMetrics:
    chunks = record.chunk_ns
    gaps_ms = [(b - a) / NS_PER_MS for a, b in zip(chunks, chunks[1:])]
    output_tokens = record.num_output_tokens
    itl, itl_weights = inter_token_latencies(chunks, token_weights(record))
    has_tpot = record.is_ok and len(chunks) > 1 and output_tokens > 1
    return RequestMetrics(
        index=record.index,
        is_ok=record.is_ok,
        error=record.error,
        input_tokens=record.prompt_tokens if record.prompt_tokens is not None else record.input_len,
        output_tokens=output_tokens,
        ttft_ms=(chunks[0] - record.sent_ns) / NS_PER_MS if chunks else None,
        ttft_sched_ms=(chunks[0] - record.scheduled_ns) / NS_PER_MS if chunks else None,
        tpot_ms=(chunks[-1] - chunks[0]) / NS_PER_MS / (output_tokens - 1) if has_tpot else None,
        first_decode_gap_ms=gaps_ms[0] if gaps_ms else None,
        max_stall_ms=max(gaps_ms) if gaps_ms else None,
        e2e_ms=(record.end_ns - record.sent_ns) / NS_PER_MS,
        dispatch_lag_ms=(record.sent_ns - max(record.slot_ns, record.scheduled_ns)) / NS_PER_MS,
        itl_ms=tuple(itl),
        itl_weights=tuple(itl_weights),
    )


def ttft_phases_ms(record: RequestRecord) -> dict[str, float] | None:
    """The phases of one request's TTFT (see the module docstring); None without server timings."""
    timings = record.server_timings or {}
    server_ttft_s = timings.get("ttft_s")
    if not record.is_ok or not record.chunk_ns or server_ttft_s is None:
        return None
    phases = {f"{k}_ms": (timings.get(f"{k}_s") or 0.0) * 1e3 for k in TTFT_SERVER_PHASES}
    client_ttft_ms = (record.chunk_ns[0] - record.sent_ns) / NS_PER_MS
    phases["server_other_ms"] = server_ttft_s * 1e3 - sum(phases.values())
    phases["network_ms"] = client_ttft_ms - server_ttft_s * 1e3
    phases["server_ttft_ms"] = server_ttft_s * 1e3
    first_gap_s = timings.get("first_decode_gap_s")
    if first_gap_s is not None:
        phases["server_first_decode_gap_ms"] = first_gap_s * 1e3
    return phases


def ttft_breakdown(records: list[RequestRecord]) -> dict | None:
    """{phase: summary} over the successful requests that carry server timings, else None."""
    rows = [p for r in records if (p := ttft_phases_ms(r)) is not None]
    if not rows:
        return None
    names = dict.fromkeys(name for row in rows for name in row)
    return {name: summarize([row[name] for row in rows if name in row]) for name in names}


def prefix_reuse(records: list[RequestRecord]) -> float | None:
    """Cached over prompt tokens (see the module docstring); None when no server reports it."""
    pairs = [
        (r.cached_tokens, r.prompt_tokens)
        for r in records
        if r.is_ok and r.cached_tokens is not None and r.prompt_tokens
    ]
    if not pairs:
        return None
    return sum(cached for cached, _ in pairs) / sum(prompt for _, prompt in pairs)


def turn_summaries(records: list[RequestRecord]) -> dict | None:
    """{turn number from 1, as a string (a JSON key): {num_ok, ttft_ms, prefix_reuse}}, for a
    multi-turn run; None for single requests."""
    turns = sorted({r.turn for r in records if r.turn is not None})
    if not turns:
        return None
    summaries = {}
    for turn in turns:
        ok = [r for r in records if r.turn == turn and r.is_ok and r.chunk_ns]
        summaries[str(turn + 1)] = {
            "num_ok": len(ok),
            "ttft_ms": summarize([(r.chunk_ns[0] - r.sent_ns) / NS_PER_MS for r in ok]),
            "prefix_reuse": prefix_reuse(ok),
        }
    return summaries


def measured(records: list[RequestRecord]) -> list[RequestRecord]:
    """The records that count: warm-up requests are left out of every metric."""
    return [r for r in records if not r.is_warmup]


def rate_rps(times_ns: list[int]) -> float | None:
    """Events per second over the span they cover: (n - 1) / (last - first)."""
    if len(times_ns) < 2 or max(times_ns) == min(times_ns):
        return None
    return (len(times_ns) - 1) / ((max(times_ns) - min(times_ns)) / 1e9)


def duration_s(records: list[RequestRecord]) -> float:
    """From the first scheduled send to the last end."""
    if not records:
        return 0.0
    return (max(r.end_ns for r in records) - min(r.scheduled_ns for r in records)) / 1e9


def latency_summaries(per_request: list[RequestMetrics]) -> dict:
    """Distributions over successful requests; ITL is per token across all of them."""
    ok = [m for m in per_request if m.is_ok]

    def of(name: str) -> dict:
        return summarize([v for m in ok if (v := getattr(m, name)) is not None])

    return {
        "ttft_ms": of("ttft_ms"),
        "ttft_sched_ms": of("ttft_sched_ms"),
        "tpot_ms": of("tpot_ms"),
        "itl_ms": summarize(
            [v for m in ok for v in m.itl_ms], [w for m in ok for w in m.itl_weights]
        ),
        "first_decode_gap_ms": of("first_decode_gap_ms"),
        "max_stall_ms": of("max_stall_ms"),
        "e2e_ms": of("e2e_ms"),
        "dispatch_lag_ms": summarize([m.dispatch_lag_ms for m in per_request]),
    }


def by_repeat(records: list[RequestRecord]) -> list[list[RequestRecord]]:
    """The records of each `--repeats` pass, in pass order; each pass has its own clock."""
    groups: dict[int, list[RequestRecord]] = {}
    for record in records:
        groups.setdefault(record.repeat, []).append(record)
    return [groups[k] for k in sorted(groups)]


def mean_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def throughput(
    passes: list[list[RequestRecord]], per_request: list[RequestMetrics], slo: SLO
) -> dict:
    """Rates over the run's duration; goodput counts only requests meeting the SLO.

    With repeats, the duration is the passes' durations added up, so each rate is
    the pooled tokens (or requests) over the pooled time.
    """
    total_s = sum(duration_s(p) for p in passes)
    seconds = total_s or float("nan")
    ok = [m for m in per_request if m.is_ok]
    good = [m for m in per_request if slo.is_met(m)]
    return {
        "duration_s": total_s,
        "offered_rate_rps": mean_of([rate_rps([r.scheduled_ns for r in p]) for p in passes]),
        "send_rate_rps": mean_of([rate_rps([r.sent_ns for r in p]) for p in passes]),
        "request_throughput_rps": len(ok) / seconds,
        "input_tokens_per_s": sum(m.input_tokens for m in ok) / seconds,
        "output_tokens_per_s": sum(m.output_tokens for m in ok) / seconds,
        "goodput_rps": len(good) / seconds,
        "goodput_tokens_per_s": sum(m.output_tokens for m in good) / seconds,
        "slo": slo.text,
        "slo_attainment": len(good) / len(per_request) if per_request else None,
    }


def token_checks(records: list[RequestRecord]) -> dict:
    """Counts that reveal drifting token counts between workload, client and server."""
    ok = [r for r in records if r.is_ok]
    return {
        "prompt_token_mismatches": sum(  # a turn's prompt depends on the replies
            r.turn is None and r.prompt_tokens is not None and r.prompt_tokens != r.input_len
            for r in ok
        ),
        "output_token_mismatches": sum(r.num_output_tokens != r.output_len for r in ok),
        "chunk_count_corrections": sum(
            not r.is_usage_streamed
            and r.completion_tokens is not None
            and r.completion_tokens != sum(r.chunk_tokens)
            for r in ok
        ),
        "missing_usage": sum(r.completion_tokens is None for r in ok),
        "missing_done": sum(not r.is_done for r in ok),
    }


def summarize_run(records: list[RequestRecord], slo: SLO) -> dict:
    """The whole summary of one target's run, from its records alone."""
    counted = measured(records)
    passes = by_repeat(counted)
    per_pass = [[request_metrics(r) for r in p] for p in passes]
    per_request = [m for metrics in per_pass for m in metrics]
    errors = Counter(r.error for r in counted if r.error is not None)
    return {
        "num_requests": len(counted),
        "repeats": len(passes),
        "num_warmup": len(records) - len(counted),
        "num_ok": sum(r.is_ok for r in counted),
        "num_errors": sum(errors.values()),
        "errors": {name: errors.get(name, 0) for name in ERROR_CLASSES},
        **throughput(passes, per_request, slo),
        **latency_summaries(per_request),
        **token_checks(counted),
        "ttft_breakdown_ms": ttft_breakdown(counted),
        "prefix_reuse": prefix_reuse(counted),
        "turns": turn_summaries(counted),
        "ci95": confidence_intervals(
            per_pass,
            [duration_s(p) for p in passes],
            slo,
        )
        if len(passes) > 1
        else None,
    }
