"""Waiting for sealed KV sends off the engine thread.

ZeroMQ reads a layer's frames straight from the prefill worker's KV blocks, so
the blocks may be reused only once every frame has left the process. Waiting
for that on the engine thread (up to the send timeout) would let one receiver
that stopped reading stall every other prefill; this thread waits instead and
calls back when a send is out, or overdue.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import zmq

from disagg.kv.transfer import PendingSend

log = logging.getLogger(__name__)

OnSettled = Callable[[Exception | None], None]
"""Called once from the completions thread: None when sent, else TimeoutError."""


class SendCompletions:
    def __init__(self, poll_s: float = 0.001) -> None:
        """poll_s: how often sends behind the oldest one are looked at."""
        self._poll_s = poll_s
        self._pending: list[tuple[PendingSend, OnSettled]] = []
        self._lock = threading.Lock()
        self._has_work = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-send-completions", daemon=True)

    def start(self) -> SendCompletions:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._has_work.set()
        self._thread.join(timeout=5)

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def watch(self, pending: PendingSend, on_settled: OnSettled) -> None:
        with self._lock:
            self._pending.append((pending, on_settled))
        self._has_work.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._has_work.clear()
            with self._lock:
                items = list(self._pending)
            if not items:
                self._has_work.wait()
                continue
            self._wait_a_little(items[0][0])
            for item in items:
                self._settle_if_done(*item)

    def _wait_a_little(self, oldest: PendingSend) -> None:
        """Sleep until the oldest send's next frame is out, or poll_s passed."""
        for tracker in oldest.trackers:
            if not tracker.done:
                with contextlib.suppress(zmq.NotDone):
                    tracker.wait(self._poll_s)
                return

    def _settle_if_done(self, pending: PendingSend, on_settled: OnSettled) -> None:
        if pending.is_sent:
            error = None
        elif pending.is_overdue:
            error = TimeoutError(f"KV frames still queued after {pending.timeout_s}s")
        else:
            return
        with self._lock:
            self._pending.remove((pending, on_settled))
        try:
            on_settled(error)
        except Exception:  # a broken callback must not stop every other send's completion
            log.exception("KV send completion callback failed")
