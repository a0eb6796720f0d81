"""The single-process reference for constrained decoding: transformers `generate` with the
same grammar masks, as a logits processor. Cluster outputs under a grammar must equal it."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from disagg.grammar import GrammarState, TokenMasker


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks one sequence's scores; advances its grammar by the token chosen last step."""

    def __init__(self, state: GrammarState, vocab_size: int, prompt_len: int) -> None:
        self.state = state
        self.prompt_len = prompt_len
        self._masker = TokenMasker(vocab_size, 1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: [1, prompt_len + generated]; scores: [1, V]
        generated = input_ids.shape[1] - self.prompt_len
        if generated > self.state.num_accepted_tokens:
            assert self.state.accept_token(int(input_ids[0, -1]))
        self._masker.apply(scores, [self.state])
        return scores


def constrained_greedy(
    model, prompt_ids: list[int], state: GrammarState, vocab_size: int, max_new_tokens: int
) -> list[int]:
    """Greedy output token ids (EOS included if the grammar finished)."""
    processor = GrammarLogitsProcessor(state, vocab_size, len(prompt_ids))
    input_ids = torch.tensor([prompt_ids])
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        logits_processor=[processor],
        pad_token_id=model.generation_config.eos_token_id,
    )
    return output[0, len(prompt_ids) :].tolist()
