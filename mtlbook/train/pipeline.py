r"""The loss pipeline: the five stages from a model's outputs to the training objective.

For one batch with tasks :math:`i = 1..n` (task-major vectors ``[n]``):

.. math::

    L_i &= \text{task loss of } i \text{ on its present rows (focal, bce, huber, mse, ce, infonce)}
           &&\text{stage 1, } \texttt{task\_losses} \\
    \ell_i &= c_i L_i \qquad (c_i = \texttt{config.task\_weights})
           &&\text{stage 2, } \texttt{fixed\_weights} \\
    \tilde\ell &= \text{balancer}(\ell) \qquad\text{(default: } \tfrac{\ell_i}{2\sigma_i^2} + \tfrac12\log\sigma_i^2)
           &&\text{stage 3, } \texttt{balance} \\
    \hat\ell_i &= \tilde\ell_i + \min\Bigl(\lambda \textstyle\sum_{j\ne i} w_{ij}\tilde\ell_j,\
                  \rho_{\max}\operatorname{sg}(\tilde\ell_i)\Bigr)
           &&\text{stage 4, } \texttt{transfer} \text{ (adaTT, while enabled)} \\
    \mathcal L &= \textstyle\sum_i \hat\ell_i - \lambda_H H_{gate}
           &&\text{stage 5, } \texttt{objective}

with :math:`H_{gate} = \texttt{model.gate\_entropy()} \in [0, 1]` and
:math:`\lambda_H = \texttt{config.gate\_entropy\_weight}`. Every ``grad_interval`` batches
stage 4 first lets adaTT measure task affinity from the gradients of :math:`\tilde\ell` on
the shared experts of this very forward pass (``retain_graph``), so the optimizer step and
the measurement see the same batch.

This module is pure arithmetic on tensors: it knows nothing about devices, mixed precision,
several processes or out-of-memory errors. The trainer runs stage 1 under autocast, checks
:math:`\tilde\ell` and :math:`\mathcal L` for finiteness between the stages, and hands the
objective to the balancer's backward (GradNorm and PCGrad take :math:`\tilde\ell` as their
per-task losses and the transfer and gate terms as extra terms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor, nn

from mtlbook.data.batch import Batch, TaskSpec
from mtlbook.losses import present_tasks, task_losses
from mtlbook.losses_grouped import grouped_task_losses

__all__ = ["LossPipeline", "LossTerms"]

#: ``measure(weighted, present, batch)``: how stage 4 hands adaTT the losses to measure on.
MeasureFn = Callable[[Tensor, Tensor, Batch], Any]


@dataclass
class LossTerms:
    """What the five stages produced for one batch (every vector is ``[n_tasks]``)."""

    raw: Tensor  #: :math:`L_i` (stage 1)
    present: Tensor  #: bool, task has a present row in the batch
    weighted: Tensor  #: :math:`\tilde\ell_i` (stages 2-3)
    final: Tensor | None = None  #: :math:`\hat\ell_i` (stage 4)
    objective: Tensor | None = None  #: :math:`\mathcal L` (stage 5)


class LossPipeline:
    r"""The five loss stages for one model's tasks (see the module docstring).

    Args:
        task_specs: the model's tasks, in order.
        loss_names: ``{task: loss name}`` overrides (default loss per task kind otherwise).
        loss_kwargs: ``{task: {argument: value}}`` for the losses.
        fixed_weights: ``[n_tasks]`` tensor :math:`c_i`.
        balancer: the loss balancer (stage 3).
        adatt: an :class:`~mtlbook.adatt.AdaptiveTaskTransfer` or ``None`` (stage 4).
        gate_entropy: a function returning :math:`H_{gate}` of the last forward pass.
        gate_weight: :math:`\lambda_H`.
        grouped: compute stage 1 with :func:`~mtlbook.losses_grouped.grouped_task_losses` (tasks
            of one loss and shape together; the same values to float rounding) instead of
            :func:`~mtlbook.losses.task_losses`. The trainer sets it for ``experts="bank"`` models.
    """

    def __init__(
        self,
        task_specs: Sequence[TaskSpec],
        loss_names: Mapping[str, str],
        loss_kwargs: Mapping[str, Mapping[str, Any]],
        fixed_weights: Tensor,
        balancer: nn.Module,
        adatt: nn.Module | None,
        gate_entropy: Callable[[], Tensor],
        gate_weight: float,
        grouped: bool = False,
    ) -> None:
        self.task_specs = tuple(task_specs)
        self.task_names = tuple(s.name for s in self.task_specs)
        self.loss_names = dict(loss_names)
        self.loss_kwargs = {t: dict(kw) for t, kw in loss_kwargs.items()}
        self.fixed_weights = fixed_weights
        self.balancer = balancer
        self.adatt = adatt
        self.gate_entropy = gate_entropy
        self.gate_weight = float(gate_weight)
        self.grouped = bool(grouped)

    def task_losses(self, outputs: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """Stage 1: :math:`L_i` on the present rows of each task."""
        compute = grouped_task_losses if self.grouped else task_losses
        return compute(outputs, batch, self.task_specs, self.loss_names, self.loss_kwargs, None)

    def present(self, batch: Batch) -> Tensor:
        """Bool ``[n_tasks]``: which tasks have a target in ``batch``."""
        return present_tasks(batch, self.task_names)

    def balance(self, raw: Tensor, present: Tensor) -> Tensor:
        r"""Stages 2 and 3: :math:`\tilde\ell = \text{balancer}(c \odot L)` (in float32)."""
        fixed = raw.float() * self.fixed_weights  # stage 2: fixed weights c_i
        return self.balancer.weight_losses(fixed, present)  # stage 3: balancer

    @property
    def transfers(self) -> bool:
        """True while adaTT is attached and enabled (stage 4 does something)."""
        return self.adatt is not None and bool(self.adatt.enabled)

    def transfer(self, weighted: Tensor, present: Tensor, batch: Batch, step: int, measure: MeasureFn | None = None) -> Tensor:
        r"""Stage 4: measure affinity every ``grad_interval`` batches, then :math:`\hat\ell`.

        ``measure`` replaces ``adatt.measure(weighted, present)`` (the trainer passes the
        multi-process version); ``step`` is the index of the batch since training began.
        """
        if not self.transfers:
            return weighted
        if self.adatt.should_measure(step):
            if measure is None:
                self.adatt.measure(weighted, present)
            else:
                measure(weighted, present, batch)
        return self.adatt.compute_transfer_loss(weighted, present=present)

    def objective(self, final: Tensor) -> Tensor:
        r"""Stage 5: :math:`\mathcal L = \sum_i \hat\ell_i - \lambda_H H_{gate}`."""
        objective = final.sum()
        if self.gate_weight != 0.0:
            objective = objective - self.gate_weight * self.gate_entropy().float()
        return objective

    def __call__(self, outputs: Mapping[str, Tensor], batch: Batch, step: int = 0) -> LossTerms:
        """All five stages without the trainer's guards (for reading and for tests)."""
        raw = self.task_losses(outputs, batch)
        present = self.present(batch)
        weighted = self.balance(raw, present)
        final = self.transfer(weighted, present, batch, step)
        return LossTerms(raw, present, weighted, final, self.objective(final))

