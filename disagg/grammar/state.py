"""One sequence's position in its grammar, and how it is carried across the prefill/decode split.

A `GrammarState` wraps an xgrammar `GrammarMatcher` (a pushdown automaton over bytes, with
the per-state token masks precomputed at compile time; Dong et al., "XGrammar", 2024).

Across the split the decode worker rebuilds the state: it compiles the same wire spec (cached
per process) and replays the tokens generated so far (`GrammarState.from_tokens`): one token
after a prefill, every output token after a migration or preemption. xgrammar cannot serialize
a matcher, only a compiled grammar, so the alternative is shipping that with the KV handle.
Measured by `python -m bench.grammar_mask` (one thread, a four-property nested schema):

- wire spec 369 bytes; compiled grammar serialized 54,723 bytes;
- cached compile, then replay of 1 or of 33 tokens: 0.14-0.30 ms (noise exceeds the gap);
- deserializing the shipped grammar 24-29 ms, as long as compiling it cold (24-29 ms).

So the spec travels and the state is rebuilt: 150x fewer bytes, and after a worker's first
request for a schema, ~100x faster than deserializing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import xgrammar as xgr

from disagg.errors import InvalidRequestError


class GrammarState:
    """Where one sequence is in its grammar: which tokens may come next, and whether it is done."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self.num_accepted_tokens = 0

    @classmethod
    def from_tokens(cls, compiled: xgr.CompiledGrammar, token_ids: Iterable[int]) -> GrammarState:
        """The state after `token_ids`; a token the grammar forbids is an InvalidRequestError."""
        state = cls(compiled)
        for token_id in token_ids:
            if not state.accept_token(token_id):
                raise InvalidRequestError(
                    f"token {token_id} at output position {state.num_accepted_tokens} "
                    "does not follow the grammar",
                    "constraint",
                )
        return state

    @property
    def is_terminated(self) -> bool:
        """A stop token was accepted: the output is complete and nothing may follow."""
        return self._matcher.is_terminated()

    @property
    def can_stop(self) -> bool:
        """The text so far is complete, so a stop token (EOS) is allowed now."""
        return self._matcher.is_completed()

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) if the grammar forbids it."""
        is_accepted = self._matcher.accept_token(int(token_id))
        self.num_accepted_tokens += is_accepted
        return is_accepted

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 [*, ceil(V / 32)], CPU)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)
