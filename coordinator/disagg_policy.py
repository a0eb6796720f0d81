"""Conditional disaggregation: whether a prompt is prefilled where it will decode.

Moving a prompt's KV pays off when its prefill is long: computed on a prefill
worker, it does not stall the decode worker's running sequences. A short
uncached suffix (a follow-up turn whose conversation is cached, say) costs less
to compute in place than the extra hop and the KV transfer. vLLM's and NVIDIA
Dynamo's conditional disaggregation and Splitwise's mixed pool make the same
call; here it is made per request from a cost model (coordinator/prefill_cost.py)
fed by what the workers measure and report in heartbeats (prefill tokens/s,
decode step time, running sequences), what the coordinator measures itself (each
worker's Prefill overhead: hop and KV transfer tail) and knows (prompt tokens in
flight per worker, handles held, each side's cached prefix).

`--disagg-policy`: always (a prefill worker), never (the decode worker itself),
auto (the cheaper by the cost model; until a prefill rate has been measured, in
place when at most `--max-local-prefill-tokens` are left to compute past the
decode worker's cached prefix).

Each decision says where and why (`Decision.reason`), for the request's timings,
its log line and the `disagg_prefill_placements_total` counter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.prefill_cost import Estimate, PrefillSite, estimate
from coordinator.prefix_routing import PrefixIndex
from coordinator.registry import WorkerRecord
from disagg.config import DispatchConfig
from disagg.engine.engine_rates import ewma
from disagg.rpc import control_pb2 as pb

log = logging.getLogger(__name__)

IN_PLACE, REMOTE = "in_place", "remote"
"""Where a prompt was prefilled: on its decode worker, or on a prefill worker."""


@dataclass(frozen=True)
class Decision:
    is_in_place: bool
    reason: str
    """policy (always/never said so), cost (auto, by the cost model), threshold (auto, before
    any prefill rate was measured), colocated (the worker runs both phases), no_prefill_worker
    (none left to take it)."""
    estimate: Estimate | None = None
    """The cost model's figures, when it decided."""

    @property
    def placement(self) -> str:
        return IN_PLACE if self.is_in_place else REMOTE


def prefills_in_place(config: DispatchConfig, num_uncached_tokens: int) -> bool:
    """The rule without measurements: the policy, and for auto the length threshold."""
    if config.disagg_policy == "auto":
        return num_uncached_tokens <= config.max_local_prefill_tokens
    return config.disagg_policy == "never"


def place_prefill(
    config: DispatchConfig,
    decode: WorkerRecord,
    candidates: Sequence[WorkerRecord],
    prompt_ids: Sequence[int],
    num_kv_cached_tokens: int,
    index: PrefixIndex,
) -> tuple[WorkerRecord, Decision]:
    """Where to prefill `prompt_ids` for its handle on `decode` (which holds
    `num_kv_cached_tokens` of it already): `decode` itself, or the best of `candidates`
    (prefill workers, by prefix reuse and tokens in flight)."""
    if decode.info.role == "colocated":
        return decode, Decision(True, "colocated")
    if not candidates:
        return decode, Decision(True, "no_prefill_worker")
    if config.disagg_policy != "auto":
        return _by_policy(config, decode, candidates, prompt_ids, index)
    prefill = index.pick_prefill(list(candidates), prompt_ids)
    num_uncached = len(prompt_ids) - num_kv_cached_tokens
    if prefill.prefill_tokens_per_s <= 0:
        is_in_place = prefills_in_place(config, num_uncached)
        return (decode if is_in_place else prefill), Decision(is_in_place, "threshold")
    figures = _estimate(config, decode, prefill, prompt_ids, num_uncached, index)
    log.debug(
        "prefill of %d uncached tokens: remote %.3f s on %s, in place %.3f s + %.3f s stall",
        num_uncached, figures.remote_s, prefill.worker_id, figures.in_place_s, figures.stall_s,
    )  # fmt: skip
    return (decode if figures.is_in_place else prefill), Decision(
        figures.is_in_place, "cost", figures
    )


def _by_policy(
    config: DispatchConfig,
    decode: WorkerRecord,
    candidates: Sequence[WorkerRecord],
    prompt_ids: Sequence[int],
    index: PrefixIndex,
) -> tuple[WorkerRecord, Decision]:
    if config.disagg_policy == "never":
        return decode, Decision(True, "policy")
    return index.pick_prefill(list(candidates), prompt_ids), Decision(False, "policy")


def _estimate(
    config: DispatchConfig,
    decode: WorkerRecord,
    prefill: WorkerRecord,
    prompt_ids: Sequence[int],
    num_uncached: int,
    index: PrefixIndex,
) -> Estimate:
    """The cost model's inputs, from the registry's records.

    NOTE: a decode worker that never prefilled in place has no rate of its own yet; it
    serves the same model, so the prefill worker's stands in. Its running streams are
    the handles this coordinator holds there besides this request's, or the reported
    batch when that is larger (a heartbeat lags by at most its interval).
    """
    remote = PrefillSite(
        tokens_per_s=prefill.prefill_tokens_per_s,
        num_queued_tokens=prefill.prompt_tokens_in_flight,
        num_uncached_tokens=len(prompt_ids) - index.num_cached_tokens(prefill, prompt_ids),
        overhead_s=prefill.prefill_overhead_s,
    )
    in_place = PrefillSite(
        tokens_per_s=decode.prefill_tokens_per_s or prefill.prefill_tokens_per_s,
        num_queued_tokens=decode.prompt_tokens_in_flight,
        num_uncached_tokens=num_uncached,
        overhead_s=decode.prefill_overhead_s,
    )
    num_running = max(len(decode.held_handle_ids) - 1, decode.num_running_sequences)
    return estimate(
        remote, in_place, decode.decode_step_s, num_running, config.in_place_stall_weight
    )


def observe_prefill(worker: WorkerRecord, call_s: float, reply: pb.PrefillResponse) -> None:
    """A Prefill call on `worker` took `call_s` seconds as the coordinator saw it, of which
    the worker spent `reply.queue_s` waiting and `reply.prefill_s` computing: the rest
    (the hop, the KV transfer's tail) is its overhead."""
    overhead_s = max(0.0, call_s - reply.queue_s - reply.prefill_s)
    # NOTE: ewma takes a first 0.0 whole and would restart from a later one: keep it above 0
    worker.prefill_overhead_s = ewma(worker.prefill_overhead_s, max(overhead_s, 1e-6))
