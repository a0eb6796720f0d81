"""Shipping one prompt's KV to its decode worker's handle, layer by layer as it is computed."""

from __future__ import annotations

from disagg.engine.llm_engine import LLMEngine
from disagg.engine.sequence import Sequence
from disagg.engine.worker_loop import EngineLoop, Wake
from disagg.kv.transfer import KVSender, PendingSend
from disagg.rpc import control_pb2 as pb
from disagg.rpc.prefill_reply import PrefillResult
from prefill_worker.send_completions import SendCompletions


class ShipKV(PrefillResult):
    """Sends each computed layer to the handle's decode worker; frees local blocks after.

    Only tokens from the handle's `num_cached_tokens` on are sent: the decode worker
    holds the rest. That start may lie before what this worker computes (its own
    prefix cache had more), so each layer's first send also carries the cached
    tokens between the two, read from the shared blocks; or after it (the decode
    worker had more), so the computed tokens before it are not sent.

    `ship` and `hand_over` run on the engine thread (the sender's sockets live
    there); the wait for the frames to leave and the reply run on the
    completions thread.
    """

    def __init__(
        self,
        loop: EngineLoop,
        sender: KVSender,
        completions: SendCompletions,
        handle: pb.KVHandle,
    ) -> None:
        super().__init__()
        self.loop = loop
        self.engine: LLMEngine = loop.engine
        self.sender = sender
        self.completions = completions
        self.endpoint = handle.zmq_endpoint
        self.handle_id = handle.handle_id
        num_layers = self.engine.kv_cache.layout.num_layers
        self._next_to_send = [handle.num_cached_tokens] * num_layers
        """Per layer, the first token the decode worker has not been sent."""
        self._is_sealed = False

    def ship(self, seq: Sequence, layer: int, start: int, end: int) -> None:
        first = self._next_to_send[layer]
        if end <= first:
            return
        k, v = self.engine.kv_cache.token_range(layer, seq.block_table, first, end)
        self.sender.send_layer(self.endpoint, self.handle_id, layer, first, k, v)
        self._next_to_send[layer] = end

    def hand_over(self, seq: Sequence) -> None:
        num_layers = self.engine.kv_cache.layout.num_layers
        try:
            pending = self.sender.seal(
                self.endpoint, self.handle_id, seq.num_prompt_tokens, num_layers
            )
        except Exception:
            self._release(seq)
            raise
        self._is_sealed = True
        self.completions.watch(pending, lambda error: self._settled(seq, pending, error))

    def abandon(self, seq: Sequence) -> None:
        if not self._is_sealed:
            self.sender.abort(self.handle_id)

    def _settled(self, seq: Sequence, pending: PendingSend, error: Exception | None) -> None:
        # NOTE: only now, with every frame out of the process, may the blocks be reused.
        self._release(seq)
        if error is not None:
            self.failed(seq, error)
        else:
            self.handed_over(seq, pending.done.nbytes, pending.done.checksum)

    def _release(self, seq: Sequence) -> None:
        self.engine.block_manager.release(seq)
        self.loop.submit(Wake())  # a prompt may have been waiting for these blocks
