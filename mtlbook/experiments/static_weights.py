r"""A tuned static-weight baseline (linear scalarization) for chapter 8: the search and the choice.

The model minimises :math:`\sum_i c_i L_i` with fixed weights :math:`c_i`. The search space
is per-task scales :math:`s_i` applied to losses normalised by their value at initialisation,

.. math:: c_i = \frac{s_i}{L_i(0)}, \qquad s \in n\,\Delta^{n-1}
          \ (\text{so } \textstyle\sum_i s_i = n),

with :math:`L_i(0)` the training loss of task :math:`i` under the freshly initialised model
of the seed. :func:`weight_trials` lists the trials of one seed, in this order:

0. raw equal weights, :math:`c_i = 1` (the same run as PLE with equal weights);
1. loss-normalised equal weights, :math:`s_i = 1`;
2. and on: :math:`s = n\,u` with :math:`u \sim \text{Dirichlet}(1, \dots, 1)` (uniform on the
   simplex), drawn from a generator seeded by ``(seed, trial)``.

:func:`select_trial` picks the trial whose *validation* metrics are best on average:
trial :math:`k` scores :math:`\frac1n\sum_i \Delta(m^{(k)}_i, m^{(0)}_i)` with :math:`\Delta`
the signed relative improvement of :func:`mtlbook.experiments.study.relative_improvement`
(positive = better), i.e. the study's own primary metric measured on validation data
against trial 0. The test split is never looked at.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["select_trial", "weight_trials"]


def weight_trials(initial_losses: Mapping[str, float], n_trials: int, seed: int) -> list[dict[str, float]]:
    """The ``n_trials`` weight dicts ``{task: c_i}`` of one seed (see the module docstring)."""
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be an int >= 1, got {n_trials!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not initial_losses:
        raise ValueError("initial_losses must name at least one task")
    bad = {t: v for t, v in initial_losses.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"initial_losses must be finite numbers > 0, got {bad}")
    tasks = list(initial_losses)
    n = len(tasks)
    trials = [{t: 1.0 for t in tasks}]
    for trial in range(1, n_trials):
        if trial == 1:
            scales = np.ones(n)
        else:
            scales = n * np.random.default_rng([seed, trial]).dirichlet(np.ones(n))
        trials.append({t: float(s / initial_losses[t]) for t, s in zip(tasks, scales)})
    return trials


def select_trial(val_metrics: Sequence[Mapping[str, tuple[str, float]]], higher_is_better: Mapping[str, bool]) -> int:
    """Index of the best trial on validation: ``val_metrics[k] = {task: (metric, value)}``.

    Scores every trial by its mean signed relative improvement over trial 0; ties go to
    the earlier trial. ``higher_is_better`` maps a metric name to its direction.
    """
    if not val_metrics:
        raise ValueError("val_metrics must hold at least one trial")
    base = val_metrics[0]
    scores = []
    for trial in val_metrics:
        if set(trial) != set(base):
            raise ValueError(f"every trial must score the same tasks; got {sorted(trial)} and {sorted(base)}")
        changes = []
        for task, (metric, value) in trial.items():
            if metric not in higher_is_better:
                raise ValueError(f"metric {metric!r} has no known direction; known: {sorted(higher_is_better)}")
            reference = base[task][1]
            sign = 1.0 if higher_is_better[metric] else -1.0
            changes.append(sign * (value - reference) / abs(reference) if reference != 0 else 0.0)
        scores.append(float(np.mean(changes)))
    scores_arr = np.asarray(scores)
    scores_arr[~np.isfinite(scores_arr)] = -np.inf
    return int(np.argmax(scores_arr))
