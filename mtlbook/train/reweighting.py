"""The weight each task's loss carries on the shared parameters, recorded once per epoch.

With the balancer's weights :math:`b_j` (:math:`1/(2\\sigma_j^2)` for uncertainty weighting,
1 for equal weights) and adaTT's effective weights :math:`c_j`
(:meth:`~mtlbook.adatt.AdaptiveTaskTransfer.effective_task_weights`), the gradient that
reaches the shared parameters is

.. math::

    \\nabla_{\\theta_s} \\sum_i L_i^{\\text{adaTT}} = \\sum_j c_j\\, b_j\\, \\nabla_{\\theta_s} \\ell_j

for the fixed-weighted task losses :math:`\\ell_j` (appendix A.5). The trainer evaluates
:math:`c` at the end of every epoch, at the epoch-mean losses (the caps are decided on these
means, not batch by batch), and stores ``effective_weights`` (:math:`c`, ``None`` without
adaTT) and ``loss_weights`` (:math:`c \\odot b`) in the epoch's history record. PCGrad edits
the gradients after weighting, so for it ``loss_weights`` describes the objective only.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlbook.balancing import LossBalancer, UncertaintyBalancer

__all__ = ["loss_weight_snapshot"]


@torch.no_grad()
def loss_weight_snapshot(
    adatt: nn.Module | None,
    balancer: LossBalancer,
    task_names: Sequence[str],
    train_metrics: Mapping[str, float],
    fixed_weights: Tensor,
) -> dict[str, Any]:
    """``{"effective_weights": [n] or None, "loss_weights": [n]}`` for one epoch record.

    Args:
        adatt: the trainer's :class:`~mtlbook.adatt.AdaptiveTaskTransfer` (or ``None``), in
            the epoch's own phase (call before ``on_epoch_end``).
        balancer: the trainer's balancer.
        task_names: the tasks, in order.
        train_metrics: the epoch's ``record["train"]`` (``"<task>/loss"`` = epoch-mean loss;
            a task never present in the epoch is NaN and keeps weight 1).
        fixed_weights: the trainer's fixed per-task weights ``[n]``.
    """
    device = fixed_weights.device
    means = torch.tensor([float(train_metrics.get(f"{t}/loss", math.nan)) for t in task_names], device=device)
    fixed = means.to(fixed_weights.dtype) * fixed_weights
    present = torch.isfinite(fixed)
    b = balancer.weights().to(device=device, dtype=torch.float64)
    if adatt is None:
        return {"effective_weights": None, "loss_weights": [float(v) for v in b.tolist()]}
    if isinstance(balancer, UncertaintyBalancer):  # b L + (1/2) log sigma^2: the offset moves the caps
        weighted = balancer.weight_losses(fixed.float(), present)
    else:  # weights() times the loss; LossBalancer's version has no side effects (GradNorm's has)
        weighted = LossBalancer.weight_losses(balancer, fixed.float(), present)
    c = adatt.effective_task_weights(weighted.to(device), present).to(torch.float64)
    return {"effective_weights": [float(v) for v in c.tolist()], "loss_weights": [float(v) for v in (c * b).tolist()]}
