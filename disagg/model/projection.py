"""Projections that read the same input, laid out once as one matmul.

Q/K/V and gate/up each become a single weight, concatenated at load, so a step
runs one matmul (one pass over the input, one call into the BLAS) where
transformers runs two or three. The transformers modules' weights are
re-pointed at views of the fused tensor, so nothing is held twice and the
original model still computes exactly as before.

Which kernel runs depends on the device, the dtype and the rows in the call,
each choice measured (`python -m bench engine --parts kernels`):
- float32 on CPU, one or two rows (decode of a small batch): the weight is kept
  input-major (`[in, out]`, contiguous) and multiplied with `torch.mm`. MKL's
  sgemm reads that layout at ~20 GB/s where `F.linear` (`[out, in]`, transposed
  operand) reaches ~13 GB/s on a 2-core avx2 EPYC: the LM head alone went from
  8.4 to 4.7 ms per token.
- more rows, and bfloat16 on CPUs that compute it natively (avx512_bf16 / AMX):
  the weight is also reordered once into oneDNN's blocked layout
  (`mkldnn._reorder_linear_weight`), which skips the per-call reorder
  `F.linear` pays; for float32 at 4–64 rows it was 1.1–2× faster than MKL.
- everywhere else, CUDA included: a plain `F.linear` (cuBLAS on GPU).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from disagg.model.device import cpu_has_native_bf16

PREPACK_BATCH_HINT = 16
"""Batch size oneDNN tunes the packed layout for; any batch size works with it."""

GEMV_MAX_ROWS = 2
"""Calls with at most this many rows use the input-major layout (float32 on CPU)."""


def can_prepack(weight: torch.Tensor) -> bool:
    """True where a oneDNN-packed weight is the fastest linear torch offers."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and cpu_has_native_bf16()


def wants_input_major(weight: torch.Tensor) -> bool:
    """True where `torch.mm` over an `[in, out]` weight beats `F.linear` for a few rows."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32


class Projection:
    """One or more `nn.Linear`s over the same input.

    `fused=True`: one matmul over the concatenated weight, the outputs split
    after (views, no copy). `fused=False`: one matmul per linear, as
    transformers runs them (kept as the measured baseline). `prepack`: None
    chooses per device and dtype; False keeps the plain `F.linear` layout only.
    `repoint=False` leaves the linears' own weights alone (a weight tied to the
    embedding table must stay row-major for the lookup).
    """

    def __init__(
        self,
        linears: list[torch.nn.Linear],
        fused: bool = True,
        prepack: bool | None = None,
        repoint: bool = True,
    ) -> None:
        self.split_sizes = [linear.out_features for linear in linears]
        self.fused = fused or len(linears) == 1
        self.weight_t: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        if not self.fused:
            self.parts = [(linear.weight.detach(), linear.bias) for linear in linears]
            return
        self.bias = _fused_bias(linears)
        plain = prepack is False
        if not plain and wants_input_major(linears[0].weight):
            self.weight_t = _input_major_weight(linears, repoint)
            self.weight = self.weight_t.t()
        else:
            self.weight = _fused_weight(linears)
        if prepack is None:
            prepack = can_prepack(self.weight)
        if prepack:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(
                self.weight.contiguous(), PREPACK_BATCH_HINT
            )
            self.packed_id = _register_packed(self.packed, self.out_features)

    @property
    def out_features(self) -> int:
        """Width of the (concatenated) output: for the LM head, the logits' vocabulary."""
        return sum(self.split_sizes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """x: [T, in] -> [T, out] for one linear, else a tuple of [T, out_i] views."""
        if not self.fused:
            return tuple(F.linear(x, weight, bias) for weight, bias in self.parts)
        out = self.matmul(x)
        if len(self.split_sizes) == 1:
            return out
        return out.split(self.split_sizes, dim=-1)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out], the fused output before any split."""
        if self.weight_t is not None and x.shape[0] <= GEMV_MAX_ROWS:
            if self.bias is None:
                return torch.mm(x, self.weight_t)
            return torch.addmm(self.bias, x, self.weight_t)
        if self.packed is not None:
            if torch.compiler.is_compiling():
                return torch.ops.disagg.packed_linear(x, self.packed_id, self.bias)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


_PACKED: list[tuple[weakref.ref[torch.Tensor], int]] = []
"""Every packed weight (weakly: it lives as long as its Projection) and its output
width, by id: what a compiled graph refers to."""


def _register_packed(packed: torch.Tensor, out_features: int) -> int:
    _PACKED.append((weakref.ref(packed), out_features))
    return len(_PACKED) - 1


@torch.library.custom_op("disagg::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed_id: int, bias: torch.Tensor | None) -> torch.Tensor:
    """A oneDNN-packed linear as one opaque op. x: [T, in] -> [T, out].

    NOTE: inductor cannot take an MKLDNN-layout tensor as a graph constant (its
    mkldnn lowering asserts), so the graph names the weight by id instead.
    """
    packed = _PACKED[packed_id][0]()
    assert packed is not None, "the packed weight's projection is gone"
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed_id: int, bias: torch.Tensor | None) -> torch.Tensor:
    _, out_features = _PACKED[packed_id]
    return x.new_empty(x.shape[0], out_features)


def _fused_weight(linears: list[torch.nn.Linear]) -> torch.Tensor:
    """[sum(out), in]; each linear's weight becomes a view of its rows."""
    if len(linears) == 1:
        return linears[0].weight.detach()
    fused = torch.cat([linear.weight.detach() for linear in linears]).contiguous()
    _repoint(linears, fused)
    return fused


def _input_major_weight(linears: list[torch.nn.Linear], repoint: bool) -> torch.Tensor:
    """[in, sum(out)], contiguous; with `repoint` each linear's weight becomes a
    (column) view of it, so the original layout is not kept twice."""
    weight_t = torch.cat([linear.weight.detach() for linear in linears]).t().contiguous()
    if repoint:
        _repoint(linears, weight_t.t())
    return weight_t


def _repoint(linears: list[torch.nn.Linear], fused: torch.Tensor) -> None:
    """fused: [sum(out), in]; each linear's weight becomes the view of its rows."""
    start = 0
    for linear in linears:
        end = start + linear.out_features
        linear.weight.data = fused[start:end]
        start = end


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
