"""A prefill worker process."""

from __future__ import annotations

import asyncio
import dataclasses

from disagg.config import EngineConfig, WorkerConfig
from disagg.engine.engine_rates import EngineRates
from disagg.engine.llm_engine import LLMEngine
from disagg.engine.worker_loop import EngineLoop
from disagg.kv.frame_mac import FrameMac
from disagg.kv.transfer import KVSender
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.worker_process import (
    apply_threads,
    resolved_id,
    serve_worker,
    watch_parent,
    worker_info,
)
from prefill_worker.send_completions import SendCompletions
from prefill_worker.service import PrefillService


async def run(engine_config: EngineConfig, config: WorkerConfig) -> None:
    watch_parent()
    apply_threads(config)
    # NOTE: a prefill worker never decodes, so --compile would only cost start-up time.
    engine = LLMEngine(dataclasses.replace(engine_config, compile=False))
    sender = KVSender(mac=FrameMac.from_secret(config.cluster_secret))
    completions = SendCompletions().start()
    loop = EngineLoop(engine)
    loop.start()
    service = PrefillService(loop, sender, completions)
    worker_id = resolved_id(config, "prefill")
    rates = EngineRates(engine.stats)

    def status() -> pb.HeartbeatRequest:
        return pb.HeartbeatRequest(
            worker_id=worker_id,
            load=loop.num_sequences + completions.num_pending,
            free_kv_blocks=engine.block_manager.num_free_blocks,
            cached_kv_blocks=engine.block_manager.num_cached_blocks,
            prefill_tokens_per_s=rates.sample().prefill_tokens_per_s,
            num_engine_steps=loop.num_busy_steps,
            step_running_s=loop.step_running_s,
        )

    def on_stop() -> None:
        loop.stop()
        completions.stop()
        sender.close()

    await serve_worker(
        config,
        worker_info(engine, "prefill", worker_id),
        lambda server: pb_grpc.add_PrefillWorkerServicer_to_server(service, server),
        status,
        on_stop,
    )


def main(engine_config: EngineConfig, config: WorkerConfig) -> int:
    asyncio.run(run(engine_config, config))
    return 0
