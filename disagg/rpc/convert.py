"""Between our dataclasses and the control-plane protobufs, in one place."""

from __future__ import annotations

from disagg.engine.sampling_params import SamplingParams
from disagg.engine.sequence import TokenLogprob
from disagg.kv.cache import KVLayout
from disagg.kv.wire import dtype_name
from disagg.rpc import control_pb2 as pb


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    message = pb.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_tokens=params.max_tokens,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
        constraint=params.constraint,
        num_resumed_tokens=params.num_resumed_tokens,
    )
    if params.seed is not None:
        message.seed = params.seed
    if params.logprobs is not None:
        message.logprobs = params.logprobs
    return message


def sampling_from_proto(message: pb.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError, like any other construction of SamplingParams."""
    return SamplingParams(
        max_tokens=message.max_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        stop_token_ids=tuple(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        min_tokens=message.min_tokens,
        logprobs=message.logprobs if message.HasField("logprobs") else None,
        constraint=message.constraint,
        num_resumed_tokens=message.num_resumed_tokens,
    )


def logprob_to_proto(logprob: TokenLogprob | None) -> pb.TokenLogprob | None:
    if logprob is None:
        return None
    top = [pb.TopLogprob(token_id=t, logprob=lp) for t, lp in logprob.top]
    return pb.TokenLogprob(logprob=logprob.logprob, top=top)


def logprob_from_proto(token_id: int, message: pb.TokenLogprob) -> TokenLogprob:
    top = [(entry.token_id, entry.logprob) for entry in message.top]
    return TokenLogprob(token_id=token_id, logprob=message.logprob, top=top)


def optional_logprob(message: object, field: str, token_id: int) -> TokenLogprob | None:
    """The logprob in `message.<field>`, or None when the sender did not set it."""
    if not message.HasField(field):
        return None
    return logprob_from_proto(token_id, getattr(message, field))


def layout_to_proto(layout: KVLayout) -> pb.KVLayout:
    return pb.KVLayout(
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        block_size=layout.block_size,
        dtype=dtype_name(layout.dtype),
    )


def layouts_match(layout: KVLayout, message: pb.KVLayout) -> bool:
    """Block size may differ: KV travels as token ranges, not blocks."""
    theirs = (message.num_layers, message.num_kv_heads, message.head_dim, message.dtype)
    ours = (layout.num_layers, layout.num_kv_heads, layout.head_dim, dtype_name(layout.dtype))
    return theirs == ours
