"""Summaries as a table: one column per target, ratios against the first.

A terminal gets it drawn by rich; a pipe or file gets plain aligned text, which
stays stable for scripts and diffs. With `--repeats`, a cell carries its
bootstrap 95% interval in brackets.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

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
    ("prefix reuse (cached/prompt)", "prefix_reuse", None, "{:.1%}"),
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
    # Where the target reports its own timings (disagg): the mean TTFT, phase by phase.
    ("TTFT mean: queue (ms)", "ttft_breakdown_ms.queue_ms", "mean", "{:.1f}"),
    ("TTFT mean: prefill (ms)", "ttft_breakdown_ms.prefill_ms", "mean", "{:.1f}"),
    ("TTFT mean: KV transfer (ms)", "ttft_breakdown_ms.kv_transfer_ms", "mean", "{:.1f}"),
    ("TTFT mean: server other (ms)", "ttft_breakdown_ms.server_other_ms", "mean", "{:.1f}"),
    ("TTFT mean: network (ms)", "ttft_breakdown_ms.network_ms", "mean", "{:.1f}"),
    (
        "first decode gap, server p50 (ms)",
        "ttft_breakdown_ms.server_first_decode_gap_ms",
        "p50",
        "{:.2f}",
    ),
)


def turn_rows(summaries: list[dict]) -> list[tuple[str, str, str | None, str]]:
    """Multi-turn runs: TTFT p50 and prefix reuse of each turn any target has."""
    turns = sorted({t for s in summaries for t in s.get("turns") or {}}, key=int)
    return [
        row
        for t in turns
        for row in (
            (f"turn {t}: TTFT sent p50 (ms)", f"turns.{t}.ttft_ms", "p50", "{:.1f}"),
            (f"turn {t}: prefix reuse", f"turns.{t}.prefix_reuse", None, "{:.1%}"),
        )
    ]


def value(summary: dict, key: str, stat: str | None) -> float | None:
    """summary[key][stat], where a dotted key walks nested dicts; None where absent."""
    entry: object = summary
    for part in key.split("."):
        entry = entry.get(part) if isinstance(entry, dict) else None
    if stat is not None:
        entry = entry.get(stat) if isinstance(entry, dict) else None
    return entry if isinstance(entry, (int, float)) else None


def interval(summary: dict, key: str, stat: str | None) -> list[float] | None:
    """The bootstrap 95% interval of a row's number, when the run had repeats."""
    intervals = summary.get("ci95") or {}
    return intervals.get(key if stat is None else f"{key}.{stat}")


def _cell(number: float | None, fmt: str) -> str:
    return "-" if number is None or number != number else fmt.format(number)


def _ratio(number: float | None, base: float | None) -> str:
    if number is None or base is None or base == 0 or number != number or base != base:
        return "-"
    return f"{number / base:.2f}x"


def _cell_with_interval(number: float | None, fmt: str, ci: list[float] | None) -> str:
    text = _cell(number, fmt)
    if ci is None or number is None:
        return text
    return f"{text} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def table_rows(columns: list[tuple[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): a column per (name, summary), then `name/first` ratio columns.

    A row no target has a number for (the TTFT phases of a server that reports
    none) is left out.
    """
    names = [name for name, _ in columns]
    header = ["metric", *names, *(f"{n}/{names[0]}" for n in names[1:])]
    rows = []
    for label, key, stat, fmt in (*ROWS, *turn_rows([summary for _, summary in columns])):
        numbers = [value(summary, key, stat) for _, summary in columns]
        if all(n is None for n in numbers):
            continue
        cells = [
            _cell_with_interval(n, fmt, interval(summary, key, stat))
            for n, (_, summary) in zip(numbers, columns)
        ]
        rows.append([label, *cells, *(_ratio(n, numbers[0]) for n in numbers[1:])])
    return header, rows


def render(columns: list[tuple[str, dict]]) -> str:
    """The table as plain aligned text."""
    header, rows = table_rows(columns)
    lines = [header, *rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in lines
    ]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def print_table(columns: list[tuple[str, dict]]) -> None:
    """Drawn with rich on a terminal, else as plain text on stdout."""
    if not sys.stdout.isatty():
        print(render(columns))
        return
    header, rows = table_rows(columns)
    table = Table(*header, title="disagg-bench", title_justify="left")
    for column in table.columns[1:]:
        column.justify = "right"
    for row in rows:
        table.add_row(*row)
    Console().print(table)
