"""`disagg serve`: the whole cluster on this machine, one OS process per role.

Children get the launcher's pid in DISAGG_PARENT_PID and exit if it dies, so
even a SIGKILLed launcher leaves no orphans; Ctrl-C or SIGTERM stops them all
(SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from disagg.config import CoordinatorConfig, DispatchConfig, EngineConfig, ServeConfig
from launcher.options import config_to_args

STARTUP_TIMEOUT_S = 600.0
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class ClusterPlan:
    """Which processes to start, with which arguments."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    total_threads: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def num_workers(self) -> int:
        serve = self.serve
        is_split = serve.mode == "disaggregated"
        return serve.num_decode_workers + (serve.num_prefill_workers if is_split else 0)

    @property
    def threads_per_worker(self) -> int:
        """NOTE: by default the cores are split evenly so that workers do not fight over them."""
        return self.serve.worker_threads or max(1, self.total_threads // self.num_workers)

    @property
    def http_port(self) -> int:
        return self.coordinator.http_port

    def commands(self) -> list[tuple[str, list[str]]]:
        cli = [sys.executable, "-m", "launcher.cli"]
        coordinator = [
            *cli, "coordinator", *config_to_args(self.coordinator),
            *config_to_args(self.dispatch),
        ]  # fmt: skip
        worker = [
            "--coordinator", f"127.0.0.1:{self.coordinator.control_port}",
            "--threads", str(self.threads_per_worker), *config_to_args(self.engine),
        ]  # fmt: skip
        commands = [("coordinator", coordinator)]
        serve = self.serve
        if serve.mode == "colocated":
            for i in range(serve.num_decode_workers):
                commands.append((f"colocated-{i}", [*cli, "decode-worker", "--colocated", *worker]))
            return commands
        for i in range(serve.num_prefill_workers):
            commands.append((f"prefill-{i}", [*cli, "prefill-worker", *worker]))
        for i in range(serve.num_decode_workers):
            decode = [*cli, "decode-worker", "--kv-transport", serve.kv_transport, *worker]
            commands.append((f"decode-{i}", decode))
        return commands


class Cluster:
    def __init__(self, plan: ClusterPlan) -> None:
        self.plan = plan
        self.processes: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()

    def start(self) -> None:
        env = os.environ | {"DISAGG_PARENT_PID": str(os.getpid())}
        for name, command in self.plan.commands():
            self.processes[name] = subprocess.Popen(command, env=env)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> bool:
        """Until every worker has registered; False if a process died or time ran out."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.plan.http_port}/cluster"
        while time.monotonic() < deadline and not self._stop.is_set():
            dead = [name for name, p in self.processes.items() if p.poll() is not None]
            if dead:
                print(f"disagg serve: {', '.join(dead)} exited during start-up", file=sys.stderr)
                return False
            if registered_workers(url) >= self.plan.num_workers:
                return True
            self._stop.wait(0.5)
        return False

    def wait(self) -> int:
        """Until a signal, or until the coordinator exits; returns its exit code (0 on a signal)."""
        coordinator = self.processes["coordinator"]
        while not self._stop.is_set():
            if coordinator.poll() is not None:
                return coordinator.returncode
            self._stop.wait(0.5)
        return 0

    @property
    def is_stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def registered_workers(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return len(json.load(response)["workers"])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return 0


def serve(plan: ClusterPlan) -> int:
    cluster = Cluster(plan)
    signal.signal(signal.SIGTERM, cluster.request_stop)
    signal.signal(signal.SIGINT, cluster.request_stop)
    cluster.start()
    try:
        if not cluster.wait_ready():
            return 0 if cluster.is_stopping else 1
        roles = ", ".join(name for name in cluster.processes if name != "coordinator")
        print(
            f"disagg serve: ready on http://{plan.coordinator.host}:{plan.http_port} "
            f"({plan.serve.mode}: {roles}); Ctrl-C stops",
            flush=True,
        )
        return cluster.wait()
    finally:
        cluster.stop()
