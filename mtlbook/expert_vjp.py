r"""Every task's gradient through one shared expert, written out: the structured mode's last step.

:func:`mtlbook.gradients.structured_gradients` ends with a vector-Jacobian product through
each shared expert, once per task: the expert saw one input :math:`u \in \mathbb R^{B \times
d_0}` (the same for every task), and task :math:`k` hands it a cotangent :math:`C_k =
\partial L_k / \partial E(u) \in \mathbb R^{B \times d_J}`. For an expert of affine maps
:math:`W_j, b_j` with ReLU (or no activation) between them,

.. math::

    z_0 = u, \qquad p_j = z_{j-1} W_j^\top + b_j, \qquad z_j = \sigma(p_j) \;(j < J),
    \qquad E(u) = p_J ,

the chain rule read backwards, with :math:`\Delta_{k,J} = C_k`, is

.. math::

    \frac{\partial L_k}{\partial W_j} = \Delta_{k,j}^\top z_{j-1}, \qquad
    \frac{\partial L_k}{\partial b_j} = \mathbf 1^\top \Delta_{k,j}, \qquad
    \Delta_{k,j-1} = \bigl(\Delta_{k,j} W_j\bigr) \odot \sigma'(p_{j-1}),

and :math:`\partial L_k / \partial u = \Delta_{k,1} W_1` (no :math:`\sigma'`: :math:`u` is the
input). Every task shares :math:`z_j` and :math:`\sigma'(p_j)` (they depend on :math:`u`
only), so each line is one matmul over all :math:`K` tasks: :math:`\Delta W` as ``[K*B, d_j]
@ [d_j, d_{j-1}]``, the weight gradients as one batched ``[K, d_j, B] @ [B, d_{j-1}]``.

``torch.autograd.grad(..., is_grads_batched=True)`` computes the same numbers (on this
package's CPU bit for bit), but ``vmap`` over the recorded graph pays per node and per batched
rule, and keeps more ``[K, B, d]`` buffers alive at once: written out, one expert's backward
for 16 tasks takes about 0.7 of the time (``benchmarks/expert_vjp.py``), and a measured step's
peak memory drops with it (``benchmarks/peers.py``). :math:`z_j` is recomputed
without a graph (two small matmuls); :func:`expert_vjp` checks that the recomputation
reproduces the output the model recorded, bit for bit, and otherwise returns None so that the
caller takes autograd's way (dropout in training, another activation, hooks, autocast: any
expert this module does not model).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from mtlbook.models.experts import Expert

__all__ = ["ExpertVJP", "expert_vjp"]


class ExpertVJP(NamedTuple):
    """Per-task gradients of one expert: ``parameters`` pairs each parameter ``p`` with its
    ``[K, *p.shape]`` gradients; ``input`` is ``[K, B, d_0]`` (None unless asked)."""

    parameters: list[tuple[nn.Parameter, Tensor]]
    input: Tensor | None


def _layers(expert: nn.Module) -> list[tuple[nn.Linear, bool]] | None:
    """The expert as ``(linear, relu_after)`` pairs, or None where it is not affine maps and ReLUs."""
    if not isinstance(expert, Expert) or not isinstance(expert.output_activation, nn.Identity):
        return None
    layers: list[tuple[nn.Linear, bool]] = []
    for module in expert.body:
        if isinstance(module, nn.Linear):
            layers.append((module, False))
        elif isinstance(module, nn.ReLU) and layers and not layers[-1][1]:
            layers[-1] = (layers[-1][0], True)
        elif isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training):
            continue  # the identity in this mode
        else:
            return None  # dropout in training, GELU, tanh...: autograd knows them
    layers.append((expert.output_layer, False))
    return layers


@torch.no_grad()
def expert_vjp(
    expert: nn.Module, u: Tensor, output: Tensor, cotangents: Tensor, want_input: bool = False
) -> ExpertVJP | None:
    r"""Every task's gradient on ``expert``'s parameters (and input) for one batch.

    Args:
        expert: an :class:`~mtlbook.models.experts.Expert` of affine maps and ReLUs.
        u: the input it read, ``[B, d_0]`` (the same for every task).
        output: the output the model recorded for ``u``, ``[B, d_J]``.
        cotangents: :math:`C_k = \partial L_k / \partial E(u)`, task-major ``[K, B, d_J]``.
        want_input: also return :math:`\partial L_k / \partial u`.

    Returns:
        :class:`ExpertVJP`, or None when the expert is not of that form or recomputing it
        does not reproduce ``output`` exactly (the caller then differentiates the graph).
    """
    layers = _layers(expert)
    if layers is None or u.dim() != 2 or cotangents.dim() != 3:
        return None
    # _layers accepted only Linear, ReLU, Identity and eval-mode Dropout: the Linears hold every
    # parameter, and these modules (listed directly, no recursive walk) are all there is
    dtypes = {output.dtype, u.dtype, cotangents.dtype}
    dtypes.update(p.dtype for linear, _ in layers for p in (linear.weight, linear.bias) if p is not None)
    if len(dtypes) > 1:
        return None  # autocast or mixed dtypes: the recorded graph is the reference
    modules = (expert, expert.body, *expert.body, expert.output_layer, expert.output_activation)
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return None
    # forward again, keeping what every task's backward shares: z_{j-1}, ReLU masks
    inputs, masks = [], []
    z = u
    for linear, relu in layers:
        inputs.append(z)
        z = nn.functional.linear(z, linear.weight, linear.bias)
        if relu:
            z = z.relu()
            masks.append(z > 0)
        else:
            masks.append(None)
    if not torch.equal(z, output):
        return None
    n_tasks = cotangents.shape[0]
    grads: list[tuple[nn.Parameter, Tensor]] = []
    delta = cotangents  # Delta_{k,j}, [K, B, d_j]
    input_grad = None
    for j in reversed(range(len(layers))):
        linear, _ = layers[j]
        z_in = inputs[j]
        # dL_k/dW_j = Delta_kj^T z_{j-1}: one batched matmul, z_{j-1} broadcast
        if linear.bias is not None:
            grads.append((linear.bias, delta.sum(1)))
        z_batched = z_in.expand(n_tasks, *z_in.shape)  # a view, no copy
        grads.append((linear.weight, torch.bmm(delta.transpose(1, 2), z_batched)))
        if j > 0 or want_input:
            # Delta W_j for every task and row at once: [K*B, d_j] @ [d_j, d_{j-1}]
            back = delta.reshape(-1, delta.shape[-1]) @ linear.weight
            back = back.view(n_tasks, *z_in.shape)
            if j > 0:
                mask = masks[j - 1]
                # in place: one [K, B, d] buffer less
                delta = back.mul_(mask) if mask is not None else back
            else:
                input_grad = back
    return ExpertVJP(grads[::-1], input_grad)
