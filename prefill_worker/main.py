"""A prefill worker process."""

from __future__ import annotations

import asyncio

from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.worker_loop import EngineLoop
from disagg.kv.transfer import KVSender
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.worker_process import WorkerConfig, apply_threads, serve_worker, watch_parent
from prefill_worker.service import PrefillService


async def run(engine_config: EngineConfig, config: WorkerConfig) -> None:
    watch_parent()
    apply_threads(config)
    engine = LLMEngine(engine_config)
    sender = KVSender()
    loop = EngineLoop(engine)
    loop.start()
    service = PrefillService(engine, loop, sender)
    worker_id = config.resolved_id("prefill")

    def status() -> pb.HeartbeatRequest:
        return pb.HeartbeatRequest(
            worker_id=worker_id,
            load=loop.num_sequences,
            free_kv_blocks=engine.block_manager.num_free_blocks,
            outstanding_prompt_tokens=service.outstanding_prompt_tokens,
        )

    def on_stop() -> None:
        loop.stop()
        sender.close()

    info = pb.WorkerInfo(
        worker_id=worker_id,
        role="prefill",
        model=engine.loaded.name,
        capacity=engine_config.max_num_seqs,
        total_kv_blocks=engine.block_manager.num_blocks,
        block_size=engine_config.block_size,
    )
    await serve_worker(
        config,
        info,
        lambda server: pb_grpc.add_PrefillWorkerServicer_to_server(service, server),
        status,
        on_stop,
    )


def main(engine_config: EngineConfig, config: WorkerConfig) -> int:
    asyncio.run(run(engine_config, config))
    return 0
