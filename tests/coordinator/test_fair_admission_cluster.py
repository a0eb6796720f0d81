"""Fair admission end to end: on an in-process cluster whose KV pool holds two requests at
once, tenant A floods (more than its concurrency quota lets run: the rest get 429) while
tenant B's few requests, sent once A's burst fills the wait queue, are all served, with a
time to first token well below A's median. And the `priority` field's checks."""

from __future__ import annotations

import random
import statistics
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cluster_harness import wait_until
from tests.coordinator.front_door import post
from tests.inprocess_cluster import InProcessCluster

NUM_A_REQUESTS = 28
A_MAX_CONCURRENT = 20
NUM_B_REQUESTS = 3
PROMPT_LEN = 96
"""6 blocks of 16, plus one of lookahead: a 16-block pool holds two requests at once."""


def num_waiting(cluster: InProcessCluster) -> int:
    with urllib.request.urlopen(f"{cluster.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    line = next(x for x in text.splitlines() if x.startswith("disagg_requests_waiting{"))
    return int(float(line.rsplit(" ", 1)[1]))


@pytest.mark.slow  # several seconds: the full suite runs it
def test_a_flooding_tenant_gets_429_while_another_is_served_first(tiny_model_dir):
    rng = random.Random(0)
    vocab = range(1000, 30000)  # distinct prompts: no prefix shared between requests

    def complete(tenant: str) -> tuple[int, dict]:
        prompt = [rng.choice(vocab) for _ in range(PROMPT_LEN)]
        body = {"prompt": prompt, "max_tokens": 8, "ignore_eos": True, "user": tenant}
        status, reply, _ = post(f"{cluster.url}/v1/completions", body)
        return status, reply

    with (
        InProcessCluster(
            tiny_model_dir, num_kv_blocks=16, tenant_max_concurrent=A_MAX_CONCURRENT
        ) as cluster,
        ThreadPoolExecutor(NUM_A_REQUESTS + NUM_B_REQUESTS) as pool,
    ):
        start = threading.Barrier(NUM_A_REQUESTS)

        def flood() -> tuple[int, dict]:
            start.wait()
            return complete("A")

        a_futures = [pool.submit(flood) for _ in range(NUM_A_REQUESTS)]
        wait_until(lambda: num_waiting(cluster) >= 12, 60, "tenant A's burst to queue")
        b_futures = [pool.submit(complete, "B") for _ in range(NUM_B_REQUESTS)]
        a_replies = [f.result(timeout=120) for f in a_futures]
        b_replies = [f.result(timeout=120) for f in b_futures]
        cluster.wait_all_blocks_free()

    a_statuses = sorted(status for status, _ in a_replies)
    assert a_statuses == [200] * A_MAX_CONCURRENT + [429] * (NUM_A_REQUESTS - A_MAX_CONCURRENT)
    assert [status for status, _ in b_replies] == [200] * NUM_B_REQUESTS, b_replies
    a_ttfts_s = [reply["metrics"]["ttft_s"] for status, reply in a_replies if status == 200]
    b_ttfts_s = [reply["metrics"]["ttft_s"] for _, reply in b_replies]
    # NOTE: first come first served would put B behind every queued A (over 12 of them)
    assert max(b_ttfts_s) < statistics.median(a_ttfts_s), (b_ttfts_s, sorted(a_ttfts_s))


def test_openai_priority_is_an_integer_field(inprocess_cluster):
    status, _ = inprocess_cluster.completion("Hi", max_tokens=2, priority=-3)
    assert status == 200
    for bad in ("high", 1.5, 2**31):
        status, reply = inprocess_cluster.completion("Hi", max_tokens=2, priority=bad)
        assert status == 400 and reply["error"]["param"] == "priority", reply
