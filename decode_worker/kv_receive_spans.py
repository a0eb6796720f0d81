"""`kv.receive` spans: how long a handle's KV took to arrive, as handle hooks (tracing on only).

The span runs from the first layer in to READY, or to the handle's end when it never got
there (then with the reason as `failure`), under the Allocate RPC that made the handle, so
it sits in the request's trace beside the prefill worker's `kv.send`. Layers arrive on the
KV receiver's thread, which opens no span: it records two clock readings, and the span is
made once at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from decode_worker.kv_handle import HandleHooks, KVHandle
from disagg import tracing


@dataclass
class _Receiving:
    parent: Any
    """The Allocate RPC's trace context."""
    allocated_unix_ns: int
    first_layer_unix_ns: int | None = None


class KVReceiveSpans(HandleHooks):
    def __init__(self) -> None:
        # NOTE: touched from the gRPC loop and the receiver thread, one key per handle; each
        # dict operation is atomic, and a handle's calls come in lifecycle order.
        self._receiving: dict[str, _Receiving] = {}

    def on_allocate(self, handle: KVHandle) -> None:
        receiving = _Receiving(tracing.current_context(), time.time_ns())
        self._receiving[handle.handle_id] = receiving

    def on_layer_received(self, handle: KVHandle, layer: int, num_tokens: int) -> None:
        receiving = self._receiving.get(handle.handle_id)
        if receiving is not None and receiving.first_layer_unix_ns is None:
            receiving.first_layer_unix_ns = time.time_ns()

    def on_ready(self, handle: KVHandle) -> None:
        self._end(handle, None)

    def on_free(self, handle: KVHandle, reason: str) -> None:
        self._end(handle, reason)  # nothing left to end unless it never got READY

    def _end(self, handle: KVHandle, failure: str | None) -> None:
        receiving = self._receiving.pop(handle.handle_id, None)
        if receiving is None:
            return
        attributes: dict[str, str | int] = {
            "kv_bytes": handle.nbytes,
            "num_prompt_tokens": handle.num_prompt_tokens,
        }
        if failure is not None:
            attributes["failure"] = failure
        start_ns = receiving.first_layer_unix_ns or receiving.allocated_unix_ns
        tracing.record_span("kv.receive", start_ns, time.time_ns(), attributes, receiving.parent)
