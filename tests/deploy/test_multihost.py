"""The cluster across hosts: coordinator, 2 prefill and 2 decode workers, each in its own
network namespace with its own address, KV over TCP across a bridge.

The namespaces stand in for machines: nothing is shared but the bridge (and the
filesystem, which is why the decode workers are told to use TCP, as they would
need to on real machines). Needs root for `ip netns`; where it is refused the
test is skipped with the reason.

Last, a decode host's link is cut while streams run on it (its bridge port goes down:
no reset, no close, the streams just fall silent). Each of its streams moves to the other
decode host once the coordinator notices (missed heartbeats or the stall timeout, whichever
comes first) and finishes with transformers' tokens; once idle, no
KV block is held on any host still in the cluster, and the cut host, plugged back in,
rejoins with every block free.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.local_cluster import get_json, post_json, wait_until
from disagg.model.loader import LoadedModel
from disagg.model.tokenizer import encode_prompt
from disagg.rpc.health import ROLE_SERVICES
from tests.deploy.netns import Network, netns_refusal
from tests.helpers import reference_tokens

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "1, 1, 2, 3, 5, 8, 13,",
]
NEW_TOKENS = 16
ROLES = ["coordinator", "prefill", "prefill", "decode", "decode"]
# Each host is a fresh namespace, so these ports are free there by construction.
HTTP_PORT, GRPC_PORT, CONTROL_PORT, WORKER_PORT = 8000, 8001, 50050, 50060
START_TIMEOUT_S = 600.0
STALL_TIMEOUT_S = 5.0
"""The coordinator's --stall-timeout: how long a silent decode stream waits before it moves
(the cut host's missed heartbeats, 3 s, usually tell first)."""
CUT_NEW_TOKENS = 48
"""Long enough that every stream is still going when the link is cut."""


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    reason = netns_refusal()
    if reason is not None:
        print(f"skipping the multi-host test: {reason}")
        pytest.skip(reason)
    net = Network(len(ROLES))
    try:
        net.open()
        yield net
    finally:
        logs = tmp_path_factory.getbasetemp() / "multihost"
        net.close()
        assert not net.leftovers(), f"left behind: {net.leftovers()}"
        for log in sorted(logs.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-2000:]}")


def role_command(role: str, index: int, coordinator: str, address: str) -> list[str]:
    cli = [sys.executable, "-m", "launcher.cli"]
    if role == "coordinator":
        return [*cli, "coordinator", "--host", "0.0.0.0", "--http-port", str(HTTP_PORT),
                "--grpc-port", str(GRPC_PORT), "--control-port", str(CONTROL_PORT),
                "--stall-timeout", str(STALL_TIMEOUT_S)]  # fmt: skip
    worker = [*cli, f"{role}-worker", "--coordinator", f"{coordinator}:{CONTROL_PORT}",
              "--host", "0.0.0.0", "--port", str(WORKER_PORT), "--advertise-host", address,
              "--worker-id", f"{role}-host{index}", "--dtype", "float32", "--threads", "1",
              "--kv-cache-memory", str(128 << 20)]  # fmt: skip
    return [*worker, "--kv-transport", "tcp"] if role == "decode" else worker


@pytest.fixture(scope="module")
def cluster(network, tmp_path_factory):
    logs = tmp_path_factory.getbasetemp() / "multihost"
    logs.mkdir(exist_ok=True)
    coordinator = network.hosts[0].address
    for index, (role, host) in enumerate(zip(ROLES, network.hosts)):
        command = role_command(role, index, coordinator, host.address)
        network.spawn(host, command, logs / f"{index}-{role}.log")
    url = f"http://{coordinator}:{HTTP_PORT}"

    def is_up() -> bool:
        for process in network.processes:
            assert process.poll() is None, f"{process.args[4:7]} exited with {process.returncode}"
        try:
            state = get_json(f"{url}/cluster")
        except OSError:
            return False
        return state["ready"] and len(state["workers"]) == len(ROLES) - 1

    wait_until(is_up, START_TIMEOUT_S, "five hosts to form a cluster", interval_s=0.5)
    return url


@pytest.fixture(scope="module")
def reference_ids(default_fp32) -> dict[str, list[int]]:
    """transformers' greedy tokens per prompt, once, as many as the longest test wants (a
    shorter greedy run is a prefix)."""
    tok = default_fp32.tokenizer
    model = default_fp32.model
    return {p: reference_tokens(model, encode_prompt(tok, p), CUT_NEW_TOKENS) for p in PROMPTS}


def texts(loaded: LoadedModel, reference_ids: dict[str, list[int]], num_tokens: int) -> dict:
    """The text a server returns for the first `num_tokens` (special tokens dropped)."""
    decode = loaded.tokenizer.decode
    return {
        p: decode(ids[:num_tokens], skip_special_tokens=True) for p, ids in reference_ids.items()
    }


@pytest.fixture(scope="module")
def expected(default_fp32, reference_ids) -> dict[str, str]:
    return texts(default_fp32, reference_ids, NEW_TOKENS)


@pytest.fixture(scope="module")
def expected_long(default_fp32, reference_ids) -> dict[str, str]:
    return texts(default_fp32, reference_ids, CUT_NEW_TOKENS)


def greedy(url: str, prompt: str) -> dict:
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    status, reply = post_json(f"{url}/v1/completions", body)
    assert status == 200, reply
    return reply


def test_workers_register_from_their_own_hosts(network, cluster):
    workers = get_json(f"{cluster}/cluster")["workers"]
    addresses = {w["worker_id"]: w["address"] for w in workers}
    for index, (role, host) in enumerate(zip(ROLES, network.hosts)):
        if role != "coordinator":
            assert addresses[f"{role}-host{index}"] == f"{host.address}:{WORKER_PORT}"


def test_greedy_tokens_equal_transformers_and_kv_crosses_the_bridge(network, cluster, expected):
    hosts = {f"{role}-host{i}": h for i, (role, h) in enumerate(zip(ROLES, network.hosts))}
    sent_before = {name: h.nbytes_sent for name, h in hosts.items()}
    received_before = {name: h.nbytes_received for name, h in hosts.items()}
    prompts = PROMPTS * 2
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: greedy(cluster, p), prompts))
    assert [r["choices"][0]["text"] for r in replies] == [expected[p] for p in prompts]

    kv_sent, kv_received = Counter(), Counter()
    for reply in replies:
        metrics = reply["metrics"]
        assert metrics["kv_bytes"] > 0
        kv_sent[metrics["prefill_worker"]] += metrics["kv_bytes"]
        kv_received[metrics["decode_worker"]] += metrics["kv_bytes"]
    assert set(kv_sent) <= {n for n in hosts if n.startswith("prefill")}
    assert set(kv_received) <= {n for n in hosts if n.startswith("decode")}
    assert len(kv_sent) == 2 and len(kv_received) == 2, "every worker host took part"
    for name, nbytes in kv_sent.items():  # headers and TCP framing only add
        assert hosts[name].nbytes_sent - sent_before[name] >= nbytes, name
    for name, nbytes in kv_received.items():
        assert hosts[name].nbytes_received - received_before[name] >= nbytes, name
    print(f"KV bytes across the bridge: sent {dict(kv_sent)}, received {dict(kv_received)}")


async def health_of(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        return (await stub.Check(request, timeout=5)).status


def test_every_host_reports_serving_on_grpc_health(network, cluster):
    serving = health_pb2.HealthCheckResponse.SERVING
    for role, host in zip(ROLES, network.hosts):
        if role == "coordinator":
            assert asyncio.run(health_of(f"{host.address}:{GRPC_PORT}", "")) == serving
            continue
        for service in ("", *ROLE_SERVICES[role]):
            assert asyncio.run(health_of(f"{host.address}:{WORKER_PORT}", service)) == serving


@dataclass
class Stream:
    """One greedy streamed completion as the client sees it."""

    prompt: str
    text: str = ""
    num_chunks: int = 0
    finish_reason: str | None = None

    def run(self, url: str) -> Stream:
        body = {"prompt": self.prompt, "max_tokens": CUT_NEW_TOKENS, "temperature": 0,
                "stream": True}  # fmt: skip
        request = urllib.request.Request(
            f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            for line in (raw.decode().strip() for raw in response):
                if line.startswith("data: {"):
                    event = json.loads(line[len("data: ") :])
                    assert "error" not in event, event
                    (choice,) = event["choices"]
                    self.text += choice["text"]
                    self.num_chunks += 1
                    self.finish_reason = choice["finish_reason"] or self.finish_reason
        return self


def migrations(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(n) for n in re.findall(r"^disagg_migrations_total\{.*\} (\S+)$", text, re.M))


def workers_by_id(url: str) -> dict[str, dict]:
    return {w["worker_id"]: w for w in get_json(f"{url}/cluster")["workers"]}


def busy_decode_worker(url: str, streams: list[Stream]) -> str:
    """A decode worker with sequences on it, once every stream has tokens (mid-stream)."""
    wait_until(lambda: all(s.num_chunks >= 2 for s in streams), 300, "every stream to be going")
    return wait_until(
        lambda: next((i for i, w in workers_by_id(url).items()
                      if w["role"] == "decode" and w["load"] > 0), None),
        30, "a decode worker with sequences",
    )  # fmt: skip


def holds_nothing(worker: dict) -> bool:
    return worker["free_kv_blocks"] == worker["total_kv_blocks"] and worker["load"] == 0


def test_a_decode_host_cut_off_mid_stream_loses_no_stream(network, cluster, expected_long):
    hosts = {f"{role}-host{i}": h for i, (role, h) in enumerate(zip(ROLES, network.hosts))}
    migrations_before = migrations(cluster)
    streams = [Stream(prompt) for prompt in PROMPTS]
    with ThreadPoolExecutor(len(streams)) as pool:
        futures = [pool.submit(stream.run, cluster) for stream in streams]
        victim = busy_decode_worker(cluster, streams)
        network.cut(hosts[victim])
        try:
            assert [f.result().text for f in futures] == [expected_long[p] for p in PROMPTS]
        finally:
            if any(not f.done() for f in futures):
                network.mend(hosts[victim])  # NOTE: so that the fixture can stop the cluster
    assert all(s.finish_reason in ("length", "stop") for s in streams)
    assert migrations(cluster) > migrations_before, "the cut hit no stream"

    def survivors_idle() -> bool:
        survivors = workers_by_id(cluster)
        return victim not in survivors and all(holds_nothing(w) for w in survivors.values())

    wait_until(survivors_idle, 60, "the surviving hosts to hold no KV block", interval_s=0.5)
    assert len(workers_by_id(cluster)) == len(ROLES) - 2, "only the cut host left the cluster"

    network.mend(hosts[victim])

    def victim_back_and_idle() -> bool:
        workers = workers_by_id(cluster)
        return len(workers) == len(ROLES) - 1 and all(holds_nothing(w) for w in workers.values())

    wait_until(victim_back_and_idle, 120, "the cut host to rejoin holding no KV", interval_s=0.5)
