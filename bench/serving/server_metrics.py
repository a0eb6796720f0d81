"""The server's own Prometheus counters, scraped before and after a run and diffed.

The diff is the server's account of the run, beside the client's: how many
requests it finished, how many tokens it generated, how long its phases took in
total. Only samples that grow monotonically are kept (counters, and the sums and
counts of histograms); buckets and gauges say nothing about a run as a difference.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.serving.record import RequestRecord

MONOTONIC = ("counter", "histogram", "summary")
SKIPPED_SUFFIXES = ("_bucket", "_created")


def sample_key(name: str, labels: dict[str, str]) -> str:
    """`name{a="1",b="2"}`, labels sorted, as Prometheus prints a series."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def parse_samples(text: str) -> dict[str, float]:
    """The monotonic samples of a Prometheus text exposition, keyed by series."""
    samples = {}
    for family in text_string_to_metric_families(text):
        if family.type not in MONOTONIC:
            continue
        for sample in family.samples:
            if not sample.name.endswith(SKIPPED_SUFFIXES):
                samples[sample_key(sample.name, sample.labels)] = sample.value
    return samples


def scrape(url: str, timeout_s: float = 10.0) -> dict[str, float] | None:
    """The target's `/metrics` samples, or None when it has no Prometheus endpoint."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=timeout_s)
        response.raise_for_status()
        return parse_samples(response.text)
    except (httpx.HTTPError, ValueError):
        return None


def diff(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """after - before for every series that moved (a new series counts from 0)."""
    moved = {key: value - before.get(key, 0.0) for key, value in after.items()}
    return {key: delta for key, delta in moved.items() if delta}


def series_total(deltas: dict[str, float], name: str, label: str = "") -> float:
    """The deltas of `name` summed over its label sets, or only those carrying `label`."""
    return sum(
        v
        for key, v in deltas.items()
        if (key == name or key.startswith(name + "{")) and label in key
    )


def agreement(deltas: dict[str, float], records: list[RequestRecord]) -> dict[str, dict]:
    """disagg's counters beside what the client saw, warm-up included (the server served it).

    The series are the ones DESIGN.md names; a server without them gets an empty dict.
    """
    if not any(key.startswith("disagg_") for key in deltas):
        return {}
    ok = [r for r in records if r.is_ok]
    pairs = {
        "requests_finished": (
            series_total(deltas, "disagg_requests_total", 'status="finished"'),
            len(ok),
        ),
        "generation_tokens": (
            series_total(deltas, "disagg_generation_tokens_total"),
            sum(r.num_output_tokens for r in ok),
        ),
        "prompt_tokens": (
            series_total(deltas, "disagg_prompt_tokens_total"),
            sum(r.prompt_tokens or 0 for r in ok),
        ),
    }
    return {
        what: {"server": server, "client": float(client)}
        for what, (server, client) in pairs.items()
    }
