from __future__ import annotations

import torch

from disagg.engine.sampler import sample
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.sequence import Sequence


def seq_with(**kwargs: object) -> Sequence:
    return Sequence([1, 2, 3], SamplingParams(**kwargs))


def draws(seq_factory, logits_row: torch.Tensor, others: int, steps: int = 20) -> list[int]:
    """Tokens drawn for one seeded sequence placed among `others` unrelated sequences."""
    target = seq_factory()
    batch = [seq_with(temperature=1.0) for _ in range(others)] + [target]
    gen = torch.Generator().manual_seed(others)
    tokens = []
    for _ in range(steps):
        noise = torch.randn(len(batch), logits_row.shape[0], generator=gen)
        noise[-1] = logits_row
        tokens.append(sample(noise, batch).token_ids[-1])
        target.output_token_ids.append(tokens[-1])
    return tokens


def test_same_seed_same_tokens_whatever_the_batch():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    make = lambda: seq_with(temperature=1.0, seed=1234)  # noqa: E731
    assert draws(make, logits, others=0) == draws(make, logits, others=7)
    other_seed = lambda: seq_with(temperature=1.0, seed=99)  # noqa: E731
    assert draws(make, logits, others=0) != draws(other_seed, logits, others=0)


def test_a_seeded_draw_depends_only_on_seed_and_position():
    """What lets a request prefilled on one worker sample on another as in one engine."""
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(7))
    first, second = seq_with(temperature=1.0, seed=5), seq_with(temperature=1.0, seed=5)
    sample(logits.clone(), [seq_with(temperature=1.0, seed=5)])  # an unrelated earlier draw
    first.output_token_ids = second.output_token_ids = [1, 2, 3]
    assert sample(logits.clone(), [first]).token_ids == sample(logits.clone(), [second]).token_ids


def test_greedy_top_k_one_and_tiny_top_p_all_pick_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    seqs = [
        seq_with(temperature=0),
        seq_with(temperature=1.5, top_k=1, seed=1),
        seq_with(temperature=1.5, top_p=1e-6, seed=2),
        seq_with(temperature=0),
    ]
    assert sample(logits.clone(), seqs).token_ids == logits.argmax(-1).tolist()


def test_top_k_restricts_draws_to_the_k_most_likely():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(2))
    allowed = set(logits[0].topk(3).indices.tolist())
    seq = seq_with(temperature=5.0, top_k=3)
    seen = {sample(logits.clone(), [seq]).token_ids[0] for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seq = seq_with(temperature=1.0, top_p=0.7)
    seen = {sample(logits.clone(), [seq]).token_ids[0] for _ in range(300)}
    assert seen == {0, 1}


def test_logprobs_are_the_raw_distribution_with_top_alternatives():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(5))
    seqs = [seq_with(temperature=0, logprobs=3), seq_with(temperature=0)]
    out = sample(logits.clone(), seqs)
    expected = logits[0].log_softmax(-1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert abs(first.logprob - expected.max().item()) < 1e-6
    assert [t for t, _ in first.top] == expected.topk(3).indices.tolist()
    assert out.logprobs[1] is None
