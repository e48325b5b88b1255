"""The benchmark problem shared by ``benchmarks/adatt_cost.py`` and ``benchmarks/trainer_step.py``.

One definition, so that the cost of measuring affinity alone (chapter 5) and the cost of a
whole trainer step (chapter 7) are measured on the same model and the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mtlbook.data import Batch, TaskSpec, iterate_batches, make_suite_regime
from mtlbook.models import PLE


@dataclass
class Problem:
    """A PLE at its initial state and the batches every configuration cycles through."""

    model: PLE
    batches: list[Batch]
    task_specs: tuple[TaskSpec, ...]


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def make_problem(
    n_tasks: int,
    *,
    batch_size: int = 256,
    n_batches: int = 16,
    n_features: int = 32,
    expert_hidden: Sequence[int] = (64,),
    expert_dim: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Problem:
    """The synthetic ``"conflict"`` suite with ``n_tasks`` tasks in 4 groups (2 when
    ``n_tasks < 4``) and a 2-level PLE (2 shared experts per level, 1 expert per task).

    The input width is ``max(n_features, n_tasks + n_groups)`` so that every task and group
    direction fits.
    """
    _check_int(n_tasks, "n_tasks", 2)
    _check_int(batch_size, "batch_size", 1)
    _check_int(n_batches, "n_batches", 1)
    n_groups = 4 if n_tasks >= 4 else 2
    dim = max(n_features, n_tasks + n_groups)
    dataset, _ = make_suite_regime("conflict", batch_size * n_batches, seed=seed, n_tasks=n_tasks,
                                   n_groups=n_groups, dim=dim)  # fmt: skip
    torch.manual_seed(seed)
    model = PLE(dataset.n_features, dataset.task_specs, expert_hidden=tuple(expert_hidden),
                expert_dim=expert_dim).to(device)  # fmt: skip
    batches = [b.to(device) for b in iterate_batches(dataset, batch_size)]
    return Problem(model, batches, tuple(dataset.task_specs))
