"""The Prefill RPC's side of a prompt in the engine loop, shared by both kinds of prefill.

A prefill worker ships each layer's K/V as it is computed and frees its own
blocks once the frames are out (off the engine thread); a colocated worker
computes straight into the handle's blocks and has nothing to ship.
Everything else (timings, the first token, failing the RPC when the sequence
is aborted) is the same, and lives here.
"""

from __future__ import annotations

import time

from disagg import tracing
from disagg.engine.sequence import Sequence
from disagg.engine.worker_loop import Abort, Admit, EngineLoop, SequenceListener
from disagg.rpc import control_pb2 as pb
from disagg.rpc.convert import logprob_to_proto
from disagg.rpc.thread_bridge import ThreadSafeFuture


class PrefillAborted(Exception):
    """The sequence left the engine before its prompt was computed."""


class PrefillResult(SequenceListener):
    def __init__(self) -> None:
        self.future: ThreadSafeFuture[pb.PrefillResponse] = ThreadSafeFuture()
        self._submitted_s = time.perf_counter()
        self._started_s: float | None = None
        self._computed_s: float | None = None

    # -- what differs between the two kinds -----------------------------

    def ship(self, seq: Sequence, layer: int, start: int, end: int) -> None:
        """Layer `layer` of tokens [start, end) is computed."""

    def hand_over(self, seq: Sequence) -> None:
        """The prompt is computed: make its KV available, then call `handed_over` (from
        any thread, possibly later) or `failed`. Raising here counts as `failed`."""
        self.handed_over(seq, 0, 0)

    def abandon(self, seq: Sequence) -> None:
        """The prompt will not complete, or its KV will not be handed over."""

    # -- results -----------------------------------------------------------

    def handed_over(self, seq: Sequence, nbytes: int, checksum: int) -> None:
        """Answer the RPC: the KV is where the handle says (`nbytes` moved, `checksum`)."""
        computed_s = self._computed_s or time.perf_counter()
        started_s = self._started_s or computed_s
        self.future.set_result(
            pb.PrefillResponse(
                first_token_id=seq.output_token_ids[0],
                first_logprob=logprob_to_proto(
                    seq.output_logprobs[0] if seq.output_logprobs else None
                ),
                queue_s=started_s - self._submitted_s,
                prefill_s=computed_s - started_s,
                transfer_s=time.perf_counter() - computed_s,
                kv_bytes=nbytes,
                kv_checksum=checksum,
                finish_reason=seq.finish_reason or "",
                num_cached_tokens=seq.num_cached_tokens,
            )
        )

    def failed(self, seq: Sequence, error: Exception) -> None:
        self.abandon(seq)
        self.future.set_exception(error)

    # -- the engine loop's calls ----------------------------------------

    def on_layer(self, seq: Sequence, layer: int, start: int, end: int) -> None:
        if self._started_s is None:
            self._started_s = time.perf_counter()
        self.ship(seq, layer, start, end)

    def on_prefilled(self, seq: Sequence) -> None:
        self._computed_s = time.perf_counter()
        try:
            self.hand_over(seq)
        except Exception as error:
            self.failed(seq, error)

    def on_finished(self, seq: Sequence) -> None:
        self.failed(seq, PrefillAborted(f"prefill of {seq.request_id} was aborted"))

    def on_error(self, seq: Sequence, error: Exception) -> None:
        self.failed(seq, error)


async def run_prefill(loop: EngineLoop, seq: Sequence, result: PrefillResult) -> pb.PrefillResponse:
    """Submit a prefill-only sequence and wait; a cancelled RPC takes it out of the engine."""
    seq.is_prefill_only = True
    loop.submit(Admit(seq, result))
    try:
        reply = await result.future
    except BaseException:
        loop.submit(Abort(seq))
        raise
    if tracing.is_active():
        trace_phases(reply, seq.num_prompt_tokens)
    return reply


def trace_phases(reply: pb.PrefillResponse, num_prompt_tokens: int) -> None:
    """The prefill's phases as spans under the Prefill RPC's, placed back from the reply's
    timings (measured on the engine thread, which opens no span). The KV send overlaps the
    forward (each layer leaves as it is computed); its tail after the forward is
    `transfer_s`. A colocated prefill ships nothing and has no `kv.send`."""
    end_ns = time.time_ns()
    computed_ns = end_ns - int(reply.transfer_s * 1e9)
    started_ns = computed_ns - int(reply.prefill_s * 1e9)
    tracing.record_span("prefill.queue", started_ns - int(reply.queue_s * 1e9), started_ns)
    forward = {"num_prompt_tokens": num_prompt_tokens}
    tracing.record_span("prefill.forward", started_ns, computed_ns, forward)
    if reply.kv_bytes:
        sent = {"kv_bytes": reply.kv_bytes, "tail_s": reply.transfer_s}
        tracing.record_span("kv.send", started_ns, end_ns, sent)
