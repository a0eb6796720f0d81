"""TLS on the coordinator's front doors, from PEM files given by path (`--tls-cert`,
`--tls-key`, optionally `--tls-ca` for mutual TLS on gRPC).

HTTP: uvicorn's own SSL options, so a plaintext request never reaches the app (the handshake
fails and the connection closes). gRPC: server credentials on the port itself, so a plaintext
or, with a CA, a certificate-less client fails at the handshake (UNAVAILABLE on its side).
Files are read at start-up: a missing or unreadable file fails before the model loads, with
the option that names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from disagg.config import ConfigError, CoordinatorConfig


@dataclass(frozen=True)
class TlsFiles:
    cert_path: str
    key_path: str
    ca_path: str = ""

    @classmethod
    def from_config(cls, config: CoordinatorConfig) -> TlsFiles | None:
        """The front doors' TLS files, checked readable; None when TLS is off."""
        if not config.tls_cert:
            return None
        files = cls(config.tls_cert, config.tls_key, config.tls_ca)
        for field, path in (("tls_cert", files.cert_path), ("tls_key", files.key_path),
                            ("tls_ca", files.ca_path)):  # fmt: skip
            if path:
                _read(field, path)
        return files

    def uvicorn_options(self) -> dict[str, str]:
        """Keyword arguments for `uvicorn.Config`."""
        return {"ssl_certfile": self.cert_path, "ssl_keyfile": self.key_path}

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials; with a CA, clients must present a certificate it signed."""
        pair = (_read("tls_key", self.key_path), _read("tls_cert", self.cert_path))
        ca = _read("tls_ca", self.ca_path) if self.ca_path else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=ca, require_client_auth=bool(ca)
        )


def _read(field: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(field, f"cannot read {path}: {error.strerror}") from error
