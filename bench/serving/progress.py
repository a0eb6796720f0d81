"""A progress bar while a target runs: sent/done/failed, in flight, achieved rate, rolling TTFT.

It reads the records the client fills in, twice a second, so the hot path pays nothing.
"""

from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.serving.record import RequestRecord

ROLLING_WINDOW = 50


def progress_line(records: list[RequestRecord], elapsed_s: float) -> str:
    """`sent 12/100  done 10  failed 1  in flight 2  9.8 req/s  TTFT p50 (last 50) 41 ms`."""
    sent = sum(r.sent_ns > 0 for r in records)
    done = [r for r in records if r.end_ns > 0]
    failed = sum(not r.is_ok for r in done)
    recent = sorted((r for r in done if r.is_ok), key=lambda r: r.end_ns)[-ROLLING_WINDOW:]
    ttfts = sorted((r.chunk_ns[0] - r.sent_ns) / 1e6 for r in recent)
    ttft = f"{ttfts[(len(ttfts) - 1) // 2]:.0f} ms" if ttfts else "-"
    rate = len(done) / elapsed_s if elapsed_s > 0 else 0.0
    return (
        f"sent {sent}/{len(records)}  done {len(done)}  failed {failed}  "
        f"in flight {sent - len(done)}  {rate:.1f} req/s  TTFT p50 (last {ROLLING_WINDOW}) {ttft}"
    )


async def show_progress(
    records: list[RequestRecord], start_ns: int, label: str = "", interval_s: float = 0.5
) -> None:
    """A rich progress bar (done of total) with the counts line beside it, on stderr.

    Redrawn every interval until cancelled, then once more with the final state.
    Refreshing here rather than in rich's own thread keeps the client's process to
    the one event loop it measures with.
    """
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[line]}"),
    )
    with Progress(*columns, console=Console(stderr=True), auto_refresh=False) as bar:
        task = bar.add_task(label, total=len(records), line="")

        def draw() -> None:
            elapsed_s = (time.perf_counter_ns() - start_ns) / 1e9
            done = sum(r.end_ns > 0 for r in records)
            bar.update(task, completed=done, line=progress_line(records, elapsed_s))
            bar.refresh()

        try:
            while True:
                await asyncio.sleep(interval_s)
                draw()
        finally:
            draw()
