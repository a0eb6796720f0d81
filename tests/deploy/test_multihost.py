"""The cluster across hosts: coordinator, 2 prefill and 2 decode workers, each in its own
network namespace with its own address, KV over TCP across a bridge.

The namespaces stand in for machines: nothing is shared but the bridge (and the
filesystem, which is why the decode workers are told to use TCP, as they would
need to on real machines). Needs root for `ip netns`; where it is refused the
test is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.local_cluster import get_json, post_json, wait_until
from disagg.model.tokenizer import encode_prompt
from disagg.rpc.health import ROLE_SERVICES
from tests.deploy.netns import Network, netns_refusal
from tests.helpers import reference_text

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
                "--grpc-port", str(GRPC_PORT), "--control-port", str(CONTROL_PORT)]  # fmt: skip
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
def expected(default_fp32) -> dict[str, str]:
    tok = default_fp32.tokenizer
    return {p: reference_text(default_fp32, encode_prompt(tok, p), NEW_TOKENS) for p in PROMPTS}


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
