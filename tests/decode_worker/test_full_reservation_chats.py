"""Chats without max_tokens on a decode worker with the `full` reservation (the baseline):
each holds the blocks of its whole context from Allocate on, so on a pool that holds two
contexts, a third waits in the coordinator's admission queue until one of the two ends."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from tests.cluster_harness import wait_until
from tests.inprocess_cluster import InProcessCluster

CONTEXT_TOKENS = 4096  # the tiny model's max_position_embeddings
BLOCK_SIZE = 16
CONTEXT_BLOCKS = CONTEXT_TOKENS // BLOCK_SIZE
NUM_KV_BLOCKS = 600
"""Two whole contexts fit, three do not."""


@pytest.fixture(scope="module")
def full_reservation_pool(tiny_model_dir):
    with InProcessCluster(
        tiny_model_dir,
        num_kv_blocks=NUM_KV_BLOCKS,
        block_size=BLOCK_SIZE,
        heartbeat_interval_s=0.2,
        decode={"kv_reservation": "full"},
    ) as cluster:
        yield cluster


class Chat:
    """A streaming chat without max_tokens, read in a thread until its first token."""

    def __init__(self, cluster: InProcessCluster, turn: int) -> None:
        body = {
            "messages": [{"role": "user", "content": f"Say something about the number {turn}."}],
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
        }
        self.request = urllib.request.Request(
            f"{cluster.url}/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        self.has_token = threading.Event()
        self.may_close = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with urllib.request.urlopen(self.request, timeout=120) as response:
                while not self.has_token.is_set():
                    raw = response.readline()
                    assert raw, "the stream ended before its first token"
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line.removeprefix("data:"))
                    if any(c["delta"].get("content") for c in chunk["choices"]):
                        self.has_token.set()
                self.may_close.wait(timeout=60)
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            self.errors.append(error)

    def close(self) -> None:
        self.may_close.set()
        self.thread.join(timeout=30)
        assert self.errors == []


def decode_worker(cluster: InProcessCluster) -> dict:
    (worker,) = [w for w in cluster.cluster()["workers"] if w["role"] != "prefill"]
    return worker


def test_chats_without_max_tokens_hold_their_context_and_the_third_waits(
    full_reservation_pool,
):
    cluster = full_reservation_pool
    assert 2 * CONTEXT_BLOCKS <= NUM_KV_BLOCKS < 3 * CONTEXT_BLOCKS
    chats = [Chat(cluster, turn) for turn in range(3)]
    try:
        wait_until(lambda: sum(c.has_token.is_set() for c in chats) == 2, 60, "two chats")
        (waiting,) = [c for c in chats if not c.has_token.is_set()]

        def two_contexts_held() -> bool:
            worker = decode_worker(cluster)
            # NOTE: the chats may share their template's first block (prefix cache)
            used = worker["total_kv_blocks"] - worker["free_kv_blocks"]
            return worker["num_running_sequences"] == 2 and used >= 2 * CONTEXT_BLOCKS - 1

        wait_until(two_contexts_held, 30, "two whole contexts held by the decode worker")
        assert not waiting.has_token.is_set(), "a third context fitted the pool"
        [c for c in chats if c is not waiting][0].close()  # its blocks come back
        wait_until(waiting.has_token.is_set, 60, "the waiting chat to start")
    finally:
        for chat in chats:
            chat.close()
    assert decode_worker(cluster)["num_preemptions"] == 0
    cluster.wait_all_blocks_free()
