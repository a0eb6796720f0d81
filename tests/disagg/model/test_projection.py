"""Fused projections compute exactly what the separate linears do."""

from __future__ import annotations

import pytest
import torch

from disagg.model.projection import Projection


def linears(bias: list[bool], sizes=(12, 4, 4), in_features=16) -> list[torch.nn.Linear]:
    torch.manual_seed(0)
    return [torch.nn.Linear(in_features, n, bias=b) for n, b in zip(sizes, bias)]


@pytest.mark.parametrize("bias", [[False] * 3, [True] * 3, [True, False, True]])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_fused_outputs_equal_each_linear(bias, num_tokens):
    parts = linears(bias)
    x = torch.randn(num_tokens, 16)
    expected = [linear(x) for linear in parts]
    got = Projection(parts, fused=True)(x)
    assert [tuple(g.shape) for g in got] == [(num_tokens, n) for n in (12, 4, 4)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_fusing_shares_memory_with_the_original_linears():
    parts = linears([False] * 3)
    before = [linear.weight.clone() for linear in parts]
    projection = Projection(parts, fused=True)
    for linear, old in zip(parts, before):
        assert torch.equal(linear.weight, old)
    assert parts[0].weight.data_ptr() == projection.weight.data_ptr()
    assert parts[1].weight.data_ptr() == projection.weight[12].data_ptr()


def test_unfused_runs_each_linear():
    parts = linears([True, True, True])
    x = torch.randn(3, 16)
    got = Projection(parts, fused=False)(x)
    for g, linear in zip(got, parts):
        assert torch.equal(g, linear(x))


def test_single_linear_returns_a_tensor():
    (linear,) = linears([True], sizes=(8,))
    x = torch.randn(2, 16)
    assert torch.equal(Projection([linear])(x), linear(x))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs a oneDNN build")
def test_prepacked_weight_matches_plain_linear():
    parts = linears([True, False, True])
    x = torch.randn(5, 16)
    expected = Projection(parts, fused=True, prepack=False)(x)
    got = Projection(parts, fused=True, prepack=True)(x)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 17])
def test_every_kernel_computes_the_linear(num_tokens):
    """float32 on CPU: the input-major mm (<= GEMV_MAX_ROWS rows) and the packed kernel
    (more rows) both compute what nn.Linear computes."""
    parts = linears([True, False, True])
    x = torch.randn(num_tokens, 16)
    expected = [linear(x) for linear in parts]
    projection = Projection(parts, fused=True)
    assert projection.weight_t is not None
    assert projection.weight_t.is_contiguous() and projection.weight_t.shape == (16, 20)
    for g, e in zip(projection(x), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_input_major_layout_is_held_once():
    """The linears' weights become views of the input-major copy: no second layout."""
    parts = linears([False] * 3)
    projection = Projection(parts, fused=True)
    assert parts[0].weight.data_ptr() == projection.weight_t.data_ptr()
    assert not parts[0].weight.is_contiguous()


def test_a_tied_weight_is_left_alone():
    (linear,) = linears([False], sizes=(8,))
    before = linear.weight.data_ptr()
    projection = Projection([linear], repoint=False)
    assert linear.weight.data_ptr() == before and linear.weight.is_contiguous()
    x = torch.randn(1, 16)
    torch.testing.assert_close(projection(x), linear(x), rtol=1e-6, atol=1e-6)
