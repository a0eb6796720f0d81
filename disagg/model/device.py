"""Device and dtype resolution: `--device` and `--dtype auto` made concrete."""

from __future__ import annotations

import torch

from disagg.errors import InvalidRequestError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`; a CUDA device that is not there is an error, not a fallback."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"unsupported device {name!r}; use cpu, cuda or cuda:N", "device")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequestError(
                f"device {name!r} requested but CUDA is unavailable", "device"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidRequestError(f"no such CUDA device {name!r}", "device")
    return device


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bfloat16 in hardware (avx512_bf16 or AMX).

    NOTE: elsewhere torch emulates bf16 matmuls, which is slower than float32.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 where the hardware computes it natively, float32 otherwise."""
    if name == "auto":
        native = device.type == "cuda" or cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    if name not in DTYPES:
        choices = ", ".join(["auto", *DTYPES])
        raise InvalidRequestError(f"unsupported dtype {name!r}; choose one of {choices}", "dtype")
    return DTYPES[name]
