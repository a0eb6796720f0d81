"""The MAC on KV messages: what it accepts and what it refuses, and a signing sender feeding a
verifying receiver over real ZeroMQ, which drops (and counts) every message it cannot verify."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zmq

from disagg.kv.frame_mac import TAG_NBYTES, FrameMac
from disagg.kv.transfer import KVReceiver, KVSender
from disagg.kv.wire import DoneHeader, LayerHeader, layer_frames
from tests.disagg.kv.test_transfer import DEADLINE_S, CacheSink, make_cache, wait_until

MAC = FrameMac("cluster-secret")


def layer_message(handle_id: str = "h", layer: int = 0) -> list[bytes]:
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    header = LayerHeader(handle_id, layer, 0, 4, "float32", (4, 2, 8))
    return [bytes(frame) for frame in layer_frames(header, k, v)]


def test_a_signed_message_verifies_and_loses_its_tag():
    frames = layer_message()
    signed = MAC.signed(frames)
    assert len(signed) == len(frames) + 1 and len(signed[-1]) == TAG_NBYTES
    assert MAC.verified(signed) == frames


def flip_payload_bit(frames: list[bytes]) -> list[bytes]:
    k = bytearray(frames[1])
    k[0] ^= 0x80
    return [frames[0], bytes(k), *frames[2:]]


def move_a_byte_between_frames(frames: list[bytes]) -> list[bytes]:
    return [frames[0], frames[1][:-1], frames[1][-1:] + frames[2], *frames[3:]]


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(flip_payload_bit, id="payload bit flipped"),
        pytest.param(move_a_byte_between_frames, id="frame boundary moved"),
        pytest.param(lambda f: [b'{"kind":"layer"}', *f[1:]], id="header replaced"),
        pytest.param(lambda f: f[:-1], id="tag missing"),
        pytest.param(lambda f: [*f[:-1], f[-1][:-1]], id="tag truncated"),
        pytest.param(lambda f: [*f[:-2], f[-1]], id="frame dropped"),
        pytest.param(lambda f: [f[-1]], id="tag alone"),
    ],
)
def test_any_change_to_a_signed_message_fails_verification(tamper):
    assert MAC.verified(tamper(MAC.signed(layer_message()))) is None


def test_another_secret_signs_differently():
    frames = layer_message()
    assert FrameMac("other-secret").verified(MAC.signed(frames)) is None
    assert FrameMac("cluster-secret").verified(MAC.signed(frames)) == frames


def test_no_secret_means_no_mac():
    assert FrameMac.from_secret("") is None
    with pytest.raises(ValueError, match="cluster_secret"):
        FrameMac("")


def test_a_verifying_receiver_takes_signed_handles_and_drops_the_rest(tmp_path: Path):
    cache = make_cache(torch.float32)
    sink = CacheSink(cache)
    with (
        KVReceiver(f"ipc://{tmp_path}/kv.sock", sink, mac=MAC) as receiver,
        KVSender(send_timeout_s=DEADLINE_S, mac=MAC) as sender,
    ):
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(receiver.endpoint)
        forged = [
            layer_message("h"),  # no tag
            FrameMac("rogue").signed(layer_message("h")),  # a tag under another key
            [DoneHeader("h", 4, 1, 0, 0).encode()],
        ]
        for frames in forged:
            push.send_multipart(frames)
        push.close(linger=int(DEADLINE_S * 1000))
        wait_until(lambda: receiver.num_rejected == len(forged))
        assert "h" not in sink.done and receiver.num_malformed == 0

        done_event = sink.expect("h", [0])
        k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
        sender.send_layer(receiver.endpoint, "h", 0, 0, k, v)
        done = sender.finish(receiver.endpoint, "h", num_tokens=4, num_layers=1)
        assert done_event.wait(DEADLINE_S)
        assert sink.checksums["h"] == done.checksum  # the forged layer never reached the sink
        assert receiver.num_rejected == len(forged)
