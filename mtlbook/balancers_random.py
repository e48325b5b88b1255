r"""Random loss weighting (RLW) :cite:`lin2022reasonable`, the baseline every balancer must beat.

Lin et al. draw fresh task weights at every training step from a fixed distribution and
report that this random weighting is competitive with most published balancers. With
:math:`z \sim \mathcal N(0, I_n)` drawn per step,

.. math::
    \lambda = n \operatorname{softmax}(z), \qquad \mathcal L = \sum_i \lambda_i L_i .

The paper's weights are :math:`\operatorname{softmax}(z)` (they sum to 1); here they are
multiplied by :math:`n` so they sum to :math:`n`, like equal weighting's ones (by symmetry
:math:`\mathbb E[\lambda_i] = 1`): a learning rate tuned for equal weights means the same
for RLW. Absent tasks get weight 0 for that step (their drawn weight is not passed to the
others).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlbook.balancer_base import SeededGeneratorState
from mtlbook.balancing import LossBalancer, register_balancer

__all__ = ["RandomLossWeighting"]


class RandomLossWeighting(SeededGeneratorState, LossBalancer):
    r"""Random loss weighting :cite:`lin2022reasonable`: :math:`\lambda = n\,\mathrm{softmax}(z)`,
    :math:`z \sim \mathcal N(0, I)`, drawn anew at every :meth:`weight_losses` call.

    The draws come from a ``torch.Generator`` seeded with ``seed`` (independent of the
    global RNG, so the model's initialisation and dropout see the same random numbers as
    under equal weighting); its state is part of ``state_dict``, so a run resumed from a
    checkpoint draws the same weights. :meth:`weights` returns the last draw (ones before
    the first), without drawing.

    Args:
        n_tasks: number of tasks.
        seed: seed of the weight generator (an int).
    """

    def __init__(self, n_tasks: int, seed: int = 0) -> None:
        super().__init__(n_tasks)
        self._seed_generator(seed)
        self.register_buffer("task_weights", torch.ones(n_tasks))

    def draw(self) -> Tensor:
        """Draw the next weights ``[n_tasks]`` (advances the generator) and keep them."""
        z = torch.randn(self.n_tasks, generator=self._generator)
        with torch.no_grad():
            self.task_weights.copy_(self.n_tasks * torch.softmax(z, dim=0))
        return self.task_weights.detach().clone()

    def weight_losses(self, task_losses: Tensor, present: Tensor | None = None) -> Tensor:
        task_losses, present = self._check_losses(task_losses, present)
        weights = self.draw().to(device=task_losses.device, dtype=task_losses.dtype)
        return self._masked(weights * self._masked(task_losses, present), present)

    def weights(self) -> Tensor:
        return self.task_weights.detach().clone()


register_balancer("rlw", RandomLossWeighting)
