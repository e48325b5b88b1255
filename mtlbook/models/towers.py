r"""Task towers: the per-task heads that turn a task's features into raw outputs.

For task :math:`k` with input features :math:`f_k(x)` (the bottom output, the MMoE mixture
or the last CGC level's output) the tower is a small MLP :math:`h_k` ending in an affine
layer of the task's output width,

.. math::

    y_k = h_k\big(f_k(x)\big) \in \mathbb{R}^{o_k},

with :math:`o_k = 1` for binary and regression tasks (a logit or a value, returned as shape
``[batch]``), the number of classes for multiclass tasks and the embedding width for
contrastive tasks (``[batch, o_k]``). Towers return raw outputs: logits, never
probabilities; the losses apply sigmoid/softmax themselves.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from mtlbook.data.batch import TaskSpec
from mtlbook.models._validation import check_int, check_widths
from mtlbook.models.experts import hidden_stack


class TaskTower(nn.Module):
    """MLP head ``[batch, in_dim] -> [batch]`` (output_dim 1) or ``[batch, output_dim]``.

    Args:
        in_dim: input width (>= 1).
        output_dim: output width (>= 1); 1 squeezes the last dimension.
        hidden: hidden-layer widths (``()`` for a linear head).
        dropout: dropout after each hidden activation, in [0, 1).
        activation: hidden activation (see :data:`mtlbook.models.experts.ACTIVATIONS`).
    """

    def __init__(
        self,
        in_dim: int,
        output_dim: int = 1,
        hidden: Sequence[int] = (32,),
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_dim = check_int(in_dim, "in_dim", 1)
        self.output_dim = check_int(output_dim, "output_dim", 1)
        self.hidden = check_widths(hidden, "tower_hidden")
        self.body, width = hidden_stack(in_dim, self.hidden, dropout, activation)
        self.head = nn.Linear(width, output_dim)

    @classmethod
    def for_task(cls, in_dim: int, spec: TaskSpec, hidden: Sequence[int] = (32,), dropout: float = 0.0) -> "TaskTower":
        """A tower whose output width is ``spec.output_dim``."""
        if not isinstance(spec, TaskSpec):
            raise TypeError(f"spec must be a TaskSpec, got {type(spec).__name__}")
        return cls(in_dim, spec.output_dim, hidden, dropout)

    def forward(self, features: Tensor) -> Tensor:
        out = self.head(self.body(features))
        return out.squeeze(-1) if self.output_dim == 1 else out
