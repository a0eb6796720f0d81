"""A second cluster on the ports of a running one fails at start-up, clearly; the first serves on."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.local_cluster import free_port, get_json, wait_until

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 120.0


def coordinator_command(http_port: int, grpc_port: int, control_port: int) -> list[str]:
    return [
        sys.executable, "-m", "launcher.cli", "coordinator", "--host", "127.0.0.1",
        "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--control-port", str(control_port),
    ]  # fmt: skip


def cluster_view(port: int) -> dict | None:
    try:
        return get_json(f"http://127.0.0.1:{port}/cluster")
    except OSError:
        return None


@pytest.fixture(scope="module")
def first():
    """A running coordinator on three free ports: (http, grpc, control)."""
    ports = (free_port(), free_port(), free_port())
    process = subprocess.Popen(coordinator_command(*ports))
    try:
        wait_until(lambda: cluster_view(ports[0]), START_TIMEOUT_S, "the first coordinator")
        yield ports
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_second(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S)


@pytest.mark.parametrize("shared", ["--http-port", "--grpc-port", "--control-port"])
def test_a_second_coordinator_on_a_taken_port_names_it_and_exits(first, shared):
    index = ["--http-port", "--grpc-port", "--control-port"].index(shared)
    ports = [free_port(), free_port(), free_port()]
    ports[index] = first[index]
    result = run_second(coordinator_command(*ports))
    assert result.returncode != 0
    assert f"port {first[index]} on 127.0.0.1 is in use: choose another with {shared}" in (
        result.stderr
    )
    assert cluster_view(first[0]) is not None, "the first coordinator stopped serving"


def test_a_second_disagg_serve_fails_before_starting_any_worker(first):
    http_port, grpc_port, control_port = first
    command = [
        sys.executable, "-m", "launcher.cli", "serve", "--host", "127.0.0.1",
        "--http-port", str(free_port()), "--grpc-port", str(free_port()),
        "--control-port", str(control_port),
    ]  # fmt: skip
    result = run_second(command)
    assert result.returncode == 2
    assert f"port {control_port} on 127.0.0.1 is in use: choose another with --control-port" in (
        result.stderr
    )
    assert "worker" not in result.stdout
    assert cluster_view(http_port)["workers"] == []
