"""Exclusive listening sockets: a taken port is an error that names the option to change."""

from __future__ import annotations

import asyncio

import pytest

from bench.local_cluster import free_port
from disagg.ports import PortInUseError, add_grpc_port, bind_tcp, check_free, grpc_server


def test_a_second_tcp_listener_on_a_port_is_refused_with_the_option_named():
    port = free_port()
    first = bind_tcp("127.0.0.1", port, "--http-port")
    try:
        with pytest.raises(PortInUseError, match=f"port {port} .*in use.*--http-port"):
            bind_tcp("127.0.0.1", port, "--http-port")
        with pytest.raises(PortInUseError):
            check_free("127.0.0.1", port, "--http-port")
    finally:
        first.close()
    check_free("127.0.0.1", port, "--http-port")


def test_a_grpc_server_cannot_share_a_port_with_another():
    """grpc.aio's default (SO_REUSEPORT) would let both bind; ours refuses the second."""

    async def scenario() -> None:
        port = free_port()
        first, second = grpc_server(), grpc_server()
        assert add_grpc_port(first, "127.0.0.1", port, "--control-port") == port
        await first.start()
        try:
            with pytest.raises(PortInUseError, match=f"port {port} .*--control-port"):
                add_grpc_port(second, "127.0.0.1", port, "--control-port")
            with pytest.raises(PortInUseError):
                check_free("127.0.0.1", port, "--control-port")
        finally:
            await first.stop(grace=None)

    asyncio.run(scenario())


def test_port_zero_binds_a_free_port():
    async def scenario() -> int:
        server = grpc_server()
        return add_grpc_port(server, "127.0.0.1", 0, "--port")

    assert asyncio.run(scenario()) > 0
