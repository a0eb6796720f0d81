"""A decode worker process (or, with `colocated`, a worker that runs both phases)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from decode_worker.colocated import ColocatedPrefillService
from decode_worker.kv_handle import FreeReason, HandleHooks, KVHandle
from decode_worker.kv_handles import HandleTable
from decode_worker.kv_receive_spans import KVReceiveSpans
from decode_worker.kv_socket_dir import make_socket_dir, remove_stale_socket_dirs
from decode_worker.service import DecodeService, SettleWaiters
from disagg import tracing
from disagg.config import DecodeWorkerConfig, EngineConfig, WorkerConfig
from disagg.engine.engine_rates import EngineRates
from disagg.engine.llm_engine import LLMEngine
from disagg.engine.worker_loop import EngineLoop
from disagg.kv.frame_mac import FrameMac
from disagg.kv.transfer import KVReceiver
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.worker_process import (
    apply_threads,
    resolved_id,
    serve_worker,
    watch_parent,
    worker_info,
)


def receiver_bind(config: WorkerConfig, transport: str) -> str:
    """Where the KV receiver binds; for ipc, a fresh socket directory (stale ones of dead
    workers are removed first: a SIGKILLed worker cannot remove its own)."""
    if transport == "ipc":
        remove_stale_socket_dirs()
        return f"ipc://{make_socket_dir()}/kv.sock"
    return f"tcp://{config.host}:0"


LEASE_SWEEP_S = 0.5
"""How often handles whose lease lapsed are looked for (leases last several seconds)."""


class LeaseExpiries(HandleHooks):
    """Counts the KV handles freed because their lease ran out: the coordinator that held
    them stopped renewing (it restarted, or lost the request without a Free). Reported in
    every heartbeat; the coordinator exports it per worker."""

    def __init__(self) -> None:
        self.num_freed = 0

    def on_free(self, handle: KVHandle, reason: str) -> None:
        if reason == FreeReason.LEASE_EXPIRED:
            self.num_freed += 1


async def run(
    engine_config: EngineConfig, config: WorkerConfig, decode: DecodeWorkerConfig
) -> None:
    watch_parent()
    apply_threads(config)
    engine = LLMEngine(engine_config)
    role = "colocated" if decode.colocated else "decode"
    waiters = SettleWaiters()
    lease_expiries = LeaseExpiries()
    hooks: list[HandleHooks] = [waiters, lease_expiries]
    if tracing.setup(f"disagg-{role}-worker") and not decode.colocated:
        hooks.append(KVReceiveSpans())
    worker_id = resolved_id(config, role)
    table = HandleTable(
        engine.block_manager,
        engine.kv_cache,
        decode.ready_timeout_s,
        decode.claim_timeout_s,
        hooks=hooks,
        prefix_cache=engine.scheduler.prefix_cache,
        worker_id=worker_id,
        reservation=decode.kv_reservation,
    )
    receiver = None
    if not decode.colocated:
        bind = receiver_bind(config, decode.kv_transport)
        mac = FrameMac.from_secret(config.cluster_secret)
        receiver = KVReceiver(bind, table, advertise_host=config.advertise_host, mac=mac)
        receiver.start()
    loop = EngineLoop(engine, tick=table.expire)
    loop.start()
    endpoint = receiver.endpoint if receiver else ""
    service = DecodeService(engine, table, loop, waiters, worker_id, endpoint)
    leases = asyncio.create_task(service.expire_leases(LEASE_SWEEP_S))
    rates = EngineRates(engine.stats)  # NOTE: in-place prefills count as its prefill rate

    def add_services(server) -> None:
        pb_grpc.add_DecodeWorkerServicer_to_server(service, server)
        # NOTE: a plain decode worker prefills its own handles too, so a request whose
        # prefill workers all failed still runs (the coordinator's last resort).
        prefill = ColocatedPrefillService(table, loop)
        pb_grpc.add_PrefillWorkerServicer_to_server(prefill, server)

    def status() -> pb.HeartbeatRequest:
        measured = rates.sample()
        return pb.HeartbeatRequest(
            worker_id=worker_id,
            load=service.load(),
            free_kv_blocks=engine.block_manager.num_free_blocks,
            num_preemptions=engine.scheduler.num_preemptions,
            num_kv_frames_rejected=receiver.num_rejected if receiver else 0,
            cached_kv_blocks=engine.block_manager.num_cached_blocks,
            prefill_tokens_per_s=measured.prefill_tokens_per_s,
            decode_step_s=measured.decode_step_s,
            num_running_sequences=len(engine.scheduler.running),
            num_engine_steps=loop.num_busy_steps,
            step_running_s=loop.step_running_s,
            num_handles_lease_expired=lease_expiries.num_freed,
        )

    def renew_leases(reply: pb.HeartbeatResponse) -> None:
        if reply.lease_s > 0:
            table.renew(list(reply.leased_handle_ids), reply.lease_s)

    def on_stop() -> None:
        leases.cancel()
        loop.stop()
        if receiver is not None:
            receiver.stop()
            if bind.startswith("ipc://"):
                shutil.rmtree(Path(bind.removeprefix("ipc://")).parent, ignore_errors=True)

    info = worker_info(engine, role, worker_id)
    await serve_worker(config, info, add_services, status, on_stop, renew_leases)


def main(engine_config: EngineConfig, config: WorkerConfig, decode: DecodeWorkerConfig) -> int:
    asyncio.run(run(engine_config, config, decode))
    return 0
