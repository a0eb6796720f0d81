"""The coordinator's HTTP app: routes to endpoints, nothing else."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coordinator.completions import CompletionsEndpoint
from coordinator.dispatcher import Dispatcher
from coordinator.registry import WorkerRegistry
from disagg.model_loader import ModelInfo


def is_ready(registry: WorkerRegistry) -> bool:
    return bool(registry.healthy("prefill")) and bool(registry.healthy("decode"))


def build_app(
    dispatcher: Dispatcher, registry: WorkerRegistry, model: ModelInfo, served_name: str
) -> Starlette:
    async def health_ready(request: Request) -> Response:
        return Response(status_code=200 if is_ready(registry) else 503)

    async def health_live(request: Request) -> Response:
        return Response(status_code=200)

    async def models(request: Request) -> JSONResponse:
        card = {"id": served_name, "object": "model", "created": 0, "owned_by": "disagg"}
        return JSONResponse({"object": "list", "data": [card]})

    async def cluster(request: Request) -> JSONResponse:
        workers = [
            {
                "worker_id": w.worker_id,
                "role": w.info.role,
                "address": w.info.address,
                "load": w.load,
                "free_kv_blocks": w.free_kv_blocks,
                "total_kv_blocks": w.info.total_kv_blocks,
            }
            for w in registry.all()
        ]
        return JSONResponse({"ready": is_ready(registry), "workers": workers})

    completions = CompletionsEndpoint(dispatcher, model, served_name)
    routes = [
        Route("/v1/completions", completions.handle, methods=["POST"]),
        Route("/v1/models", models),
        Route("/v2/health/ready", health_ready),
        Route("/v2/health/live", health_live),
        Route("/cluster", cluster),
    ]
    return Starlette(routes=routes)
