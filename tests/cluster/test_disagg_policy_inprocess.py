"""`--disagg-policy auto` on the in-process cluster (tiny model, float32): a short uncached
suffix is prefilled in place on the decode worker, a long one on the prefill worker, with
transformers' greedy tokens either way; once the workers have measured their rates, the
cost model decides, and every decision shows in the timings and the placement counter."""

from __future__ import annotations

import random
import urllib.request

import pytest

from tests.cluster_harness import wait_until
from tests.helpers import reference_text
from tests.inprocess_cluster import InProcessCluster

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    with InProcessCluster(
        tiny_model_dir, dispatch={"disagg_policy": "auto"}, heartbeat_interval_s=0.2
    ) as cluster:
        yield cluster


def tokens(seed: int, num_tokens: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(num_tokens)]


def greedy(cluster, prompt: list[int], tiny_fp32) -> dict:
    status, body = cluster.completion(prompt, max_tokens=NEW_TOKENS, temperature=0)
    assert status == 200, body
    assert body["choices"][0]["text"] == reference_text(tiny_fp32, prompt, NEW_TOKENS)
    return body["metrics"]


def test_short_suffixes_prefill_in_place_and_a_long_prompt_on_the_prefill_worker(
    cluster, tiny_fp32
):
    # NOTE: first in the module: the prefill worker has measured nothing yet, so auto
    # decides by the length threshold (32 uncached tokens) until it has
    short = tokens(seed=1, num_tokens=20)
    fresh = greedy(cluster, short, tiny_fp32)
    assert (fresh["prefill_worker"], fresh["prefill_placement"]) == ("decode-0", "in_place")
    follow_up = greedy(cluster, short + tokens(seed=2, num_tokens=10), tiny_fp32)
    assert follow_up["kv_cached_tokens"] == 16  # the decode worker's own cached block
    assert (follow_up["prefill_worker"], follow_up["prefill_placement"]) == (
        "decode-0",
        "in_place",
    )
    long = greedy(cluster, tokens(seed=3, num_tokens=200), tiny_fp32)
    assert (long["prefill_worker"], long["prefill_placement"]) == ("prefill-0", "remote")
    assert fresh["placement_reason"] == long["placement_reason"] == "threshold"
    cluster.wait_all_blocks_free()


def test_once_rates_are_measured_the_cost_model_decides(cluster, tiny_fp32):
    greedy(cluster, tokens(seed=4, num_tokens=100), tiny_fp32)  # makes sure both measured

    def measured() -> dict | None:
        workers = {w["role"]: w for w in cluster.cluster()["workers"]}
        decode, prefill = workers["decode"], workers["prefill"]
        if prefill["prefill_tokens_per_s"] > 0 and decode["decode_step_s"] > 0:
            return workers
        return None

    workers = wait_until(measured, 10, "heartbeats with measured rates")
    assert workers["prefill"]["prefill_overhead_s"] > 0
    base = tokens(seed=5, num_tokens=200)
    for prompt in (base, base + tokens(seed=6, num_tokens=5), tokens(seed=7, num_tokens=300)):
        timings = greedy(cluster, prompt, tiny_fp32)
        assert timings["placement_reason"] == "cost"
        expected = "decode-0" if timings["prefill_placement"] == "in_place" else "prefill-0"
        assert timings["prefill_worker"] == expected
    cluster.wait_all_blocks_free()


def test_decisions_are_counted_by_placement_and_reason(cluster):
    with urllib.request.urlopen(f"{cluster.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {
        line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("disagg_prefill_placements_total{")
    }
    in_place = [v for k, v in counts.items() if 'placement="in_place"' in k and "threshold" in k]
    remote = [v for k, v in counts.items() if 'placement="remote"' in k and "threshold" in k]
    assert in_place and in_place[0] >= 2 and remote and remote[0] >= 1
    assert sum(v for k, v in counts.items() if 'reason="cost"' in k) >= 3
