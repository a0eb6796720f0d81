"""Summaries as a plain-text table: one column per target, ratios against the first."""

from __future__ import annotations

# (label, summary key, stat or None, format)
ROWS: tuple[tuple[str, str, str | None, str], ...] = (
    ("requests ok", "num_ok", None, "{:.0f}"),
    ("requests failed", "num_errors", None, "{:.0f}"),
    ("offered rate (req/s)", "offered_rate_rps", None, "{:.2f}"),
    ("send rate (req/s)", "send_rate_rps", None, "{:.2f}"),
    ("throughput (req/s)", "request_throughput_rps", None, "{:.2f}"),
    ("input tokens/s", "input_tokens_per_s", None, "{:.1f}"),
    ("output tokens/s", "output_tokens_per_s", None, "{:.1f}"),
    ("goodput (req/s)", "goodput_rps", None, "{:.2f}"),
    ("goodput tokens/s", "goodput_tokens_per_s", None, "{:.1f}"),
    ("SLO attainment", "slo_attainment", None, "{:.1%}"),
    ("TTFT sched p50 (ms)", "ttft_sched_ms", "p50", "{:.1f}"),
    ("TTFT sched p99 (ms)", "ttft_sched_ms", "p99", "{:.1f}"),
    ("TTFT sent p50 (ms)", "ttft_ms", "p50", "{:.1f}"),
    ("TTFT sent p99 (ms)", "ttft_ms", "p99", "{:.1f}"),
    ("TPOT mean (ms)", "tpot_ms", "mean", "{:.2f}"),
    ("TPOT p99 (ms)", "tpot_ms", "p99", "{:.2f}"),
    ("ITL p50 (ms)", "itl_ms", "p50", "{:.2f}"),
    ("ITL p99 (ms)", "itl_ms", "p99", "{:.2f}"),
    ("first decode gap p50 (ms)", "first_decode_gap_ms", "p50", "{:.2f}"),
    ("first decode gap p99 (ms)", "first_decode_gap_ms", "p99", "{:.2f}"),
    ("max stall p50 (ms)", "max_stall_ms", "p50", "{:.1f}"),
    ("max stall max (ms)", "max_stall_ms", "max", "{:.1f}"),
    ("E2E p50 (ms)", "e2e_ms", "p50", "{:.1f}"),
    ("E2E p99 (ms)", "e2e_ms", "p99", "{:.1f}"),
    ("dispatch lag p99 (ms)", "dispatch_lag_ms", "p99", "{:.2f}"),
)


def value(summary: dict, key: str, stat: str | None) -> float | None:
    entry = summary.get(key)
    return entry.get(stat) if stat is not None and isinstance(entry, dict) else entry


def _cell(number: float | None, fmt: str) -> str:
    return "-" if number is None or number != number else fmt.format(number)


def _ratio(number: float | None, base: float | None) -> str:
    if number is None or base is None or base == 0 or number != number or base != base:
        return "-"
    return f"{number / base:.2f}x"


def render(columns: list[tuple[str, dict]]) -> str:
    """Rows of ROWS, a column per (name, summary), and `name/first` ratio columns."""
    names = [name for name, _ in columns]
    header = ["metric", *names, *(f"{n}/{names[0]}" for n in names[1:])]
    lines = [header]
    for label, key, stat, fmt in ROWS:
        numbers = [value(summary, key, stat) for _, summary in columns]
        ratios = [_ratio(n, numbers[0]) for n in numbers[1:]]
        lines.append([label, *(_cell(n, fmt) for n in numbers), *ratios])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in lines
    ]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)
