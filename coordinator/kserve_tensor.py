"""KServe V2 tensors: a name, a datatype, a shape and the elements, and their raw byte layout.

`Tensor` holds its elements flat in row-major order. `tensor_to_bytes` / `tensor_from_bytes`
give the raw layout that REST's binary tensor data extension and gRPC's
`raw_input_contents` / `raw_output_contents` share: numbers little-endian and packed, BYTES
elements each a 4-byte little-endian length and then the bytes. What the tensors mean to
this server is `kserve_text`'s business.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from disagg.errors import InvalidRequestError

STRUCT_FORMATS = {
    "BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q",
    "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "FP16": "e", "FP32": "f", "FP64": "d",
}  # fmt: skip
DATATYPES = frozenset({"BYTES", *STRUCT_FORMATS})


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list
    """Elements flat, row-major: str/bytes for BYTES (JSON may also give objects), else numbers."""
    parameters: dict = field(default_factory=dict)

    def check_shape(self) -> None:
        """The shape must account for every element (`messages` alone is exempt: see module)."""
        if math.prod(self.shape) != len(self.data):
            raise InvalidRequestError(
                f"input {self.name!r} has shape {self.shape} ({math.prod(self.shape)} elements) "
                f"but {len(self.data)} elements of data",
                self.name,
            )

    def check_elements(self) -> None:
        """Elements that arrived as JSON must be of the declared datatype."""
        if self.datatype == "BYTES":
            return  # what counts as text is the text contract's call
        if not all(_is_of(self.datatype, value) for value in self.data):
            raise InvalidRequestError(
                f"input {self.name!r} has data that is not {self.datatype}", self.name
            )


def _is_of(datatype: str, value: object) -> bool:
    if datatype == "BOOL":
        return isinstance(value, bool)
    if isinstance(value, bool):  # NOTE: bool is an int subclass, but not a number here
        return False
    return isinstance(value, int | float) if datatype.startswith("FP") else isinstance(value, int)


def check_datatype(name: str, datatype: object) -> str:
    if datatype not in DATATYPES:
        raise InvalidRequestError(
            f"input {name!r} has unknown datatype {datatype!r}; use one of "
            f"{', '.join(sorted(DATATYPES))}",
            name,
        )
    return datatype


def check_shape_value(name: str, shape: object) -> list[int]:
    is_dims = isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )
    if not is_dims:
        raise InvalidRequestError(
            f"input {name!r} needs a shape: a list of non-negative integers", name
        )
    return shape


def pack_bytes(items: Iterable[str | bytes]) -> bytes:
    """BYTES elements as 4-byte little-endian lengths, each followed by its bytes."""
    parts = []
    for item in items:
        raw = item.encode() if isinstance(item, str) else item
        parts += [struct.pack("<I", len(raw)), raw]
    return b"".join(parts)


def unpack_bytes(name: str, raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequestError(f"input {name!r}: BYTES data ends inside a length", name)
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidRequestError(f"input {name!r}: a BYTES element overruns the data", name)
        items.append(raw[offset : offset + size])
        offset += size
    return items


def tensor_to_bytes(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return pack_bytes(tensor.data)
    return struct.pack(f"<{len(tensor.data)}{STRUCT_FORMATS[tensor.datatype]}", *tensor.data)


def tensor_from_bytes(
    name: str, datatype: str, shape: list[int], raw: bytes, parameters: dict | None = None
) -> Tensor:
    if datatype == "BYTES":
        data: list = unpack_bytes(name, raw)
    else:
        fmt = STRUCT_FORMATS[datatype]
        count, extra = divmod(len(raw), struct.calcsize(fmt))
        if extra:
            raise InvalidRequestError(
                f"input {name!r}: {len(raw)} bytes is not a whole number of {datatype}", name
            )
        data = list(struct.unpack(f"<{count}{fmt}", raw))
    return Tensor(name, datatype, shape, data, dict(parameters or {}))


def flatten(data: object) -> list:
    """JSON tensor data may be nested by dimension or flat; either way, row-major elements."""
    if not isinstance(data, list):
        return [data]
    flat: list = []
    stack = [iter(data)]  # NOTE: a loop, not recursion: nesting depth is the client's choice
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat
