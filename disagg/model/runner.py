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
from disagg.model.compiled_decode import MIN_DYNAMIC_SIZE
from disagg.model.llama import AttentionMetadata, LlamaModel
from disagg.model.paged_attention import DecodeKeys


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, eos_token_ids: set[int]) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.eos_token_ids = eos_token_ids
        self.device = model.device
        self.mask_logits: Callable[[torch.Tensor, list[Sequence]], None] | None = None
        """Constrained decoding: forbids, in place, what each row's grammar forbids."""
        self.compiled_decode: Callable[..., torch.Tensor] | None = None
        """The model's forward compiled for decode (compiled_decode.py); None: eager."""

    @torch.inference_mode()
    def prefill(
        self, chunks: list[ScheduledChunk], on_layer: Callable[[int], None] | None = None
    ) -> tuple[list[Sequence], SamplerOutput]:
        """Compute the chunks' K/V into their blocks; sample for prompts that complete."""
        block_size = self.kv_cache.layout.block_size
        input_ids, positions, slots, context_blocks = [], [], [], []
        logits_indices: list[int] = []
        completed: list[Sequence] = []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += self.kv_cache.slot_ids(seq.block_table, start, end)
            num_blocks = -(-end // block_size)
            context_blocks.append(
                None if start == 0 else self._tensor(seq.block_table[:num_blocks])
            )
            if chunk.completes_prompt:
                logits_indices.append(len(input_ids) - 1)
                completed.append(seq)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            query_lens=[chunk.num_tokens for chunk in chunks],
            context_blocks=context_blocks,
            context_lens=[c.seq.num_computed_tokens + c.num_tokens for c in chunks],
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
        """One token for each sequence; each feeds its last token, whose K/V is not cached yet.

        Compiled, the step's shapes are kept off the sizes the compiler specializes
        (MIN_DYNAMIC_SIZE): a lone sequence runs as two copies of itself (the copy
        writes the very same K/V into the very same slot), its block table is at
        least two blocks long, and the key bias is always there, so that the graphs
        compiled at start-up serve every batch and no request waits on a compile.
        """
        compiled = self.compiled_decode is not None
        rows = seqs + seqs[:1] * (MIN_DYNAMIC_SIZE - len(seqs)) if compiled else seqs
        block_size = self.kv_cache.layout.block_size
        context_lens = [seq.num_tokens for seq in rows]
        num_blocks = -(-max(context_lens) // block_size)
        if compiled:
            num_blocks = max(num_blocks, MIN_DYNAMIC_SIZE)
        # NOTE: padding entries point at block 0; the key mask hides whatever is there.
        tables = self._tensor([_padded(seq.block_table[:num_blocks], num_blocks) for seq in rows])
        positions = self._tensor(context_lens) - 1  # [B]
        last_blocks = tables.gather(1, (positions // block_size).unsqueeze(1)).squeeze(1)
        meta = AttentionMetadata(
            slot_mapping=last_blocks * block_size + positions % block_size,
            query_lens=[1] * len(rows),
            context_blocks=[],
            context_lens=[],
            decode_keys=DecodeKeys.build(tables, context_lens, block_size, always_bias=compiled),
        )
        input_ids = self._tensor([seq.last_token_id for seq in rows])
        forward = self.compiled_decode or self.model.forward
        logits = forward(input_ids, positions, meta, self.kv_cache, None)
        return self._sample(logits[: len(seqs)], seqs)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [B, V]. Stop tokens are masked for sequences still short of min_tokens."""
        short = [
            (row, seq)
            for row, seq in enumerate(seqs)
            if seq.num_output_tokens < seq.params.min_tokens
        ]
        for row, seq in short:
            logits[row, list(seq.stop_token_ids(self.eos_token_ids))] = float("-inf")
        if self.mask_logits is not None:
            self.mask_logits(logits, seqs)
        return sample(logits, seqs)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def _padded(values: list[int], length: int) -> list[int]:
    return values + [0] * (length - len(values))
