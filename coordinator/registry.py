"""Which workers exist and how loaded they are: fed by Register and Heartbeat.

A worker that misses heartbeats for `heartbeat_timeout_s`, or that a call found
unreachable (gRPC UNAVAILABLE), is taken out of rotation at once (and forgotten; it
registers again if it comes back), and `on_lost` listeners hear of it, so the
requests in flight there move elsewhere instead of waiting on a dead worker.

The registry is the only writer of worker records. Between heartbeats it keeps
the load estimate current itself: blocks the coordinator allocated since the last
report count as used, blocks given back since count as free again (and wake the
admission line at once instead of a heartbeat later); each heartbeat replaces
the estimate with the worker's own numbers.

It also keeps which KV handles the coordinator holds on each decode worker, and
every heartbeat reply lists them: that renews their leases. A handle the
coordinator let go of (or never heard of, after a restart) is freed by its worker
once the lease runs out. Every call on a worker's channel names the worker id it
was opened for, so a restarted incarnation refuses calls meant for the dead one
(disagg/rpc/worker_epoch.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.cluster_secret import client_interceptors
from disagg.rpc.worker_epoch import addressed_to

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0
"""Default keepalive ping interval on worker channels, in seconds."""

CLOSE_GRACE_S = 10.0
"""How long the channel to a worker out of rotation stays open for the calls leaving it."""

LEASE_HEARTBEATS = 3
"""A handle's lease spans at least this many heartbeat intervals (each renews it)."""

ROLES_FOR = {"prefill": ("prefill", "colocated"), "decode": ("decode", "colocated")}


def keepalive_options(interval_s: float) -> list[tuple[str, int]]:
    """gRPC channel options that ping an idle or busy connection every `interval_s` and fail
    its calls when a ping goes unanswered for as long (a stopped or unplugged worker)."""
    interval_ms = max(1, int(interval_s * 1000))
    return [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", interval_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


@dataclass
class WorkerRecord:
    info: pb.WorkerInfo
    channel: grpc.aio.Channel
    last_seen_s: float
    free_kv_blocks: int
    load: int = 0
    reserved_blocks: int = 0
    """Blocks this coordinator allocated on the worker since its last heartbeat, less those
    given back since (so it may be negative)."""
    prompt_tokens_in_flight: int = 0
    """Prompt tokens this coordinator has sent the worker and not yet had back."""
    num_preemptions: int = 0
    num_cached_blocks: int = 0
    """KV blocks the worker holds findable by prefix hash (as last reported)."""
    """Sequences the worker preempted for KV blocks over its life (as last reported)."""
    num_kv_frames_rejected: int = 0
    """KV messages the worker dropped for a missing or wrong MAC (forged or altered), ever."""
    num_engine_steps: int = 0
    """Engine steps that computed something, ever (as last reported): its progress counter."""
    step_running_s: float = 0.0
    """Seconds the engine had been inside its current step (as last reported; 0: between)."""
    progress_s: float = 0.0
    """time.monotonic() of the heartbeat that last showed `num_engine_steps` grown or a step
    running (else of the registration): when the engine was last seen at work
    (coordinator/stall_watch.py)."""
    num_handles_lease_expired: int = 0
    """KV handles the worker freed because their lease ran out, ever (as last reported)."""
    is_draining: bool = False
    """The worker is finishing its sequences before it exits: place nothing new on it."""
    held_handle_ids: set[str] = field(default_factory=set)
    """KV handles a request of this coordinator holds there: each heartbeat renews them."""
    prefill_tokens_per_s: float = 0.0
    """Prompt tokens per second of its prefill forwards, a moving average (as last reported;
    0.0: none measured yet)."""
    decode_step_s: float = 0.0
    """Seconds per decode step of its running batch, a moving average (as last reported)."""
    num_running_sequences: int = 0
    """Sequences in its decode batch (as last reported)."""
    prefill_overhead_s: float = 0.0
    """A prefill here, measured by this coordinator: the Prefill call's seconds beyond the
    worker's queue and forward (the hop, the KV transfer's tail), a moving average."""
    decode: pb_grpc.DecodeWorkerStub = field(init=False)
    prefill: pb_grpc.PrefillWorkerStub = field(init=False)

    def __post_init__(self) -> None:
        self.decode = pb_grpc.DecodeWorkerStub(self.channel)
        self.prefill = pb_grpc.PrefillWorkerStub(self.channel)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def free_blocks_estimate(self) -> int:
        return min(self.info.total_kv_blocks, self.free_kv_blocks - self.reserved_blocks)


class WorkerRegistry:
    def __init__(
        self,
        heartbeat_interval_s: float = 1.0,
        heartbeat_timeout_s: float = 3.0,
        cluster_secret: str = "",
    ) -> None:
        """cluster_secret: sent with every call to a worker, whose services refuse calls
        without it."""
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._workers: dict[str, WorkerRecord] = {}
        self._listeners: list[Callable[[], None]] = []
        self._lost_listeners: list[Callable[[str], None]] = []
        self.channel_options: list[tuple[str, int]] = keepalive_options(KEEPALIVE_S)
        """Options of every channel to a worker (keepalive: a silent peer is noticed)."""
        self._channel_interceptors = client_interceptors(cluster_secret)
        self.lease_s = 0.0
        """Time to live of the KV handles held, from allocation and each renewal; 0: none."""

    def set_handle_lease(self, lease_s: float) -> None:
        """Lease handles for `lease_s`, stretched to 3 heartbeat intervals so that one late
        beat cannot free a live request's KV; 0 turns leases off."""
        min_lease_s = LEASE_HEARTBEATS * self.heartbeat_interval_s
        self.lease_s = max(lease_s, min_lease_s) if lease_s > 0 else 0.0

    def on_lost(self, listener: Callable[[str], None]) -> None:
        """Called with a worker's id when it leaves the rotation for missed heartbeats or
        for being unreachable (not when it re-registers)."""
        self._lost_listeners.append(listener)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Called whenever capacity may have grown (a worker joined or reported free blocks)."""
        self._listeners.append(listener)

    def register(self, info: pb.WorkerInfo) -> None:
        old = self._workers.pop(info.worker_id, None)
        if old is not None:
            asyncio.ensure_future(old.channel.close())
        channel = grpc.aio.insecure_channel(
            info.address,
            options=self.channel_options,
            interceptors=[*self._channel_interceptors, *addressed_to(info.worker_id)],
        )
        now_s = time.monotonic()
        self._workers[info.worker_id] = WorkerRecord(
            info, channel, now_s, free_kv_blocks=info.total_kv_blocks, progress_s=now_s
        )
        log.info("worker %s (%s) registered at %s", info.worker_id, info.role, info.address)
        self._changed()

    def heartbeat(self, request: pb.HeartbeatRequest) -> bool:
        """Take the worker's report; False if the worker is not in the rotation."""
        record = self._workers.get(request.worker_id)
        if record is None:
            return False
        record.last_seen_s = time.monotonic()
        # NOTE: a step that ran, or one running now (however long: the stall watch's hard
        # bound still applies), is progress
        if request.num_engine_steps != record.num_engine_steps or request.step_running_s > 0:
            record.progress_s = record.last_seen_s
        record.num_engine_steps = request.num_engine_steps
        record.step_running_s = request.step_running_s
        record.num_handles_lease_expired = request.num_handles_lease_expired
        record.free_kv_blocks = request.free_kv_blocks
        record.reserved_blocks = 0
        record.load = request.load
        record.is_draining = request.draining
        record.num_preemptions = request.num_preemptions
        record.num_kv_frames_rejected = request.num_kv_frames_rejected
        record.num_cached_blocks = request.cached_kv_blocks
        record.prefill_tokens_per_s = request.prefill_tokens_per_s
        record.decode_step_s = request.decode_step_s
        record.num_running_sequences = request.num_running_sequences
        self._changed()
        return True

    def heartbeat_reply(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        """The answer to a heartbeat: known or not, and the handles whose leases it renews."""
        if not self.heartbeat(request):
            return pb.HeartbeatResponse(known=False)
        held = self._workers[request.worker_id].held_handle_ids
        return pb.HeartbeatResponse(known=True, leased_handle_ids=held, lease_s=self.lease_s)

    def hold_handle(self, worker: WorkerRecord, handle_id: str) -> None:
        """A request holds this handle: keep renewing its lease."""
        worker.held_handle_ids.add(handle_id)

    def let_go_handle(self, worker: WorkerRecord, handle_id: str) -> None:
        """The request is done with the handle (freed or freeing): stop renewing it."""
        worker.held_handle_ids.discard(handle_id)

    def blocks_for(self, worker: WorkerRecord, num_tokens: int) -> int:
        return -(-num_tokens // max(1, worker.info.block_size))

    def reserve_blocks(self, worker: WorkerRecord, num_tokens: int) -> int:
        """Count room for `num_tokens` as used on `worker` until its next heartbeat."""
        num_blocks = self.blocks_for(worker, num_tokens)
        worker.reserved_blocks += num_blocks
        return num_blocks

    def unreserve_blocks(self, worker: WorkerRecord, num_blocks: int) -> None:
        """An allocation that did not happen."""
        worker.reserved_blocks -= num_blocks

    def release_blocks(self, worker: WorkerRecord, num_blocks: int) -> None:
        """The worker has `num_blocks` back (a request finished or was freed): room now."""
        worker.reserved_blocks -= num_blocks
        self._changed()

    def start_prefill(self, worker: WorkerRecord, num_prompt_tokens: int) -> None:
        worker.prompt_tokens_in_flight += num_prompt_tokens

    def end_prefill(self, worker: WorkerRecord, num_prompt_tokens: int) -> None:
        worker.prompt_tokens_in_flight -= num_prompt_tokens

    def healthy(self, role: str) -> list[WorkerRecord]:
        """Workers that can take new work in `role` ("prefill" or "decode"): not draining."""
        return [
            w
            for w in self._workers.values()
            if w.info.role in ROLES_FOR[role] and not w.is_draining
        ]

    def all(self) -> list[WorkerRecord]:
        return list(self._workers.values())

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    def sweep(self, now_s: float | None = None) -> list[str]:
        """Forget workers whose heartbeats stopped."""
        now_s = time.monotonic() if now_s is None else now_s
        stale = [
            w.worker_id
            for w in self._workers.values()
            if now_s - w.last_seen_s > self.heartbeat_timeout_s
        ]
        for worker_id in stale:
            self.drop(worker_id, "missed its heartbeats")
        return stale

    def drop(self, worker_id: str, why: str) -> bool:
        """Take a worker out of rotation now; False if it was not in it."""
        record = self._workers.pop(worker_id, None)
        if record is None:
            return False
        # NOTE: closed a while later, so that the Frees and cancellations of the requests
        # leaving it still go out (a stopped worker that resumes gets them).
        close = lambda: asyncio.ensure_future(record.channel.close())  # noqa: E731
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, close)
        log.warning("worker %s %s; out of rotation", worker_id, why)
        for listener in self._lost_listeners:
            listener(worker_id)
        return True

    def drop_if_unreachable(self, worker: WorkerRecord, error: grpc.aio.AioRpcError) -> None:
        """UNAVAILABLE: the worker is gone or cut off; out of rotation now, not a sweep later."""
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            self.drop(worker.worker_id, f"is unreachable ({error.details()})")

    async def run_sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s / 2)
            self.sweep()

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()


class RegistryService(pb_grpc.RegistryServicer):
    def __init__(self, registry: WorkerRegistry, model: str) -> None:
        self.registry = registry
        self.model = model

    async def Register(
        self, request: pb.WorkerInfo, context: grpc.aio.ServicerContext
    ) -> pb.RegisterResponse:
        if request.role not in ("prefill", "decode", "colocated"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown role {request.role!r}")
        if not request.address or not request.worker_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "worker_id and address are required"
            )
        if request.model != self.model:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker serves {request.model!r}, this cluster serves {self.model!r}",
            )
        self.registry.register(request)
        return pb.RegisterResponse(heartbeat_interval_s=self.registry.heartbeat_interval_s)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        return self.registry.heartbeat_reply(request)
