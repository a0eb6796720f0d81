"""The cluster as users run it: `disagg serve` processes, real sockets, the real default model."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from disagg.model.tokenizer import encode_prompt
from tests.cluster_harness import ServeProcess, wait_until
from tests.helpers import reference_text

pytestmark = pytest.mark.slow  # starts real `disagg serve` processes on the default model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Le chat est assis sur le tapis, et",
    "Photosynthesis is the process by which",
    "東京は日本の首都で、",
    "1, 1, 2, 3, 5, 8, 13,",
    "Q: Why is the sky blue?\nA:",
    "SELECT name, COUNT(*) FROM orders",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def expected(default_fp32) -> dict[str, str]:
    """transformers' greedy text for every prompt."""
    tok = default_fp32.tokenizer
    return {p: reference_text(default_fp32, encode_prompt(tok, p), NEW_TOKENS) for p in PROMPTS}


@pytest.fixture(scope="module")
def cluster():
    with ServeProcess("--prefill-workers", "2", "--decode-workers", "2") as serve:
        yield serve


def greedy(serve: ServeProcess, prompt: str, **fields: object) -> dict:
    status, body = serve.completion(prompt, max_tokens=NEW_TOKENS, temperature=0, **fields)
    assert status == 200, body
    return body


def test_disaggregated_greedy_equals_transformers(cluster, expected):
    for prompt in PROMPTS:
        body = greedy(cluster, prompt)
        assert body["choices"][0]["text"] == expected[prompt]
        metrics = body["metrics"]
        assert metrics["kv_bytes"] > 0 and metrics["ttft_s"] > 0
        assert metrics["prefill_worker"].startswith("prefill-")
    cluster.wait_all_blocks_free()


def test_sixteen_concurrent_requests_across_two_by_two_workers(cluster, expected):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda p: greedy(cluster, p), prompts))
    assert [b["choices"][0]["text"] for b in bodies] == [expected[p] for p in prompts]
    used = {(b["metrics"]["prefill_worker"], b["metrics"]["decode_worker"]) for b in bodies}
    assert len({p for p, _ in used}) == 2 and len({d for _, d in used}) == 2, used
    cluster.wait_all_blocks_free()


def test_streamed_pieces_concatenate_to_the_full_text(cluster, expected):
    prompt = PROMPTS[1]
    options = {"stream_options": {"include_usage": True}}
    chunks = list(stream_chunks(cluster, prompt, max_tokens=NEW_TOKENS, temperature=0, **options))
    assert chunks[-1] == "[DONE]"
    bodies = [json.loads(c) for c in chunks[:-1]]
    text = "".join(b["choices"][0]["text"] for b in bodies if b["choices"])
    assert text == expected[prompt]
    assert bodies[-1]["choices"] == [] and bodies[-1]["usage"]["completion_tokens"] == NEW_TOKENS


def test_stop_string_is_cut_and_frees_the_request(cluster, expected):
    prompt = PROMPTS[0]
    full = expected[prompt]
    stop = full[10:14]
    body = greedy(cluster, prompt, stop=[stop])
    assert body["choices"][0]["text"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    cluster.wait_all_blocks_free()


BAD_REQUESTS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": 42}, "prompt"),
]
"""Bodies the front door refuses with a 400 naming the field (also run in-process)."""


@pytest.mark.parametrize(("body", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_leak_nothing(cluster, body, param):
    from tests.cluster_harness import post_json

    status, reply = post_json(f"{cluster.url}/v1/completions", body)
    assert status == 400
    assert reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"
    cluster.wait_all_blocks_free()


def test_a_hundred_requests_with_random_cancellations_leak_nothing(cluster):
    rng = random.Random(0)
    plans = [(PROMPTS[i % len(PROMPTS)], rng.random() < 0.4, rng.randint(1, 6)) for i in range(100)]
    outcomes: list[str] = []
    lock = threading.Lock()

    def run(plan: tuple[str, bool, int]) -> None:
        prompt, cancel, after = plan
        chunks = stream_chunks(cluster, prompt, max_tokens=12, temperature=0.8, seed=after)
        received = []
        for received_count, chunk in enumerate(chunks, start=1):
            received.append(chunk)
            if cancel and received_count >= after:
                chunks.close()  # the client goes away mid-stream
                break
        if cancel and received[-1] != "[DONE]":
            outcome = "cancelled"
        else:
            outcome = "done" if received[-1] == "[DONE]" else "bad"
        with lock:
            outcomes.append(outcome)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(run, plans))
    assert len(outcomes) == 100 and "bad" not in outcomes
    assert outcomes.count("cancelled") > 10
    cluster.wait_all_blocks_free(timeout_s=60)
    assert greedy(cluster, PROMPTS[0])["choices"][0]["finish_reason"] in ("stop", "length")


def stream_chunks(serve: ServeProcess, prompt: str, **fields: object):
    """The `data:` payloads of a streamed completion; closing the generator disconnects."""
    body = json.dumps({"prompt": prompt, "stream": True, **fields}).encode()
    request = urllib.request.Request(
        f"{serve.url}/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: "):
                yield line[len("data: ") :]


def test_colocated_mode_gives_the_same_tokens(expected):
    with ServeProcess("--mode", "colocated") as serve:
        for prompt in PROMPTS[:3]:
            assert greedy(serve, prompt)["choices"][0]["text"] == expected[prompt]
        serve.wait_all_blocks_free()


def test_killing_a_decode_worker_moves_its_requests_and_the_rest_keep_serving(expected):
    """Requests on the killed worker migrate to the other one (coordinator/migration.py):
    every stream ends normally with [DONE], and the migration is counted."""
    with ServeProcess("--prefill-workers", "1", "--decode-workers", "2") as serve:
        results: dict[int, list[str]] = {}

        def consume(i: int) -> None:
            results[i] = list(
                stream_chunks(serve, PROMPTS[i], max_tokens=160, temperature=0, ignore_eos=True)
            )

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        decode_ids = [w for w in serve.worker_pids if w.startswith("decode-")]
        wait_until(
            lambda: all(
                w["load"] > 0 for w in serve.cluster()["workers"] if w["worker_id"] in decode_ids
            ),
            120,
            "both decode workers to be busy",
        )
        victim = decode_ids[0]
        os.kill(serve.worker_pids[victim], signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), "a request hung after its decode worker died"
        failed = [r for r in results.values() if any('"error"' in c for c in r)]
        assert not failed, f"requests on the killed worker must migrate, not fail: {failed[0]}"
        assert all(chunks[-1] == "[DONE]" for chunks in results.values())
        with urllib.request.urlopen(f"{serve.url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert any(
            line.startswith("disagg_migrations_total")
            and 'cause="decode_failed"' in line
            and float(line.rsplit(" ", 1)[1]) >= 1
            for line in metrics.splitlines()
        ), "the killed worker's requests were not counted as migrated"
        wait_until(
            lambda: victim not in {w["worker_id"] for w in serve.cluster()["workers"]},
            10,
            "the dead worker to leave the rotation",
        )
        for prompt in PROMPTS[:2]:
            assert greedy(serve, prompt)["choices"][0]["text"] == expected[prompt]
        serve.worker_pids.pop(victim)
