"""Run a real `disagg serve` for a test: free ports, wait until ready, and check that
stopping it leaves no process and no listening port behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens there (connections left in TIME_WAIT do not count, as for any server)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def get_json(url: str, timeout_s: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.load(response)


def post_json(url: str, body: dict, timeout_s: float = 300.0) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class ServeProcess:
    def __init__(self, *args: str) -> None:
        self.http_port = free_port()
        self.control_port = free_port()
        self.args = [
            *args,
            "--http-port", str(self.http_port),
            "--control-port", str(self.control_port),
            "--host", "127.0.0.1",
            "--dtype", "float32",
            "--kv-cache-memory", str(256 << 20),
        ]  # fmt: skip
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.process: subprocess.Popen | None = None
        self.worker_pids: dict[str, int] = {}

    def __enter__(self) -> ServeProcess:
        command = [sys.executable, "-m", "disagg.cli", "serve", *self.args]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=os.environ | {"PYTHONUNBUFFERED": "1"}
        )
        try:
            wait_until(self._ready, START_TIMEOUT_S, "the cluster to start", interval_s=0.5)
        except BaseException:
            self.stop()
            raise
        for worker in self.cluster()["workers"]:
            self.worker_pids[worker["worker_id"]] = int(worker["worker_id"].rsplit("-", 1)[1])
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        for worker_id, pid in self.worker_pids.items():
            assert not pid_alive(pid), f"{worker_id} (pid {pid}) outlived disagg serve"
        assert port_is_free(self.http_port) and port_is_free(self.control_port)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"disagg serve exited with {self.process.returncode}")
        try:
            return self.cluster()["ready"] and self._all_registered()
        except OSError:
            return False

    def _all_registered(self) -> bool:
        expected = self.expected_workers()
        return len(self.cluster()["workers"]) >= expected

    def expected_workers(self) -> int:
        args = self.args

        def count(flag: str) -> int:
            return int(args[args.index(flag) + 1]) if flag in args else 1

        if "colocated" in args:
            return count("--decode-workers")
        return count("--prefill-workers") + count("--decode-workers")

    def cluster(self) -> dict:
        return get_json(f"{self.url}/cluster")

    def completion(self, prompt: str, **fields: object) -> tuple[int, dict]:
        return post_json(f"{self.url}/v1/completions", {"prompt": prompt, **fields})

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)

    def wait_all_blocks_free(self, timeout_s: float = 30.0) -> None:
        def all_free() -> bool:
            workers = self.cluster()["workers"]
            return all(
                w["free_kv_blocks"] == w["total_kv_blocks"] and w["load"] == 0 for w in workers
            )

        wait_until(all_free, timeout_s, "every KV block to be free")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/status") as status:
            return "zombie" not in status.read()
    except FileNotFoundError:
        return False
