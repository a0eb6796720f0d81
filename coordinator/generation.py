"""Prompt ids in, text out: what every API (OpenAI, KServe REST, KServe gRPC) shares.

Each protocol only parses its request into a `GenerationRequest` and shapes
`TextChunk`s into its own responses; detokenization, stop strings, the
context-length check, metrics and the log line live here once. Running a request's
generations (tasks, fan-out, disconnects) is `generation_runner`'s.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from coordinator.cluster_scheduler import ClusterScheduler
from coordinator.errors import DeadlineExceededError
from coordinator.metrics import Metrics
from coordinator.quotas import TenantQuotas
from coordinator.request_timing import RequestTrace
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.sequence import TokenLogprob
from disagg.errors import InvalidRequestError
from disagg.model.loader import ModelInfo
from disagg.model.tokenizer import TextStream

DEFAULT_TENANT = "default"


def resolve_tenant(*candidates: str | None) -> str:
    """The first tenant a request names, in the protocol's order of precedence; else default."""
    return next((c for c in candidates if c), DEFAULT_TENANT)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    tenant: str = DEFAULT_TENANT
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    deadline_s: float | None = None
    """time.monotonic() by which the client wants its answer (coordinator/client_deadline.py)."""
    priority: int = 0
    """Order among the tenant's own requests waiting for KV room, lower first (vLLM's)."""


@dataclass
class TextChunk:
    """New text and the tokens behind it; the last chunk carries the finish reason."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    num_completion_tokens: int
    """Tokens generated so far, this chunk included."""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str
    num_prompt_tokens: int
    trace: RequestTrace

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids)


class Generator:
    def __init__(
        self,
        scheduler: ClusterScheduler,
        model: ModelInfo,
        metrics: Metrics,
        quotas: TenantQuotas | None = None,
    ) -> None:
        """quotas: where each request's prompt and generated tokens are charged, as they
        happen, against its tenant's tokens per minute."""
        self.scheduler = scheduler
        self.model = model
        self.metrics = metrics
        self.quotas = quotas or TenantQuotas()
        self.num_running = 0

    def check(self, request: GenerationRequest) -> None:
        """Errors a client can fix, raised before anything is scheduled."""
        if not request.prompt_ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        limit = self.model.max_model_len
        if len(request.prompt_ids) + request.params.max_tokens > limit:
            raise InvalidRequestError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                f"({request.params.max_tokens}) exceeds the model's context of {limit} tokens",
                "max_tokens",
            )
        self.scheduler.check_fits(request.prompt_ids, request.params)

    async def stream(
        self, request: GenerationRequest, trace: RequestTrace
    ) -> AsyncIterator[TextChunk]:
        """Text as it is generated. Closing the iterator early cancels the request.

        The request must have passed `check` (the generation runner checks every request
        of a batch before any starts)."""
        text = TextStream(self.model.tokenizer, stop=request.params.stop)
        tokens = self.scheduler.generate(request.prompt_ids, request.params, trace)
        pending_ids: list[int] = []
        pending_logprobs: list[TokenLogprob] = []
        count, status = 0, "error"
        self.num_running += 1
        self.quotas.charge_tokens(request.tenant, len(request.prompt_ids))
        try:
            async for update in tokens:
                count += 1
                self.quotas.charge_tokens(request.tenant, 1)
                pending_ids.append(update.token_id)
                if update.logprob is not None:
                    pending_logprobs.append(update.logprob)
                delta, stopped = text.push([update.token_id])
                finish = "stop" if stopped else update.finish_reason
                if finish and not stopped:
                    delta += text.finish()
                if delta or finish:
                    yield TextChunk(delta, pending_ids, pending_logprobs, finish, count)
                    pending_ids, pending_logprobs = [], []
                if finish:
                    status = "finished"
                    return
            status = "finished"
        except (GeneratorExit, asyncio.CancelledError, DeadlineExceededError):
            # NOTE: a passed client deadline is the client giving up, as a cancel is; which
            # of the two the server sees first is a race, and both count the same.
            status = "cancelled"
            raise
        finally:
            self.num_running -= 1
            e2e_s = time.time() - trace.arrival_s
            self.metrics.record(
                trace, request.tenant, status, len(request.prompt_ids), count, e2e_s
            )
            await tokens.aclose()  # a stop string or a gone client frees the KV now

    async def complete(self, request: GenerationRequest, trace: RequestTrace) -> Completion:
        parts, ids, logprobs, reason = [], [], [], "length"
        async for chunk in self.stream(request, trace):
            parts.append(chunk.text)
            ids += chunk.token_ids
            logprobs += chunk.logprobs
            reason = chunk.finish_reason or reason
        return Completion("".join(parts), ids, logprobs, reason, len(request.prompt_ids), trace)
