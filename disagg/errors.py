"""Typed errors that the API layers map onto their protocol's status codes."""

from __future__ import annotations


class DisaggError(Exception):
    """Base class for every error disagg raises on purpose."""


class InvalidRequestError(DisaggError, ValueError):
    """The request itself is wrong (an HTTP 400); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class OutOfBlocksError(DisaggError):
    """No KV blocks are free right now; the caller may queue and retry later."""


class UnsupportedModelError(DisaggError):
    """The model's architecture or files are not something the runner can serve."""


class NeverFitsError(InvalidRequestError, OutOfBlocksError):
    """The request needs more KV blocks than the whole pool holds, so no wait can help:
    a client error (HTTP 400, gRPC INVALID_ARGUMENT), not "no room now" (503)."""
