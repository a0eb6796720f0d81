"""Chat requests without max_tokens (max_tokens = the rest of the context) on a pool that
could hold only two such whole budgets: blocks on demand let 64 of them decode at once, and
as they grow, the decode worker preempts some (counted in /cluster) instead of failing any."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from tests.cluster_harness import wait_until
from tests.inprocess_cluster import InProcessCluster

NUM_CHATS = 64
CONTEXT_TOKENS = 4096  # the tiny model's max_position_embeddings
BLOCK_SIZE = 16
NUM_KV_BLOCKS = 728  # the default pool (1,456 blocks of 8,192-token context) scaled to 4,096


@pytest.fixture(scope="module")
def default_ratio_pool(tiny_model_dir):
    with InProcessCluster(
        tiny_model_dir, num_kv_blocks=NUM_KV_BLOCKS, block_size=BLOCK_SIZE, queue_timeout_s=10.0
    ) as cluster:
        yield cluster


def open_chat(cluster: InProcessCluster, turn: int):
    body = {
        "messages": [{"role": "user", "content": f"Say something about the number {turn}."}],
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{cluster.url}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    return urllib.request.urlopen(request, timeout=120)


def decode_worker(cluster: InProcessCluster) -> dict:
    (worker,) = [w for w in cluster.cluster()["workers"] if w["role"] != "prefill"]
    return worker


@pytest.mark.slow  # several seconds: the full suite runs it
def test_64_chats_without_max_tokens_decode_at_once(default_ratio_pool):
    # reserving prompt + max_tokens, at most two would fit at once
    num_preemptions = lambda: decode_worker(default_ratio_pool)["num_preemptions"]  # noqa: E731
    assert num_preemptions() == 0
    assert 3 * (CONTEXT_TOKENS // BLOCK_SIZE) > NUM_KV_BLOCKS
    all_streaming = threading.Barrier(NUM_CHATS + 1, timeout=60)
    seen: list[list[str]] = [[] for _ in range(NUM_CHATS)]
    errors: list[BaseException] = []
    may_close = threading.Event()

    def chat(turn: int) -> None:
        try:
            with open_chat(default_ratio_pool, turn) as response:
                while len(seen[turn]) < 4:  # the role, the first token, then decoded ones
                    line = response.readline().decode().strip()
                    if line.startswith("data:"):
                        seen[turn].append(line)
                all_streaming.wait()  # every chat streams at once
                may_close.wait(timeout=60)  # then they grow until some must be preempted
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)
            all_streaming.abort()

    threads = [threading.Thread(target=chat, args=(turn,)) for turn in range(NUM_CHATS)]
    for thread in threads:
        thread.start()
    all_streaming.wait()
    try:
        wait_until(num_preemptions, 60, "the growing chats to preempt some")
    finally:
        may_close.set()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    chunks = [json.loads(line.removeprefix("data:")) for lines in seen for line in lines]
    ended = [c for c in chunks for choice in c["choices"] if choice["finish_reason"] is not None]
    assert ended == [], "a chat ended before every chat was decoding"
    default_ratio_pool.wait_all_blocks_free()
