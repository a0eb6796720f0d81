"""Chaos on a real `disagg serve` (2 prefill + 2 decode workers, the default model, float32):
a decode worker SIGSTOPped or SIGKILLed mid-stream, a prefill worker SIGKILLed during prefill.
Every request completes with the undisturbed run's greedy text, the metrics show the faults
hit their windows, and once idle every KV block on every live worker is free.

One cluster serves the three faults in turn (starting one loads the model five times).
Every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from tests.cluster_harness import ServeProcess, wait_until

pytestmark = pytest.mark.slow

STALL_TIMEOUT_S = 3.0
NUM_STREAMS = 6
DECODE_MAX_TOKENS = 32
PREFILL_MAX_TOKENS = 4
TOPICS = ("rivers", "bread", "trains", "owls", "glass", "chess", "tides", "paper")
LONG_PROMPT_WORDS = 140
"""Long enough that a CPU prefill takes a while, so a kill lands during one."""


@dataclass
class Stream:
    """One streaming request as the client saw it."""

    chat: bool
    prompt: str
    max_tokens: int
    text: str = ""
    num_chunks: int = 0
    finishes: list[str] = field(default_factory=list)
    num_done: int = 0
    usage: dict | None = None

    def body(self) -> dict:
        common = {
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            return {"messages": [{"role": "user", "content": self.prompt}], **common}
        return {"prompt": self.prompt, **common}

    def run(self, url: str) -> Stream:
        path = "/v1/chat/completions" if self.chat else "/v1/completions"
        request = urllib.request.Request(
            url + path, json.dumps(self.body()).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=180) as response:
            for raw in response:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    self.num_done += 1
                elif line.startswith("data: "):
                    self.take(json.loads(line[len("data: ") :]))
        return self

    def take(self, event: dict) -> None:
        assert "error" not in event, event
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices", []):
            self.text += choice.get("text") or choice.get("delta", {}).get("content") or ""
            self.num_chunks += 1
            if choice.get("finish_reason"):
                self.finishes.append(choice["finish_reason"])


def streams(long: bool) -> list[Stream]:
    """Half completions, half chat; distinct prompts."""
    made = []
    for i in range(NUM_STREAMS):
        topic = TOPICS[i]
        if long:
            words = " ".join(f"{topic} {n}" for n in range(LONG_PROMPT_WORDS // 2))
            prompt, max_tokens = f"Summarize: {words}", PREFILL_MAX_TOKENS
        else:
            prompt, max_tokens = f"Write a short story about {topic}.", DECODE_MAX_TOKENS
        made.append(Stream(i % 2 == 1, prompt, max_tokens))
    return made


def run_all(serve: ServeProcess, batch: list[Stream], fault=None) -> list[Stream]:
    """Run every stream at once; `fault(batch)` runs alongside, from the test's thread."""
    with ThreadPoolExecutor(len(batch)) as pool:
        futures = [pool.submit(stream.run, serve.url) for stream in batch]
        if fault is not None:
            fault(batch)
        return [future.result() for future in futures]


def check_same(disturbed: list[Stream], undisturbed: list[Stream]) -> None:
    for got, want in zip(disturbed, undisturbed):
        assert got.text == want.text, (got.prompt[:40], got.text, want.text)
        assert got.finishes == ["length"] and got.num_done == 1
        assert got.usage["completion_tokens"] == got.max_tokens


def migrations(serve: ServeProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"{serve.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r'disagg_migrations_total\{[^}]*cause="(\w+)"[^}]*\} (\S+)', text)
    return {cause: float(value) for cause, value in found}


def workers(serve: ServeProcess, role: str) -> list[dict]:
    return [w for w in serve.cluster()["workers"] if w["role"] == role]


def busy_decode_worker(serve: ServeProcess, batch: list[Stream]) -> dict:
    """A decode worker with sequences on it, once every stream has tokens (mid-stream)."""
    wait_until(lambda: all(s.num_chunks >= 3 for s in batch), 120, "every stream to be going")
    return wait_until(
        lambda: next((w for w in workers(serve, "decode") if w["load"] > 0), None),
        30,
        "a decode worker with sequences",
    )


def test_requests_survive_killed_and_hung_workers_with_the_same_tokens():
    serve = ServeProcess(
        "--prefill-workers", "2", "--decode-workers", "2",
        "--stall-timeout", str(STALL_TIMEOUT_S),
    )  # fmt: skip
    with serve:
        expected = run_all(serve, streams(long=False))
        assert all(s.usage["completion_tokens"] == DECODE_MAX_TOKENS for s in expected)

        # a hang: SIGSTOP a decode worker mid-stream, SIGCONT it once its streams moved
        stopped: dict = {}

        def hang(batch: list[Stream]) -> None:
            stopped.update(busy_decode_worker(serve, batch))
            os.kill(stopped["pid"], signal.SIGSTOP)
            try:
                wait_until(lambda: sum(migrations(serve).values()) > 0 or _all_done(batch),
                           60, "the hung worker's streams to move")  # fmt: skip
            finally:
                os.kill(stopped["pid"], signal.SIGCONT)

        check_same(run_all(serve, streams(long=False), hang), expected)
        assert sum(migrations(serve).values()) >= 1, "the hang hit no stream"
        wait_until(lambda: len(workers(serve, "decode")) == 2, 60, "the hung worker to return")

        # a crash: SIGKILL a decode worker mid-stream
        before = migrations(serve).get("decode_failed", 0)
        killed: dict = {}

        def crash(batch: list[Stream]) -> None:
            killed.update(busy_decode_worker(serve, batch))
            os.kill(killed["pid"], signal.SIGKILL)

        check_same(run_all(serve, streams(long=False), crash), expected)
        assert migrations(serve).get("decode_failed", 0) > before, "the crash hit no stream"

        # a prefill worker killed during prefill (long prompts)
        expected_long = run_all(serve, streams(long=True))

        def kill_prefill(batch: list[Stream]) -> None:
            victim = wait_until(
                lambda: next((w for w in workers(serve, "prefill") if w["load"] > 0), None),
                60,
                "a prefill worker to be busy",
            )
            os.kill(victim["pid"], signal.SIGKILL)

        check_same(run_all(serve, streams(long=True), kill_prefill), expected_long)
        assert migrations(serve).get("prefill_failed", 0) >= 1, "the kill hit no prefill"
        serve.wait_all_blocks_free(timeout_s=60)
        # the killed ones are gone; their restarts too must stop with the cluster
        serve.worker_pids.update({w["worker_id"]: w["pid"] for w in serve.cluster()["workers"]})


def _all_done(batch: list[Stream]) -> bool:
    return all(s.num_done for s in batch)
