"""A thread that owns an engine: commands in, per-sequence events out.

Workers serve gRPC on an asyncio loop, but the engine must step without pause
and is not thread-safe. So one thread owns it; other threads only enqueue
commands (`prefill`, `decode`, `abort`), drained between steps, and hear back
through each sequence's listener, called on this thread.

Every prefill here hands off: a completed prompt leaves the batch with its
first token and its blocks, for its listener to ship (prefill worker) or mark
READY in place (colocated). Decoding sequences join with their KV already in
their blocks.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from disagg.engine.llm_engine import LLMEngine
from disagg.engine.scheduler import ScheduledChunk
from disagg.engine.sequence import FinishReason, Sequence

log = logging.getLogger(__name__)


class SequenceListener:
    """What a sequence's owner hears; all calls come from the engine thread."""

    def on_layer(self, seq: Sequence, layer: int, start: int, end: int) -> None:
        """Layer `layer` of tokens [start, end) is in the sequence's blocks."""

    def on_prefilled(self, seq: Sequence) -> None:
        """The whole prompt is computed and `seq` has its first token."""

    def on_token(self, seq: Sequence) -> None:
        """`seq` got one more token (it may also have finished)."""

    def on_finished(self, seq: Sequence) -> None:
        """`seq` left the batch; its blocks are free."""

    def on_error(self, seq: Sequence, error: Exception) -> None:
        """The step that carried `seq` failed; it has been taken out."""


class EngineLoop:
    def __init__(
        self, engine: LLMEngine, tick: Callable[[], None] | None = None, tick_s: float = 0.5
    ) -> None:
        self.engine = engine
        self._tick = tick
        self._tick_s = tick_s
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._listeners: dict[int, SequenceListener] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    @property
    def num_sequences(self) -> int:
        return len(self._listeners)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    # -- commands (any thread) ----------------------------------------------

    def prefill(self, seq: Sequence, listener: SequenceListener) -> None:
        self._commands.put(lambda: self._admit(seq, listener, running=False))

    def decode(self, seq: Sequence, listener: SequenceListener) -> None:
        self._commands.put(lambda: self._admit(seq, listener, running=True))

    def abort(self, seq: Sequence) -> None:
        self._commands.put(lambda: self._abort(seq))

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine thread between steps."""
        self._commands.put(fn)

    # -- the engine thread ----------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._drain(block=not self.engine.has_unfinished)
            if self.engine.has_unfinished and not self._stopped.is_set():
                self._step()

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self._tick_s) if block else None
            while True:
                if command is not None:
                    command()
                command = self._commands.get_nowait()
        except queue.Empty:
            pass
        if self._tick is not None:
            self._tick()

    def _admit(self, seq: Sequence, listener: SequenceListener, running: bool) -> None:
        self._listeners[seq.seq_id] = listener
        if running:
            self.engine.scheduler.add_running(seq)
        else:
            self.engine.scheduler.add(seq)

    def _abort(self, seq: Sequence) -> None:
        if seq.is_finished or seq.seq_id not in self._listeners:
            return
        self.engine.scheduler.finish(seq, FinishReason.ABORT)
        self._listeners.pop(seq.seq_id).on_finished(seq)

    def _step(self) -> None:
        output = self.engine.scheduler.schedule()
        seqs = [chunk.seq for chunk in output.prefill] + output.decode
        try:
            if output.prefill:
                self._prefill(output.prefill)
            elif output.decode:
                self._decode(output.decode)
        except Exception as error:
            log.exception("engine step failed; failing its %d sequences", len(seqs))
            for seq in seqs:
                self.engine.scheduler.finish(seq, FinishReason.ERROR)
                listener = self._listeners.pop(seq.seq_id, None)
                if listener is not None:
                    listener.on_error(seq, error)

    def _prefill(self, chunks: list[ScheduledChunk]) -> None:
        ranges = [
            (c.seq, c.seq.num_computed_tokens, c.seq.num_computed_tokens + c.num_tokens)
            for c in chunks
        ]

        def on_layer(layer: int) -> None:
            for seq, start, end in ranges:
                self._listeners[seq.seq_id].on_layer(seq, layer, start, end)

        for seq in self.engine.prefill(chunks, on_layer, hand_off=True):
            self._listeners.pop(seq.seq_id).on_prefilled(seq)

    def _decode(self, seqs: list[Sequence]) -> None:
        for seq in self.engine.decode_step(seqs):
            listener = self._listeners[seq.seq_id]
            listener.on_token(seq)
            if seq.is_finished:
                del self._listeners[seq.seq_id]
                listener.on_finished(seq)
