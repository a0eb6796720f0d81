"""The prefix cache across the split, on the in-process cluster (tiny model, float32): a shared
system prompt is computed and shipped once; later requests get transformers' tokens from it."""

from __future__ import annotations

import random
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cluster_harness import wait_until
from tests.helpers import reference_text

NEW_TOKENS = 12
BLOCK_SIZE = 16  # the in-process cluster's


@pytest.fixture(scope="module")
def cluster(inprocess_cluster):
    return inprocess_cluster


def system_prompt(seed: int, num_tokens: int = 150) -> list[int]:
    """A prompt no other test sends: token ids of a seeded draw (below the tiny vocabulary)."""
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(num_tokens)]


def greedy(cluster, prompt: list[int]) -> dict:
    status, body = cluster.completion(prompt, max_tokens=NEW_TOKENS, temperature=0)
    assert status == 200, body
    return body


def assert_exact(body: dict, tiny_fp32, prompt: list[int]) -> None:
    assert body["choices"][0]["text"] == reference_text(tiny_fp32, prompt, NEW_TOKENS)


def test_a_second_request_reuses_the_prefix_on_both_sides(cluster, tiny_fp32):
    system = system_prompt(seed=1)
    first, second = system + [11, 12, 13], system + [21, 22, 23, 24, 25]
    cold = greedy(cluster, first)
    warm = greedy(cluster, second)
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    num_cached = len(system) // BLOCK_SIZE * BLOCK_SIZE
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == num_cached
    assert warm["metrics"]["kv_cached_tokens"] == num_cached
    per_token = cold["metrics"]["kv_bytes"] / len(first)
    assert warm["metrics"]["kv_bytes"] == per_token * (len(second) - num_cached)
    assert_exact(cold, tiny_fp32, first)
    assert_exact(warm, tiny_fp32, second)
    cluster.wait_all_blocks_free()

    def every_worker_reports_cached_blocks() -> bool:
        return all(w["cached_kv_blocks"] >= 9 for w in cluster.cluster()["workers"])

    wait_until(every_worker_reports_cached_blocks, 10, "heartbeats with cached blocks")


def test_the_same_prompt_again_ships_only_its_last_block(cluster, tiny_fp32):
    prompt = system_prompt(seed=2, num_tokens=64)  # ends on a block boundary
    cold, warm = greedy(cluster, prompt), greedy(cluster, prompt)
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 48
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
    assert_exact(warm, tiny_fp32, prompt)
    cluster.wait_all_blocks_free()


def test_concurrent_requests_sharing_a_prefix_equal_transformers(cluster, tiny_fp32):
    system = system_prompt(seed=3)
    prompts = [system + [1000 + i] * (i + 1) for i in range(6)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        bodies = list(pool.map(lambda p: greedy(cluster, p), prompts))
    for body, prompt in zip(bodies, prompts):
        assert_exact(body, tiny_fp32, prompt)
    again = greedy(cluster, system + [7])  # whatever raced above, now it is cached
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 144
    cluster.wait_all_blocks_free()


def test_prefix_cache_metrics_count_hits(cluster):
    system = system_prompt(seed=4, num_tokens=40)
    greedy(cluster, system + [5])
    greedy(cluster, system + [6])
    with urllib.request.urlopen(f"{cluster.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "disagg_prefix_cache_query_tokens_total" in text
    hits = [
        line
        for line in text.splitlines()
        if line.startswith("disagg_prefix_cache_hit_tokens_total") and 'role="decode"' in line
    ]
    assert hits and float(hits[0].rsplit(" ", 1)[1]) >= 32
