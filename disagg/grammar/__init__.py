"""Constrained decoding: JSON, JSON Schema, regex, choices and tool calls, with xgrammar.

`ConstraintSpec` (spec.py) is what a request asks for and what travels on the wire;
`GrammarCompiler` (compiler.py) compiles it for a tokenizer; `GrammarState` (state.py) is one
sequence's position in it; `TokenMasker` (mask.py) masks a batch's logits before sampling.
"""

from __future__ import annotations

from disagg.grammar.compiler import GrammarCompiler
from disagg.grammar.mask import TokenMasker
from disagg.grammar.spec import ConstraintSpec, ToolSpec
from disagg.grammar.state import GrammarState

__all__ = ["ConstraintSpec", "GrammarCompiler", "GrammarState", "TokenMasker", "ToolSpec"]
