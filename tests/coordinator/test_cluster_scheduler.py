"""The cluster scheduler against a small decode pool (8 blocks of 16 tokens) and a heartbeat
far slower than the test, so nothing here may wait for a heartbeat to see room."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from unittest import mock

import pytest

from disagg.model.runner import ModelRunner
from tests.cluster_harness import wait_until
from tests.inprocess_cluster import InProcessCluster

NUM_KV_BLOCKS, BLOCK_SIZE = 8, 16
POOL_TOKENS = NUM_KV_BLOCKS * BLOCK_SIZE
HEARTBEAT_INTERVAL_S = 120.0
QUEUE_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def small_pool(tiny_model_dir):
    with InProcessCluster(
        tiny_model_dir,
        num_kv_blocks=NUM_KV_BLOCKS,
        block_size=BLOCK_SIZE,
        queue_timeout_s=QUEUE_TIMEOUT_S,
        heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
    ) as cluster:
        yield cluster


def num_waiting(cluster: InProcessCluster) -> float:
    with urllib.request.urlopen(f"{cluster.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^disagg_requests_waiting\{[^}]*\} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_request_larger_than_the_whole_decode_pool_is_refused_at_once(small_pool):
    """It could never fit: a 400 now, not a 503 after waiting out the queue timeout."""
    start_s = time.monotonic()
    status, reply = small_pool.completion("hello", max_tokens=POOL_TOKENS, ignore_eos=True)
    elapsed_s = time.monotonic() - start_s
    assert status == 400, reply
    assert reply["error"]["param"] == "max_tokens" and "decode worker" in reply["error"]["message"]
    assert elapsed_s < QUEUE_TIMEOUT_S / 4
    small_pool.wait_all_blocks_free()


def test_a_waiting_request_runs_as_soon_as_a_cancelled_one_frees_its_blocks(small_pool):
    """The first request grows towards 7 of the 8 blocks; the second's prompt alone needs 7
    (96 tokens + the lookahead), so it waits; when the first one's client leaves, the freed
    blocks admit it at once, not at the next heartbeat (minutes away).

    The tiny model decodes 100 tokens in a fraction of a second, so decode steps are held
    until the second request is seen waiting: the first may not finish on its own first."""
    fields = {"max_tokens": 100, "ignore_eos": True, "temperature": 0}
    body = json.dumps({"prompt": "hello", "stream": True, **fields}).encode()
    second_fields = {**fields, "max_tokens": 32}
    second_queued = threading.Event()
    real_decode = ModelRunner.decode

    def held_decode(runner: ModelRunner, seqs: list) -> object:
        second_queued.wait(30)
        return real_decode(runner, seqs)

    with mock.patch.object(ModelRunner, "decode", held_decode):
        first = urllib.request.urlopen(
            urllib.request.Request(
                f"{small_pool.url}/v1/completions", body, {"Content-Type": "application/json"}
            ),
            timeout=60,
        )
        first.readline()  # the first one holds its blocks
        second: dict = {}

        def run_second() -> None:
            start_s = time.monotonic()
            second["reply"] = small_pool.completion([5] * 96, **second_fields)
            second["elapsed_s"] = time.monotonic() - start_s

        thread = threading.Thread(target=run_second)
        thread.start()
        try:
            wait_until(lambda: num_waiting(small_pool) == 1, 20, "the second request to queue")
        finally:
            second_queued.set()
        first.close()  # the client leaves: Free returns its blocks
        thread.join(timeout=QUEUE_TIMEOUT_S + 10)
    status, reply = second["reply"]
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == 32
    assert reply["metrics"]["queue_s"] > 0 and second["elapsed_s"] < HEARTBEAT_INTERVAL_S / 4
    small_pool.wait_all_blocks_free()
