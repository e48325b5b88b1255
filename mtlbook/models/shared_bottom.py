r"""Shared-Bottom: one shared MLP under per-task towers (hard parameter sharing).

.. math::

    z = B(x), \qquad y_k = h_k(z) \quad (k = 1, \dots, K).

Every task reads the same representation :math:`z`, so all per-task gradients meet on the
bottom's parameters: :math:`\nabla_{\theta_B} \sum_k L_k = \sum_k \nabla_{\theta_B} L_k`.
That sum is where conflicting gradients cancel or one task dominates. The bottom is the
model's only shared expert: ``shared_experts == [bottom]``. There are no gates, so
``gate_weights`` stays empty and ``gate_entropy()`` is 0.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from mtlbook.data.batch import TaskSpec
from mtlbook.models._validation import check_dropout, check_int, check_widths
from mtlbook.models.base import MultiTaskModel, _LastForward
from mtlbook.models.experts import Expert


class SharedBottom(MultiTaskModel):
    """Hard parameter sharing: ``y_k = tower_k(bottom(x))``.

    Args:
        n_features: input width (>= 1).
        task_specs: the tasks.
        expert_hidden: hidden widths of the bottom MLP (named like the gated models'
            argument so one config drives every model).
        expert_dim: output width of the bottom (>= 1).
        tower_hidden: hidden widths of each tower.
        dropout: dropout in the bottom and the towers, in [0, 1).
        check_finite: reject NaN/inf inputs.
        experts: ``"bank"`` (default: the towers are batched; the single bottom is one
            module either way; see :mod:`mtlbook.models.banks`) or ``"modules"``.
    """

    def __init__(
        self,
        n_features: int,
        task_specs: Sequence[TaskSpec],
        *,
        expert_hidden: Sequence[int] = (64,),
        expert_dim: int = 32,
        tower_hidden: Sequence[int] = (32,),
        dropout: float = 0.0,
        check_finite: bool = True,
        experts: str = "bank",
    ) -> None:
        super().__init__(n_features, task_specs, check_finite=check_finite, experts=experts)
        expert_dim = check_int(expert_dim, "expert_dim", 1)
        dropout = check_dropout(dropout)
        self.bottom = Expert(n_features, expert_dim, check_widths(expert_hidden, "expert_hidden"), dropout)
        self._build_towers([expert_dim] * len(self.task_specs), check_widths(tower_hidden, "tower_hidden"), dropout)
        self._finish_build()

    @property
    def shared_experts(self) -> nn.ModuleList:
        return nn.ModuleList([self.bottom])

    def _last_shared_experts(self) -> list[Expert]:
        return [self.bottom]

    def _task_features(self, x: Tensor, record: _LastForward) -> list[Tensor]:
        z = self.bottom(x)
        record.shared_outputs = [z]
        return [z] * len(self.task_names)
