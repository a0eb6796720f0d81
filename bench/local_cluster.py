"""A `disagg serve` started on free local ports, for benchmarks and tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class ServerProcess:
    """A server in a child process: ready when `with` enters, stopped when it leaves.

    Subclasses say how to start it (`command`, `env`) and how to tell it is up
    (`is_up`); a child that exits while starting fails at once.
    """

    what = "the server"
    stop_grace_s = 60.0
    """How long SIGTERM has to work before the child is killed."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.stderr_path: str | None = None
        """When set, the child's stderr goes to this file instead of ours."""

    @property
    def extra_body(self) -> dict:
        """Fields its requests need beyond the OpenAI ones (see `disagg-bench run --extra-body`)."""
        return {}

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return os.environ | {"PYTHONUNBUFFERED": "1"}

    def is_up(self) -> bool:
        raise NotImplementedError

    def __enter__(self):
        stderr = open(self.stderr_path, "w") if self.stderr_path else None  # noqa: SIM115
        self.process = subprocess.Popen(self.command(), env=self.env(), stderr=stderr)
        if stderr is not None:
            stderr.close()  # the child holds its own copy
        try:
            wait_until(self._ready, START_TIMEOUT_S, f"{self.what} to start", interval_s=0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.what} exited with {self.process.returncode}")
        return self.is_up()


class LocalCluster(ServerProcess):
    """`with LocalCluster("--mode", "colocated") as cluster: cluster.url ...`"""

    what = "disagg serve"

    def __init__(self, *args: str, num_workers: int | None = None) -> None:
        super().__init__()
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.control_port = free_port()
        self.args = [
            *args,
            "--host", "127.0.0.1",
            "--http-port", str(self.http_port),
            "--grpc-port", str(self.grpc_port),
            "--control-port", str(self.control_port),
        ]  # fmt: skip
        self.num_workers = num_workers or self._count_workers()
        self.url = f"http://127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "launcher.cli", "serve", *self.args]

    def cluster(self) -> dict:
        return get_json(f"{self.url}/cluster")

    def completion(self, prompt: str | list[int], **fields: object) -> tuple[int, dict]:
        return post_json(f"{self.url}/v1/completions", {"prompt": prompt, **fields})

    def is_up(self) -> bool:
        try:
            state = self.cluster()
        except OSError:
            return False
        return state["ready"] and len(state["workers"]) >= self.num_workers

    def _count_workers(self) -> int:
        def count(flag: str) -> int:
            return int(self.args[self.args.index(flag) + 1]) if flag in self.args else 1

        if "colocated" in self.args:
            return count("--decode-workers")
        return count("--prefill-workers") + count("--decode-workers")
