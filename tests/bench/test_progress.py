from __future__ import annotations

from bench.serving.progress import progress_line
from bench.serving.record import RequestRecord

MS = 1_000_000


def test_progress_line_counts_and_rolling_ttft():
    records = [
        RequestRecord(0, 1, 1, sent_ns=1 * MS, chunk_ns=[41 * MS], end_ns=50 * MS),
        RequestRecord(1, 1, 1, sent_ns=2 * MS, chunk_ns=[102 * MS], end_ns=120 * MS),
        RequestRecord(2, 1, 1, sent_ns=3 * MS, end_ns=9 * MS, error="5xx"),
        RequestRecord(3, 1, 1, sent_ns=4 * MS),
        RequestRecord(4, 1, 1),
    ]
    line = progress_line(records, elapsed_s=1.5)
    assert "sent 4/5" in line and "done 3" in line and "failed 1" in line
    assert "in flight 1" in line and "2.0 req/s" in line
    assert "TTFT p50 (last 50) 40 ms" in line


def test_progress_line_before_anything_finished():
    assert "TTFT p50 (last 50) -" in progress_line([RequestRecord(0, 1, 1)], elapsed_s=0.0)
