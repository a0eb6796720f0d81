"""What one engine step did: the contract between the engine and whoever drives it."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.engine.sequence import Sequence


@dataclass
class StepOutput:
    """Sequences by what happened to them in one `LLMEngine.step`.

    A sequence may be in two lists: a prompt whose first token already ends it is
    in `prefilled` and `finished`; a decoded token that ends it, in `decoded` and
    `finished`. `failed` sequences are in no other list.
    """

    prefilled: list[Sequence] = field(default_factory=list)
    """Prompts computed to the end this step; each has its first token. Prefill-only
    ones (PREFILLED) left the engine still holding their blocks."""
    decoded: list[Sequence] = field(default_factory=list)
    """Got one more token from a decode step."""
    finished: list[Sequence] = field(default_factory=list)
    """Left the batch this step (stop, length); their blocks are free."""
    failed: list[Sequence] = field(default_factory=list)
    """Carried by a step that raised `error`; taken out with finish reason `error`."""
    error: Exception | None = None
    num_scheduled: int = 0
    """Sequences the scheduler put in this step; 0: nothing could run (idle, or no room)."""

    @property
    def is_idle(self) -> bool:
        return self.num_scheduled == 0
