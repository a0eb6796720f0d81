"""Keeps a cluster's worker processes running: restarts crashed ones, with backoff.

A worker that dies (a signal, a non-zero exit) is started again after an
exponential backoff, as in Erlang/OTP supervisors and systemd's `Restart=`:
`initial_backoff_s * 2**(n-1)` for its n-th crash in a row, capped at
`max_backoff_s`; a run that lasted `stable_after_s` resets the count. A worker
that crashes `max_startup_crashes` times in a row before it ever registered
with the coordinator (a bad flag, a missing model, no memory) is given up on
and reported, not restarted forever.

A worker that exits 0 did so on purpose: SIGTERM drains a worker (it leaves
the rotation, finishes its sequences, exits 0), and an operator who drains one
wants it gone. It is not restarted unless `restart_clean_exits` is set (a
rolling restart). Each incarnation gets a new worker id, `<name>-e<epoch>`,
so the coordinator never mistakes a new process for the dead one.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol


class Process(Protocol):
    """The part of `subprocess.Popen` the supervisor uses."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def send_signal(self, signum: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


Spawn = Callable[[list[str]], Process]


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_s: float = 1.0
    """Wait before the first restart after a crash."""
    max_backoff_s: float = 30.0
    """Longest wait between restarts."""
    stable_after_s: float = 60.0
    """A run at least this long resets the crash count (and so the backoff)."""
    max_startup_crashes: int = 3
    """Crashes in a row before registering, after which the worker is given up on."""
    restart_clean_exits: bool = False
    """Also restart a worker that exited 0 (drained by SIGTERM)."""

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")
        if self.max_startup_crashes < 1:
            raise ValueError("max_startup_crashes must be >= 1")
        if self.stable_after_s < 0:
            raise ValueError("stable_after_s must be >= 0")

    def backoff_s(self, num_crashes: int) -> float:
        """Wait before restarting after the `num_crashes`-th crash in a row (>= 1)."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** (num_crashes - 1))


@dataclass
class Child:
    """One supervised worker slot (e.g. `decode-0`) and its current incarnation."""

    name: str
    command: list[str]
    epoch: int = 0
    process: Process | None = None
    started_at_s: float = 0.0
    is_registered: bool = False
    has_exited: bool = False
    """The current incarnation's exit has been seen and dealt with."""
    num_crashes: int = 0
    """Crashes in a row (reset by a run of `stable_after_s`)."""
    num_startup_crashes: int = 0
    """Crashes in a row before registering."""
    restart_at_s: float | None = None
    is_given_up: bool = False
    is_stopped: bool = False
    """Exited 0 and stays down."""

    @property
    def worker_id(self) -> str:
        return f"{self.name}-e{self.epoch}"

    @property
    def is_running(self) -> bool:
        return self.process is not None and not self.has_exited


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def report_to_stderr(message: str) -> None:
    print(f"disagg serve: {message}", file=sys.stderr, flush=True)


@dataclass
class Supervisor:
    """Call `start()` once, then `poll()` every fraction of a second; `stop()` at the end.

    `spawn(command)` starts a process (the worker id flags are appended by the
    supervisor); `clock` and `report` are replaceable so tests need no processes.
    """

    commands: list[tuple[str, list[str]]]
    spawn: Spawn
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    report: Callable[[str], None] = report_to_stderr
    children: dict[str, Child] = field(init=False)
    num_restarts: int = field(default=0, init=False)
    _is_stopping: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.children = {name: Child(name, command) for name, command in self.commands}

    def start(self) -> None:
        for child in self.children.values():
            self._start(child)

    @property
    def processes(self) -> dict[str, Process]:
        return {c.name: c.process for c in self.children.values() if c.process is not None}

    @property
    def given_up(self) -> list[str]:
        return [c.name for c in self.children.values() if c.is_given_up]

    @property
    def has_unregistered(self) -> bool:
        """A running incarnation has not been seen in the registry yet."""
        return any(c.is_running and not c.is_registered for c in self.children.values())

    def mark_registered(self, worker_ids: Iterable[str]) -> None:
        """The worker ids the coordinator lists now: their incarnations started up fine."""
        registered = set(worker_ids)
        for child in self.children.values():
            if child.is_running and child.worker_id in registered:
                child.is_registered = True
                child.num_startup_crashes = 0

    def poll(self) -> None:
        """Notice exits and start the restarts that are due."""
        if self._is_stopping:
            return
        now_s = self.clock()
        for child in self.children.values():
            if child.is_running and child.process.poll() is not None:
                self._on_exit(child, now_s)
            if child.restart_at_s is not None and now_s >= child.restart_at_s:
                self._restart(child)

    def stop(self, grace_s: float) -> None:
        """SIGTERM every running worker, then SIGKILL those still there after `grace_s`."""
        self._is_stopping = True
        running = [c.process for c in self.children.values() if c.is_running]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline_s = time.monotonic() + grace_s
        for process in running:
            try:
                process.wait(max(0.1, deadline_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _restart(self, child: Child) -> None:
        child.restart_at_s = None
        self.num_restarts += 1
        self._start(child)
        self.report(f"{child.name} restarted as {child.worker_id} (pid {child.process.pid})")

    def _start(self, child: Child) -> None:
        child.epoch += 1
        child.is_registered = False
        child.has_exited = False
        child.started_at_s = self.clock()
        child.process = self.spawn([*child.command, "--worker-id", child.worker_id])

    def _on_exit(self, child: Child, now_s: float) -> None:
        child.has_exited = True
        returncode = child.process.returncode
        what = f"{child.worker_id} (pid {child.process.pid}) {describe_exit(returncode)}"
        if returncode == 0:
            self._on_clean_exit(child, what, now_s)
            return
        if now_s - child.started_at_s >= self.policy.stable_after_s:
            child.num_crashes = 0
        child.num_crashes += 1
        if not child.is_registered:
            child.num_startup_crashes += 1
            if child.num_startup_crashes >= self.policy.max_startup_crashes:
                child.is_given_up = True
                self.report(
                    f"{what} before registering, {child.num_startup_crashes} times in a row; "
                    f"giving up on {child.name}"
                )
                return
        delay_s = self.policy.backoff_s(child.num_crashes)
        child.restart_at_s = now_s + delay_s
        self.report(f"{what}; restarting {child.name} in {delay_s:.1f} s")

    def _on_clean_exit(self, child: Child, what: str, now_s: float) -> None:
        if self.policy.restart_clean_exits:
            child.restart_at_s = now_s
            self.report(f"{what} after draining; restarting {child.name}")
            return
        child.is_stopped = True
        self.report(f"{what} after draining; not restarted")
