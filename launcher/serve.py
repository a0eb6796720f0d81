"""`disagg serve`: the whole cluster on this machine, one OS process per role.

A worker that crashes is restarted (see launcher/supervisor.py); one that
SIGTERM drained exits 0 and stays down unless `--restart-drained` is given.
Children get the launcher's pid in DISAGG_PARENT_PID and exit if it dies, so
even a SIGKILLed launcher leaves no orphans; Ctrl-C or SIGTERM stops them all
(SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from disagg.config import (
    CoordinatorConfig,
    DecodeWorkerConfig,
    DispatchConfig,
    EngineConfig,
    ServeConfig,
)
from disagg.ports import check_free
from launcher.options import config_to_args
from launcher.supervisor import RestartPolicy, Supervisor

STARTUP_TIMEOUT_S = 600.0
STOP_GRACE_S = 10.0
REGISTRY_CHECK_S = 1.0
"""How often a restarted worker's registration is looked for."""


@dataclass(frozen=True)
class ClusterPlan:
    """Which processes to start, with which arguments."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    decode: DecodeWorkerConfig = field(default_factory=DecodeWorkerConfig)
    """Settings of the decode (and colocated) workers; `serve` sets their role and transport."""
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
            *cli, "coordinator", *config_to_args(self.coordinator, exclude=SECRET_FIELDS),
            *config_to_args(self.dispatch),
        ]  # fmt: skip
        worker = [
            "--coordinator", f"127.0.0.1:{self.coordinator.control_port}",
            "--threads", str(self.threads_per_worker), *config_to_args(self.engine),
        ]  # fmt: skip
        commands = [("coordinator", coordinator)]
        serve = self.serve
        decode_worker = [
            *cli, "decode-worker", *worker,
            *config_to_args(self.decode, exclude=SERVE_DECODE_FIELDS),
        ]  # fmt: skip
        if serve.mode == "colocated":
            for i in range(serve.num_decode_workers):
                commands.append((f"colocated-{i}", [*decode_worker, "--colocated"]))
            return commands
        for i in range(serve.num_prefill_workers):
            commands.append((f"prefill-{i}", [*cli, "prefill-worker", *worker]))
        for i in range(serve.num_decode_workers):
            decode = [*decode_worker, "--kv-transport", serve.kv_transport]
            commands.append((f"decode-{i}", decode))
        return commands


class Cluster:
    """The coordinator plus supervised workers.

    NOTE: during start-up any exit is fatal (a bad flag or model fails fast);
    once every worker has registered, the supervisor restarts crashed ones.
    The coordinator is not restarted: its exit ends `disagg serve`.
    """

    def __init__(self, plan: ClusterPlan, policy: RestartPolicy | None = None) -> None:
        self.plan = plan
        self.coordinator: subprocess.Popen | None = None
        env = os.environ | {"DISAGG_PARENT_PID": str(os.getpid())} | secret_env(plan.coordinator)
        workers = [(name, cmd) for name, cmd in plan.commands() if name != "coordinator"]
        self.supervisor = Supervisor(
            workers,
            spawn=lambda command: subprocess.Popen(command, env=env),
            policy=policy or RestartPolicy(restart_clean_exits=plan.serve.restart_drained),
        )
        self._env = env
        scheme = "https" if plan.coordinator.tls_cert else "http"
        self._url = f"{scheme}://127.0.0.1:{plan.coordinator.http_port}/cluster"
        self._stop = threading.Event()

    @property
    def processes(self) -> dict[str, subprocess.Popen]:
        """The coordinator and each worker's current process, by name."""
        return {"coordinator": self.coordinator, **self.supervisor.processes}

    def start(self) -> None:
        command = dict(self.plan.commands())["coordinator"]
        self.coordinator = subprocess.Popen(command, env=self._env)
        self.supervisor.start()

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> bool:
        """Until every worker has registered; False if a process died or time ran out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            dead = [name for name, p in self.processes.items() if p.poll() is not None]
            if dead:
                print(f"disagg serve: {', '.join(dead)} exited during start-up", file=sys.stderr)
                return False
            worker_ids = registered_worker_ids(self._url)
            self.supervisor.mark_registered(worker_ids)
            if len(worker_ids) >= self.plan.num_workers:
                return True
            self._stop.wait(0.5)
        return False

    def wait(self) -> int:
        """Supervise until a signal or the coordinator's exit; its exit code (0 on a signal)."""
        next_check_s = 0.0
        while not self._stop.is_set():
            if self.coordinator.poll() is not None:
                return self.coordinator.returncode
            self.supervisor.poll()
            if time.monotonic() >= next_check_s and self.supervisor.has_unregistered:
                self.supervisor.mark_registered(registered_worker_ids(self._url))
                next_check_s = time.monotonic() + REGISTRY_CHECK_S
            self._stop.wait(0.2)
        return 0

    @property
    def is_stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def summary(self) -> str | None:
        """What the supervisor did over the cluster's life, if anything."""
        restarts, given_up = self.supervisor.num_restarts, self.supervisor.given_up
        if not restarts and not given_up:
            return None
        gave_up = f"; gave up on {', '.join(given_up)}" if given_up else ""
        return f"{restarts} worker restart(s){gave_up}"

    def stop(self) -> None:
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.send_signal(signal.SIGTERM)
        self.supervisor.stop(STOP_GRACE_S)
        if self.coordinator is not None:
            try:
                self.coordinator.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.coordinator.kill()
                self.coordinator.wait()


SERVE_DECODE_FIELDS = ("colocated", "kv_transport")
"""Decode-worker settings that `serve` derives from its own (--mode, its --kv-transport)."""

SECRET_FIELDS = ("cluster_secret", "api_key", "metrics_key")
"""Passed to children in their environment, not on command lines that `ps` shows."""


def secret_env(coordinator: CoordinatorConfig) -> dict[str, str]:
    """The children's secrets: the cluster secret (a fresh one unless given), API keys and
    the metrics key."""
    env = {"DISAGG_CLUSTER_SECRET": coordinator.cluster_secret or secrets.token_hex(32)}
    if coordinator.api_key:
        env["DISAGG_API_KEY"] = ",".join(coordinator.api_key)
    if coordinator.metrics_key:
        env["DISAGG_METRICS_KEY"] = coordinator.metrics_key
    return env


def registered_worker_ids(url: str) -> list[str]:
    """The worker ids the coordinator at `url` (its /cluster) lists; none if it cannot be asked."""
    # NOTE: over TLS the probe does not verify the certificate: it asks its own child on
    # loopback, whose certificate need not name 127.0.0.1, and reads only worker ids.
    context = _unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return [w["worker_id"] for w in json.load(response)["workers"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return []


def _unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_ports(plan: ClusterPlan) -> None:
    """Fail before starting any process if a port is taken (the coordinator checks again)."""
    check_free(plan.coordinator.host, plan.coordinator.http_port, "--http-port")
    check_free(plan.coordinator.host, plan.coordinator.grpc_port, "--grpc-port")
    check_free(plan.coordinator.host, plan.coordinator.control_port, "--control-port")


def serve(plan: ClusterPlan) -> int:
    check_ports(plan)
    cluster = Cluster(plan)
    signal.signal(signal.SIGTERM, cluster.request_stop)
    signal.signal(signal.SIGINT, cluster.request_stop)
    cluster.start()
    try:
        if not cluster.wait_ready():
            return 0 if cluster.is_stopping else 1
        roles = ", ".join(name for name in cluster.processes if name != "coordinator")
        print(
            f"disagg serve: ready on {'https' if plan.coordinator.tls_cert else 'http'}"
            f"://{plan.coordinator.host}:{plan.coordinator.http_port} "
            f"({plan.serve.mode}: {roles}; {plan.threads_per_worker} torch thread(s) per worker "
            f"of {plan.total_threads} cores); Ctrl-C stops",
            flush=True,
        )
        return cluster.wait()
    finally:
        cluster.stop()
        summary = cluster.summary()
        if summary:
            print(f"disagg serve: stopped after {summary}", file=sys.stderr, flush=True)
