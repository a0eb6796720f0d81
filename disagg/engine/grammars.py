"""An engine's constrained sequences: compiling their grammars, masking, advancing.

A sequence whose `params.constraint` is set (a `ConstraintSpec.to_wire()` string) gets a
`GrammarState` before it enters the batch, rebuilt from every token its output has so far:
none on a fresh prompt; the first token when a decode worker takes over from a prefill
worker; and after a migration, also the prompt's last `params.num_resumed_tokens` tokens,
which are output the client already has (the spec travels, the state is rebuilt: see
disagg/grammar/state.py for why). Before sampling, `mask` sets the logits of tokens its
grammar forbids to -inf (constrained rows only); after, `advance` moves the state by the
sampled token.

Compiling is kept off the engine thread. The xgrammar compiler costs 1-3 s to set up (once
per process) and a schema 1-30 ms to compile (once per engine: compiled grammars are cached
by wire string); on the thread that steps the batch, either would stall every stream for
that long. Workers call `prepare` (or `compile_ahead`) from their gRPC handlers: the work
runs on this engine's one `grammar-compile` thread while the batch keeps stepping, and the
sequence is admitted with its state already built, so `attach` on the engine thread finds
nothing left to do. `attach` still compiles in place for callers without an event loop
(offline `add_request`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from disagg.engine.sequence import Sequence
from disagg.errors import InvalidRequestError
from disagg.grammar import ConstraintSpec, GrammarCompiler, GrammarState, TokenMasker

MAX_CACHED_GRAMMARS = 256
COMPILE_THREAD_PREFIX = "grammar-compile"


class EngineGrammars:
    """Per engine: the compiler, a cache of compiled grammars and the batch masker."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: GrammarCompiler | None = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        """Guards the compiler and the cache: handlers' compiles and `attach` may overlap."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=COMPILE_THREAD_PREFIX)
        self._masker = TokenMasker(vocab_size, max_num_rows=16)

    async def compile_ahead(self, wire: str) -> None:
        """Compile a wire spec into the cache off the calling loop's thread (no-op for "");
        InvalidRequestError if it does not compile."""
        if wire:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.compiled, wire)

    async def prepare(self, seq: Sequence) -> None:
        """`attach` on the compile thread, so that the sequence enters the engine ready."""
        if seq.params.constraint and seq.grammar is None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.attach, seq)

    def attach(self, seq: Sequence) -> None:
        """Give `seq` its grammar state if it asks for one; InvalidRequestError if the spec
        does not compile or its output so far does not follow it."""
        if not seq.params.constraint or seq.grammar is not None:
            return
        compiled = self.compiled(seq.params.constraint)
        seq.grammar = GrammarState.from_tokens(compiled, grammar_tokens(seq))

    def compiled(self, wire: str) -> Any:
        """The compiled grammar of a wire spec, from the cache when seen before."""
        with self._lock:
            grammar = self._compiled.get(wire)
            if grammar is not None:
                self._compiled.move_to_end(wire)
                return grammar
            if self._compiler is None:
                self._compiler = GrammarCompiler(
                    self._tokenizer, self.vocab_size, self._stop_token_ids
                )
            grammar = self._compiler.compile(ConstraintSpec.from_wire(wire))
            self._compiled[wire] = grammar
            if len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
            return grammar

    def mask(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """logits [B, V]: forbid, in place, what each constrained row's grammar forbids."""
        states = [seq.grammar for seq in seqs]
        if any(state is not None for state in states):
            self._masker.apply(logits, states)

    @staticmethod
    def advance(seq: Sequence, token_id: int) -> bool:
        """Move `seq`'s grammar by the token just sampled under its mask; False if it refuses.

        NOTE: a refusal is only reachable when every token was masked (e.g. min_tokens hid
        the stop token the grammar needed): the sequence cannot follow its grammar.
        """
        return seq.grammar is None or seq.grammar.accept_token(token_id)

    @staticmethod
    def is_complete(seq: Sequence) -> bool:
        """The grammar accepted its stop token: the output is whole."""
        return seq.grammar is not None and seq.grammar.is_terminated


def grammar_tokens(seq: Sequence) -> list[int]:
    """Every token of `seq`'s output so far, in order: the resumed tail of its prompt (a
    migrated request), then its own output; InvalidRequestError if the tail is longer than
    the prompt."""
    num_resumed = seq.params.num_resumed_tokens
    if num_resumed > seq.num_prompt_tokens:
        raise InvalidRequestError(
            f"num_resumed_tokens ({num_resumed}) exceeds the prompt's "
            f"{seq.num_prompt_tokens} tokens",
            "num_resumed_tokens",
        )
    resumed = seq.prompt_token_ids[seq.num_prompt_tokens - num_resumed :]
    return resumed + seq.output_token_ids
