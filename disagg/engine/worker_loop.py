"""The loop a worker runs: a thread that owns an engine, typed commands in, events out.

Workers serve gRPC on an asyncio loop, but the engine must step without pause
and is not thread-safe. So one thread owns it: other threads only enqueue
commands (`Admit`, `Abort`, `Wake`), drained between steps, and hear back
through each sequence's listener, called on this thread. Each turn of the loop
is `engine.step()`; the loop only routes its `StepOutput` to the listeners.

What a sequence does is its own: a prefill-only sequence leaves after its
prompt with its first token and its blocks, for its listener to ship
(prefill worker) or mark READY in place (colocated); one admitted
WAITING_FOR_KV decodes with its KV already in its blocks.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from disagg.engine.llm_engine import LLMEngine
from disagg.engine.scheduler import ScheduledChunk
from disagg.engine.sequence import Sequence
from disagg.engine.step_output import StepOutput
from disagg.errors import InvalidRequestError


class SequenceListener:
    """What a sequence's owner hears; all calls come from the engine thread."""

    def on_layer(self, seq: Sequence, layer: int, start: int, end: int) -> None:
        """Layer `layer` of tokens [start, end) is in the sequence's blocks."""

    def on_prefilled(self, seq: Sequence) -> None:
        """The whole prompt is computed and `seq` has its first token."""

    def on_token(self, seq: Sequence) -> None:
        """`seq` got one more token by a decode step (it may also have finished)."""

    def on_finished(self, seq: Sequence) -> None:
        """`seq` left the batch; its blocks are free."""

    def on_error(self, seq: Sequence, error: Exception) -> None:
        """The step that carried `seq` failed; it has been taken out."""


@dataclass(frozen=True)
class Admit:
    """Add `seq` to the engine (by its status); `listener` hears about it."""

    seq: Sequence
    listener: SequenceListener


@dataclass(frozen=True)
class Abort:
    """Take `seq` out if it is still in the engine; its listener hears `on_finished`."""

    seq: Sequence


@dataclass(frozen=True)
class Wake:
    """Nothing to do but look again: blocks were freed elsewhere, or the loop stops."""


Command = Admit | Abort | Wake


class EngineLoop:
    def __init__(
        self, engine: LLMEngine, tick: Callable[[], None] | None = None, tick_s: float = 0.5
    ) -> None:
        """tick: called on the engine thread between steps, at least every tick_s when idle."""
        self.engine = engine
        self._tick = tick
        self._tick_s = tick_s
        self._commands: queue.Queue[Command] = queue.Queue()
        self._listeners: dict[int, SequenceListener] = {}
        self.num_steps = 0
        """Steps run; with num_in_last_step, which step batch a listener's call is about."""
        self.num_in_last_step = 0
        self.num_busy_steps = 0
        """Steps that computed something (num_scheduled > 0), ever: the worker's progress
        counter, reported in its heartbeat. A step that found no room for anything is not
        counted, so an engine spinning on a full pool does not read as making progress."""
        self._step_started_s = 0.0
        """time.monotonic() when the step running now began; 0.0 between steps."""
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    @property
    def num_sequences(self) -> int:
        """Sequences in the engine that a listener waits on."""
        return len(self._listeners)

    @property
    def step_running_s(self) -> float:
        """Seconds the engine has been inside the step it runs now; 0.0 between steps.

        With num_busy_steps, the worker's progress as its heartbeat reports it: one long
        step (a big in-place prefill on a slow CPU) is work, not a hang. Read from any
        thread (one float, set by the engine thread).
        """
        started_s = self._step_started_s
        return time.monotonic() - started_s if started_s else 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._commands.put(Wake())
        self._thread.join(timeout=10)

    def submit(self, command: Command) -> None:
        """Enqueue a command from any thread; it runs between two steps."""
        self._commands.put(command)

    # -- the engine thread ----------------------------------------------------

    def _run(self) -> None:
        is_idle = True
        while not self._stopped.is_set():
            self._drain(block=is_idle)
            if self._stopped.is_set():
                return
            is_idle = True
            if self.engine.has_unfinished:
                self._step_started_s = time.monotonic()
                try:
                    output = self.engine.step(self._on_layer)
                finally:
                    self._step_started_s = 0.0
                self.num_steps, self.num_in_last_step = self.num_steps + 1, output.num_scheduled
                if not output.is_idle:
                    self.num_busy_steps += 1
                self._dispatch(output)
                is_idle = output.is_idle  # e.g. waiting for blocks: sleep until a Wake

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self._tick_s) if block else None
            while True:
                if command is not None:
                    self._apply(command)
                command = self._commands.get_nowait()
        except queue.Empty:
            pass
        if self._tick is not None:
            self._tick()

    def _apply(self, command: Command) -> None:
        if isinstance(command, Admit):
            try:
                self.engine.add_sequence(command.seq)
            except InvalidRequestError as error:  # a constraint its tokens do not follow
                command.listener.on_error(command.seq, error)
                return
            self._listeners[command.seq.seq_id] = command.listener
        elif isinstance(command, Abort):
            listener = self._listeners.pop(command.seq.seq_id, None)
            if self.engine.abort_sequence(command.seq) and listener is not None:
                listener.on_finished(command.seq)

    def _on_layer(self, layer: int, chunks: list[ScheduledChunk]) -> None:
        for chunk in chunks:
            self._listeners[chunk.seq.seq_id].on_layer(chunk.seq, layer, chunk.start, chunk.end)

    def _dispatch(self, output: StepOutput) -> None:
        for seq in output.prefilled:
            listener = self._listeners[seq.seq_id]
            if seq.is_prefill_only:
                del self._listeners[seq.seq_id]
                listener.on_prefilled(seq)
            else:
                listener.on_token(seq)
        for seq in output.decoded:
            self._listeners[seq.seq_id].on_token(seq)
        for seq in output.finished:
            self._listeners.pop(seq.seq_id).on_finished(seq)
        for seq in output.failed:
            listener = self._listeners.pop(seq.seq_id, None)
            if listener is not None:
                listener.on_error(seq, output.error)
