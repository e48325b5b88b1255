r"""A bank of narrow affine maps (a few outputs each: gates, task heads) with faster matmuls.

A bank computes :math:`n` affine maps at once, :math:`Y_i = X_i A_i + a_i` with
:math:`A_i \in \mathbb{R}^{d_\text{in} \times d_\text{out}}` stored stacked as
``weight [n, d_in, d_out]`` (:mod:`mtlbook.models.bank_storage`). Its backward needs

.. math::

    \frac{\partial L}{\partial X_i} = G_i A_i^\top, \qquad
    \frac{\partial L}{\partial A_i} = X_i^\top G_i = \big(G_i^\top X_i\big)^\top, \qquad
    \frac{\partial L}{\partial a_i} = \textstyle\sum_b G_{i,b},

with :math:`G_i = \partial L / \partial Y_i \in \mathbb{R}^{B \times d_\text{out}}`. The
two ways of writing :math:`\partial L / \partial A_i` are the same numbers, but not the same
speed: on CPU, a batched matmul whose result has a last dimension of a few entries (a gate's
:math:`m = 2..8` experts, a task head's 1..3 outputs) runs several times slower than the
transposed product, whose rows are long. The same holds for the forward product, computed as
:math:`Y_i^\top = A_i^\top X_i^\top`, and for :math:`G_i A_i^\top` with one output, which is
an outer product (an elementwise multiply). ``benchmarks/plain_step.py`` measures the
whole step and, apart, its matmuls alone (``bank_matmul_ms``).

:func:`bank_affine` is what the banks call: ``torch.baddbmm`` for wide maps, and
:class:`NarrowBankAffine` (the transposed products) when ``d_out <= NARROW_OUT``. Both give
the same values up to float rounding of the matmul kernels, and both are differentiable
twice (the backward is written with differentiable ops on the saved inputs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

NARROW_OUT = 8
"""Widest ``d_out`` computed with :class:`NarrowBankAffine`; measured faster than ``baddbmm`` up to 8 outputs."""


class NarrowBankAffine(torch.autograd.Function):
    r"""``x [n, B, d_in] @ weight [n, d_in, d_out] + bias [n, 1, d_out]`` through products with long rows.

    Forward computes :math:`Y_i^\top = A_i^\top X_i^\top + a_i^\top` (``[n, d_out, B]``, rows of
    length :math:`B`) and returns its transposed view ``[n, B, d_out]``: the same values, with
    the batch as the fast-moving dimension (a softmax over the gate's experts then reads it as
    it is). ``bias`` may be None. Called through :func:`bank_affine`.
    """

    generate_vmap_rule = True  # the backward is plain batched ops: vmap (is_grads_batched) can batch it

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        weight_rows = weight.transpose(1, 2).contiguous()  # [n, d_out, d_in]: a few long rows
        if bias is None:
            out_t = torch.bmm(weight_rows, x.transpose(1, 2))
        else:
            out_t = torch.baddbmm(bias.transpose(1, 2), weight_rows, x.transpose(1, 2))
        return out_t.transpose(1, 2)  # [n, B, d_out] view of [n, d_out, B]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor | None], output: Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x_in, weight_in = ctx.saved_tensors
        # under autocast the forward ran in a lower precision than some inputs: the backward
        # computes in the gradient's dtype and hands each input a gradient of its own dtype
        x, weight = x_in.to(grad.dtype), weight_in.to(grad.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if weight.shape[-1] == 1:  # G A^T with one output: an outer product, elementwise
                grad_x = grad * weight.transpose(1, 2)
            else:
                grad_x = torch.bmm(grad, weight.transpose(1, 2))
            grad_x = grad_x.to(x_in.dtype)
        if ctx.needs_input_grad[1]:
            # (G^T X)^T: the product with long rows, then the small [n, d_in, d_out] copy
            grad_weight = torch.bmm(grad.transpose(1, 2), x).transpose(1, 2).contiguous().to(weight_in.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(1, keepdim=True).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias


def bank_affine(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    r"""``n`` affine maps in one batched matmul: ``y[i] = x[i] @ weight[i] + bias[i]``.

    Args:
        x: ``[n, B, d_in]``; a stride-0 broadcast of one ``[B, d_in]`` is fine.
        weight: ``[n, d_in, d_out]``.
        bias: ``[n, 1, d_out]`` or None.

    Returns:
        ``[n, B, d_out]``.
    """
    if weight.shape[-1] <= NARROW_OUT:
        return NarrowBankAffine.apply(x, weight, bias)
    if bias is not None:
        return torch.baddbmm(bias, x, weight)
    return torch.bmm(x, weight)
