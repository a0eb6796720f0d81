"""One benchmark run: the same workload and schedule against each target, one after another.

Everything that costs CPU (tokenizing, building bodies, drawing the schedule)
happens before a target's clock starts. Targets run sequentially so they never
compete for the client or the machine.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from bench.serving.client import APIS, RequestOptions, request_body, send
from bench.serving.conversation import Conversation, turn_body, write_conversations
from bench.serving.conversation_driver import drive_conversations
from bench.serving.decode_batch_sampler import DecodeBatchSampler
from bench.serving.environment import environment
from bench.serving.metrics import summarize_run
from bench.serving.progress import show_progress
from bench.serving.record import RequestRecord, write_records
from bench.serving.schedule import Schedule
from bench.serving.server_metrics import agreement, diff, scrape
from bench.serving.slo import SLO
from bench.serving.workload import WorkloadRequest, write_workload

MAX_DISPATCH_LAG_P99_MS = 5.0
MAX_CLIENT_CPU_PERCENT = 80.0


@dataclass(frozen=True)
class Target:
    """A server to drive: a short name for tables and directories, and its base URL."""

    name: str
    url: str
    extra_body: dict = field(default_factory=dict)
    """Merged into every request body sent to this target (see `request_body`)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"target name {self.name!r} must be a plain directory name")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"target {self.name!r} needs an http(s) URL, got {self.url!r}")


def parse_target(text: str) -> Target:
    """`NAME=URL`; the URL's trailing `/` and `/v1` are dropped."""
    name, sep, url = text.partition("=")
    if not sep:
        raise ValueError(f"bad target {text!r}: use NAME=URL, e.g. ours=http://127.0.0.1:8000")
    url = url.rstrip("/")
    return Target(name.strip(), url.removesuffix("/v1"))


@dataclass(frozen=True)
class RunPlan:
    """Everything fixed before the clock starts."""

    workload: tuple[WorkloadRequest, ...]
    schedule: Schedule
    options: RequestOptions
    num_warmup: int = 0
    """The first num_warmup requests are sent but excluded from metrics."""
    slo: SLO = field(default_factory=SLO)
    repeats: int = 1
    """Passes of the whole workload per target, for confidence intervals."""
    duration_s: float | None = None
    """Closed loops: users stop taking new requests after this long (open loops are cut
    to it when the schedule is built)."""
    conversations: tuple[Conversation, ...] = ()
    """Multi-turn workloads: the conversations whose turns the workload's requests are; the
    schedule then times conversations, not requests (bench/serving/conversation_driver.py)."""
    think_time_s: float = 0.0
    """Multi-turn workloads: the pause between an answer and its conversation's next turn."""


@dataclass
class TargetResult:
    target: Target
    records: list[RequestRecord]
    summary: dict
    client_cpu_percent: float
    warnings: list[str]
    server_metrics: dict[str, float] | None = None
    """The target's /metrics counters, after minus before; None without /metrics."""
    server_agreement: dict[str, dict] = field(default_factory=dict)
    """disagg's request and token counters beside the client's counts."""
    decode_running: dict | None = None
    """disagg's decode workers' running batch, sampled during the run (None: not disagg)."""


def with_extra_bodies(targets: list[Target], specs: list[str]) -> list[Target]:
    """Attach each `NAME=JSON` of `--extra-body` to the target of that name."""
    extras: dict[str, dict] = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        try:
            extra = json.loads(text) if sep else None
        except ValueError:
            extra = None
        if not isinstance(extra, dict):
            raise ValueError(f"bad --extra-body {spec!r}: use NAME='{{\"field\": value}}'")
        if name not in {t.name for t in targets}:
            raise ValueError(f"--extra-body names {name!r}, which is not a --target")
        extras[name] = extras.get(name, {}) | extra
    return [replace(t, extra_body=t.extra_body | extras.get(t.name, {})) for t in targets]


def discover_model(url: str, timeout_s: float = 10.0) -> str | None:
    """The first model the target lists under /v1/models, or None."""
    try:
        response = httpx.get(f"{url}/v1/models", timeout=timeout_s)
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


async def _open_loop(plan, url, bodies, records, client, start_ns, inflight) -> None:
    tasks = []
    for record, body, offset_s in zip(records, bodies, plan.schedule.offsets_s):
        record.scheduled_ns = record.slot_ns = int(offset_s * 1e9)
        delay_s = (start_ns + record.scheduled_ns - time.perf_counter_ns()) / 1e9
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if inflight is not None:
            was_full = inflight.locked()
            await inflight.acquire()
            if was_full:  # NOTE: keeps its scheduled time; only the lag is measured from here
                record.slot_ns = time.perf_counter_ns() - start_ns
        tasks.append(
            asyncio.create_task(_send(plan, url, body, record, client, start_ns, inflight))
        )
    await asyncio.gather(*tasks)


async def _closed_loop(plan, url, bodies, records, client, start_ns, inflight) -> None:
    pending = iter(zip(records, bodies))
    deadline_ns = None if plan.duration_s is None else start_ns + int(plan.duration_s * 1e9)

    async def user() -> None:
        for record, body in pending:
            if deadline_ns is not None and time.perf_counter_ns() >= deadline_ns:
                return
            record.scheduled_ns = record.slot_ns = time.perf_counter_ns() - start_ns
            if inflight is not None:
                await inflight.acquire()
            await _send(plan, url, body, record, client, start_ns, inflight)

    await asyncio.gather(*(user() for _ in range(plan.schedule.concurrency or 1)))


async def _send(plan, url, body, record, client, start_ns, inflight) -> None:
    try:
        await send(client, url, body, record, start_ns, plan.options.timeout_s)
    finally:
        if inflight is not None:
            inflight.release()


async def drive(
    plan: RunPlan, url: str, bodies, progress_label: str | None = None, repeat: int = 0
) -> list[RequestRecord]:
    """Send the workload to `url` on the plan's schedule; a record per request that went out.

    bodies: one per request, or for a multi-turn plan a `TurnBody` that builds each turn's.
    """
    records = [
        RequestRecord(
            r.index, r.input_len, r.output_len, is_warmup=r.index < plan.num_warmup, repeat=repeat
        )
        for r in plan.workload
    ]
    for conversation in plan.conversations:
        for turn, index in enumerate(conversation.request_indices):
            records[index].conversation, records[index].turn = conversation.index, turn
    cap = plan.schedule.max_inflight
    inflight = asyncio.Semaphore(cap) if cap else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    endpoint = url + APIS[plan.options.api]
    async with httpx.AsyncClient(timeout=plan.options.timeout_s, limits=limits) as client:
        loop = _open_loop if plan.schedule.offsets_s is not None else _closed_loop
        if plan.conversations:
            loop = drive_conversations
        start_ns = time.perf_counter_ns()
        progress = (
            asyncio.create_task(show_progress(records, start_ns, progress_label))
            if progress_label is not None
            else None
        )
        try:
            await loop(plan, endpoint, bodies, records, client, start_ns, inflight)
        finally:
            if progress is not None:
                progress.cancel()
                await asyncio.gather(progress, return_exceptions=True)
    return [r for r in records if r.end_ns > 0]  # a closed loop's deadline leaves some unsent


def run_warnings(summary: dict, client_cpu_percent: float) -> list[str]:
    """What makes this run's numbers suspect, in words."""
    warnings = []
    lag_p99 = summary["dispatch_lag_ms"]["p99"]
    if lag_p99 is not None and lag_p99 > MAX_DISPATCH_LAG_P99_MS:
        warnings.append(f"client dispatch lag p99 {lag_p99:.1f} ms > 5 ms: client-bound?")
    if client_cpu_percent > MAX_CLIENT_CPU_PERCENT:
        warnings.append(f"client CPU {client_cpu_percent:.0f}% > 80%: client-bound?")
    if summary["num_errors"]:
        warnings.append(f"{summary['num_errors']} requests failed: {summary['errors']}")
    for key in (
        "prompt_token_mismatches",
        "output_token_mismatches",
        "missing_usage",
        "missing_done",
    ):
        if summary[key]:
            warnings.append(f"{summary[key]} successful requests with {key.replace('_', ' ')}")
    return warnings


def disagreements(counts: dict[str, dict]) -> list[str]:
    """Where the server's counters and the client's counts differ, in words."""
    return [
        f"server counted {pair['server']:.0f} {what.replace('_', ' ')}, client {pair['client']:.0f}"
        for what, pair in counts.items()
        if pair["server"] != pair["client"]
    ]


def run_target(plan: RunPlan, target: Target, is_progress_shown: bool = False) -> TargetResult:
    """Every pass of the workload against one target, between two scrapes of its /metrics."""
    model = plan.options.model or discover_model(target.url) or "default"
    options = replace(plan.options, model=model)
    if plan.conversations:
        bodies = functools.partial(
            turn_body, workload=plan.workload, options=options, extra=target.extra_body
        )
    else:
        bodies = [request_body(r, options, target.extra_body) for r in plan.workload]
    before = scrape(target.url)
    records: list[RequestRecord] = []
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    with DecodeBatchSampler(target.url) as sampler:
        for repeat in range(plan.repeats):
            label = f"{target.name} {repeat + 1}/{plan.repeats}" if is_progress_shown else None
            records += asyncio.run(drive(plan, target.url, bodies, label, repeat))
    cpu_percent = 100 * (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    after = scrape(target.url)
    deltas = diff(before, after) if before is not None and after is not None else None
    counts = agreement(deltas or {}, records)
    summary = summarize_run(records, plan.slo)
    warnings = run_warnings(summary, cpu_percent) + disagreements(counts)
    if plan.duration_s is not None and len(records) == plan.repeats * len(plan.workload):
        warnings.append(
            f"all {len(plan.workload)} requests went out within --duration {plan.duration_s:g} s:"
            " raise --num-requests (multi-turn: --num-conversations) to fill it"
        )
    return TargetResult(
        target, records, summary, cpu_percent, warnings, deltas, counts, sampler.summary()
    )


def write_result(out_dir: Path, result: TargetResult, config: dict) -> Path:
    """`<out_dir>/<target>/requests.jsonl` and `run.json`; returns the target directory."""
    target_dir = out_dir / result.target.name
    target_dir.mkdir(parents=True, exist_ok=True)
    write_records(target_dir / "requests.jsonl", result.records)
    run = {
        "target": result.target.__dict__,
        "config": config,
        "environment": environment(),
        "client_cpu_percent": result.client_cpu_percent,
        "summary": result.summary,
        "warnings": result.warnings,
        "server_metrics_diff": result.server_metrics,
        "server_agreement": result.server_agreement,
        "decode_running": result.decode_running,
    }
    (target_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return target_dir


def write_inputs(out_dir: Path, plan: RunPlan) -> None:
    """workload.jsonl, and conversations.jsonl for a multi-turn plan."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_workload(out_dir / "workload.jsonl", list(plan.workload))
    if plan.conversations:
        write_conversations(out_dir / "conversations.jsonl", list(plan.conversations))


def run_all(
    plan: RunPlan,
    targets: list[Target],
    out_dir: Path,
    config: dict,
    on_result: Callable[[TargetResult], None] = lambda result: None,
    is_progress_shown: bool = False,
) -> list[TargetResult]:
    """Write the workload, then run and write each target in turn."""
    write_inputs(out_dir, plan)
    results = []
    for target in targets:
        result = run_target(plan, target, is_progress_shown)
        write_result(out_dir, result, config)
        on_result(result)
        results.append(result)
    return results
