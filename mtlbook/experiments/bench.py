"""What ``benchmarks/adatt_cost.py`` and ``benchmarks/trainer_step.py`` share.

One benchmark problem, so that the cost of measuring affinity alone (chapter 5) and the
cost of a whole trainer step (chapter 7) are measured on the same model and the same
batches; and the two statistics both report: per-round ratios and quantiles.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from mtlbook._checks import check_int
from mtlbook.data import Batch, TaskSpec, iterate_batches, make_suite_regime
from mtlbook.models import PLE


@dataclass
class Problem:
    """A PLE at its initial state and the batches every configuration cycles through."""

    model: PLE
    batches: list[Batch]
    task_specs: tuple[TaskSpec, ...]


_check_int = check_int


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
    n_levels: int = 2,
) -> Problem:
    """The synthetic ``"conflict"`` suite with ``n_tasks`` tasks in 4 groups (2 when
    ``n_tasks < 4``) and a PLE of ``n_levels`` levels (default 2; 1 is a CGC) with 2 shared
    experts per level and 1 expert per task, in the module form (``experts="modules"``; the
    benchmarks make the bank form with :func:`~mtlbook.models.to_bank`).

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
    # the module form: the benchmarks' reference, which they convert with to_bank
    model = PLE(dataset.n_features, dataset.task_specs, expert_hidden=tuple(expert_hidden),
                expert_dim=expert_dim, n_levels=n_levels, experts="modules").to(device)  # fmt: skip
    batches = [b.to(device) for b in iterate_batches(dataset, batch_size)]
    return Problem(model, batches, tuple(dataset.task_specs))


def write_rows(path: str | Path, rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> Path:
    """Write ``rows`` to the CSV file ``path`` (folders created) with ``columns`` as its header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def round_ratios(times: dict[str, list[float]], baseline: str = "plain") -> dict[str, list[float]]:
    """Per-round ratio of each configuration's block time to the baseline's in the same round.

    Dividing within a round cancels slow drifts of a shared machine: both times were taken
    seconds apart under the same load.
    """
    if baseline not in times:
        raise ValueError(f"baseline {baseline!r} is not among the timed configurations {sorted(times)}")
    base = times[baseline]
    out: dict[str, list[float]] = {}
    for name, values in times.items():
        if len(values) != len(base):
            raise ValueError(f"{name} has {len(values)} rounds, the baseline {len(base)}")
        out[name] = [v / b for v, b in zip(values, base)]
    return out


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (``q`` in [0, 1]) of a non-empty sequence."""
    if not values:
        raise ValueError("values must not be empty")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
