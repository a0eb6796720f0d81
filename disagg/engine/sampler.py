"""Choosing the next token for every sequence of a batch from its logits.

Rows whose request asks for penalties or logit_bias are adjusted first
(disagg/engine/penalties.py). Greedy rows then take the argmax. Sampled rows go
through temperature, top-k and top-p together (one sort for the whole batch),
then draw with the sequence's own generator, so a seeded request gets the same
tokens in any batch. Logprobs are those of the model's distribution before
penalties and logit_bias (vLLM's default, "raw_logprobs"): what the model
thinks of the token, not how the request steered the choice.

NOTE: a seeded draw's RNG state is a function of (seed, output position) alone,
not of how many draws came before in this process, so a request prefilled on
one worker and decoded on another samples exactly as it would in one engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from disagg.engine.penalties import apply_penalties
from disagg.engine.sequence import Sequence, TokenLogprob


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
    """logits: [B, V] float32, one row per sequence in `seqs`.

    NOTE: an all-greedy batch without logprobs or penalties (the common case) is
    one argmax and one device-to-host copy; nothing else touches the logits.
    """
    adjusted = apply_penalties(logits, seqs)  # [B, V]; `logits` itself when none asks
    token_ids = adjusted.argmax(dim=-1)  # [B]
    sampled_rows = [i for i, seq in enumerate(seqs) if not seq.params.is_greedy]
    if not sampled_rows and all(seq.params.logprobs is None for seq in seqs):
        return SamplerOutput(token_ids.tolist(), [None] * len(seqs))
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        draws = _sample_rows(adjusted[rows], [seqs[i] for i in sampled_rows])
        token_ids[rows] = draws
    chosen = token_ids.tolist()
    return SamplerOutput(chosen, _logprobs(logits, seqs, chosen))


def _sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits: [b, V] -> token ids [b]."""
    device = logits.device
    temperature = torch.tensor([s.params.temperature for s in seqs], device=device)
    top_k = torch.tensor([s.params.top_k or logits.shape[-1] for s in seqs], device=device)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
    scaled = logits / temperature.unsqueeze(1)
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)  # [b, V]
    rank = torch.arange(logits.shape[-1], device=device).unsqueeze(0)
    probs = sorted_logits.softmax(dim=-1)
    # NOTE: a token is kept while the mass before it is < top_p, so the top token always is.
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (rank < top_k.unsqueeze(1)) & (mass_before < top_p.unsqueeze(1))
    probs = probs.masked_fill(~keep, 0.0)
    draws = [
        torch.multinomial(probs[i].cpu(), 1, generator=_generator(seq))
        for i, seq in enumerate(seqs)
    ]
    picked = torch.cat(draws).to(device)  # [b] positions in sorted order
    return sorted_ids.gather(1, picked.unsqueeze(1)).squeeze(1)


def _generator(seq: Sequence) -> torch.Generator:
    if seq.params.seed is None:
        return seq.generator
    mixed = (seq.params.seed * 0x9E3779B97F4A7C15 + seq.num_output_tokens) % (1 << 63)
    return torch.Generator().manual_seed(mixed)


def _logprobs(
    logits: torch.Tensor, seqs: list[Sequence], chosen: list[int]
) -> list[TokenLogprob | None]:
    wanted = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    results: list[TokenLogprob | None] = [None] * len(seqs)
    if not wanted:
        return results
    logprobs = logits[wanted].log_softmax(dim=-1)  # [w, V]
    max_top = max(seqs[i].params.logprobs for i in wanted)
    top_values, top_ids = logprobs.topk(max(max_top, 1), dim=-1)
    for row, i in enumerate(wanted):
        num_top = seqs[i].params.logprobs
        top = list(zip(top_ids[row, :num_top].tolist(), top_values[row, :num_top].tolist()))
        results[i] = TokenLogprob(chosen[i], logprobs[row, chosen[i]].item(), top)
    return results
