"""The KV bytes that cross the wire, checked end to end against real worker processes (whose
services and KV receivers want the cluster secret, given here so the test can present it)."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest
import torch
import zmq

from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.kv.frame_mac import FrameMac
from disagg.kv.wire import DoneHeader, LayerHeader, combine, frame_checksum, layer_frames
from disagg.model.tokenizer import encode_prompt
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.cluster_secret import secret_metadata
from disagg.rpc.convert import sampling_to_proto
from tests.cluster_harness import ServeProcess
from tests.helpers import reference_tokens

pytestmark = pytest.mark.slow  # starts real `disagg serve` processes on the default model

PROMPT = "The quick brown fox jumps over the lazy dog because"
GREEDY = SamplingParams(temperature=0, max_tokens=12)
SECRET = "kv-integrity-secret"
METADATA = secret_metadata(SECRET)
MAC = FrameMac(SECRET)


@pytest.fixture(scope="module")
def cluster():
    with ServeProcess(
        "--prefill-workers",
        "1",
        "--decode-workers",
        "1",
        "--kv-transport",
        "tcp",
        "--cluster-secret",
        SECRET,
    ) as serve:
        yield serve


def stubs(serve: ServeProcess) -> tuple[pb_grpc.PrefillWorkerStub, pb_grpc.DecodeWorkerStub]:
    workers = {w["role"]: w["address"] for w in serve.cluster()["workers"]}
    prefill = pb_grpc.PrefillWorkerStub(grpc.insecure_channel(workers["prefill"]))
    decode = pb_grpc.DecodeWorkerStub(grpc.insecure_channel(workers["decode"]))
    return prefill, decode


def local_kv_checksum(loaded, prompt_ids: list[int]) -> int:
    """What the prefill worker's frames should hash to, computed here with our own engine."""
    engine = LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=64), loaded=loaded)
    seq = engine.add_request(prompt_ids, GREEDY)
    seq.is_prefill_only = True  # as on the prefill worker: it leaves with its blocks
    checksum = 0

    def on_layer(layer: int, chunks: list) -> None:
        nonlocal checksum
        k, v = engine.kv_cache.token_range(layer, seq.block_table, 0, len(prompt_ids))
        checksum = combine(checksum, frame_checksum(layer, 0, k, v))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker runs: the same kernels give the same bits
    try:
        engine.step(on_layer)
    finally:
        torch.set_num_threads(threads)
    return checksum


def test_decode_worker_holds_exactly_the_kv_the_prefill_worker_computed(cluster, default_fp32):
    prompt_ids = encode_prompt(default_fp32.tokenizer, PROMPT)
    prefill, decode = stubs(cluster)
    handle = decode.Allocate(
        pb.AllocateRequest(
            request_id="kv-check",
            prompt_token_ids=prompt_ids,
            sampling=sampling_to_proto(replace(GREEDY, max_tokens=12)),
        ),
        timeout=10,
        metadata=METADATA,
    )
    reply = prefill.Prefill(
        pb.PrefillRequest(
            request_id="kv-check",
            prompt_token_ids=prompt_ids,
            sampling=sampling_to_proto(GREEDY),
            handle=handle,
        ),
        timeout=60,
        metadata=METADATA,
    )
    assert reply.kv_bytes == 2 * len(prompt_ids) * 30 * 3 * 64 * 4
    assert reply.kv_checksum == local_kv_checksum(default_fp32, prompt_ids)
    # The decode worker only decodes from a handle whose received bytes hash to the
    # sender's checksum; the tokens then prove those bytes are the right KV.
    request = pb.DecodeRequest(handle_id=handle.handle_id, first_token_id=reply.first_token_id)
    tokens = [reply.first_token_id] + [
        e.token_id for e in decode.Decode(request, timeout=60, metadata=METADATA)
    ]
    assert tokens == reference_tokens(default_fp32.model, prompt_ids, 12)
    cluster.wait_all_blocks_free()


def test_a_corrupted_frame_fails_the_request_and_frees_its_blocks(cluster):
    _, decode = stubs(cluster)
    prompt_ids = list(range(100, 140))
    handle = decode.Allocate(
        pb.AllocateRequest(
            request_id="corrupt",
            prompt_token_ids=prompt_ids,
            sampling=sampling_to_proto(replace(GREEDY, max_tokens=4)),
        ),
        timeout=10,
        metadata=METADATA,
    )
    layout = handle.layout
    shape = (len(prompt_ids), layout.num_kv_heads, layout.head_dim)
    socket = zmq.Context.instance().socket(zmq.PUSH)
    socket.connect(handle.zmq_endpoint)
    checksum = 0
    for layer in range(layout.num_layers):
        k, v = torch.randn(shape), torch.randn(shape)
        header = LayerHeader(handle.handle_id, layer, 0, len(prompt_ids), "float32", shape)
        frames = [bytes(f) for f in layer_frames(header, k, v)]
        checksum = combine(checksum, frame_checksum(layer, 0, frames[1], frames[2]))
        if layer == 7:
            frames[1] = frames[1][:100] + bytes([frames[1][100] ^ 0x01]) + frames[1][101:]
        socket.send_multipart(MAC.signed(frames))  # signed after the flip: the checksum's case
    done = DoneHeader(handle.handle_id, len(prompt_ids), layout.num_layers, checksum, 0)
    socket.send_multipart(MAC.signed([done.encode()]))
    socket.close(linger=5000)
    request = pb.DecodeRequest(handle_id=handle.handle_id, first_token_id=5)
    with pytest.raises(grpc.RpcError) as info:
        list(decode.Decode(request, timeout=30, metadata=METADATA))
    assert info.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
    assert "checksum_mismatch" in info.value.details()
    cluster.wait_all_blocks_free()
    status, body = cluster.completion("Still serving?", max_tokens=4, temperature=0)
    assert status == 200 and body["usage"]["completion_tokens"] == 4
