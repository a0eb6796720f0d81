"""Turns scheduled sequences into tensors, runs the forward and samples.

prepare → forward → sample, nothing else: which sequences run is the
scheduler's business, what their tokens mean is the engine's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from disagg.engine.sampler import SamplerOutput, sample
from disagg.engine.scheduler import ScheduledChunk
from disagg.engine.sequence import Sequence
from disagg.kv.cache import PagedKVCache
from disagg.model.llama import AttentionMetadata, LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, eos_token_ids: set[int]) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.eos_token_ids = eos_token_ids
        self.device = model.device
        self.mask_logits: Callable[[torch.Tensor, list[Sequence]], None] | None = None
        """Constrained decoding: forbids, in place, what each row's grammar forbids."""

    @torch.inference_mode()
    def prefill(
        self, chunks: list[ScheduledChunk], on_layer: Callable[[int], None] | None = None
    ) -> tuple[list[Sequence], SamplerOutput]:
        """Compute the chunks' K/V into their blocks; sample for prompts that complete."""
        input_ids, positions, slots, context_slots = [], [], [], []
        logits_indices: list[int] = []
        completed: list[Sequence] = []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += self.kv_cache.slot_ids(seq.block_table, start, end)
            context_slots.append(
                None
                if start == 0
                else self._tensor(self.kv_cache.slot_ids(seq.block_table, 0, end))
            )
            if chunk.completes_prompt:
                logits_indices.append(len(input_ids) - 1)
                completed.append(seq)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            query_lens=[chunk.num_tokens for chunk in chunks],
            context_slots=context_slots,
        )
        logits = self.model.forward(
            self._tensor(input_ids),
            self._tensor(positions),
            meta,
            self.kv_cache,
            self._tensor(logits_indices),
            on_layer,
        )
        return completed, self._sample(logits, completed)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> SamplerOutput:
        """One token for each sequence; each feeds its last token, whose K/V is not cached yet."""
        positions = self._tensor([seq.num_tokens - 1 for seq in seqs])  # [B]
        context_lens = positions + 1
        slots, mask = self._decode_slots(seqs, context_lens)
        meta = AttentionMetadata(
            slot_mapping=slots.gather(1, positions.unsqueeze(1)).squeeze(1),
            query_lens=[1] * len(seqs),
            context_slots=[],
            decode_slots=slots,
            decode_mask=mask,
        )
        input_ids = self._tensor([seq.last_token_id for seq in seqs])
        batch_rows = torch.arange(len(seqs), device=self.device)
        logits = self.model.forward(input_ids, positions, meta, self.kv_cache, batch_rows)
        return self._sample(logits, seqs)

    def _decode_slots(
        self, seqs: list[Sequence], context_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, Lmax] cache slots of every sequence's keys, and the padding mask if needed."""
        block_size = self.kv_cache.layout.block_size
        max_len = int(context_lens.max())
        num_blocks = -(-max_len // block_size)
        # NOTE: padding entries point at block 0; the mask hides whatever is there.
        tables = self._tensor([_padded(seq.block_table[:num_blocks], num_blocks) for seq in seqs])
        pos = torch.arange(max_len, device=self.device)
        slots = tables[:, pos // block_size] * block_size + pos % block_size  # [B, Lmax]
        if bool((context_lens == max_len).all()):
            return slots, None
        mask = pos.unsqueeze(0) < context_lens.unsqueeze(1)  # [B, Lmax]
        return slots, mask[:, None, None, :]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [B, V]. Stop tokens are masked for sequences still short of min_tokens."""
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                logits[row, list(seq.stop_token_ids(self.eos_token_ids))] = float("-inf")
        if self.mask_logits is not None:
            self.mask_logits(logits, seqs)
        return sample(logits, seqs)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def _padded(values: list[int], length: int) -> list[int]:
    return values + [0] * (length - len(values))
