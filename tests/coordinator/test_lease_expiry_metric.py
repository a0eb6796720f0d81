"""Handles freed by lease expiry, and engine progress, reach the coordinator's /metrics per
worker: the workers count them and report them in every heartbeat."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from coordinator.metrics import Metrics
from coordinator.registry import WorkerRegistry
from disagg.engine.sampling_params import SamplingParams
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.convert import sampling_to_proto
from tests.cluster_harness import wait_until

LEASE_S = 0.3


def scraped(text: str, name: str) -> dict[str, float]:
    """worker id -> value of the sample `name` in a Prometheus text exposition."""
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_heartbeat_counts_are_exported_per_worker():
    async def render() -> str:
        registry = WorkerRegistry()
        for worker_id, role in (("decode-0", "decode"), ("prefill-0", "prefill")):
            registry.register(pb.WorkerInfo(worker_id=worker_id, role=role, address="x:1"))
        registry.heartbeat(
            pb.HeartbeatRequest(
                worker_id="decode-0", num_handles_lease_expired=3, num_engine_steps=40
            )
        )
        registry.heartbeat(pb.HeartbeatRequest(worker_id="prefill-0", num_engine_steps=7))
        return Metrics("m").render(registry, running=0, waiting=0).decode()

    text = asyncio.run(render())
    assert scraped(text, "disagg_kv_handles_lease_expired_total") == {"decode-0": 3.0}
    assert scraped(text, "disagg_engine_steps_total") == {"decode-0": 40.0, "prefill-0": 7.0}


def metrics_text(cluster) -> str:
    with urllib.request.urlopen(f"{cluster.url}/metrics", timeout=10) as response:
        return response.read().decode()


def test_a_handle_nobody_renews_is_freed_and_counted_on_the_metrics(inprocess_cluster):
    """A handle allocated behind the coordinator's back (as if by a coordinator that since
    restarted): no heartbeat reply renews it, so its worker frees it when the lease runs out,
    and the next heartbeat's count shows on /metrics."""
    cluster = inprocess_cluster
    decode = next(w for w in cluster.cluster()["workers"] if w["role"] == "decode")
    worker_id = decode["worker_id"]
    before = scraped(metrics_text(cluster), "disagg_kv_handles_lease_expired_total")
    assert worker_id in before, "exported from the first scrape, as 0 until one expires"
    request = pb.AllocateRequest(
        request_id="orphan",
        prompt_token_ids=[1, 2, 3, 4],
        sampling=sampling_to_proto(SamplingParams(temperature=0, max_tokens=4)),
        lease_s=LEASE_S,
    )
    with grpc.insecure_channel(decode["address"]) as channel:
        handle = pb_grpc.DecodeWorkerStub(channel).Allocate(request, timeout=10)
    assert handle.handle_id

    def counted() -> bool:
        after = scraped(metrics_text(cluster), "disagg_kv_handles_lease_expired_total")
        return after[worker_id] == before[worker_id] + 1

    wait_until(counted, 15, "the expired lease to be counted")
    cluster.wait_all_blocks_free()
