"""The KV wire format: how a prompt's K/V travels from a prefill to a decode worker.

This module is the one place the frame layout is written down; `kv_transfer`
moves the frames, the decode worker's sink interprets them.

Pipe
----
One ZeroMQ PUSH socket per (sender process, decode worker), connected to the
decode worker's PULL socket (`tcp://host:port` across hosts, `ipc:///path` on
one host). Messages from one sender arrive in order; messages of several
handles may interleave.

Messages
--------
layer message, 3 frames (one layer of one handle, token positions [start, end)):

    frame 0  header   UTF-8 JSON object
                      {"kind": "layer", "handle_id": str, "layer": int,
                       "start": int, "end": int, "dtype": str,
                       "shape": [n, num_kv_heads, head_dim]}
                      0 <= start < end, n == end - start, layer >= 0,
                      dtype in {"float32", "bfloat16", "float16"}
    frame 1  K        n * num_kv_heads * head_dim * itemsize bytes: the
                      C-contiguous [n, num_kv_heads, head_dim] tensor, little-endian
    frame 2  V        the same layout as K

done message, 1 frame (after every layer message of the handle):

    frame 0  header   UTF-8 JSON object
                      {"kind": "done", "handle_id": str, "num_tokens": int,
                       "num_layers": int, "checksum": int, "nbytes": int}
                      checksum = combine() of frame_checksum() over every layer
                      message of the handle (0 <= checksum < 2**64);
                      nbytes = total K and V bytes of those messages

With a cluster secret every message carries one more, last frame: a 32-byte
HMAC-SHA256 tag over all its other frames (written down in
`disagg.kv.frame_mac`); the receiver strips and checks it before frame 0 is
parsed, so the frame counts above are then 4 and 2.

Unknown header fields are ignored, so a field can be added without breaking
older receivers; missing or ill-typed fields make the message malformed.

NOTE: headers are JSON because they are ~150 bytes and self-describing; the
tensor bytes never pass through JSON, pickle or protobuf: they are frames sent
straight from tensor memory and received into tensors that view the frame.

Checksum
--------
Per frame: the wrapping uint64 sum of each of K and V's bytes read as
little-endian 64-bit words (a short tail is one zero-padded word), chained
with layer, start and byte counts through the splitmix64 finalizer. Each step
is a bijection, so any single flipped byte or a frame labelled with the wrong
layer or start always changes the frame's value. Frames are combined by
addition mod 2**64, so the receiver can fold them in any arrival order.

NOTE: numpy sums words at tens of GB/s, ~10x zlib.crc32 on our machines; the
price is that a permutation of 8-byte words inside a frame goes unseen. TCP
and Unix sockets already guard the bytes in flight: this checksum catches
protocol and lifecycle bugs (wrong layer or range, stale or overwritten sender
memory, missing or duplicated frames), not line noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

Buffer = bytes | bytearray | memoryview | np.ndarray

LAYER_NUM_FRAMES = 3
DONE_NUM_FRAMES = 1
MAX_HEADER_NBYTES = 4096  # real headers are ~150 bytes; refuse to parse a tensor as JSON

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

_MASK64 = (1 << 64) - 1
_WORD = np.dtype("<u8")
_CHECKSUM_SEED = 0x6B765F77697265  # "kv_wire"


@dataclass(frozen=True)
class LayerHeader:
    """Frame 0 of a layer message: which handle, layer and token range K/V belong to."""

    handle_id: str
    layer: int
    start: int
    end: int
    dtype: str
    shape: tuple[int, int, int]  # [end - start, num_kv_heads, head_dim]
    kind: ClassVar[str] = "layer"

    def __post_init__(self) -> None:
        _check_str(self.handle_id, "handle_id")
        _check_int(self.layer, "layer", minimum=0)
        _check_int(self.start, "start", minimum=0)
        _check_int(self.end, "end", minimum=0)
        if self.end <= self.start:
            raise ValueError(f"token range [{self.start}, {self.end}) is empty or inverted")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        if not isinstance(self.shape, (list, tuple)):
            raise ValueError(f"shape: expected [n, num_kv_heads, head_dim], got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(self.shape))  # torch.Size or list -> tuple
        _check_shape(self.shape, self.num_tokens)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def frame_nbytes(self) -> int:
        """Bytes of K (and of V) this header announces."""
        return math.prod(self.shape) * _itemsize(self.dtype)

    def encode(self) -> bytes:
        return _encode(self)


@dataclass(frozen=True)
class DoneHeader:
    """The done message: the handle is complete once every layer checksums to `checksum`."""

    handle_id: str
    num_tokens: int
    num_layers: int
    checksum: int
    nbytes: int
    kind: ClassVar[str] = "done"

    def __post_init__(self) -> None:
        _check_str(self.handle_id, "handle_id")
        _check_int(self.num_tokens, "num_tokens", minimum=1)
        _check_int(self.num_layers, "num_layers", minimum=1)
        _check_int(self.checksum, "checksum", minimum=0)
        if self.checksum > _MASK64:
            raise ValueError(f"checksum: {self.checksum} does not fit in 64 bits")
        _check_int(self.nbytes, "nbytes", minimum=0)

    def encode(self) -> bytes:
        return _encode(self)


@dataclass(frozen=True)
class LayerMessage:
    """A decoded layer message; k and v view the received frames (no copy)."""

    header: LayerHeader
    k: torch.Tensor  # [n, num_kv_heads, head_dim]
    v: torch.Tensor  # [n, num_kv_heads, head_dim]


def decode_header(data: Buffer) -> LayerHeader | DoneHeader:
    """Parse frame 0 of either message; ValueError on anything malformed."""
    if memoryview(data).nbytes > MAX_HEADER_NBYTES:
        raise ValueError(f"header of {memoryview(data).nbytes} bytes, over {MAX_HEADER_NBYTES}")
    try:
        fields = json.loads(bytes(data))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"header is not a JSON object: {type(fields).__name__}")
    kind = fields.get("kind")
    if kind == "layer":
        return LayerHeader(**_pick(fields, "handle_id", "layer", "start", "end", "dtype", "shape"))
    if kind == "done":
        names = ("handle_id", "num_tokens", "num_layers", "checksum", "nbytes")
        return DoneHeader(**_pick(fields, *names))
    raise ValueError(f"kind: unknown message kind {kind!r}")


def decode_message(frames: list[Buffer]) -> LayerMessage | DoneHeader:
    """One received multipart message -> its header (and zero-copy K/V); ValueError if malformed."""
    if not frames:
        raise ValueError("empty message")
    header = decode_header(frames[0])
    expected = LAYER_NUM_FRAMES if isinstance(header, LayerHeader) else DONE_NUM_FRAMES
    if len(frames) != expected:
        raise ValueError(f"{header.kind} message has {len(frames)} frames, expected {expected}")
    if isinstance(header, DoneHeader):
        return header
    k = tensor_from_frame(frames[1], header.dtype, header.shape)
    v = tensor_from_frame(frames[2], header.dtype, header.shape)
    return LayerMessage(header, k, v)


def layer_frames(header: LayerHeader, k: torch.Tensor, v: torch.Tensor) -> list[Buffer]:
    """The three frames of a layer message; K/V frames view contiguous CPU tensor memory."""
    return [header.encode(), frame_buffer(k), frame_buffer(v)]


def frame_buffer(tensor: torch.Tensor) -> np.ndarray:
    """A zero-copy uint8 view of a contiguous CPU tensor's bytes, for the buffer protocol.

    NOTE: the numpy array keeps the tensor alive, so ZeroMQ may hold it past
    the caller's own reference.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("frame_buffer needs a contiguous CPU tensor")
    return tensor.reshape(-1).view(torch.uint8).numpy()


def tensor_from_frame(
    buffer: Buffer, dtype: str, shape: tuple[int, ...] | list[int]
) -> torch.Tensor:
    """The frame's bytes as a [*shape] tensor of `dtype`, sharing the frame's memory.

    NOTE: ZeroMQ packs small messages into a shared receive buffer, so a short
    frame may start at an address the dtype is not aligned to; only that case
    is copied (into torch's aligned allocation).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    view = memoryview(buffer)
    expected = math.prod(shape) * _itemsize(dtype)
    if view.nbytes != expected:
        raise ValueError(
            f"frame has {view.nbytes} bytes, shape {list(shape)} {dtype} needs {expected}"
        )
    raw = torch.frombuffer(view.cast("B"), dtype=torch.uint8)
    if raw.data_ptr() % _itemsize(dtype):
        raw = raw.clone()
    return raw.view(DTYPES[dtype]).view(*shape)


def dtype_name(dtype: torch.dtype) -> str:
    """The wire's name of a torch dtype ("float32", "bfloat16", "float16")."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot go on the KV wire") from None


def frame_checksum(
    layer: int, start: int, k: Buffer | torch.Tensor, v: Buffer | torch.Tensor
) -> int:
    """The checksum of one layer message (see the module docstring); 0 <= value < 2**64."""
    h = _CHECKSUM_SEED
    k_bytes, v_bytes = _as_bytes(k), _as_bytes(v)
    for field in (layer, start, k_bytes.size, _word_sum(k_bytes), v_bytes.size, _word_sum(v_bytes)):
        h = _fmix64(h ^ (field & _MASK64))
    return h


def combine(a: int, b: int) -> int:
    """Fold two checksums; commutative and associative, so arrival order does not matter."""
    return (a + b) & _MASK64


def _as_bytes(data: Buffer | torch.Tensor) -> np.ndarray:
    if not isinstance(data, torch.Tensor):
        return np.frombuffer(data, dtype=np.uint8)
    if data.requires_grad or data.device.type != "cpu" or not data.is_contiguous():
        data = data.detach().cpu().contiguous()
    return frame_buffer(data)


def _word_sum(data: np.ndarray) -> int:
    """Wrapping sum of the bytes as little-endian uint64 words; the tail is one padded word."""
    num_full = data.size // 8 * 8
    total = int(data[:num_full].view(_WORD).sum(dtype=np.uint64)) if num_full else 0
    if num_full == data.size:
        return total
    return (total + int.from_bytes(data[num_full:].tobytes(), "little")) & _MASK64


def _fmix64(x: int) -> int:
    """splitmix64's finalizer: a bijection on 64-bit ints that spreads every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _encode(header: LayerHeader | DoneHeader) -> bytes:
    # NOTE: vars(), not dataclasses.asdict: asdict deep-copies, and this runs per layer
    return json.dumps({"kind": header.kind, **vars(header)}, separators=(",", ":")).encode()


def _pick(fields: dict, *names: str) -> dict:
    missing = [name for name in names if name not in fields]
    if missing:
        raise ValueError(f"header misses field(s) {missing}")
    return {name: fields[name] for name in names}


def _check_int(value: object, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: {value} is below {minimum}")


def _check_str(value: object, name: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: expected a non-empty string, got {value!r}")


def _check_shape(shape: tuple, num_tokens: int) -> None:
    if len(shape) != 3:
        raise ValueError(f"shape: expected [n, num_kv_heads, head_dim], got {shape!r}")
    for name, dim in zip(("n", "num_kv_heads", "head_dim"), shape):
        _check_int(dim, f"shape.{name}", minimum=1)
    if shape[0] != num_tokens:
        raise ValueError(f"shape: {shape[0]} tokens but the range [start, end) holds {num_tokens}")


def _itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize
