"""The limits a request must fit, as workers advertise them when they register.

The coordinator checks a request once against these, before anything is
allocated, so that one that can never be served gets a 400 at once instead of
waiting for room that will never come. Workers still refuse what does not fit
what they own (their pool, their vocabulary), with INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass

from disagg.errors import InvalidRequestError, NeverFitsError
from disagg.rpc import control_pb2 as pb


@dataclass(frozen=True)
class WorkerLimits:
    """0 in a field means the worker did not advertise that limit: it is not checked."""

    vocab_size: int = 0
    max_model_len: int = 0
    num_kv_blocks: int = 0
    block_size: int = 0

    @classmethod
    def from_info(cls, info: pb.WorkerInfo) -> WorkerLimits:
        return cls(info.vocab_size, info.max_model_len, info.total_kv_blocks, info.block_size)

    def check(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Raise InvalidRequestError (param named) when the request can never run here."""
        if self.vocab_size and prompt_ids and max(prompt_ids) >= self.vocab_size:
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {self.vocab_size})", "prompt"
            )
        num_tokens = len(prompt_ids) + max_tokens
        if self.max_model_len and num_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                f"the model's context of {self.max_model_len} tokens",
                "max_tokens",
            )
        if self.num_kv_blocks and self.block_size:
            needed = -(-num_tokens // self.block_size)
            if needed > self.num_kv_blocks:
                raise NeverFitsError(
                    f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) needs "
                    f"{needed} KV blocks; the largest decode worker holds {self.num_kv_blocks} "
                    f"({self.num_kv_blocks * self.block_size} tokens)",
                    "max_tokens",
                )


def check_fits(workers: list[pb.WorkerInfo], prompt_ids: list[int], max_tokens: int) -> None:
    """Pass when some worker could ever take the request; else raise the error of the
    worker with the largest pool (the one that came closest)."""
    if not workers:
        return
    ranked = sorted(workers, key=lambda w: -(w.total_kv_blocks * max(1, w.block_size)))
    errors = []
    for info in ranked:
        try:
            WorkerLimits.from_info(info).check(prompt_ids, max_tokens)
            return
        except InvalidRequestError as error:
            errors.append(error)
    raise errors[0]
