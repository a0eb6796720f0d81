"""`disagg-bench run --fault`: the spec parser, the victim choice, the pid guard, the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.cli import main
from bench.local_cluster import wait_until
from bench.serving.fault_run import fault_lines, num_lost, recovery_summary
from bench.serving.faults import (
    ACTIONS,
    FaultEvent,
    FaultInjector,
    FaultSpec,
    format_spec,
    is_worker_process,
    parse_fault,
    pick_victim,
)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("kill:decode@every=10s", FaultSpec("kill", "decode", 10.0, 10.0)),
        ("kill:prefill@at=5s", FaultSpec("kill", "prefill", 5.0)),
        ("term:decode@at=500ms", FaultSpec("term", "decode", 0.5)),
        ("kill:colocated@every=2.5", FaultSpec("kill", "colocated", 2.5, 2.5)),
        (" kill:decode@at=0s ", FaultSpec("kill", "decode", 0.0)),
    ],
)
def test_parse_fault_reads_every_form(text, spec):
    assert parse_fault(text) == spec
    assert parse_fault(format_spec(spec)) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kill:decode", "use ACTION:ROLE@at=T or @every=T"),
        ("kill:decode@in=5s", "use ACTION:ROLE@at=T"),
        ("kill:decode@every=5min", "use ACTION:ROLE@at=T"),
        ("stop:decode@at=5s", "action must be one of kill, term"),
        ("kill:coordinator@at=5s", "role must be one of prefill, decode, colocated"),
        ("kill:decode@every=0s", "every= needs a time > 0"),
        ("kill:decode@at=1.2.3s", "is not a number"),
    ],
)
def test_parse_fault_refuses_bad_specs_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message):
        parse_fault(text)


def test_fault_times_within_a_run():
    assert FaultSpec("kill", "decode", 10.0, 10.0).times_s(35.0) == [10.0, 20.0, 30.0]
    assert FaultSpec("kill", "decode", 5.0).times_s(35.0) == [5.0]
    assert FaultSpec("kill", "decode", 50.0).times_s(35.0) == []


def test_the_action_names_their_signals():
    assert ACTIONS == {"kill": signal.SIGKILL, "term": signal.SIGTERM}


def worker(worker_id: str, role: str, load: int, pid: int = 7, draining: bool = False) -> dict:
    return {"worker_id": worker_id, "role": role, "load": load, "pid": pid, "draining": draining}


def test_the_victim_is_the_busiest_live_worker_of_the_role():
    workers = [
        worker("decode-0-e1", "decode", 2),
        worker("decode-1-e1", "decode", 5),
        worker("decode-2-e1", "decode", 9, draining=True),
        worker("prefill-0-e1", "prefill", 50),
        worker("decode-3-e1", "decode", 50, pid=0),
    ]
    assert pick_victim(workers, "decode")["worker_id"] == "decode-1-e1"
    assert pick_victim(workers, "colocated") is None
    tie = [worker("decode-1-e1", "decode", 1), worker("decode-0-e1", "decode", 1)]
    assert pick_victim(tie, "decode")["worker_id"] == "decode-0-e1"


def test_only_a_local_worker_process_of_the_role_may_be_signalled():
    assert not is_worker_process(os.getpid(), "decode"), "pytest is no disagg worker"
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "launcher.cli", "decode-worker"]
    )
    try:
        # NOTE: until the child has exec'd, /proc shows the parent's command line.
        wait_until(lambda: is_worker_process(process.pid, "decode"), 10, "the child to exec")
        assert is_worker_process(process.pid, "colocated"), "colocated runs decode-worker"
        assert not is_worker_process(process.pid, "prefill")
    finally:
        process.kill()
        process.wait()
    assert not is_worker_process(process.pid, "decode"), "a dead pid is never signalled"


def test_the_report_counts_lost_requests_and_says_what_each_fault_did():
    assert num_lost({"num_requests": 20, "num_ok": 17}) == 3
    events = [
        FaultEvent("kill:decode@every=10s", "decode", 10.0, "decode-0-e1", 41, "", 6.5),
        FaultEvent("kill:decode@every=10s", "decode", 20.0, "decode-0-e2", 42, "", None),
        FaultEvent("kill:decode@every=10s", "decode", 30.0, skipped="no live decode worker"),
    ]
    lines = fault_lines(events)
    assert "decode-0-e1 (pid 41); replacement registered after 6.5 s" in lines[0]
    assert "no replacement registered in time" in lines[1]
    assert "skipped (no live decode worker)" in lines[2]
    assert recovery_summary(events).startswith(
        "recovery (fault to replacement registered): p50 6.5 s"
    )
    assert recovery_summary([]) == "recovery: none measured"


def test_a_bad_fault_fails_the_run_before_any_request(tmp_path, capsys):
    code = main(
        [
            "run",
            "--target",
            "x=http://127.0.0.1:9",
            "--fault",
            "kill:gpu@at=1s",
            "-o",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "role must be one of" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


class FakeCluster:
    """A /cluster endpoint on a free port whose worker list the test changes."""

    def __init__(self) -> None:
        self.workers: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps({"ready": True, "workers": owner.workers}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_injector_kills_the_worker_then_times_its_replacement():
    cluster = FakeCluster()
    victim = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "launcher.cli", "decode-worker"]
    )
    try:
        cluster.workers = [worker("decode-0-e1", "decode", 3, pid=victim.pid)]
        with FaultInjector(cluster.url, [parse_fault("kill:decode@at=100ms")]) as injector:
            assert victim.wait(timeout=30) == -signal.SIGKILL
            cluster.workers = [worker("decode-0-e2", "decode", 0, pid=1)]
            wait_until(
                lambda: injector.events and injector.events[0].recovered_after_s, 30, "recovery"
            )
        (event,) = injector.events
        assert (event.worker_id, event.pid, event.skipped) == ("decode-0-e1", victim.pid, "")
        assert event.recovered_after_s > 0
    finally:
        victim.kill()
        victim.wait()
        cluster.close()


def test_after_the_run_the_injector_still_times_a_late_replacement():
    cluster = FakeCluster()
    victim = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "launcher.cli", "prefill-worker"]
    )
    try:
        cluster.workers = [worker("prefill-0-e1", "prefill", 0, pid=victim.pid)]
        late = threading.Timer(
            1.0, lambda: setattr(cluster, "workers", [worker("p-e2", "prefill", 0)])
        )
        with FaultInjector(cluster.url, [parse_fault("term:prefill@at=0s")]) as injector:
            assert victim.wait(timeout=30) == -signal.SIGTERM
            late.start()
        (event,) = injector.events
        assert event.recovered_after_s >= 1.0
    finally:
        victim.kill()
        victim.wait()
        cluster.close()
