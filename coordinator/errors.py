"""Every error the coordinator raises, and which HTTP status each earns; each protocol renders
it in its own shape (OpenAI's error object, KServe's {"error"}, a gRPC status)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from disagg.errors import DisaggError, InvalidRequestError, OutOfBlocksError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20


class NotFoundError(LookupError):
    """An unknown model or version (404)."""

    def __init__(self, message: str, param: str | None = "model") -> None:
        super().__init__(message)
        self.param = param


class TooLargeError(ValueError):
    """A request body over the limit (413)."""


class OverloadedError(DisaggError):
    """No room now and the wait queue is full (or the wait timed out): retry later (503)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QuotaExceededError(DisaggError):
    """The tenant is over its quota (concurrency or rate): retry later (429), unlike overload."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class WorkerError(DisaggError):
    """A worker failed or vanished while serving the request (503)."""


class DeadlineExceededError(DisaggError):
    """The client's deadline passed before the request finished; its work was stopped (504)."""


class ClientGoneError(Exception):
    """The client disconnected while its request ran (499 in the access log)."""


@dataclass(frozen=True)
class HttpError:
    status: int
    message: str
    kind: str
    param: str | None = None
    retry_after_s: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


def classify(error: Exception) -> HttpError:
    if isinstance(error, InvalidRequestError):
        return HttpError(400, str(error), "invalid_request_error", error.param)
    if isinstance(error, OutOfBlocksError):
        return HttpError(400, str(error), "invalid_request_error", "max_tokens")
    if isinstance(error, NotFoundError):
        return HttpError(404, str(error), "not_found_error", error.param)
    if isinstance(error, TooLargeError):
        return HttpError(413, str(error), "invalid_request_error")
    if isinstance(error, QuotaExceededError):
        return HttpError(429, str(error), "rate_limit_exceeded", retry_after_s=error.retry_after_s)
    if isinstance(error, OverloadedError):
        return HttpError(503, str(error), "overloaded_error", retry_after_s=error.retry_after_s)
    if isinstance(error, DeadlineExceededError):
        return HttpError(504, str(error), "timeout")
    if isinstance(error, WorkerError):
        return HttpError(503, str(error), "service_unavailable", retry_after_s=1)
    log.error("internal error: %r", error, exc_info=error)
    return HttpError(500, f"internal error: {type(error).__name__}: {error}", "internal_error")
