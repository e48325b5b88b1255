r"""MMoE: multi-gate mixture of experts (Ma et al., 2018, :cite:`ma2018modeling`).

:math:`n` experts :math:`E_1, \dots, E_n` of one common output width read the input; each
task :math:`k` owns a softmax gate and a tower:

.. math::

    g_k(x) = \operatorname{softmax}(W_k x), \qquad
    f_k(x) = \sum_{i=1}^{n} g_k(x)_i \, E_i(x), \qquad
    y_k = h_k\big(f_k(x)\big).

Every expert is shared (any task may route to any expert), so ``shared_experts`` is the
whole expert pool and ``shared_parameters()`` all expert parameters. Gates are keyed
``"level0/{task}"`` in ``gate_weights`` (one level), over experts labelled ``expert[i]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mtlbook.data.batch import TaskSpec
from mtlbook.models._validation import check_dropout, check_int, check_per_expert_widths, check_widths
from mtlbook.models.banks import GateBank, experts_forward
from mtlbook.models.base import MixtureRecord, MultiTaskModel, _LastForward
from mtlbook.models.experts import Expert
from mtlbook.models.gates import SoftmaxGate, mix_experts


class MMoE(MultiTaskModel):
    """Multi-gate mixture of experts.

    Args:
        n_features: input width (>= 1).
        task_specs: the tasks.
        n_experts: number of experts (>= 1).
        expert_hidden: hidden widths, one tuple for every expert (``(64,)``) or one tuple
            per expert (``[(16,), (64, 32), ...]``, length ``n_experts``).
        expert_dim: common output width of the experts (>= 1).
        tower_hidden: hidden widths of each tower.
        dropout: dropout in experts and towers, in [0, 1).
        gate_entropy_weight: weight of the gate-entropy regulariser (see
            :mod:`mtlbook.models.base`).
        check_finite: reject NaN/inf inputs.
        experts: ``"bank"`` (default: batched experts, gates and towers; see
            :mod:`mtlbook.models.banks`) or ``"modules"``.
    """

    def __init__(
        self,
        n_features: int,
        task_specs: Sequence[TaskSpec],
        *,
        n_experts: int = 4,
        expert_hidden: Sequence[int] | Sequence[Sequence[int]] = (64,),
        expert_dim: int = 32,
        tower_hidden: Sequence[int] = (32,),
        dropout: float = 0.0,
        gate_entropy_weight: float = 0.0,
        check_finite: bool = True,
        experts: str = "bank",
    ) -> None:
        super().__init__(
            n_features, task_specs, gate_entropy_weight=gate_entropy_weight, check_finite=check_finite, experts=experts
        )
        n_experts = check_int(n_experts, "n_experts", 1)
        expert_dim = check_int(expert_dim, "expert_dim", 1)
        dropout = check_dropout(dropout)
        hidden = check_per_expert_widths(expert_hidden, n_experts, "expert_hidden")
        self.experts = nn.ModuleList(Expert(n_features, expert_dim, h, dropout) for h in hidden)
        self.gates = nn.ModuleList(SoftmaxGate(n_features, n_experts) for _ in self.task_specs)
        labels = tuple(f"expert[{i}]" for i in range(n_experts))
        self.gate_expert_names = {f"level0/{name}": labels for name in self.task_names}
        self._build_towers([expert_dim] * len(self.task_specs), check_widths(tower_hidden, "tower_hidden"), dropout)
        self._finish_build()

    @property
    def shared_experts(self) -> nn.ModuleList:
        return nn.ModuleList(self.experts)

    def _last_shared_experts(self) -> list[Expert]:
        return list(self.experts)

    def _task_features(self, x: Tensor, record: _LastForward) -> list[Tensor]:
        outputs = [expert(x) for expert in self.experts]
        record.shared_outputs = outputs
        stacked = torch.stack(outputs, dim=1)  # [batch, n_experts, expert_dim]
        features, gates = [], []
        for name, gate in zip(self.task_names, self.gates):
            weights = gate(x)
            record.gate_weights[f"level0/{name}"] = weights
            gates.append(weights)
            features.append(mix_experts(weights, stacked))
        record.levels = [MixtureRecord(outputs, features, gates, None, x, list(self.experts))]
        return features

    def _task_features_bank(self, x: Tensor, record: _LastForward) -> Tensor:
        # f_k = sum_i g_ki E_i: [K, batch, n] gate weights, [n, batch, d] expert outputs
        outputs = experts_forward(list(self.experts), [x] * len(self.experts), self.training)
        record.shared_outputs = outputs
        stacked = torch.stack(outputs)  # [n_experts, batch, expert_dim]
        weights = GateBank(list(self.gates))(x)  # [K, batch, n_experts]
        for k, name in enumerate(self.task_names):
            record.gate_weights[f"level0/{name}"] = weights[k]
        # sum_i g_ki E_i as n multiply-adds over [K, batch, d]: an einsum here would contract
        # over the experts with the batch as the batch dim, one tiny matmul per row on CPU
        weights = weights.to(stacked.dtype)
        features = weights[:, :, 0, None] * stacked[0]
        for i in range(1, stacked.shape[0]):
            features = features + weights[:, :, i, None] * stacked[i]
        record.levels = [MixtureRecord(outputs, features, weights, None, None)]
        return features
