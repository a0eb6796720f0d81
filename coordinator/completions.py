"""POST /v1/completions: OpenAI's text completion, non-streaming and streaming (SSE)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from coordinator.admission import OverloadedError
from coordinator.dispatcher import Dispatcher, RequestTrace, WorkerError
from disagg.errors import InvalidRequestError, OutOfBlocksError
from disagg.model_loader import ModelInfo
from disagg.sampling_params import SamplingParams
from disagg.tokenizer import TextStream, encode_prompt

log = logging.getLogger(__name__)


@dataclass
class Completion:
    text: str
    finish_reason: str
    num_completion_tokens: int


def openai_error(
    status: int, message: str, kind: str, param: str | None = None, headers=None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(error: Exception) -> JSONResponse:
    if isinstance(error, InvalidRequestError):
        return openai_error(400, str(error), "invalid_request_error", error.param)
    if isinstance(error, OverloadedError):
        headers = {"Retry-After": str(error.retry_after_s)}
        return openai_error(503, str(error), "overloaded_error", headers=headers)
    if isinstance(error, OutOfBlocksError):
        return openai_error(400, str(error), "invalid_request_error", "max_tokens")
    if isinstance(error, WorkerError):
        return openai_error(503, str(error), "service_unavailable", headers={"Retry-After": "1"})
    log.exception("internal error", exc_info=error)
    return openai_error(500, f"internal error: {error}", "internal_error")


def sampling_params(body: dict) -> SamplingParams:
    stop = body.get("stop") or ()
    try:
        return SamplingParams(
            max_tokens=int(body.get("max_tokens", 16)),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            top_k=int(body.get("top_k", 0) or 0),
            seed=body.get("seed"),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            ignore_eos=bool(body.get("ignore_eos", False)),
            min_tokens=int(body.get("min_tokens", 0)),
        )
    except (TypeError, ValueError) as error:
        if isinstance(error, InvalidRequestError):
            raise
        raise InvalidRequestError(f"malformed sampling parameter: {error}") from error


class CompletionsEndpoint:
    def __init__(self, dispatcher: Dispatcher, model: ModelInfo, served_name: str) -> None:
        self.dispatcher = dispatcher
        self.model = model
        self.served_name = served_name

    async def handle(self, request: Request) -> Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise InvalidRequestError("request body must be a JSON object")
            prompt_ids, params = self._parse(body)
        except json.JSONDecodeError as error:
            return openai_error(400, f"body is not valid JSON: {error}", "invalid_request_error")
        except InvalidRequestError as error:
            return error_response(error)
        except LookupError as error:
            return openai_error(404, str(error), "not_found_error", "model")
        trace = RequestTrace(f"cmpl-{uuid.uuid4().hex}")
        if body.get("stream"):
            return StreamingResponse(
                self._stream(prompt_ids, params, trace), media_type="text/event-stream"
            )
        try:
            completion = await self._complete(prompt_ids, params, trace)
        except Exception as error:
            return error_response(error)
        return JSONResponse(self._body(trace, completion, len(prompt_ids)))

    def _parse(self, body: dict) -> tuple[list[int], SamplingParams]:
        model = body.get("model", self.served_name)
        if model not in (self.served_name, self.model.name):
            raise LookupError(f"model {model!r} not found; this server serves {self.served_name!r}")
        prompt_ids = self._prompt_ids(body.get("prompt"))
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        params = sampling_params(body)
        if len(prompt_ids) + params.max_tokens > self.model.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context of {self.model.max_model_len} tokens",
                "max_tokens",
            )
        return prompt_ids, params

    def _prompt_ids(self, prompt: object) -> list[int]:
        """A string, or (as OpenAI allows) the prompt's token ids."""
        if isinstance(prompt, str):
            return encode_prompt(self.model.tokenizer, prompt)
        vocab_size = len(self.model.tokenizer)
        if isinstance(prompt, list) and all(type(t) is int and 0 <= t < vocab_size for t in prompt):
            return prompt
        raise InvalidRequestError(
            f"prompt must be a string or a list of token ids in [0, {vocab_size})", "prompt"
        )

    async def _pieces(
        self, prompt_ids: list[int], params: SamplingParams, trace: RequestTrace
    ) -> AsyncIterator[tuple[str, str | None, int]]:
        """(text delta, finish reason or None, tokens so far), stop strings applied."""
        text = TextStream(self.model.tokenizer, stop=params.stop)
        num_tokens = 0
        tokens = self.dispatcher.generate(prompt_ids, params, trace)
        try:
            async for update in tokens:
                num_tokens += 1
                delta, stopped = text.push([update.token_id])
                if stopped:
                    yield delta, "stop", num_tokens
                    return
                if update.finish_reason:
                    yield delta + text.finish(), update.finish_reason, num_tokens
                    return
                if delta:
                    yield delta, None, num_tokens
        finally:
            await tokens.aclose()  # a stop string or a gone client frees the KV now

    async def _complete(
        self, prompt_ids: list[int], params: SamplingParams, trace: RequestTrace
    ) -> Completion:
        parts, reason, num_tokens = [], "length", 0
        async for delta, finish, so_far in self._pieces(prompt_ids, params, trace):
            parts.append(delta)
            reason, num_tokens = finish or reason, so_far
        return Completion("".join(parts), reason, num_tokens)

    async def _stream(
        self, prompt_ids: list[int], params: SamplingParams, trace: RequestTrace
    ) -> AsyncIterator[str]:
        try:
            async for delta, finish, count in self._pieces(prompt_ids, params, trace):
                chunk = Completion(delta, finish, count)
                body = self._body(trace, chunk, len(prompt_ids), usage=finish is not None)
                yield f"data: {json.dumps(body)}\n\n"
        except Exception as error:
            yield f"data: {error_response(error).body.decode()}\n\n"
        yield "data: [DONE]\n\n"

    def _body(
        self, trace: RequestTrace, completion: Completion, num_prompt: int, usage: bool = True
    ) -> dict:
        body = {
            "id": trace.request_id,
            "object": "text_completion",
            "created": int(trace.arrival_s),
            "model": self.served_name,
            "choices": [
                {
                    "index": 0,
                    "text": completion.text,
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                }
            ],
        }
        if usage:
            body["usage"] = {
                "prompt_tokens": num_prompt,
                "completion_tokens": completion.num_completion_tokens,
                "total_tokens": num_prompt + completion.num_completion_tokens,
            }
            body["metrics"] = timings(trace)
        return body


def timings(trace: RequestTrace) -> dict:
    """Per-response timings under a key OpenAI clients ignore."""
    return {
        "ttft_s": trace.ttft_s,
        "mean_tbt_s": trace.mean_tbt_s,
        "queue_s": trace.queue_s,
        "prefill_s": trace.prefill_s,
        "kv_transfer_s": trace.kv_transfer_s,
        "kv_bytes": trace.kv_bytes,
        "prefill_worker": trace.prefill_worker,
        "decode_worker": trace.decode_worker,
        "e2e_s": time.time() - trace.arrival_s,
    }
