"""A plain decode worker prefills its own handles (the coordinator's last resort when no
prefill worker is left), and a sequence re-admitted with prompt + tokens-so-far continues with
exactly the tokens an undisturbed run produces next: the premise of request migration.

Runs on the in-process cluster (tiny model, float32), talking to its decode worker directly.
"""

from __future__ import annotations

import grpc

from disagg.engine.sampling_params import SamplingParams
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.convert import sampling_to_proto
from tests.helpers import reference_tokens

PROMPT = [101, 2023, 7, 4242, 15, 999, 31, 8]
NEW_TOKENS = 10


def generate_in_place(address: str, prompt: list[int], max_tokens: int) -> list[int]:
    """Allocate, Prefill and Decode, all on the one decode worker."""
    sampling = sampling_to_proto(SamplingParams(temperature=0, max_tokens=max_tokens))
    with grpc.insecure_channel(address) as channel:
        decode = pb_grpc.DecodeWorkerStub(channel)
        prefill = pb_grpc.PrefillWorkerStub(channel)
        allocate = pb.AllocateRequest(request_id="r", prompt_token_ids=prompt, sampling=sampling)
        handle = decode.Allocate(allocate, timeout=10)
        reply = prefill.Prefill(
            pb.PrefillRequest(
                request_id="r", prompt_token_ids=prompt, sampling=sampling, handle=handle
            ),
            timeout=30,
        )
        tokens = [reply.first_token_id]
        if reply.finish_reason:
            return tokens
        request = pb.DecodeRequest(handle_id=handle.handle_id, first_token_id=tokens[0])
        for event in decode.Decode(request, timeout=30):
            if event.HasField("token_id"):
                tokens.append(event.token_id)
            if event.finish_reason:
                break
    return tokens


def test_a_decode_worker_prefills_in_place_and_a_resumed_sequence_continues_exactly(
    inprocess_cluster, tiny_fp32
):
    (decode,) = [w for w in inprocess_cluster.cluster()["workers"] if w["role"] == "decode"]
    expected = reference_tokens(tiny_fp32.model, PROMPT, NEW_TOKENS)
    assert generate_in_place(decode["address"], PROMPT, NEW_TOKENS) == expected
    num_sent = 4
    resumed = generate_in_place(
        decode["address"], PROMPT + expected[:num_sent], NEW_TOKENS - num_sent
    )
    assert resumed == expected[num_sent:]
    inprocess_cluster.wait_all_blocks_free()
