"""API keys at the front doors: `Authorization: Bearer KEY` on HTTP (OpenAI and KServe REST),
metadata `authorization: Bearer KEY` on KServe gRPC. With keys configured, the key names the
request's tenant (what the client claims in headers or bodies is ignored); without any, every
request is let in and tenants are what clients say.

Health, readiness, metrics, the cluster view and the OpenAPI document stay open: orchestrators,
scrapers and `disagg serve` probe them without credentials. Keys are kept as SHA-256 digests,
so the lookup costs the same whatever the presented key shares with a real one.

`/metrics` can be closed on its own with `--metrics-key`: a scrape then needs
`Authorization: Bearer METRICS_KEY`, which is what Prometheus sends for a scrape job with
`authorization: {type: Bearer, credentials_file: FILE}`. It is a key of its own, not an API
key: metrics show every tenant's traffic, which no tenant's key should read.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from disagg.config import CoordinatorConfig

DEFAULT_KEY_TENANT = "default"
OPEN_PATHS = (
    "/health",
    "/metrics",
    "/cluster",
    "/openapi.json",
    "/v2/health/live",
    "/v2/health/ready",
)
"""Probes and operator views; `/cluster` is what `disagg serve` polls for its workers."""
METRICS_PATH = "/metrics"
TENANT_SCOPE_KEY = "disagg.tenant"
"""Where the middleware leaves the authenticated tenant in the ASGI scope."""


class UnauthorizedError(Exception):
    """No key, a malformed header or an unknown key (HTTP 401, gRPC UNAUTHENTICATED)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKeys:
    tenants_by_digest: dict[bytes, str] = field(default_factory=dict)
    metrics_digest: bytes = b""
    """The metrics key's digest; empty: /metrics is open."""

    @classmethod
    def from_config(cls, config: CoordinatorConfig) -> ApiKeys:
        pairs = [(key, DEFAULT_KEY_TENANT) for key in config.api_key]
        if config.api_keys:
            pairs += read_key_file(Path(config.api_keys))
        metrics_digest = _digest(config.metrics_key) if config.metrics_key else b""
        return cls({_digest(key): tenant for key, tenant in pairs}, metrics_digest)

    def check_metrics(self, authorization: str | None) -> None:
        """UnauthorizedError unless /metrics is open or `authorization` carries its key."""
        if not self.metrics_digest:
            return
        key = _bearer(authorization, "missing metrics key: send Authorization: Bearer <key>")
        if not hmac.compare_digest(_digest(key), self.metrics_digest):
            raise UnauthorizedError("invalid metrics key")

    @property
    def is_enabled(self) -> bool:
        return bool(self.tenants_by_digest)

    def tenant(self, authorization: str | None) -> str | None:
        """The key's tenant; None when keys are off. UnauthorizedError when it does not pass."""
        if not self.is_enabled:
            return None
        key = _bearer(authorization, "missing API key: send Authorization: Bearer <key>")
        tenant = self.tenants_by_digest.get(_digest(key))
        if tenant is None:
            raise UnauthorizedError("invalid API key")
        return tenant


def _bearer(authorization: str | None, missing: str) -> str:
    """The key of an `Authorization: Bearer KEY` header; UnauthorizedError(missing) if none."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise UnauthorizedError(missing)
    return key.strip()


def read_key_file(path: Path) -> list[tuple[str, str]]:
    """`KEY TENANT` per line; a key alone is tenant `default`; blank lines and `#` skipped."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise ValueError(f"{path}:{number}: expected `KEY [TENANT]`")
        pairs.append((words[0], words[1] if len(words) == 2 else DEFAULT_KEY_TENANT))
    return pairs


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or (path.startswith("/v2/models/") and path.endswith("/ready"))


def unauthorized_response(path: str, message: str) -> JSONResponse:
    """401 in the protocol's shape: OpenAI's error object under /v1, KServe's {"error"} else."""
    if path.startswith("/v1"):
        error = {"message": message, "type": "invalid_request_error", "param": None}
        body: dict = {"error": {**error, "code": "invalid_api_key"}}
    else:
        body = {"error": message}
    return JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})


class ApiKeyMiddleware:
    """Refuses unauthenticated HTTP requests; records the key's tenant in the scope."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == METRICS_PATH:
            await self._metrics(scope, receive, send)
            return
        if scope["type"] != "http" or not self.keys.is_enabled or is_open_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            tenant = self.keys.tenant(_authorization(scope))
        except UnauthorizedError as error:
            await unauthorized_response(scope["path"], str(error))(scope, receive, send)
            return
        scope[TENANT_SCOPE_KEY] = tenant
        await self.app(scope, receive, send)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            self.keys.check_metrics(_authorization(scope))
        except UnauthorizedError as error:
            await unauthorized_response(scope["path"], str(error))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _authorization(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name.lower() == b"authorization":
            return value.decode("latin-1")
    return None


def scope_tenant(scope: Scope) -> str | None:
    """The authenticated tenant of an HTTP request, or None when keys are off."""
    return scope.get(TENANT_SCOPE_KEY)
