"""The coordinator's HTTP app: OpenAI, KServe V2 REST, metrics and cluster views."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coordinator import kserve_rest, openai_api
from coordinator.auth import ApiKeyMiddleware, ApiKeys
from coordinator.frontend import Frontend
from coordinator.openapi import openapi_document


def build_app(frontend: Frontend, api_keys: ApiKeys | None = None) -> Starlette:
    """Every HTTP route; with API keys, all but health, readiness and metrics need one."""

    async def metrics(request: Request) -> Response:
        body = frontend.metrics.render(
            frontend.registry, frontend.generator.num_running, frontend.admission.num_waiting
        )
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def cluster(request: Request) -> JSONResponse:
        workers = [
            {
                "worker_id": w.worker_id,
                "role": w.info.role,
                "address": w.info.address,
                "healthy": True,
                "draining": w.is_draining,
                "pid": w.info.pid,
                "load": w.load,
                "prompt_tokens_in_flight": w.prompt_tokens_in_flight,
                "free_kv_blocks": w.free_kv_blocks,
                "total_kv_blocks": w.info.total_kv_blocks,
                "num_preemptions": w.num_preemptions,
                "num_kv_frames_rejected": w.num_kv_frames_rejected,
                "cached_kv_blocks": w.num_cached_blocks,
                "prefill_tokens_per_s": w.prefill_tokens_per_s,
                "decode_step_s": w.decode_step_s,
                "num_running_sequences": w.num_running_sequences,
                "prefill_overhead_s": w.prefill_overhead_s,
            }
            for w in frontend.registry.all()
        ]
        return JSONResponse({"ready": frontend.is_ready, "workers": workers})

    async def health(request: Request) -> JSONResponse:
        """The plain health check OpenAI bridges poll."""
        ready = frontend.is_ready
        return JSONResponse(
            {"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503
        )

    document = openapi_document()

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(document)

    routes = [
        *openai_api.routes(frontend),
        *kserve_rest.routes(frontend),
        Route("/metrics", metrics),
        Route("/health", health),
        Route("/cluster", cluster),
        Route("/openapi.json", openapi),
    ]
    keys = api_keys or ApiKeys()
    return Starlette(routes=routes, middleware=[Middleware(ApiKeyMiddleware, keys=keys)])
