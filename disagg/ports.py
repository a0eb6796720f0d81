"""Listening sockets that belong to one process only.

grpc.aio servers open their ports with SO_REUSEPORT on Linux by default, so a
second cluster started on the same host and ports shares them silently with
the first: the kernel spreads connections over both, and one cluster's
workers register with the other's coordinator. Every server socket of ours is
therefore opened without SO_REUSEPORT, and a port that is taken fails start-up
with an error naming the port and the option that changes it.
"""

from __future__ import annotations

import errno
import socket

import grpc

from disagg.errors import DisaggError

GRPC_SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]
"""Options for every `grpc.aio.server(...)`: the port is ours alone, and the coordinator's
keepalive pings (every few seconds, also during a long silent Prefill) are welcome rather
than answered with GOAWAY "too_many_pings", which would fail the calls in flight."""


class PortInUseError(DisaggError):
    """A port we must listen on is taken; the message names the option that moves it."""

    def __init__(self, host: str, port: int, option: str, reason: str = "in use") -> None:
        super().__init__(f"port {port} on {host} is {reason}: choose another with {option}")
        self.host = host
        self.port = port
        self.option = option


def grpc_server(interceptors: list[grpc.aio.ServerInterceptor] | None = None) -> grpc.aio.Server:
    """A grpc.aio server whose ports are exclusive (no SO_REUSEPORT)."""
    return grpc.aio.server(options=GRPC_SERVER_OPTIONS, interceptors=interceptors)


def add_grpc_port(
    server: grpc.aio.Server,
    host: str,
    port: int,
    option: str,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Bind `host:port` on `server` (over TLS with `credentials`); returns the bound port
    (useful when `port` is 0).

    Raises PortInUseError when the port is taken. NOTE: grpc reports a failed
    bind as a RuntimeError (or a returned 0 in older versions), without saying why.
    """
    address = f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise PortInUseError(host, port, option) from error
    if bound == 0:
        raise PortInUseError(host, port, option)
    return bound


def bind_tcp(host: str, port: int, option: str) -> socket.socket:
    """A listening TCP socket on `host:port` for an HTTP server (uvicorn's `sockets=`).

    SO_REUSEADDR only lets the port be reused while old connections sit in
    TIME_WAIT; on Linux it never lets two sockets listen on one port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        reason = "in use" if error.errno == errno.EADDRINUSE else f"unusable ({error.strerror})"
        raise PortInUseError(host, port, option, reason) from error
    sock.set_inheritable(True)
    return sock


def check_free(host: str, port: int, option: str) -> None:
    """Raise PortInUseError if `host:port` cannot be listened on right now (a start-up check)."""
    bind_tcp(host, port, option).close()
