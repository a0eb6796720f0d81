"""Conditional disaggregation: whether a prompt is prefilled where it will decode.

Moving a prompt's KV pays off when its prefill is long: computed on a prefill
worker, it does not stall the decode worker's running sequences. A short
uncached suffix (a follow-up turn whose conversation is cached, say) costs less
to compute in place than the extra hop and the KV transfer (vLLM's and Dynamo's
conditional disaggregation apply the same length rule).

`--disagg-policy`: always (a prefill worker, the default), never (the decode
worker itself), auto (in place when at most `--max-local-prefill-tokens` are
left to compute past the decode worker's cached prefix).
"""

from __future__ import annotations

from disagg.config import DispatchConfig


def prefills_in_place(config: DispatchConfig, num_uncached_tokens: int) -> bool:
    if config.disagg_policy == "auto":
        return num_uncached_tokens <= config.max_local_prefill_tokens
    return config.disagg_policy == "never"
