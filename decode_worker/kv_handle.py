"""One KV handle: its id, its lifecycle states, the record a decode worker keeps, and the
hooks called at each transition. The table that owns handles is kv_handles.py."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from enum import IntEnum

from disagg.engine.sequence import Sequence

OWNER_SEPARATOR = "/"
"""Between the minting worker's id and the random part of a handle id."""


def handle_id_for(worker_id: str) -> str:
    """A fresh handle id naming the worker incarnation that owns it."""
    return f"{worker_id}{OWNER_SEPARATOR}{uuid.uuid4().hex}" if worker_id else uuid.uuid4().hex


def owner_of(handle_id: str) -> str:
    """The worker id a handle id names ('' for an id without one)."""
    return handle_id.rpartition(OWNER_SEPARATOR)[0]


class HandleState(IntEnum):
    ALLOCATED = 0
    RECEIVING = 1
    READY = 2
    DECODING = 3
    FAILED = 4
    FREED = 5


class FreeReason:
    FINISHED = "finished"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    INCOMPLETE = "incomplete"
    PREFILL_FAILED = "prefill_failed"
    ERROR = "error"
    LEASE_EXPIRED = "lease_expired"


@dataclass
class KVHandle:
    handle_id: str
    request_id: str
    block_ids: list[int]
    prompt_token_ids: list[int]
    max_new_tokens: int
    deadline_s: float
    """time.monotonic() by which the handle must be READY (then: claimed), or it expires."""
    lease_expires_s: float = float("inf")
    """time.monotonic() after which the handle is freed unless its coordinator renewed it."""
    state: HandleState = HandleState.ALLOCATED
    tokens_per_layer: list[int] = field(default_factory=list)
    checksum: int = 0
    nbytes: int = 0
    free_reason: str | None = None
    settled: threading.Event = field(default_factory=threading.Event)
    """Set once the handle is READY, or has failed: what Decode waits on."""
    num_cached_tokens: int = 0
    """Leading prompt tokens whose K/V were already here (shared cached blocks): not sent."""
    sequence: Sequence | None = None
    """The request as Allocate gave it (prompt, sampling parameters), WAITING_FOR_KV until
    Decode claims the handle and adds its first token."""
    is_prefilling_in_place: bool = False
    """This worker's engine is computing the prompt into the blocks: if the handle ends
    meanwhile, its blocks are freed only once the engine is done with them."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens_to_receive(self) -> int:
        """Tokens each layer must bring: the prompt past its cached prefix."""
        return self.num_prompt_tokens - self.num_cached_tokens


class HandleHooks:
    """Called at each lifecycle transition; metrics and tests override what they need."""

    def on_allocate(self, handle: KVHandle) -> None: ...

    def on_layer_received(self, handle: KVHandle, layer: int, num_tokens: int) -> None: ...

    def on_ready(self, handle: KVHandle) -> None: ...

    def on_free(self, handle: KVHandle, reason: str) -> None: ...
