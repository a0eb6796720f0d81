"""How many sequences a disagg server's decode workers ran at once, sampled during a run.

The client sees requests in flight; the decode workers' running batch (their
`num_running_sequences` in `/cluster`, from each worker's last heartbeat) is how
many of those actually decoded together, the rest waiting for KV room. Polled in
a thread while a target runs; a server without `/cluster` gives no samples.
"""

from __future__ import annotations

import statistics
import threading

from bench.serving.cluster_view import read_cluster

SAMPLE_INTERVAL_S = 0.5


def decode_running(url: str) -> int | None:
    """Sequences running on all the target's decode (and colocated) workers now, or None."""
    workers = read_cluster(url)
    if workers is None:
        return None
    try:
        return sum(w["num_running_sequences"] for w in workers if w["role"] != "prefill")
    except (KeyError, TypeError):
        return None


class DecodeBatchSampler:
    """`with DecodeBatchSampler(url) as sampler:` polls until the block ends."""

    def __init__(self, url: str, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.url = url
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decode-batch", daemon=True)

    def __enter__(self) -> DecodeBatchSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = decode_running(self.url)
            if value is None and not self.samples:
                return  # not a disagg server
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval_s)

    def summary(self) -> dict | None:
        """Mean, median and max running batch over the run; None without samples."""
        if not self.samples:
            return None
        return {
            "mean": statistics.fmean(self.samples),
            "median": statistics.median(self.samples),
            "max": max(self.samples),
            "num_samples": len(self.samples),
            "interval_s": self.interval_s,
        }
