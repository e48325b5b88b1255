"""The balancers that replace the shared parameters' gradient by a combination of the per-task
gradients: the base :class:`GradientCombiner` and :class:`PCGrad` (registered in
:data:`mtlbook.balancing.BALANCERS`; the ``torchjd`` ones are in :mod:`mtlbook.balancers_torchjd`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from mtlbook.balancer_base import (
    LossBalancer,
    ScaleFn,
    SeededGeneratorState,
    _check_scale,
    _per_task_gradients,
    _trainable,
    _unflatten_into,
)
from mtlbook.gradients import gradient_parts

__all__ = ["GradientCombiner", "PCGrad"]


class GradientCombiner(LossBalancer, ABC):
    r"""Base of the methods that combine per-task gradients on the shared parameters.

    With :math:`G = [g_1; \dots; g_n] \in \mathbb{R}^{n \times d}`, the task-major per-task
    gradients :math:`g_i = \nabla_{\theta_s} \tilde L_i` of the weighted losses on the shared
    parameters, a subclass defines one map :meth:`combine`: :math:`G \mapsto d \in
    \mathbb{R}^d`. :meth:`backward` gives

    .. math::
        \nabla_{\theta_s} \leftarrow \operatorname{combine}(G) + \nabla_{\theta_s} R,
        \qquad \nabla_{\theta_o} \leftarrow \nabla_{\theta_o} \mathcal L,

    where :math:`R = \mathcal L - \sum_i \tilde L_i` is whatever the objective adds beyond the
    task losses (a gate-entropy regulariser, adaTT's transfer terms; never combined) and
    :math:`\theta_o` are all other parameters, which get the plain gradient of the objective.
    Gradients already in ``.grad`` (gradient accumulation) are kept and added to.

    ``combine(G) = G.sum(0)`` would be the plain backward. Under a loss scaler the per-task
    gradients are scaled by :math:`s`; a combiner whose map is positively homogeneous
    (:math:`\operatorname{combine}(sG) = s \operatorname{combine}(G)`, e.g. PCGrad, MGDA)
    receives them as they are; one that is not (``scale_equivariant = False``) receives
    :math:`G / s` and its output is multiplied by :math:`s`.
    """

    rewrites_shared_gradients: ClassVar[bool] = True
    #: ``combine(s * G) == s * combine(G)`` for every ``s > 0``.
    scale_equivariant: ClassVar[bool] = True

    @abstractmethod
    def combine(self, grads: Tensor) -> Tensor:
        """Map task-major per-task shared gradients ``[n_tasks, d]`` to one vector ``[d]``."""

    def _combine_checked(self, grads: Tensor, scale: ScaleFn | None, device: torch.device) -> Tensor:
        factor = None
        if scale is not None and not self.scale_equivariant:
            factor = scale(torch.ones((), device=device)).to(grads)
            grads = grads / factor
        combined = self.combine(grads)
        if not isinstance(combined, Tensor) or combined.shape != grads.shape[1:]:
            raise RuntimeError(
                f"{type(self).__name__}.combine must return a tensor of shape [{grads.shape[1]}], "
                f"got {getattr(combined, 'shape', type(combined).__name__)}"
            )
        return combined if factor is None else combined * factor

    def backward(self, objective: Tensor, weighted_losses: Tensor, shared_parameters: Sequence[Tensor],
                 scale: ScaleFn | None = None) -> None:
        _check_scale(scale)
        if not isinstance(weighted_losses, Tensor) or weighted_losses.shape != (self.n_tasks,):
            raise ValueError(f"weighted_losses must be a tensor of shape [{self.n_tasks}]")
        params = _trainable(shared_parameters)
        obj = scale(objective) if scale is not None else objective
        if not params:
            obj.backward()
            return
        losses = scale(weighted_losses) if scale is not None else weighted_losses
        active = torch.ones(self.n_tasks, dtype=torch.bool)
        task_grads = _per_task_gradients(losses, params, active)
        combined = self._combine_checked(task_grads, scale, objective.device)

        # Whatever the objective adds beyond the task losses; differentiating the
        # difference cancels the task terms exactly at the weighted_losses node.
        residual = obj - losses.sum()
        extra = [None] * len(params)
        if residual.requires_grad:
            extra = list(gradient_parts(residual, params))

        # Set accumulated gradients aside (gradient accumulation must survive), let the plain
        # backward serve the non-shared parameters, then overwrite the shared ones.
        previous = [p.grad for p in params]
        for p in params:
            p.grad = None
        obj.backward()
        for p, old, surgery, other in zip(params, previous, _unflatten_into(combined, params), extra):
            # clone: the slices of one flat vector must not share storage as .grad
            new = surgery.clone() if other is None else surgery + other
            p.grad = new if old is None else old + new


class PCGrad(SeededGeneratorState, GradientCombiner):
    r"""Projecting conflicting gradients (gradient surgery) :cite:`yu2020gradient`.

    Let :math:`g_i = \nabla_{\theta_s} L_i` on the shared parameters. For each task
    :math:`i`, start from :math:`g_i^{PC} = g_i` and visit the other tasks :math:`j` in a
    random order; whenever they conflict, remove the component along :math:`g_j`:

    .. math::
        \text{if } g_i^{PC} \cdot g_j < 0: \quad
        g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\lVert g_j \rVert^2}\, g_j .

    The shared parameters receive :math:`\sum_i g_i^{PC}` (plus the gradient of any term of
    the objective that is not a task loss, e.g. a gate-entropy regulariser, unprojected);
    every other parameter receives the plain gradient of the objective. Non-conflicting
    pairs are left untouched, so with no conflict this is exactly the plain backward.

    The visiting order comes from a ``torch.Generator`` seeded with ``seed``; its state is
    part of ``state_dict`` so a resumed run draws the same orders. Task weights are 1.

    Args:
        n_tasks: number of tasks.
        seed: seed of the order generator.
    """

    #: the shared gradients are rewritten after the backward (multi-process runs average them again)
    rewrites_shared_gradients = True

    def __init__(self, n_tasks: int, seed: int = 0) -> None:
        super().__init__(n_tasks)
        self._seed_generator(seed)

    def project(self, grads: Tensor) -> Tensor:
        """Project task-major gradients ``[n_tasks, d]``; returns the projected ``[n_tasks, d]``.

        Uses (and advances) the order generator.
        """
        if grads.dim() != 2:
            raise ValueError(f"grads must be [n_tasks, d], got shape {list(grads.shape)}")
        n = grads.shape[0]
        projected = grads.clone()
        squared_norms = (grads * grads).sum(dim=1)
        for i in range(n):
            order = torch.randperm(n, generator=self._generator).tolist()
            for j in order:
                if j == i or not bool(squared_norms[j] > 0):
                    continue
                dot = projected[i] @ grads[j]
                if bool(dot < 0):
                    projected[i] = projected[i] - (dot / squared_norms[j]) * grads[j]
        return projected

    def combine(self, grads: Tensor) -> Tensor:
        """:math:`\\sum_i g_i^{PC}`: the sum of the projected task gradients ``[d]``."""
        return self.project(grads).sum(dim=0)

    def weights(self) -> Tensor:
        return torch.ones(self.n_tasks)
