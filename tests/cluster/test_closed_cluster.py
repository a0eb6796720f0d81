"""A cluster with a secret admits only its own: each worker's gRPC services refuse a call without
the secret (or with a wrong one) before anything is allocated, KV frames without the secret's
MAC are dropped and counted and never reach a handle, and the cluster itself still serves."""

from __future__ import annotations

import urllib.request
from unittest import mock

import grpc
import pytest
import torch
import zmq

from disagg.engine.sampling_params import SamplingParams
from disagg.kv.frame_mac import FrameMac
from disagg.kv.transfer import KVSender
from disagg.kv.wire import (
    LAYER_NUM_FRAMES,
    DoneHeader,
    LayerHeader,
    combine,
    frame_checksum,
    layer_frames,
)
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.cluster_secret import secret_metadata
from disagg.rpc.convert import sampling_to_proto
from tests.cluster_harness import wait_until
from tests.inprocess_cluster import InProcessCluster

SECRET = "closed-cluster-secret"
PROMPT_IDS = list(range(100, 120))


@pytest.fixture(scope="module")
def serve(tiny_model_dir):
    with InProcessCluster(tiny_model_dir, cluster_secret=SECRET) as cluster:
        yield cluster


@pytest.fixture
def decode_stub(serve):
    address = next(w["address"] for w in serve.cluster()["workers"] if w["role"] == "decode")
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.DecodeWorkerStub(channel), pb_grpc.PrefillWorkerStub(channel)


def allocate_request(request_id: str) -> pb.AllocateRequest:
    sampling = sampling_to_proto(SamplingParams(temperature=0, max_tokens=4))
    return pb.AllocateRequest(request_id=request_id, prompt_token_ids=PROMPT_IDS, sampling=sampling)


def rejected_count(serve) -> int:
    return sum(w["num_kv_frames_rejected"] for w in serve.cluster()["workers"])


def test_the_cluster_serves_with_its_secret(serve):
    status, body = serve.completion("Hello there", max_tokens=4, temperature=0)
    assert status == 200 and body["usage"]["completion_tokens"] == 4, body
    serve.wait_all_blocks_free()


@pytest.mark.parametrize("metadata", [(), secret_metadata("wrong"), secret_metadata(SECRET + "x")])
def test_a_worker_refuses_calls_without_the_secret_and_allocates_nothing(
    serve, decode_stub, metadata
):
    decode, prefill = decode_stub
    calls = [
        lambda: decode.Allocate(allocate_request("rogue"), metadata=metadata, timeout=5),
        lambda: list(decode.Decode(pb.DecodeRequest(handle_id="h"), metadata=metadata, timeout=5)),
        lambda: decode.Free(pb.FreeRequest(handle_id="h"), metadata=metadata, timeout=5),
        lambda: prefill.Prefill(
            pb.PrefillRequest(request_id="rogue", prompt_token_ids=PROMPT_IDS),
            metadata=metadata,
            timeout=5,
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "cluster secret" in refused.value.details()
    serve.wait_all_blocks_free(timeout_s=5)


def forged_layers(handle: pb.KVHandle, mac: FrameMac | None) -> tuple[list[list], int]:
    """Every layer of the prompt as random K/V, signed with `mac` (None: unsigned)."""
    layout = handle.layout
    shape = (len(PROMPT_IDS), layout.num_kv_heads, layout.head_dim)
    messages, checksum = [], 0
    for layer in range(layout.num_layers):
        k, v = torch.randn(shape), torch.randn(shape)
        header = LayerHeader(handle.handle_id, layer, 0, len(PROMPT_IDS), "float32", shape)
        frames = [bytes(frame) for frame in layer_frames(header, k, v)]
        checksum = combine(checksum, frame_checksum(layer, 0, frames[1], frames[2]))
        messages.append(mac.signed(frames) if mac else frames)
    return messages, checksum


def send_all(endpoint: str, messages: list[list]) -> None:
    socket = zmq.Context.instance().socket(zmq.PUSH)
    socket.connect(endpoint)
    for frames in messages:
        socket.send_multipart(frames)
    socket.close(linger=5000)


def test_forged_kv_frames_are_dropped_counted_and_never_reach_the_handle(serve, decode_stub):
    decode, _ = decode_stub
    metadata = secret_metadata(SECRET)
    handle = decode.Allocate(allocate_request("forged"), metadata=metadata, timeout=5)
    before = rejected_count(serve)
    unsigned, unsigned_checksum = forged_layers(handle, None)
    wrong_key, wrong_checksum = forged_layers(handle, FrameMac("not-the-secret"))
    num_layers = handle.layout.num_layers
    done = DoneHeader(handle.handle_id, len(PROMPT_IDS), num_layers, unsigned_checksum, 0)
    forged = [*unsigned, [done.encode()], *wrong_key, FrameMac("nope").signed([done.encode()])]
    send_all(handle.zmq_endpoint, forged)
    wait_until(lambda: rejected_count(serve) - before == len(forged), 10, "forged frames counted")

    # Had any forged layer landed, the genuine frames below would be counted twice and the
    # handle would fail its checksum: it goes READY only because none did.
    genuine, checksum = forged_layers(handle, FrameMac(SECRET))
    done = DoneHeader(handle.handle_id, len(PROMPT_IDS), num_layers, checksum, 0)
    send_all(handle.zmq_endpoint, [*genuine, FrameMac(SECRET).signed([done.encode()])])
    request = pb.DecodeRequest(handle_id=handle.handle_id, first_token_id=5)
    events = list(decode.Decode(request, metadata=metadata, timeout=30))
    assert len(events) == 3  # max_tokens 4, the first token given
    serve.wait_all_blocks_free()
    with urllib.request.urlopen(f"{serve.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert f'disagg_kv_frames_rejected_total{{model="{serve.model}",worker="decode-0"}}' in text


def test_an_altered_frame_is_dropped_and_the_handle_fails_cleanly(serve, decode_stub):
    decode, _ = decode_stub
    metadata = secret_metadata(SECRET)
    handle = decode.Allocate(allocate_request("altered"), metadata=metadata, timeout=5)
    before = rejected_count(serve)
    messages, checksum = forged_layers(handle, FrameMac(SECRET))
    k = bytearray(messages[1][1])
    k[7] ^= 0x01  # one bit of layer 1's K flipped in flight: its tag no longer verifies
    messages[1][1] = bytes(k)
    done = DoneHeader(handle.handle_id, len(PROMPT_IDS), handle.layout.num_layers, checksum, 0)
    send_all(handle.zmq_endpoint, [*messages, FrameMac(SECRET).signed([done.encode()])])
    request = pb.DecodeRequest(handle_id=handle.handle_id, first_token_id=5)
    with pytest.raises(grpc.RpcError) as failed:
        list(decode.Decode(request, metadata=metadata, timeout=30))
    assert failed.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
    assert "incomplete" in failed.value.details()
    wait_until(lambda: rejected_count(serve) - before == 1, 10, "the altered frame counted")
    serve.wait_all_blocks_free()
    status, body = serve.completion("Still serving?", max_tokens=2, temperature=0)
    assert status == 200 and body["usage"]["completion_tokens"] == 2, body


def test_a_request_whose_kv_frames_fail_their_mac_still_completes_exactly(serve):
    """Every layer the prefill worker ships is altered on the way (signed under another key):
    the decode worker drops them all, the handle fails as incomplete at the done message, and
    the coordinator moves the request on: its only decode worker is a last resort it retries,
    each new prefill yields the next token, and the client gets the undisturbed text. No
    handle ever held the foreign bytes."""
    status, undisturbed = serve.completion("Fail me over", max_tokens=3, temperature=0)
    assert status == 200, undisturbed
    real_signed = KVSender._signed
    rogue = FrameMac("in-flight-tamperer")

    def altered_layers(sender: KVSender, frames: list) -> list:
        is_layer = len(frames) == LAYER_NUM_FRAMES
        return rogue.signed(frames) if is_layer else real_signed(sender, frames)

    before = rejected_count(serve)
    with mock.patch.object(KVSender, "_signed", altered_layers):
        status, body = serve.completion("Fail me over", max_tokens=3, temperature=0)
    assert status == 200, body
    assert body["choices"][0]["text"] == undisturbed["choices"][0]["text"]
    num_layers = 2  # the tiny model's
    wait_until(lambda: rejected_count(serve) - before >= num_layers, 10, "the layers counted")
    assert (rejected_count(serve) - before) % num_layers == 0
    serve.wait_all_blocks_free()
    status, body = serve.completion("Still serving?", max_tokens=2, temperature=0)
    assert status == 200 and body["usage"]["completion_tokens"] == 2, body
