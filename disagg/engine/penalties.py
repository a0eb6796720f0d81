"""Penalties and logit_bias: the logit adjustments a request asks for before its token is chosen.

For the rows whose request asks for any, in this order (vLLM's):

- logit_bias: `bias[t]` added to token t's logit (OpenAI).
- repetition_penalty p over prompt + output (CTRL, Keskar et al. 2019, as transformers'
  RepetitionPenaltyLogitsProcessor): a seen token's logit l becomes l / p if l > 0, else l * p.
- frequency and presence penalties over the output (OpenAI's formula):
  l - c[t] * frequency_penalty - (c[t] > 0) * presence_penalty, c[t] the token's count.

The state is the tokens themselves: it is rebuilt from each sequence's token ids every step,
for the whole batch at once (vLLM's sampler also rebuilds its penalty tensors from the token
lists each step), so nothing has to follow a sequence across a preemption, the
prefill/decode split or a migration. After a migration the earlier output is the tail of the
new prompt; `SamplingParams.num_resumed_tokens` says how long that tail is, so it still counts
as output.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from disagg.engine.sampling_params import SamplingParams
from disagg.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits: [B, V] -> [B, V]. Returns `logits` itself, untouched, when no row asks for
    anything; else a copy with the asking rows adjusted."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.has_penalties]
    if not rows:
        return logits
    if len(rows) == len(seqs):
        return _penalized(logits.clone(), seqs)
    index = torch.tensor(rows, device=logits.device)
    adjusted = logits.clone()
    adjusted.index_copy_(
        0, index, _penalized(logits.index_select(0, index), [seqs[i] for i in rows])
    )
    return adjusted


def _penalized(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits: [b, V], one row per sequence, a copy this changes in place and returns.

    NOTE: only the (row, token) entries the tokens name are read and written: O(tokens), not
    O(b * V) elementwise work. A token seen twice is written twice with the same value, and
    counts come from a sort (`torch.unique`), so the result is the same in any order a GPU
    runs the writes.
    """
    params = [seq.params for seq in seqs]
    flat_logits = logits.view(-1)  # [b * V]
    vocab_size = logits.shape[-1]
    _biased(logits, params)
    if any(p.repetition_penalty != 1.0 for p in params):
        keys = token_keys([seq.token_ids for seq in seqs], vocab_size, logits.device)  # [n]
        penalty = _values([p.repetition_penalty for p in params], logits)[keys // vocab_size]
        seen = flat_logits[keys]
        flat_logits[keys] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        outputs = token_keys([output_token_ids(seq) for seq in seqs], vocab_size, logits.device)
        keys, counts = torch.unique(outputs, return_counts=True)  # sorted, so deterministic
        rows = keys // vocab_size
        frequency = _values([p.frequency_penalty for p in params], logits)[rows]
        presence = _values([p.presence_penalty for p in params], logits)[rows]
        flat_logits[keys] -= counts.to(logits.dtype) * frequency + presence
    return logits


def output_token_ids(seq: Sequence) -> list[int]:
    """The request's output so far, the part generated before a migration included."""
    num_resumed = min(seq.params.num_resumed_tokens, seq.num_prompt_tokens)
    resumed = seq.prompt_token_ids[seq.num_prompt_tokens - num_resumed :] if num_resumed else []
    return resumed + seq.output_token_ids


def token_keys(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Every token of every list as an index into the flattened [len(token_lists), vocab_size]
    logits (row * vocab_size + token_id): [total tokens] int64, repeats kept.

    NOTE: numpy reads a Python list of ints ~4x faster than torch.tensor does.
    """
    lengths = [len(ids) for ids in token_lists]
    flat = np.fromiter(itertools.chain.from_iterable(token_lists), np.int64, sum(lengths))
    row_starts = np.repeat(np.arange(len(token_lists), dtype=np.int64) * vocab_size, lengths)
    return torch.from_numpy(row_starts + flat).to(device)


def _biased(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits: [b, V], changed in place. NOTE: ids past the vocabulary are skipped, not an
    error: the front door refuses them against the tokenizer, and one request's bad id must
    never fail the whole batch's step."""
    vocab_size = logits.shape[-1]
    entries = [
        (row, token_id, bias)
        for row, p in enumerate(params)
        for token_id, bias in p.logit_bias
        if token_id < vocab_size
    ]
    if entries:
        rows, token_ids, biases = zip(*entries, strict=True)
        index = (
            torch.tensor(rows, device=logits.device),
            torch.tensor(token_ids, device=logits.device),
        )
        values = torch.tensor(biases, dtype=logits.dtype, device=logits.device)
        logits.index_put_(index, logits[index] + values)  # ids are unique per row
    return logits


def _values(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """One value per row: [b], `like`'s dtype and device."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)
