"""The narrow bank affine map: same values and gradients as ``torch.baddbmm``, twice differentiable."""

from __future__ import annotations

import pytest
import torch

from mtlbook.models.narrow_affine import NARROW_OUT, NarrowBankAffine, bank_affine


def _reference(x, weight, bias):
    return torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("broadcast", [True, False])
@pytest.mark.parametrize("d_out", [1, 3, NARROW_OUT])
def test_values_and_gradients_match_baddbmm(d_out, broadcast, with_bias):
    torch.manual_seed(d_out)
    n, batch, d_in = 5, 9, 4
    weight = torch.randn(n, d_in, d_out, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, 1, d_out, dtype=torch.float64, requires_grad=True) if with_bias else None
    base = torch.randn(batch, d_in, dtype=torch.float64, requires_grad=True) if broadcast else None
    stacked = None if broadcast else torch.randn(n, batch, d_in, dtype=torch.float64, requires_grad=True)
    leaves = [t for t in (base, stacked, weight, bias) if t is not None]

    def inputs():
        return base.unsqueeze(0).expand(n, batch, d_in) if broadcast else stacked

    cotangent = torch.randn(n, batch, d_out, dtype=torch.float64)
    got = NarrowBankAffine.apply(inputs(), weight, bias)
    want = _reference(inputs(), weight, bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(got, leaves, cotangent)
    want_grads = torch.autograd.grad(want, leaves, cotangent)
    for g, w in zip(got_grads, want_grads):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_second_order_gradients():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(NarrowBankAffine.apply, (x, weight, bias))
    assert torch.autograd.gradgradcheck(NarrowBankAffine.apply, (x, weight, bias))


def test_per_task_gradients_batched_over_cotangents():
    """``is_grads_batched`` (vmap over the backward, the ``batched`` extraction) runs through it."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4, requires_grad=True)
    weight = torch.randn(3, 4, 2, requires_grad=True)
    y = NarrowBankAffine.apply(x, weight, None)
    cotangents = torch.randn(2, *y.shape)
    (batched,) = torch.autograd.grad(y, weight, cotangents, retain_graph=True, is_grads_batched=True)
    for row, cotangent in zip(batched, cotangents):
        (one,) = torch.autograd.grad(y, weight, cotangent, retain_graph=True)
        torch.testing.assert_close(row, one)


def test_bank_affine_dispatches_on_the_output_width():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, requires_grad=True)
    narrow = bank_affine(x, torch.randn(2, 4, NARROW_OUT, requires_grad=True), None)
    wide = bank_affine(x, torch.randn(2, 4, NARROW_OUT + 1, requires_grad=True), None)
    assert type(narrow.grad_fn).__name__.startswith("NarrowBankAffine")
    assert type(wide.grad_fn).__name__ == "BmmBackward0"


def test_bf16_autocast_gives_each_input_a_gradient_of_its_dtype():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(2, 4, 3, requires_grad=True)
    bias = torch.randn(2, 1, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = NarrowBankAffine.apply(x, weight, bias)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for tensor in (x, weight, bias):
        assert tensor.grad.dtype == torch.float32 and torch.isfinite(tensor.grad).all()
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 5.0))
