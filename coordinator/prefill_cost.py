"""The cost model of conditional disaggregation: where one prompt's prefill costs less.

A prompt's uncached suffix is computed either on a prefill worker, whose KV then
crosses to the decode worker, or in place on the decode worker itself, which stops
its running sequences for as long (a step is a prefill or a decode, never both).
Splitwise (Patel et al., ISCA 2024) and DistServe (Zhong et al., OSDI 2024) show
the split pays for long prompts because it keeps prefills from stalling decodes;
vLLM's and NVIDIA Dynamo's conditional disaggregation prefill short ones locally,
where the hop and the transfer cost more than the compute. Here the line is drawn
per request from measured figures instead of a fixed length:

    remote_s   = (queued + uncached_P) / rate_P + overhead_P
    in_place_s = decode_step_s + (queued_D + uncached_D) / rate_D + overhead_D
    stall_s    = num_running_D * uncached_D / rate_D

and the prefill goes in place when `in_place_s + stall_weight * stall_s <= remote_s`:
this prompt's TTFT on either side, plus, in place, the seconds every running stream
on the decode worker waits for its next token. All times are seconds; rates are
prompt tokens per second of forward (what the workers report, compute only);
queued tokens are prompt tokens already in flight there (what the coordinator
sent and has not had back); overhead is the rest of a Prefill call as the
coordinator measured it (the gRPC hop, the KV transfer's tail past the forward).

Approximations: a prefill's time is taken as linear in its tokens (attention's
quadratic term and a forward's fixed cost are folded into the measured rate), and
only the streams running now count as stalled, not those that arrive meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillSite:
    """One place the prompt could be prefilled, as measured."""

    tokens_per_s: float
    """Prompt tokens per second of prefill forward there; > 0."""
    num_queued_tokens: int = 0
    """Prompt tokens already in flight there, computed before this prompt."""
    num_uncached_tokens: int = 0
    """This prompt's tokens it would compute (past the prefix it holds)."""
    overhead_s: float = 0.0
    """Seconds a Prefill call there takes beyond queue and forward."""

    def ttft_s(self) -> float:
        """Seconds until this prompt's first token, prefilled here."""
        compute_s = (self.num_queued_tokens + self.num_uncached_tokens) / self.tokens_per_s
        return compute_s + self.overhead_s


@dataclass(frozen=True)
class Estimate:
    """Both sides of one decision, in seconds."""

    remote_s: float
    """TTFT prefilled on the prefill worker."""
    in_place_s: float
    """TTFT prefilled on the decode worker."""
    stall_s: float
    """Seconds the decode worker's running streams wait in all, prefilled in place."""
    stall_weight: float
    """A stalled stream's second against a second of this prompt's TTFT."""

    @property
    def in_place_cost_s(self) -> float:
        return self.in_place_s + self.stall_weight * self.stall_s

    @property
    def is_in_place(self) -> bool:
        """In place costs no more (ties stay: no hop, no transfer, no second worker)."""
        return self.in_place_cost_s <= self.remote_s


def estimate(
    remote: PrefillSite,
    in_place: PrefillSite,
    decode_step_s: float,
    num_running: int,
    stall_weight: float = 1.0,
) -> Estimate:
    """Both sides for one prompt. `decode_step_s`: the decode worker's step, which an in-place
    prefill waits out when streams are running; `num_running`: those streams."""
    wait_s = decode_step_s if num_running > 0 else 0.0
    prefill_s = in_place.num_uncached_tokens / in_place.tokens_per_s
    return Estimate(
        remote_s=remote.ttft_s(),
        in_place_s=wait_s + in_place.ttft_s(),
        stall_s=num_running * prefill_s,
        stall_weight=stall_weight,
    )
