"""KV handles: blocks a decode worker reserved for one request, and their lifecycle.

    ALLOCATED ─layer─▶ RECEIVING ─all layers + checksum─▶ READY ─claim─▶ DECODING ─▶ FREED
        └── timeout / checksum mismatch / prefill failed / cancelled ─▶ FAILED ─▶ FREED

The table is the KV receiver's sink: arriving layers are written straight into
the handle's blocks. Frames for a handle that is unknown, expired, freed or
already complete are dropped and counted, never written. Until a handle is
claimed its blocks belong to the table, which frees them on any failure or
expiry; once claimed they belong to the decoding sequence, and the engine
frees them when it finishes.

With a prefix cache, Allocate shares the blocks of the prompt's longest cached
run of full blocks (`num_cached_tokens`); only the rest is sent, and a frame
that would write into the shared blocks is dropped. Once READY, the prompt's
full blocks are registered, so they outlive the handle as cached free blocks.

Epochs: a handle id names the worker incarnation that minted it
(`decode-0-e2/<uuid>`). A worker restarted by the supervisor runs under a new
id, so frames, Decodes and Frees meant for its previous life name another
owner: they are refused (`stale_owner`) and counted, never applied to blocks
that now belong to someone else.

Leases: a handle allocated with a lease lives only as long as the coordinator
keeps renewing it (it lists the handles it still holds in every heartbeat
reply). A handle whose coordinator died or forgot the request is freed once
the lease runs out, whatever its state; a live request's handle, renewed every
beat, never lapses. As with an etcd lease, the holder asks for the time to
live when it grants and renews, proves it is alive, and silence releases.

In-place prefill (colocated, or a decode worker with no prefill worker left):
the engine writes the prompt's K/V straight into the handle's blocks. A handle
freed meanwhile (a Free, an expired lease, a timeout) keeps its blocks until the
engine lets go of the sequence, or they could be handed to another request and
overwritten under it (`begin_in_place_prefill` / `end_in_place_prefill`).

Reservation: blocks on demand (the prompt and a lookahead, grown as it decodes),
or `full`, the baseline on demand replaced: prompt + max_tokens from Allocate on.

Three threads touch a table (gRPC handlers, the KV receiver, the engine loop),
so every state change holds one lock; hooks run outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import torch

from decode_worker.kv_handle import (
    FreeReason,
    HandleHooks,
    HandleState,
    KVHandle,
    handle_id_for,
    owner_of,
)
from disagg.config import KVReservation
from disagg.kv.block_manager import BlockManager, reserved_num_tokens
from disagg.kv.cache import PagedKVCache
from disagg.kv.prefix_cache import PrefixCache
from disagg.kv.wire import DoneHeader, LayerHeader, combine, dtype_name

log = logging.getLogger(__name__)


MAX_END_REASONS = 4096


class HandleTable:
    def __init__(
        self,
        block_manager: BlockManager,
        kv_cache: PagedKVCache,
        ready_timeout_s: float = 30.0,
        claim_timeout_s: float = 30.0,
        hooks: list[HandleHooks] | None = None,
        prefix_cache: PrefixCache | None = None,
        worker_id: str = "",
        reservation: KVReservation = "on-demand",
    ) -> None:
        """`worker_id`: this incarnation's id, which every handle id it mints names;
        `reservation`: blocks at Allocate (see the module's docstring)."""
        self.block_manager = block_manager
        self.prefix_cache = prefix_cache
        self.kv_cache = kv_cache
        self.ready_timeout_s = ready_timeout_s
        self.claim_timeout_s = claim_timeout_s
        self.hooks = hooks or []
        self.worker_id = worker_id
        self.reservation = reservation
        self.num_dropped_frames = 0
        self.num_stale_frames = 0
        """Frames for a handle of another incarnation of this worker (also in num_dropped)."""
        self._handles: dict[str, KVHandle] = {}
        self._end_reasons: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def num_pending(self) -> int:
        """Handles not yet claimed by a decoding sequence."""
        with self._lock:
            return sum(h.state != HandleState.DECODING for h in self._handles.values())

    def get(self, handle_id: str) -> KVHandle | None:
        return self._handles.get(handle_id)

    def stale_owner(self, handle_id: str) -> str | None:
        """The other incarnation a handle id belongs to, or None when it is this one's."""
        owner = owner_of(handle_id)
        return None if owner == self.worker_id else owner

    def end_reason(self, handle_id: str) -> str | None:
        """Why a recently ended handle ended, so a late caller hears more than 'unknown'."""
        return self._end_reasons.get(handle_id)

    def allocate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        max_new_tokens: int,
        lease_s: float | None = None,
    ) -> KVHandle:
        """Reserve blocks for the prompt and a short lookahead (raises OutOfBlocksError);
        with `lease_s`, the handle is freed that long after allocation or its last renewal.

        The rest of the sequence's blocks are taken one at a time as it decodes; when
        the pool runs out, the engine preempts the youngest sequence and recomputes its
        KV later. So a request is admitted only while the block manager's watermark
        stays free for that growth. A `full` reservation takes them all now instead.
        """
        num_tokens = reserved_num_tokens(len(prompt_token_ids), max_new_tokens, self.reservation)
        keep_watermark = self.reservation != "full"  # NOTE: a full reservation never grows
        if self.prefix_cache is None:
            num_blocks = self.block_manager.blocks_for(num_tokens)
            block_ids = self.block_manager.allocate(num_blocks, keep_watermark=keep_watermark)
            num_cached = 0
        else:
            block_ids, num_cached = self.prefix_cache.allocate(
                prompt_token_ids, num_tokens, keep_watermark=keep_watermark
            )
        handle = KVHandle(
            handle_id=handle_id_for(self.worker_id),
            request_id=request_id,
            block_ids=block_ids,
            prompt_token_ids=list(prompt_token_ids),
            max_new_tokens=max_new_tokens,
            deadline_s=time.monotonic() + self.ready_timeout_s,
            tokens_per_layer=[0] * self.kv_cache.layout.num_layers,
            num_cached_tokens=num_cached,
            lease_expires_s=time.monotonic() + lease_s if lease_s else float("inf"),
        )
        with self._lock:
            self._handles[handle.handle_id] = handle
        self._call("on_allocate", handle)
        return handle

    # -- the KV receiver's sink ------------------------------------------

    def on_layer(
        self, header: LayerHeader, k: torch.Tensor, v: torch.Tensor, checksum: int
    ) -> None:
        """Write one layer's K/V for a token range into the handle's blocks. k, v: [n, Hkv, D]."""
        if self._is_stale_frame(header.handle_id):
            return
        with self._lock:
            handle = self._handles.get(header.handle_id)
            problem = self._layer_problem(handle, header)
            if problem is not None:
                self.num_dropped_frames += 1
                # NOTE: debug, not warning: a cancelled request's in-flight frames land here
                log.debug("dropped KV frame for handle %s: %s", header.handle_id, problem)
                return
            self.kv_cache.write_range(header.layer, handle.block_ids, header.start, k, v)
            handle.state = HandleState.RECEIVING
            handle.tokens_per_layer[header.layer] += header.end - header.start
            handle.checksum = combine(handle.checksum, checksum)
            handle.nbytes += k.numel() * k.element_size() * 2
        self._call("on_layer_received", handle, header.layer, header.end - header.start)

    def on_done(self, header: DoneHeader) -> None:
        """The sender says every layer is out: READY if all arrived intact, else FAILED."""
        if self._is_stale_frame(header.handle_id):
            return
        with self._lock:
            handle = self._handles.get(header.handle_id)
            if handle is None or handle.state not in (HandleState.ALLOCATED, HandleState.RECEIVING):
                self.num_dropped_frames += 1
                return
            expected = handle.num_tokens_to_receive
            complete = all(n == expected for n in handle.tokens_per_layer)
            if not complete or header.num_tokens != handle.num_prompt_tokens:
                reason = FreeReason.INCOMPLETE
            elif header.checksum != handle.checksum:
                reason = FreeReason.CHECKSUM_MISMATCH
            else:
                self._make_ready(handle)
                reason = None
        if reason is None:
            handle.settled.set()
            self._call("on_ready", handle)
        else:
            self.fail(handle.handle_id, reason)

    def _is_stale_frame(self, handle_id: str) -> bool:
        owner = self.stale_owner(handle_id)
        if owner is None:
            return False
        with self._lock:
            self.num_stale_frames += 1
            self.num_dropped_frames += 1
        log.info("dropped KV frame for %s: it belongs to %s, this is %s",
                 handle_id, owner, self.worker_id)  # fmt: skip
        return True

    def _layer_problem(self, handle: KVHandle | None, header: LayerHeader) -> str | None:
        if handle is None:
            return "unknown, expired or freed handle"
        if handle.state not in (HandleState.ALLOCATED, HandleState.RECEIVING):
            return f"handle is {handle.state.name}"
        layout = self.kv_cache.layout
        if not 0 <= header.layer < layout.num_layers:
            return f"layer {header.layer} out of range"
        if header.end > handle.num_prompt_tokens:
            return f"token range ends at {header.end}, past the prompt"
        if header.start < handle.num_cached_tokens:
            return f"token range starts at {header.start}, inside the shared cached prefix"
        if tuple(header.shape[1:]) != (layout.num_kv_heads, layout.head_dim):
            return f"shape {header.shape} does not match the pool's layout"
        if header.dtype != dtype_name(layout.dtype):
            return f"dtype {header.dtype} is not the pool's {dtype_name(layout.dtype)}"
        return None

    # -- in-place prefill ----------------------------------------------------

    def begin_in_place_prefill(self, handle_id: str) -> KVHandle | None:
        """ALLOCATED -> RECEIVING, the engine about to write the prompt's K/V into the
        blocks; None (nothing changes) when the handle is not here or not fresh."""
        with self._lock:
            handle = self._handles.get(handle_id)
            if handle is None or handle.state != HandleState.ALLOCATED:
                return None
            handle.state = HandleState.RECEIVING
            handle.is_prefilling_in_place = True
            return handle

    def end_in_place_prefill(self, handle: KVHandle) -> None:
        """The engine no longer writes into the handle's blocks (its prompt is computed or
        it left the engine). A handle that ended meanwhile frees its blocks now. Idempotent."""
        with self._lock:
            was_prefilling = handle.is_prefilling_in_place
            handle.is_prefilling_in_place = False
            ended = was_prefilling and handle.handle_id not in self._handles
        if ended:
            self.block_manager.free(handle.block_ids)

    # -- handing over and ending -----------------------------------------

    def mark_ready(self, handle_id: str) -> bool:
        """The KV was computed in place (colocated): no transfer to wait for. False when the
        handle ended meanwhile (freed, expired)."""
        with self._lock:
            handle = self._handles.get(handle_id)
            if handle is None:
                return False
            self._make_ready(handle)
        handle.settled.set()
        self._call("on_ready", handle)
        return True

    def _make_ready(self, handle: KVHandle) -> None:
        """READY, and the prompt's full blocks findable by later prompts. Under the lock:
        the handle (so its blocks) cannot be freed meanwhile."""
        handle.state = HandleState.READY
        handle.deadline_s = time.monotonic() + self.claim_timeout_s
        if self.prefix_cache is not None:
            self.prefix_cache.register(handle.block_ids, handle.prompt_token_ids)

    def claim(self, handle_id: str) -> KVHandle | None:
        """READY -> DECODING: the blocks now belong to the decoding sequence."""
        with self._lock:
            handle = self._handles.get(handle_id)
            if handle is None or handle.state != HandleState.READY:
                return None
            handle.state = HandleState.DECODING
            return handle

    def fail(self, handle_id: str, reason: str) -> bool:
        """FAILED, then FREED: blocks back to the pool, waiters woken."""
        return self._end(handle_id, reason, failed=True)

    def release(self, handle_id: str, reason: str = FreeReason.FINISHED) -> bool:
        """FREED. Blocks go back to the pool unless a decoding sequence owns them."""
        return self._end(handle_id, reason, failed=False)

    def _end(self, handle_id: str, reason: str, failed: bool) -> bool:
        with self._lock:
            handle = self._handles.pop(handle_id, None)
            if handle is None:
                return False
            # NOTE: blocks the engine is still prefilling into are freed when it is done
            owns_blocks = handle.state != HandleState.DECODING
            owns_blocks = owns_blocks and not handle.is_prefilling_in_place
            handle.state = HandleState.FAILED if failed else HandleState.FREED
            handle.free_reason = reason
            self._end_reasons[handle_id] = reason
            while len(self._end_reasons) > MAX_END_REASONS:
                self._end_reasons.popitem(last=False)
        if owns_blocks:
            self.block_manager.free(handle.block_ids)
        handle.state = HandleState.FREED
        handle.settled.set()
        self._call("on_free", handle, reason)
        return True

    def expire(self, now_s: float | None = None) -> list[str]:
        """Free every handle not READY, or READY but unclaimed, past its deadline."""
        now_s = time.monotonic() if now_s is None else now_s
        with self._lock:
            expired = [
                h.handle_id
                for h in self._handles.values()
                if h.state != HandleState.DECODING and h.deadline_s <= now_s
            ]
        for handle_id in expired:
            self.fail(handle_id, FreeReason.EXPIRED)
        return expired

    # -- leases ------------------------------------------------------------

    def renew(self, handle_ids: list[str], lease_s: float, now_s: float | None = None) -> int:
        """Extend the leases of the handles named (the coordinator still holds them) to
        `lease_s` from now; ids unknown here, of another incarnation, or of handles without
        a lease are ignored. Returns how many were renewed.

        NOTE: a renewal also restarts the wait for the KV (or for the Decode): the holder
        still wants the handle, so a prefill queued behind others under load is not cut
        off by the fixed ready timeout; the lease is what frees an abandoned handle.
        """
        now_s = time.monotonic() if now_s is None else now_s
        num_renewed = 0
        with self._lock:
            for handle_id in handle_ids:
                handle = self._handles.get(handle_id)
                if handle is not None and handle.lease_expires_s != float("inf"):
                    handle.lease_expires_s = max(handle.lease_expires_s, now_s + lease_s)
                    handle.deadline_s = max(handle.deadline_s, now_s + self._wait_s(handle))
                    num_renewed += 1
        return num_renewed

    def _wait_s(self, handle: KVHandle) -> float:
        """How long a handle in its state may wait for its next step."""
        is_ready = handle.state == HandleState.READY
        return self.claim_timeout_s if is_ready else self.ready_timeout_s

    def lapsed(self, now_s: float | None = None) -> list[str]:
        """Handles, in any state, whose lease ran out: their holder is gone."""
        now_s = time.monotonic() if now_s is None else now_s
        with self._lock:
            return [h.handle_id for h in self._handles.values() if h.lease_expires_s <= now_s]

    def _call(self, hook: str, *args: object) -> None:
        for hooks in self.hooks:
            try:
                getattr(hooks, hook)(*args)
            except Exception:  # a broken hook must not break the lifecycle
                log.exception("handle hook %s failed", hook)
