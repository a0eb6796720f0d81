"""Fault injection for `disagg-bench run --fault`: signal a worker of a role while the run goes on.

A spec reads `ACTION:ROLE@WHEN`:

- ACTION: `kill` (SIGKILL, a crash) or `term` (SIGTERM, a drain);
- ROLE: `prefill`, `decode` or `colocated`;
- WHEN: `at=T` (once, T after the run starts) or `every=T` (at T, 2T, 3T, ...);
  T in `s` or `ms`, e.g. `kill:decode@every=10s`, `term:prefill@at=500ms`.

The victim is the busiest worker of the role in the target's `/cluster`
(most sequences in flight, so the fault hits live requests), found by the
`pid` the coordinator lists; it is signalled only if that pid is a local
disagg worker process of that role. After each fault the injector polls
`/cluster` until a worker of the role registered under a new id (the
supervisor's restart), and records that as the fault's recovery time; after
the run it keeps watching, up to `recovery_grace_s`, for the last ones.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.serving.cluster_view import read_cluster

ACTIONS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
ROLES = ("prefill", "decode", "colocated")
POLL_S = 0.2
"""How often /cluster is read while waiting for a recovery."""

_SPEC = re.compile(
    r"^(?P<action>\w+):(?P<role>\w+)@(?P<when>at|every)=(?P<time>[0-9.]+)(?P<unit>s|ms)?$"
)


@dataclass(frozen=True)
class FaultSpec:
    """One `--fault`: what to do to which role, and when (seconds from the run's start)."""

    action: str
    role: str
    first_s: float
    every_s: float | None = None
    """None: once, at first_s."""

    def times_s(self, until_s: float) -> list[float]:
        """Offsets at which this fault fires in a run of `until_s` seconds."""
        if self.every_s is None:
            return [self.first_s] if self.first_s <= until_s else []
        count = int(until_s // self.every_s)
        return [self.every_s * (i + 1) for i in range(count)]


def parse_fault(text: str) -> FaultSpec:
    """`kill:decode@every=10s` -> FaultSpec; ValueError that shows the form on anything else."""
    match = _SPEC.match(text.strip())
    if match is None:
        raise ValueError(
            f"bad --fault {text!r}: use ACTION:ROLE@at=T or @every=T, e.g. kill:decode@every=10s"
        )
    action, role = match["action"], match["role"]
    if action not in ACTIONS:
        raise ValueError(f"bad --fault {text!r}: action must be one of {', '.join(ACTIONS)}")
    if role not in ROLES:
        raise ValueError(f"bad --fault {text!r}: role must be one of {', '.join(ROLES)}")
    try:
        seconds = float(match["time"]) / (1000.0 if match["unit"] == "ms" else 1.0)
    except ValueError as error:
        raise ValueError(f"bad --fault {text!r}: {match['time']!r} is not a number") from error
    if match["when"] == "every":
        if seconds <= 0:
            raise ValueError(f"bad --fault {text!r}: every= needs a time > 0")
        return FaultSpec(action, role, seconds, seconds)
    return FaultSpec(action, role, seconds)


@dataclass
class FaultEvent:
    """What one fault did: when (s from the run's start), to whom, and when the role came back."""

    spec: str
    role: str
    at_s: float
    worker_id: str | None = None
    pid: int | None = None
    skipped: str = ""
    """Why nothing was signalled (no live worker of the role, a pid that is not ours)."""
    recovered_after_s: float | None = None
    """Until a worker of the role registered under a new id; None if not within the run."""


def pick_victim(workers: list[dict], role: str) -> dict | None:
    """The busiest live worker of `role` that says where its process is; ties by id."""
    candidates = [
        w for w in workers if w["role"] == role and w.get("pid") and not w.get("draining")
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda w: (-w["load"], w["worker_id"]))


def is_worker_process(pid: int, role: str) -> bool:
    """`pid` is a disagg worker of `role` on this machine (guards against a reused pid)."""
    subcommand = "prefill-worker" if role == "prefill" else "decode-worker"
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"launcher.cli" in words and subcommand.encode() in words


def format_spec(spec: FaultSpec) -> str:
    when = f"every={spec.every_s:g}s" if spec.every_s is not None else f"at={spec.first_s:g}s"
    return f"{spec.action}:{spec.role}@{when}"


@dataclass
class FaultInjector:
    """Fires the specs' faults at a target from a thread; `with` starts and stops it."""

    url: str
    specs: list[FaultSpec]
    horizon_s: float = 3600.0
    """Faults are planned up to this long after the start; leaving `with` ends them sooner."""
    recovery_grace_s: float = 300.0
    """After the run, how long to keep watching for the last faults' replacements."""
    events: list[FaultEvent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _stopped_s: float = 0.0

    def __enter__(self) -> FaultInjector:
        self._start_s = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """No more faults; wait up to `recovery_grace_s` for the last ones' replacements."""
        self._stopped_s = time.monotonic()
        self._stop.set()
        self._thread.join()

    def _plan(self) -> list[tuple[float, FaultSpec]]:
        return sorted((t, s) for s in self.specs for t in s.times_s(self.horizon_s))

    def _run(self) -> None:
        """Every POLL_S: fire the faults that are due, then look for recoveries."""
        plan = self._plan()
        waiting: list[tuple[FaultEvent, set[str]]] = []
        while True:
            if self._stop.is_set():
                plan = []
                if not waiting or time.monotonic() > self._stopped_s + self.recovery_grace_s:
                    return
            now_s = time.monotonic() - self._start_s
            while plan and plan[0][0] <= now_s:
                event, before = self._fire(plan.pop(0)[1])
                self.events.append(event)
                if event.pid is not None:
                    waiting.append((event, before))
            waiting = [(e, before) for e, before in waiting if not self._has_recovered(e, before)]
            time.sleep(POLL_S)

    def _fire(self, spec: FaultSpec) -> tuple[FaultEvent, set[str]]:
        """Signal the victim; also returns the role's worker ids at that moment."""
        event = FaultEvent(format_spec(spec), spec.role, time.monotonic() - self._start_s)
        workers = read_cluster(self.url) or []
        before = {w["worker_id"] for w in workers if w["role"] == spec.role}
        victim = pick_victim(workers, spec.role)
        if victim is None:
            event.skipped = f"no live {spec.role} worker with a pid in /cluster"
        elif not is_worker_process(victim["pid"], spec.role):
            event.skipped = f"pid {victim['pid']} is not a local {spec.role} worker"
        else:
            event.worker_id, event.pid = victim["worker_id"], victim["pid"]
            os.kill(victim["pid"], ACTIONS[spec.action])
        return event, before

    def _has_recovered(self, event: FaultEvent, before: set[str]) -> bool:
        """A worker of the victim's role registered under an id not seen at the fault."""
        workers = [w for w in read_cluster(self.url) or [] if w["role"] == event.role]
        if not any(w["worker_id"] not in before for w in workers):
            return False
        event.recovered_after_s = time.monotonic() - self._start_s - event.at_s
        return True


def write_events(path: Path, events: list[FaultEvent]) -> None:
    path.write_text(json.dumps([asdict(e) for e in events], indent=2) + "\n")
