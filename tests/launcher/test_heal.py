"""`disagg serve` heals: a killed worker comes back under a new id; SIGTERM drains a worker.

Real processes and the real default model (slow). Every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.cluster_harness import ServeProcess, pid_alive, wait_until

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
DRAINED = "exited with code 0 after draining; not restarted"
RESTART_TIMEOUT_S = 240.0
"""Backoff, a fresh process's imports and model load, registration (a busy 2-core box)."""


def decode_workers(serve: ServeProcess) -> list[dict]:
    return [w for w in serve.cluster()["workers"] if w["role"] == "decode"]


def greedy_text(serve: ServeProcess, max_tokens: int = 12) -> str | None:
    status, body = serve.completion(PROMPT, max_tokens=max_tokens, temperature=0)
    return body["choices"][0]["text"] if status == 200 else None


def stream_completion(serve: ServeProcess, max_tokens: int) -> list[dict]:
    """Every SSE event of one streaming completion, `[DONE]` as {"done": True}."""
    body = {
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        f"{serve.url}/v1/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(request, timeout=RESTART_TIMEOUT_S) as response:
        for raw in response:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                events.append({"done": True})
            elif line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    return events


def log_has(path: Path, text: str) -> bool:
    return text in path.read_text()


def test_a_killed_worker_is_restarted_and_a_drained_one_finishes_and_stays_down(tmp_path):
    log = tmp_path / "serve.log"
    serve = ServeProcess("--prefill-workers", "1", "--decode-workers", "1")
    serve.stderr_path = str(log)
    with serve:
        expected = greedy_text(serve)
        assert expected
        (victim,) = decode_workers(serve)
        assert victim["worker_id"] == "decode-0-e1"

        os.kill(victim["pid"], signal.SIGKILL)
        restarted = wait_until(
            lambda: [w for w in decode_workers(serve) if w["worker_id"] == "decode-0-e2"],
            RESTART_TIMEOUT_S,
            "the killed decode worker to register again",
        )[0]
        serve.worker_pids[restarted["worker_id"]] = restarted["pid"]
        assert restarted["pid"] != victim["pid"]
        assert log_has(log, f"decode-0-e1 (pid {victim['pid']}) was killed by SIGKILL")
        assert wait_until(lambda: greedy_text(serve), 60, "a request to succeed again") == expected

        events: list[dict] = []
        stream = threading.Thread(target=lambda: events.extend(stream_completion(serve, 96)))
        stream.start()
        wait_until(lambda: decode_workers(serve)[0]["load"] > 0, 60, "the stream to be decoding")
        os.kill(restarted["pid"], signal.SIGTERM)
        assert stream.is_alive(), "the stream ended before the drain began"
        wait_until(
            lambda: not decode_workers(serve) or decode_workers(serve)[0]["draining"],
            10,
            "the decode worker to leave the rotation",
        )
        stream.join(timeout=120)
        assert not stream.is_alive(), "the in-flight stream hung during the drain"
        assert not any("error" in e for e in events), events
        assert events[-1] == {"done": True}
        finishes = [c["finish_reason"] for e in events[:-1] for c in e.get("choices", [])]
        assert finishes[-1] == "length"
        assert events[-2]["usage"]["completion_tokens"] == 96
        wait_until(lambda: not pid_alive(restarted["pid"]), 30, "the drained worker to exit")
        wait_until(
            lambda: log_has(log, f"decode-0-e2 (pid {restarted['pid']}) {DRAINED}"),
            10,
            "the supervisor to report the drain",
        )
