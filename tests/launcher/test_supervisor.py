"""The supervisor's restart decisions, on fake processes and a fake clock."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

import pytest

from launcher.supervisor import RestartPolicy, Supervisor


@dataclass
class FakeProcess:
    command: list[str]
    pid: int
    returncode: int | None = None
    signals: list[int] = field(default_factory=list)

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        self.returncode = 0

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode

    def kill(self) -> None:
        self.returncode = -signal.SIGKILL


class Harness:
    def __init__(self, policy: RestartPolicy) -> None:
        self.now_s = 0.0
        self.spawned: list[FakeProcess] = []
        self.supervisor = Supervisor(
            [("prefill-0", ["prefill"]), ("decode-0", ["decode"])],
            spawn=self.spawn,
            policy=policy,
            clock=lambda: self.now_s,
            report=lambda message: None,
        )
        self.supervisor.start()

    def spawn(self, command: list[str]) -> FakeProcess:
        process = FakeProcess(command, pid=100 + len(self.spawned))
        self.spawned.append(process)
        return process

    def current(self, name: str) -> FakeProcess:
        return self.supervisor.children[name].process

    def register_all(self) -> None:
        self.supervisor.mark_registered(c.worker_id for c in self.supervisor.children.values())

    def crash(self, name: str, returncode: int = -signal.SIGKILL) -> None:
        self.current(name).returncode = returncode
        self.supervisor.poll()

    def advance(self, seconds: float) -> None:
        self.now_s += seconds
        self.supervisor.poll()


POLICY = RestartPolicy(initial_backoff_s=1.0, max_backoff_s=8.0, stable_after_s=60.0)


def test_each_incarnation_gets_a_new_worker_id():
    harness = Harness(POLICY)
    assert harness.current("decode-0").command == ["decode", "--worker-id", "decode-0-e1"]
    harness.register_all()
    harness.crash("decode-0")
    harness.advance(1.0)
    assert harness.current("decode-0").command == ["decode", "--worker-id", "decode-0-e2"]
    assert harness.current("prefill-0") is harness.spawned[0], "the other worker is left alone"
    assert harness.supervisor.num_restarts == 1


def test_a_crash_is_restarted_after_a_backoff_that_doubles_and_is_capped():
    harness = Harness(POLICY)
    delays = []
    for _ in range(6):
        harness.register_all()
        before = harness.current("decode-0")
        harness.crash("decode-0")
        waited = 0.0
        while harness.current("decode-0") is before:
            harness.advance(0.5)
            waited += 0.5
        delays.append(waited)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_a_long_run_resets_the_backoff():
    harness = Harness(POLICY)
    for _ in range(3):
        harness.register_all()
        harness.crash("decode-0")
        harness.advance(10.0)
    harness.register_all()
    harness.advance(60.0)
    before = harness.current("decode-0")
    harness.crash("decode-0")
    harness.advance(1.0)
    assert harness.current("decode-0") is not before


def test_a_worker_that_keeps_crashing_at_start_up_is_given_up_on_and_reported():
    reports: list[str] = []
    harness = Harness(RestartPolicy(initial_backoff_s=1.0, max_startup_crashes=3))
    harness.supervisor.report = reports.append
    for _ in range(3):
        harness.crash("prefill-0", returncode=1)
        harness.advance(30.0)
    assert harness.supervisor.given_up == ["prefill-0"]
    assert len(harness.spawned) == 2 + 2, "two restarts, then no more"
    assert "giving up on prefill-0" in reports[-1] and "exited with code 1" in reports[-1]
    harness.advance(600.0)
    assert len(harness.spawned) == 4


def test_registering_clears_the_start_up_crash_count():
    harness = Harness(RestartPolicy(initial_backoff_s=1.0, max_startup_crashes=2))
    for _ in range(4):
        harness.crash("prefill-0")
        harness.advance(30.0)
        harness.register_all()
    assert harness.supervisor.given_up == []
    assert harness.supervisor.num_restarts == 4


def test_a_clean_exit_after_a_drain_is_not_restarted_by_default():
    reports: list[str] = []
    harness = Harness(POLICY)
    harness.supervisor.report = reports.append
    harness.register_all()
    harness.crash("decode-0", returncode=0)
    harness.advance(600.0)
    assert len(harness.spawned) == 2
    assert harness.supervisor.children["decode-0"].is_stopped
    assert "after draining; not restarted" in reports[-1]


def test_a_clean_exit_is_restarted_at_once_when_asked():
    harness = Harness(RestartPolicy(restart_clean_exits=True))
    harness.register_all()
    harness.crash("decode-0", returncode=0)
    harness.advance(0.0)
    assert harness.current("decode-0").command[-1] == "decode-0-e2"
    assert harness.supervisor.children["decode-0"].num_crashes == 0


def test_stop_terminates_every_worker_and_restarts_none():
    harness = Harness(POLICY)
    harness.supervisor.stop(grace_s=1.0)
    assert all(p.signals == [signal.SIGTERM] for p in harness.spawned)
    harness.advance(600.0)
    assert len(harness.spawned) == 2


def test_the_exit_report_names_the_signal():
    reports: list[str] = []
    harness = Harness(POLICY)
    harness.supervisor.report = reports.append
    harness.register_all()
    harness.crash("decode-0")
    assert reports == ["decode-0-e1 (pid 101) was killed by SIGKILL; restarting decode-0 in 1.0 s"]


@pytest.mark.parametrize(
    "fields",
    [
        {"initial_backoff_s": 0.0},
        {"initial_backoff_s": 5.0, "max_backoff_s": 1.0},
        {"max_startup_crashes": 0},
    ],
)
def test_bad_policies_are_refused(fields):
    with pytest.raises(ValueError):
        RestartPolicy(**fields)
