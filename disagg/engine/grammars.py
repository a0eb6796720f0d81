"""An engine's constrained sequences: compiling their grammars, masking, advancing.

A sequence whose `params.constraint` is set (a `ConstraintSpec.to_wire()` string) gets a
`GrammarState` when it enters the engine, rebuilt from the output tokens it already has:
none on a fresh prompt, the first token when a decode worker takes over from a prefill
worker (the spec travels, the state is rebuilt: see disagg/grammar/state.py for why).
Before sampling, `mask` sets the logits of tokens its grammar forbids to -inf (constrained
rows only); after, `advance` moves the state by the sampled token.

The xgrammar compiler is made on the first constrained request (tokenizer set-up, 1-3 s
once per process) and compiled grammars are cached by wire string, so a schema is compiled
once per engine however many requests use it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from disagg.engine.sequence import Sequence
from disagg.grammar import ConstraintSpec, GrammarCompiler, GrammarState, TokenMasker

MAX_CACHED_GRAMMARS = 256


class EngineGrammars:
    """Per engine: the compiler, a cache of compiled grammars and the batch masker."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: GrammarCompiler | None = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._masker = TokenMasker(vocab_size, max_num_rows=16)

    def attach(self, seq: Sequence) -> None:
        """Give `seq` its grammar state if it asks for one; InvalidRequestError if the spec
        does not compile or its output so far does not follow it."""
        if not seq.params.constraint or seq.grammar is not None:
            return
        compiled = self.compiled(seq.params.constraint)
        seq.grammar = GrammarState.from_tokens(compiled, seq.output_token_ids)

    def compiled(self, wire: str) -> Any:
        """The compiled grammar of a wire spec, from the cache when seen before."""
        grammar = self._compiled.get(wire)
        if grammar is not None:
            self._compiled.move_to_end(wire)
            return grammar
        if self._compiler is None:
            self._compiler = GrammarCompiler(self._tokenizer, self.vocab_size, self._stop_token_ids)
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
