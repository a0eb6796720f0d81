"""The engine: many sequences through one model, step by step.

A step is three moves: the scheduler picks, the runner computes, the engine
appends tokens and retires finished sequences. `prefill` and `decode_step`
are the two halves, usable on their own, which is what lets prefill and decode
live in different processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from disagg.engine.sampler import SamplerOutput
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from disagg.engine.sequence import FinishReason, Sequence
from disagg.errors import InvalidRequestError, OutOfBlocksError
from disagg.kv.block_manager import BlockManager
from disagg.kv.cache import PagedKVCache
from disagg.model.device import resolve_device, resolve_dtype
from disagg.model.llama import LlamaModel
from disagg.model.loader import LoadedModel, eos_token_ids, load_model
from disagg.model.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"
    """`default`, a .gguf file, or a local HF model directory."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto, float32, bfloat16 or float16."""
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_memory_bytes: int = 1 << 30
    """Memory budget of the KV pool, used when num_kv_blocks is not given."""
    num_kv_blocks: int | None = None
    """Exact KV pool size in blocks; overrides the memory budget."""
    max_num_seqs: int = 256
    """Most sequences decoding together."""
    max_num_batched_tokens: int = 2048
    """Most prompt tokens in one prefill forward; longer prompts are chunked."""
    max_model_len: int | None = None
    """Context limit (prompt + output); defaults to the model's."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise InvalidRequestError("block_size must be >= 1", "block_size")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InvalidRequestError("num_kv_blocks must be >= 1", "num_kv_blocks")
        if self.kv_cache_memory_bytes < 1:
            raise InvalidRequestError("kv_cache_memory_bytes must be >= 1", "kv_cache_memory_bytes")


@dataclass
class EngineStats:
    """Where the engine's time went, accumulated over its life."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_decode_steps: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if loaded is None:
            device = resolve_device(config.device)
            loaded = load_model(config.model, resolve_dtype(config.dtype, device), device)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model = LlamaModel(loaded.model)
        self.max_model_len = config.max_model_len or loaded.model.config.max_position_embeddings
        layout = self.model.kv_layout(config.block_size)
        num_blocks = config.num_kv_blocks or layout.blocks_in_budget(config.kv_cache_memory_bytes)
        if num_blocks < 1:
            raise InvalidRequestError(
                "KV cache budget is smaller than one block", "kv_cache_memory_bytes"
            )
        self.kv_cache = PagedKVCache(layout, num_blocks, self.model.device)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.block_manager
        )
        configured = getattr(loaded.model.generation_config, "eos_token_id", None)
        self.eos_token_ids = eos_token_ids(configured, loaded.tokenizer)
        self.runner = ModelRunner(self.model, self.kv_cache, self.eos_token_ids)
        self.stats = EngineStats()

    # -- requests --------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise before anything is allocated: InvalidRequestError, or OutOfBlocksError
        when the request could never fit in the pool even alone."""
        if not prompt_token_ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        vocab_size = self.model.embed_tokens.shape[0]
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) "
                f"exceeds the model's context of {self.max_model_len} tokens",
                "max_tokens",
            )
        needed = self.block_manager.blocks_for(total)
        if needed > self.block_manager.num_blocks:
            raise OutOfBlocksError(
                f"request needs {needed} KV blocks; the pool has {self.block_manager.num_blocks}"
            )

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str = ""
    ) -> Sequence:
        self.validate(prompt_token_ids, params)
        seq = Sequence(list(prompt_token_ids), params, request_id=request_id)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        return self.scheduler.abort(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # -- stepping --------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Run one scheduled step; return the sequences that got a new token."""
        output = self.scheduler.schedule()
        if output.prefill:
            return self.prefill(output.prefill)
        if output.decode:
            return self.decode_step(output.decode)
        return []

    def prefill(
        self,
        chunks: list[ScheduledChunk],
        on_layer: Callable[[int], None] | None = None,
        hand_off: bool = False,
    ) -> list[Sequence]:
        """Compute the chunks' K/V into their blocks; completed prompts get their first token.

        With `hand_off`, completed prompts do not join this engine's decode batch:
        they leave with their first token (and `finish_reason` set if that token
        already ends them) still holding their blocks, for the caller to ship or
        decode elsewhere. This is the prefill half of disaggregation.
        """
        start = time.perf_counter()
        completed, sampled = self.runner.prefill(chunks, on_layer)
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.num_prefill_tokens += sum(chunk.num_tokens for chunk in chunks)
        for chunk in chunks:
            self.scheduler.on_prefilled(chunk, hand_off)
        self._append_tokens(completed, sampled, finish=not hand_off)
        return completed

    def decode_step(self, seqs: list[Sequence]) -> list[Sequence]:
        """One new token for each running sequence."""
        start = time.perf_counter()
        sampled = self.runner.decode(seqs)
        self.stats.decode_s += time.perf_counter() - start
        self.stats.num_decode_tokens += len(seqs)
        self.stats.num_decode_steps += 1
        for seq in seqs:
            seq.num_computed_tokens += 1
        self._append_tokens(seqs, sampled)
        return seqs

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Sequence]:
        """Run prompts to completion together (an offline convenience and the test harness)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for prompt, p in zip(prompts, params_list):
            self.validate(prompt, p)
        seqs = [self.add_request(prompt, p) for prompt, p in zip(prompts, params_list)]
        while not all(seq.is_finished for seq in seqs):
            self.step()
        return seqs

    def _append_tokens(
        self, seqs: list[Sequence], sampled: SamplerOutput, finish: bool = True
    ) -> None:
        for seq, token_id, logprob in zip(seqs, sampled.token_ids, sampled.logprobs):
            seq.output_token_ids.append(token_id)
            if logprob is not None:
                seq.output_logprobs.append(logprob)
            reason = self.finish_reason(seq, token_id)
            if reason is not None and finish:
                self.scheduler.finish(seq, reason)
            elif reason is not None:
                seq.finish_reason = reason

    def finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        """Why `token_id`, just appended to `seq`, ends it; None if it does not."""
        can_stop = seq.num_output_tokens >= seq.params.min_tokens
        if can_stop and token_id in seq.stop_token_ids(self.eos_token_ids):
            return FinishReason.STOP
        if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
