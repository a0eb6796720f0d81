"""The coordinator's Prometheus metrics (names fixed by DESIGN.md), and one log line per request."""

from __future__ import annotations

import json
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from coordinator.registry import WorkerRegistry
from coordinator.request_timing import RequestTrace

log = logging.getLogger("disagg.requests")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
TBT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        labels = ["model", "tenant"]

        def histogram(name: str, doc: str, buckets=LATENCY_BUCKETS_S) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.ttft = histogram("disagg_time_to_first_token_seconds", "Arrival to first token.")
        self.tbt = histogram(
            "disagg_time_between_tokens_seconds",
            "Gap between tokens, as decode produced them.",
            TBT_BUCKETS_S,
        )
        self.e2e = histogram("disagg_e2e_request_latency_seconds", "Arrival to last token.")
        self.queue = histogram("disagg_queue_time_seconds", "Waiting for KV room.")
        self.prefill = histogram("disagg_prefill_time_seconds", "The prompt's forward.")
        self.kv_transfer = histogram(
            "disagg_kv_transfer_seconds", "After the prefill forward until the last KV byte left."
        )
        self.kv_bytes = Counter(
            "disagg_kv_transfer_bytes", "KV bytes shipped.", labels, registry=self.registry
        )
        self.requests = Counter(
            "disagg_requests", "Requests by outcome.", [*labels, "status"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "disagg_prompt_tokens", "Prompt tokens.", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "disagg_generation_tokens", "Generated tokens.", labels, registry=self.registry
        )
        self.running = Gauge(
            "disagg_requests_running", "Requests in flight.", ["model"], registry=self.registry
        )
        self.waiting = Gauge(
            "disagg_requests_waiting",
            "Requests waiting for KV room.",
            ["model"],
            registry=self.registry,
        )
        self.migrations = Counter(
            "disagg_migrations",
            "Requests moved to another worker after a fault, by cause "
            "(prefill_failed, decode_failed, stall).",
            ["model", "cause"],
            registry=self.registry,
        )
        self.recovery = Histogram(
            "disagg_recovery_seconds",
            "From a worker fault's detection to the next token of the migrated request.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.prefix_query_tokens = Counter(
            "disagg_prefix_cache_query_tokens",
            "Prompt tokens looked up in the workers' prefix caches.",
            labels,
            registry=self.registry,
        )
        self.prefix_hit_tokens = Counter(
            "disagg_prefix_cache_hit_tokens",
            "Prompt tokens found in a prefix cache, by role: prefill (not computed), "
            "decode (KV not transferred).",
            [*labels, "role"],
            registry=self.registry,
        )
        self.prefill_placements = Counter(
            "disagg_prefill_placements",
            "Where prompts were prefilled (in_place on their decode worker, or remote), and why "
            "(policy, cost, threshold, colocated, no_prefill_worker).",
            ["model", "placement", "reason"],
            registry=self.registry,
        )
        worker_labels = ["model", "worker", "role"]
        self.blocks_used = Gauge(
            "disagg_kv_blocks_used", "KV blocks in use.", worker_labels, registry=self.registry
        )
        self.blocks_total = Gauge(
            "disagg_kv_blocks_total", "KV blocks.", worker_labels, registry=self.registry
        )
        self.workers: WorkerRegistry | None = None
        """The registry of the last `render`, which worker-reported counters are read from."""
        self.registry.register(_WorkerCounters(self))

    def record(
        self,
        trace: RequestTrace,
        tenant: str,
        status: str,
        num_prompt: int,
        num_generated: int,
        e2e_s: float,
    ) -> None:
        """Everything one finished request contributes, and its log line."""
        labels = {"model": self.model, "tenant": tenant}
        self.requests.labels(**labels, status=status).inc()
        self.prompt_tokens.labels(**labels).inc(num_prompt)
        self.generation_tokens.labels(**labels).inc(num_generated)
        self.e2e.labels(**labels).observe(e2e_s)
        if trace.ttft_s is not None:
            self.ttft.labels(**labels).observe(trace.ttft_s)
            self.queue.labels(**labels).observe(trace.queue_s)
            self.prefill.labels(**labels).observe(trace.prefill_s)
            self.kv_transfer.labels(**labels).observe(trace.kv_transfer_s)
            self.kv_bytes.labels(**labels).inc(trace.kv_bytes)
            self._record_prefix_cache(labels, trace, num_prompt)
        if trace.prefill_placement:
            self.prefill_placements.labels(
                model=self.model, placement=trace.prefill_placement, reason=trace.placement_reason
            ).inc()
        for gap in trace.tbt_s:
            self.tbt.labels(**labels).observe(gap)
        for cause in trace.migrations:
            self.migrations.labels(model=self.model, cause=cause).inc()
        for recovery_s in trace.recovery_s:
            self.recovery.labels(model=self.model).observe(recovery_s)
        log.info(json.dumps({
            "request_id": trace.request_id, "tenant": tenant, "status": status,
            "prompt_tokens": num_prompt, "completion_tokens": num_generated,
            "ttft_s": trace.ttft_s, "mean_tbt_s": trace.mean_tbt_s, "e2e_s": e2e_s,
            "prefill_worker": trace.prefill_worker, "decode_worker": trace.decode_worker,
            "prefill_placement": trace.prefill_placement,
            "placement_reason": trace.placement_reason,
            "migrations": len(trace.migrations), "migration_causes": trace.migrations,
            "recovery_s": trace.recovery_s,
        }))  # fmt: skip

    def _record_prefix_cache(self, labels: dict, trace: RequestTrace, num_prompt: int) -> None:
        self.prefix_query_tokens.labels(**labels).inc(num_prompt)
        self.prefix_hit_tokens.labels(**labels, role="prefill").inc(trace.num_cached_tokens)
        self.prefix_hit_tokens.labels(**labels, role="decode").inc(trace.num_kv_cached_tokens)

    def render(self, workers: WorkerRegistry, running: int, waiting: int) -> bytes:
        """The text exposition, with gauges read fresh from the registry."""
        self.running.labels(model=self.model).set(running)
        self.waiting.labels(model=self.model).set(waiting)
        self.workers = workers
        self.blocks_used.clear()
        self.blocks_total.clear()
        for worker in workers.healthy("decode"):
            labels = {"model": self.model, "worker": worker.worker_id, "role": worker.info.role}
            total = worker.info.total_kv_blocks
            self.blocks_total.labels(**labels).set(total)
            self.blocks_used.labels(**labels).set(total - worker.free_kv_blocks)
        return generate_latest(self.registry)


class _WorkerCounters:
    """Counters the workers keep and report in heartbeats, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> list[CounterMetricFamily]:
        rejected = CounterMetricFamily(
            "disagg_kv_frames_rejected",
            "KV messages a decode worker dropped for a missing or wrong MAC (forged or altered).",
            labels=["model", "worker"],
        )
        lease_expired = CounterMetricFamily(
            "disagg_kv_handles_lease_expired",
            "KV handles a decode worker freed because their lease ran out (not renewed by "
            "the coordinator: it restarted, or lost the request without a Free).",
            labels=["model", "worker"],
        )
        steps = CounterMetricFamily(
            "disagg_engine_steps",
            "Engine steps that computed something: a worker's progress, which tells a busy "
            "worker's silent stream from a hung one's.",
            labels=["model", "worker", "role"],
        )
        workers = self.metrics.workers
        for worker in workers.all() if workers is not None else ():
            labels = [self.metrics.model, worker.worker_id]
            steps.add_metric([*labels, worker.info.role], worker.num_engine_steps)
            if worker.info.role in ("decode", "colocated"):
                lease_expired.add_metric(labels, worker.num_handles_lease_expired)
            if worker.info.role == "decode":
                rejected.add_metric(labels, worker.num_kv_frames_rejected)
        return [rejected, lease_expired, steps]
