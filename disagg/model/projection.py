"""Projections that read the same input, laid out once as one matmul.

Q/K/V and gate/up each become a single weight `[sum(out), in]`, concatenated
at load, so a step runs one matmul (one pass over the input, one call into the
BLAS) where transformers runs two or three. The transformers modules' weights
are re-pointed at row slices of the fused tensor, so nothing is held twice and
the original model still computes exactly as before.

On CPUs that compute bfloat16 natively (avx512_bf16 / AMX) a bfloat16 weight is
also reordered once into oneDNN's blocked layout (`mkldnn._reorder_linear_weight`),
which skips the per-call reorder `F.linear` pays; everywhere else, CUDA included,
the projection is a plain `F.linear` (cuBLAS on GPU, MKL/oneDNN on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from disagg.model.device import cpu_has_native_bf16

PREPACK_BATCH_HINT = 16
"""Batch size oneDNN tunes the packed layout for; any batch size works with it."""


def can_prepack(weight: torch.Tensor) -> bool:
    """True where a oneDNN-packed weight is the fastest linear torch offers."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and cpu_has_native_bf16()
    )


class Projection:
    """One or more `nn.Linear`s over the same input.

    `fused=True`: one matmul over the concatenated weight, the outputs split
    after (views, no copy). `fused=False`: one matmul per linear, as
    transformers runs them (kept as the measured baseline).
    """

    def __init__(
        self, linears: list[torch.nn.Linear], fused: bool = True, prepack: bool | None = None
    ) -> None:
        self.split_sizes = [linear.out_features for linear in linears]
        self.fused = fused or len(linears) == 1
        if not self.fused:
            self.parts = [(linear.weight, linear.bias) for linear in linears]
            self.packed = None
            return
        self.weight = _fused_weight(linears)
        self.bias = _fused_bias(linears)
        if prepack is None:
            prepack = can_prepack(self.weight)
        self.packed = (
            torch.ops.mkldnn._reorder_linear_weight(self.weight, PREPACK_BATCH_HINT)
            if prepack
            else None
        )

    @property
    def out_features(self) -> int:
        """Width of the (concatenated) output: for the LM head, the logits' vocabulary."""
        return sum(self.split_sizes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """x: [T, in] -> [T, out] for one linear, else a tuple of [T, out_i] views."""
        if not self.fused:
            return tuple(F.linear(x, weight, bias) for weight, bias in self.parts)
        if self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            out = F.linear(x, self.weight, self.bias)
        if len(self.split_sizes) == 1:
            return out
        return out.split(self.split_sizes, dim=-1)


def _fused_weight(linears: list[torch.nn.Linear]) -> torch.Tensor:
    """[sum(out), in]; each linear's weight becomes a view of its rows."""
    if len(linears) == 1:
        return linears[0].weight.detach()
    fused = torch.cat([linear.weight.detach() for linear in linears]).contiguous()
    start = 0
    for linear in linears:
        end = start + linear.out_features
        linear.weight.data = fused[start:end]
        start = end
    return fused


def _fused_bias(linears: list[torch.nn.Linear]) -> torch.Tensor | None:
    """[sum(out)], zeros for linears without a bias; None when none has one."""
    if all(linear.bias is None for linear in linears):
        return None
    parts = [
        linear.bias.detach()
        if linear.bias is not None
        else linear.weight.new_zeros(linear.out_features)
        for linear in linears
    ]
    return torch.cat(parts)
