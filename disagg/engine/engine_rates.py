"""How fast an engine prefills and decodes lately, for the coordinator's placement cost model.

A worker reports these in every heartbeat; the coordinator's conditional disaggregation
(coordinator/disagg_policy.py) weighs prefilling a prompt on a prefill worker against
prefilling it in place on its decode worker from them. They are read from the engine's
life-long `EngineStats` (seconds spent in prefill and decode forwards, tokens and steps
done), so measuring costs the engine thread nothing: each `sample` takes the change
since the previous one and folds it into an exponentially weighted moving average.

Both figures are compute time only (queueing is the coordinator's to count) and 0.0
until the engine has done that kind of work. Reading the counters from another thread
is safe: each is one Python number, and a step half-counted between two samples is
counted by the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # NOTE: the coordinator imports `ewma` without the engine (and torch)
    from disagg.engine.llm_engine import EngineStats

EWMA_WEIGHT = 0.3
"""Weight of the newest sample: about the last 3 heartbeats with work dominate."""


@dataclass(frozen=True)
class RatesSample:
    prefill_tokens_per_s: float
    """Prompt tokens computed per second of prefill forward; 0.0: none measured yet."""
    decode_step_s: float
    """Seconds one decode step (the whole running batch, one token each) takes; 0.0: none yet."""


def ewma(previous: float, sample: float, weight: float = EWMA_WEIGHT) -> float:
    """The moving average after `sample`; the first sample (previous 0.0) is taken whole."""
    return sample if previous <= 0.0 else previous + weight * (sample - previous)


class EngineRates:
    """Moving averages over an engine's stats; `sample` from the thread that reports them."""

    def __init__(self, stats: EngineStats) -> None:
        self._stats = stats
        self._seen = dict(vars(stats))
        """The counters at the previous sample."""
        self.prefill_tokens_per_s = 0.0
        self.decode_step_s = 0.0

    def sample(self) -> RatesSample:
        """Fold in the work done since the previous call; the current averages."""
        now, seen = dict(vars(self._stats)), self._seen
        prefill_s = now["prefill_s"] - seen["prefill_s"]
        num_prefill_tokens = now["num_prefill_tokens"] - seen["num_prefill_tokens"]
        if prefill_s > 0 and num_prefill_tokens > 0:
            rate = num_prefill_tokens / prefill_s
            self.prefill_tokens_per_s = ewma(self.prefill_tokens_per_s, rate)
        decode_s = now["decode_s"] - seen["decode_s"]
        num_decode_steps = now["num_decode_steps"] - seen["num_decode_steps"]
        if decode_s > 0 and num_decode_steps > 0:
            self.decode_step_s = ewma(self.decode_step_s, decode_s / num_decode_steps)
        self._seen = now
        return RatesSample(self.prefill_tokens_per_s, self.decode_step_s)
