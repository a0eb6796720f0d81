from __future__ import annotations

import json
import random

import pytest
import torch

from disagg.kv.wire import (
    DoneHeader,
    LayerHeader,
    LayerMessage,
    combine,
    decode_header,
    decode_message,
    dtype_name,
    frame_buffer,
    frame_checksum,
    layer_frames,
    tensor_from_frame,
)

LAYER = {
    "kind": "layer",
    "handle_id": "h1",
    "layer": 2,
    "start": 4,
    "end": 7,
    "dtype": "float32",
    "shape": [3, 2, 8],
}
DONE = {
    "kind": "done",
    "handle_id": "h1",
    "num_tokens": 7,
    "num_layers": 3,
    "checksum": 2**64 - 1,
    "nbytes": 1024,
}


def encoded(fields: dict, **changes: object) -> bytes:
    fields = {**fields, **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not ...}).encode()


def test_layer_header_round_trips():
    header = LayerHeader(
        "h1", layer=2, start=4, end=7, dtype="bfloat16", shape=torch.Size([3, 2, 8])
    )
    decoded = decode_header(header.encode())
    assert decoded == header and decoded.shape == (3, 2, 8)
    assert decoded.kind == "layer" and decoded.num_tokens == 3
    assert decoded.frame_nbytes == 3 * 2 * 8 * 2


def test_done_header_round_trips():
    header = DoneHeader("h1", num_tokens=7, num_layers=3, checksum=2**64 - 1, nbytes=1024)
    assert decode_header(header.encode()) == header
    assert json.loads(header.encode())["kind"] == "done"


def test_unknown_fields_are_ignored():
    assert decode_header(encoded(LAYER, future_field=1)) == decode_header(encoded(LAYER))


MALFORMED = {
    "not json": b"{not json",
    "not utf-8": b"\xff\xfe\x00",
    "empty": b"",
    "not an object": b"[1, 2, 3]",
    "no kind": encoded(LAYER, kind=...),
    "unknown kind": encoded(LAYER, kind="block"),
    "missing handle_id": encoded(LAYER, handle_id=...),
    "missing layer": encoded(LAYER, layer=...),
    "missing start": encoded(LAYER, start=...),
    "missing end": encoded(LAYER, end=...),
    "missing dtype": encoded(LAYER, dtype=...),
    "missing shape": encoded(LAYER, shape=...),
    "empty handle_id": encoded(LAYER, handle_id=""),
    "int handle_id": encoded(LAYER, handle_id=5),
    "str layer": encoded(LAYER, layer="2"),
    "bool layer": encoded(LAYER, layer=True),
    "float start": encoded(LAYER, start=4.0),
    "negative layer": encoded(LAYER, layer=-1),
    "negative start": encoded(LAYER, start=-3, end=0, shape=[3, 2, 8]),
    "inverted range": encoded(LAYER, start=7, end=4),
    "empty range": encoded(LAYER, start=4, end=4, shape=[0, 2, 8]),
    "unknown dtype": encoded(LAYER, dtype="int8"),
    "shape not a list": encoded(LAYER, shape="3,2,8"),
    "shape of rank 2": encoded(LAYER, shape=[3, 16]),
    "shape vs range": encoded(LAYER, shape=[4, 2, 8]),
    "zero heads": encoded(LAYER, shape=[3, 0, 8]),
    "float in shape": encoded(LAYER, shape=[3, 2, 8.5]),
    "missing checksum": encoded(DONE, checksum=...),
    "missing nbytes": encoded(DONE, nbytes=...),
    "negative checksum": encoded(DONE, checksum=-1),
    "checksum over 64 bits": encoded(DONE, checksum=2**64),
    "str checksum": encoded(DONE, checksum="12"),
    "zero tokens": encoded(DONE, num_tokens=0),
    "zero layers": encoded(DONE, num_layers=0),
    "negative nbytes": encoded(DONE, nbytes=-5),
    "null num_layers": encoded(DONE, num_layers=None),
    "oversized": encoded(LAYER, padding="x" * 5000),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_header_is_a_value_error(data: bytes):
    with pytest.raises(ValueError):
        decode_header(data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_frames_decode_back_to_the_tensors(dtype: torch.dtype):
    k, v = torch.randn(3, 2, 8).to(dtype), torch.randn(3, 2, 8).to(dtype)
    header = LayerHeader("h1", 0, 4, 7, dtype_name(dtype), k.shape)
    message = decode_message(layer_frames(header, k, v))
    assert isinstance(message, LayerMessage) and message.header == header
    assert message.k.dtype == dtype and torch.equal(message.k, k) and torch.equal(message.v, v)


def test_tensor_from_frame_views_the_buffer_without_copying():
    buffer = bytearray(torch.arange(12, dtype=torch.float32).numpy().tobytes())
    tensor = tensor_from_frame(memoryview(buffer), "float32", [3, 2, 2])
    buffer[0:4] = torch.tensor([42.0]).numpy().tobytes()
    assert tensor[0, 0, 0].item() == 42.0


def test_tensor_from_frame_copies_a_misaligned_frame():
    values = torch.randn(6, dtype=torch.float32)
    buffer = bytearray(1 + 24)
    buffer[1:] = values.numpy().tobytes()
    tensor = tensor_from_frame(memoryview(buffer)[1:], "float32", (3, 1, 2))
    assert tensor.data_ptr() % 4 == 0 and torch.equal(tensor.flatten(), values)


def test_tensor_from_frame_rejects_a_length_that_does_not_match_the_shape():
    with pytest.raises(ValueError, match="bytes"):
        tensor_from_frame(b"\x00" * 95, "float32", (3, 2, 4))


def test_decode_message_rejects_wrong_frame_counts():
    layer = decode_header(encoded(LAYER)).encode()
    k = b"\x00" * (3 * 2 * 8 * 4)
    done = decode_header(encoded(DONE)).encode()
    for frames in ([], [layer], [layer, k], [layer, k, k, k], [done, k]):
        with pytest.raises(ValueError):
            decode_message(frames)
    assert decode_message([done]) == decode_header(done)


def test_dtype_names():
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [
        "float32",
        "bfloat16",
        "float16",
    ]
    with pytest.raises(ValueError):
        dtype_name(torch.int64)


def test_frame_buffer_is_zero_copy_and_needs_a_contiguous_tensor():
    tensor = torch.randn(4, 2, 8, dtype=torch.bfloat16)
    assert frame_buffer(tensor).ctypes.data == tensor.data_ptr()
    with pytest.raises(ValueError):
        frame_buffer(tensor.transpose(0, 1))


def test_checksum_sees_every_single_flipped_byte_including_the_tail():
    k, v = bytes(random.Random(0).randrange(256) for _ in range(29)), bytes(range(21))
    reference = frame_checksum(3, 10, k, v)
    for index in range(len(k)):
        for flip in (0x01, 0x80, 0xFF):
            corrupted = bytearray(k)
            corrupted[index] ^= flip
            assert frame_checksum(3, 10, bytes(corrupted), v) != reference
    for index in range(len(v)):
        corrupted = bytearray(v)
        corrupted[index] ^= 0x10
        assert frame_checksum(3, 10, k, bytes(corrupted)) != reference


def test_checksum_sees_wrong_layer_wrong_start_and_swapped_k_v():
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    reference = frame_checksum(1, 0, k, v)
    assert frame_checksum(2, 0, k, v) != reference
    assert frame_checksum(1, 5, k, v) != reference
    assert frame_checksum(1, 0, v, k) != reference


def test_checksum_sees_two_frames_swapped_between_layers():
    frames = [(torch.randn(4, 2, 8), torch.randn(4, 2, 8)) for _ in range(2)]
    right = combine(frame_checksum(0, 0, *frames[0]), frame_checksum(1, 0, *frames[1]))
    swapped = combine(frame_checksum(0, 0, *frames[1]), frame_checksum(1, 0, *frames[0]))
    assert right != swapped


def test_combined_checksum_does_not_depend_on_arrival_order():
    parts = [
        frame_checksum(layer, 0, torch.randn(3, 2, 4), torch.randn(3, 2, 4)) for layer in range(8)
    ]
    totals = set()
    for seed in range(5):
        random.Random(seed).shuffle(parts)
        total = 0
        for part in parts:
            total = combine(total, part)
        totals.add(total)
    assert len(totals) == 1 and 0 <= totals.pop() < 2**64


def test_checksum_of_a_tensor_equals_that_of_its_bytes():
    k = torch.randn(6, 2, 8, dtype=torch.bfloat16)
    v = torch.randn(2, 6, 8, dtype=torch.bfloat16).transpose(0, 1)  # not contiguous
    as_bytes = frame_checksum(0, 0, frame_buffer(k), frame_buffer(v.contiguous()))
    assert frame_checksum(0, 0, k, v) == as_bytes
    assert frame_checksum(0, 0, bytes(frame_buffer(k)), v) == as_bytes
