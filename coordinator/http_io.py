"""HTTP plumbing the OpenAI and KServe REST front doors share: bounded bodies, JSON objects,
server-sent events, and noticing that the client left."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from coordinator.errors import MAX_BODY_BYTES, TooLargeError
from coordinator.request_values import check_texts
from disagg.errors import InvalidRequestError

CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a client that left; nobody receives it, but the access log shows it."""


async def read_body(request: Request) -> bytes:
    """The raw body, refused (413) past MAX_BODY_BYTES whatever Content-Length claims."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise TooLargeError(f"request body over the {MAX_BODY_BYTES}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise TooLargeError(f"request body over the {MAX_BODY_BYTES}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict:
    """The body as a dict whose every string is valid Unicode: JSON may spell a lone UTF-16
    surrogate ("\\ud83d"), which no tokenizer and no JSON response can carry, so it is a 400
    naming the top-level field it sits in."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise InvalidRequestError(f"body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        for name, value in body.items():
            check_texts("body", name)
            check_texts(name, value)
    except RecursionError:
        raise InvalidRequestError("the request body is nested too deeply") from None
    return body


def sse(payload: dict) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def until_disconnected(request: Request) -> None:
    # NOTE: the body is already read, so the next ASGI message is the disconnect (servers
    # send it at the latest once the response is complete).
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends, so a gone client frees KV now."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]
