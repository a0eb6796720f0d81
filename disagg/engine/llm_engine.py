"""The engine: many sequences through one model, step by step.

A step is three moves: the scheduler picks, the runner computes, the engine
appends tokens and retires finished sequences; it returns a `StepOutput`. The
same step serves every role: a prefill-only sequence leaves after its prompt
(its KV is shipped and decoded elsewhere), a sequence admitted WAITING_FOR_KV
joins the decode batch with its prompt's KV already in its blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from disagg.config import EngineConfig
from disagg.engine.grammars import EngineGrammars
from disagg.engine.sampler import SamplerOutput
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.scheduler import ScheduledChunk, Scheduler
from disagg.engine.sequence import FinishReason, Sequence, SequenceStatus
from disagg.engine.step_output import StepOutput
from disagg.errors import InvalidRequestError, NeverFitsError
from disagg.kv.block_manager import BlockManager
from disagg.kv.cache import PagedKVCache
from disagg.kv.prefix_cache import PrefixCache
from disagg.logs import PROGRESS_LOGGER
from disagg.model.compiled_decode import compile_decode
from disagg.model.device import resolve_device, resolve_dtype
from disagg.model.llama import LlamaModel
from disagg.model.loader import LoadedModel, eos_token_ids, load_model
from disagg.model.projection import GEMV_MAX_ROWS
from disagg.model.runner import ModelRunner

log = logging.getLogger(__name__)
progress = logging.getLogger(PROGRESS_LOGGER)

LayerCallback = Callable[[int, list[ScheduledChunk]], None]
"""on_layer(layer, chunks): that layer's K/V of every chunk is in the cache."""


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
        prefix_cache = PrefixCache(self.block_manager, loaded.name)
        prefix_cache = None if config.no_prefix_caching else prefix_cache
        self.scheduler = Scheduler(config.scheduler, self.block_manager, prefix_cache)
        configured = getattr(loaded.model.generation_config, "eos_token_id", None)
        self.eos_token_ids = eos_token_ids(configured, loaded.tokenizer)
        self.runner = ModelRunner(self.model, self.kv_cache, self.eos_token_ids)
        self.grammars = EngineGrammars(
            loaded.tokenizer, self.model.lm_head.out_features, self.eos_token_ids
        )
        self.runner.mask_logits = self.grammars.mask
        self.stats = EngineStats()
        if config.compile:
            self.runner.compiled_decode = compile_decode(self.model)
            if self.runner.compiled_decode is not None:
                self._warm_up_decode()

    def _warm_up_decode(self) -> None:
        """Run both decode graphs once (a batch within GEMV_MAX_ROWS and one past it), so
        they compile, or load from the cache, before the first request arrives."""
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        for batch in (1, GEMV_MAX_ROWS + 1):
            start = time.perf_counter()
            progress.info(
                "compiling the decode step for batches of %s rows (from the cache in seconds, "
                "else minutes on a small CPU) ...",
                batch,
            )
            self.generate([[0] * self.config.block_size] * batch, params)
            elapsed_s = time.perf_counter() - start
            progress.info("decode step for batches of %s rows ready in %.1f s", batch, elapsed_s)

    # -- requests --------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.model.embed_tokens.shape[0]

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise before anything is allocated: InvalidRequestError (NeverFitsError when the
        request could never fit in the pool even alone)."""
        self.check_prompt(prompt_token_ids, params.max_tokens)
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) "
                f"exceeds the model's context of {self.max_model_len} tokens",
                "max_tokens",
            )

    def check_prompt(self, prompt_token_ids: list[int], num_new_tokens: int) -> None:
        """What this engine owns: token ids its embedding has, and a pool that can ever hold
        the prompt plus `num_new_tokens`. The context limit is checked where requests enter
        (the coordinator, or `validate`)."""
        if not prompt_token_ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {self.vocab_size})", "prompt"
            )
        needed = self.block_manager.blocks_for(len(prompt_token_ids) + num_new_tokens)
        if needed > self.block_manager.num_blocks:
            raise NeverFitsError(
                f"request needs {needed} KV blocks; the pool has {self.block_manager.num_blocks}",
                "max_tokens",
            )

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str = ""
    ) -> Sequence:
        self.validate(prompt_token_ids, params)
        seq = Sequence(list(prompt_token_ids), params, request_id=request_id)
        self.grammars.attach(seq)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        return self.scheduler.abort(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def add_sequence(self, seq: Sequence) -> None:
        """Admit a sequence built by its owner (a worker), by its status: WAITING is
        prefilled here; WAITING_FOR_KV has its prompt's KV in its blocks now and decodes.
        A constraint that does not compile, or that its tokens so far break, raises
        InvalidRequestError before the sequence is in."""
        self.grammars.attach(seq)
        if seq.status == SequenceStatus.WAITING_FOR_KV:
            self.scheduler.add_running(seq)
        else:
            self.scheduler.add(seq)

    def abort_sequence(self, seq: Sequence) -> bool:
        """Take `seq` out with reason `abort`; False when it was no longer in the engine."""
        if seq.is_finished or seq.status == SequenceStatus.PREFILLED:
            return False
        self.scheduler.finish(seq, FinishReason.ABORT)
        return True

    # -- stepping --------------------------------------------------------

    def step(self, on_layer: LayerCallback | None = None) -> StepOutput:
        """Schedule, run, append: one prefill or one decode step.

        `on_layer(layer, chunks)` is called during a prefill forward as soon as
        `layer`'s K/V of every chunk is in the cache (chunk.start/end give the token
        range), which is what lets a prefill worker ship KV while the model runs.
        A step that raises fails its sequences instead of the caller.
        """
        scheduled = self.scheduler.schedule()
        output = StepOutput(num_scheduled=len(scheduled.prefill) + len(scheduled.decode))
        try:
            if scheduled.prefill:
                self._prefill(scheduled.prefill, on_layer, output)
            elif scheduled.decode:
                self._decode(scheduled.decode, output)
        except Exception as error:
            log.exception("engine step failed; failing its %d sequences", output.num_scheduled)
            self._fail([c.seq for c in scheduled.prefill] + scheduled.decode, error, output)
        return output

    def _prefill(
        self,
        chunks: list[ScheduledChunk],
        on_layer: LayerCallback | None,
        output: StepOutput,
    ) -> None:
        """Compute the chunks' K/V into their blocks; completed prompts get their first token."""
        start = time.perf_counter()
        layer_done = None if on_layer is None else (lambda layer: on_layer(layer, chunks))
        completed, sampled = self.runner.prefill(chunks, layer_done)
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.num_prefill_tokens += sum(chunk.num_tokens for chunk in chunks)
        for chunk in chunks:
            self.scheduler.on_prefilled(chunk)
        output.prefilled = completed
        self._append_tokens(completed, sampled, output)

    def _decode(self, seqs: list[Sequence], output: StepOutput) -> None:
        """One new token for each running sequence."""
        start = time.perf_counter()
        sampled = self.runner.decode(seqs)
        self.stats.decode_s += time.perf_counter() - start
        self.stats.num_decode_tokens += len(seqs)
        self.stats.num_decode_steps += 1
        for seq in seqs:
            seq.num_computed_tokens += 1
        output.decoded = seqs
        self._append_tokens(seqs, sampled, output)

    def _fail(self, seqs: list[Sequence], error: Exception, output: StepOutput) -> None:
        for seq in seqs:
            self.scheduler.finish(seq, FinishReason.ERROR)
        output.prefilled, output.decoded, output.finished = [], [], []
        output.failed, output.error = seqs, error

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Sequence]:
        """Run prompts to completion together (an offline convenience and the test harness)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for prompt, p in zip(prompts, params_list):
            self.validate(prompt, p)
        seqs = [self.add_request(prompt, p) for prompt, p in zip(prompts, params_list)]
        while not all(seq.is_finished for seq in seqs):
            output = self.step()
            if output.error is not None:
                raise output.error
        return seqs

    def _append_tokens(
        self, seqs: list[Sequence], sampled: SamplerOutput, output: StepOutput
    ) -> None:
        """Append each sampled token; retire the sequences it ends (a prefill-only one
        only records why: it has left this engine, its owner ends it)."""
        for seq, token_id, logprob in zip(seqs, sampled.token_ids, sampled.logprobs):
            seq.output_token_ids.append(token_id)
            if logprob is not None:
                seq.output_logprobs.append(logprob)
            is_grammatical = self.grammars.advance(seq, token_id)
            reason = self.finish_reason(seq, token_id) if is_grammatical else FinishReason.ERROR
            if reason is None:
                continue
            if seq.status == SequenceStatus.PREFILLED:
                seq.finish_reason = reason
            else:
                self.scheduler.finish(seq, reason)
                output.finished.append(seq)

    def finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        """Why `token_id`, just appended to `seq`, ends it; None if it does not."""
        if self.grammars.is_complete(seq):
            return FinishReason.STOP
        can_stop = seq.num_output_tokens >= seq.params.min_tokens
        if can_stop and token_id in seq.stop_token_ids(self.eos_token_ids):
            return FinishReason.STOP
        if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
