r"""The report that :func:`mtlbook.diagnose` and :class:`mtlbook.GradientMonitor` return.

Per measured batch :math:`b` (rows) and task :math:`i` (columns, in ``task_names`` order):

* ``grad_norms[b, i]`` :math:`= \lVert g_i(b) \rVert_2` on the shared parameters;
* ``cosines[b, i, j]`` :math:`= \cos(g_i(b), g_j(b))` (0 where a gradient is zero);
* ``noise_cosines[b, i]``: the same task on two halves of the batch (NaN when not measured);
* ``null_cosines[b, i, j]`` :math:`= \cos(g_i(b), g_j^A(b) - g_j^B(b))`: the pair's cosine when
  task :math:`j` carries only its noise (the noise baseline, :mod:`mtlbook.diagnose.noise`);
* ``ratios[b, i, j]`` :math:`= \lVert g_i(b) \rVert / \lVert g_j(b) \rVert` (NaN where either is 0);
* ``affinity``: chapter 5's EMA of the cosine matrices after the last batch
  (``affinity_history[b]`` after batch :math:`b`).

Summary statistics: quantiles of the ratios, the share of batches on which a pair's cosine
is negative and the share on which it is below the pair's noise threshold
(:mod:`mtlbook.diagnose.noise`), and the task weights adaTT's transfer loss would imply
(:meth:`DiagnosisReport.transfer_factors`, appendix A.5): with
:math:`L_i^{\mathrm{adaTT}} = L_i + \lambda \sum_{j \ne i} w_{ij} L_j`, the total loss is

.. math::

    \sum_i L_i^{\mathrm{adaTT}} = \sum_j c_j L_j, \qquad c_j = 1 + \lambda \sum_{i \ne j} w_{ij},

so adaTT acts on the trunk as a re-weighting of the tasks by :math:`c_j`. The report takes
:math:`w_{i\cdot}` as a uniform softmax over the peers that blocking leaves open
(:math:`A_{ij} \ge \tau`), the transfer weights at initialisation (:math:`W = 0`, no prior,
equal scores), and ignores the clamp at ``max_transfer_ratio`` (which can only shrink the
effect). When every row lends to all its peers, each column sums to 1 and every
:math:`c_j = 1 + \lambda`: all weights grow by :math:`\lambda` together and their ratios do not
change at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mtlbook.diagnose.noise import noise_thresholds

__all__ = ["DiagnosisReport"]


@dataclass
class DiagnosisReport:
    """Gradient measurements of a multi-task model on its shared parameters.

    Attributes:
        task_names: task order of every per-task axis.
        grad_norms: ``[n_batches, n_tasks]``.
        cosines: ``[n_batches, n_tasks, n_tasks]``.
        noise_cosines: ``[n_batches, n_tasks]``, same task on two halves (NaN: not measured).
        null_cosines: ``[n_batches, n_tasks, n_tasks]``, the noise baseline's null cosines.
        losses: ``[n_batches, n_tasks]``, the task losses of each measured batch.
        affinity_history: ``[n_batches, n_tasks, n_tasks]``; ``affinity`` is its last entry.
        steps: ``[n_batches]``: the batch index (``diagnose``) or the training step
            (``GradientMonitor``) of each measurement.
        alpha: the noise baseline's quantile (share of pure-noise batches called conflict).
        imbalance_threshold: a median norm ratio at or above this is reported as an imbalance.
        blocking_threshold: adaTT's :math:`\\tau` (pairs with affinity below it are blocked).
        transfer_lambda: adaTT's :math:`\\lambda` for :meth:`transfer_factors`.
        skipped: measurements left out, with the reason (e.g. a non-finite loss in a monitor).
        source: ``"diagnose"`` or ``"monitor"``.
    """

    task_names: tuple[str, ...]
    grad_norms: np.ndarray
    cosines: np.ndarray
    noise_cosines: np.ndarray
    null_cosines: np.ndarray
    losses: np.ndarray
    affinity_history: np.ndarray
    steps: np.ndarray
    alpha: float = 0.05
    imbalance_threshold: float = 10.0
    blocking_threshold: float = -0.1
    transfer_lambda: float = 0.1
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = "diagnose"

    # ----------------------------------------------------------------- basic shapes

    @property
    def n_batches(self) -> int:
        return int(self.grad_norms.shape[0])

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def index(self, task: str | int) -> int:
        """Position of ``task`` (a name or an index) in ``task_names``."""
        if isinstance(task, str):
            if task not in self.task_names:
                raise ValueError(f"task must be one of {list(self.task_names)}, got {task!r}")
            return self.task_names.index(task)
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 0 <= task < self.n_tasks:
            raise ValueError(f"task must be a name or an index in 0..{self.n_tasks - 1}, got {task!r}")
        return int(task)

    @property
    def affinity(self) -> np.ndarray:
        """Chapter 5's affinity (EMA of the cosines) after the last measured batch, ``[n, n]``."""
        if self.n_batches == 0:
            return np.eye(self.n_tasks)
        return self.affinity_history[-1]

    @property
    def has_noise_baseline(self) -> bool:
        """True when at least one noise cosine was measured."""
        return bool(np.isfinite(self.null_cosines).any())

    @property
    def detached_tasks(self) -> tuple[str, ...]:
        """Tasks whose gradient on the shared parameters was zero on every measured batch."""
        if self.n_batches == 0:
            return ()
        zero = (self.grad_norms == 0).all(axis=0)
        return tuple(name for name, z in zip(self.task_names, zero) if z)

    # ----------------------------------------------------------------- derived per batch

    @property
    def ratios(self) -> np.ndarray:
        """``[n_batches, n, n]``: ``norm_i / norm_j`` (NaN where either norm is 0)."""
        norms = np.where(self.grad_norms > 0, self.grad_norms, np.nan)
        return norms[:, :, None] / norms[:, None, :]

    def _measured_pair(self) -> np.ndarray:
        nonzero = self.grad_norms > 0
        return nonzero[:, :, None] & nonzero[:, None, :]

    def ratio_quantiles(self, numerator: str | int, denominator: str | int,
                        q: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> np.ndarray:
        """Quantiles of ``norm_numerator / norm_denominator`` over the batches (NaN if none finite)."""
        values = self.ratios[:, self.index(numerator), self.index(denominator)]
        values = values[np.isfinite(values)]
        return np.quantile(values, q) if values.size else np.full(len(q), math.nan)

    @property
    def noise_threshold(self) -> np.ndarray:
        """``[n, n]`` noise thresholds :math:`t_{ij}` (0 where no noise cosine was measured)."""
        if self.n_batches == 0:
            return np.zeros((self.n_tasks, self.n_tasks))
        return noise_thresholds(self.null_cosines, self.alpha)

    def _share(self, below: np.ndarray) -> np.ndarray:
        measured = self._measured_pair()
        counts = (below & measured).sum(axis=0).astype(np.float64)
        total = measured.sum(axis=0).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, counts / np.maximum(total, 1), np.nan)

    @property
    def negative_share(self) -> np.ndarray:
        """``[n, n]`` share of batches with :math:`\\cos(g_i, g_j) < 0` (the naive conflict count)."""
        return self._share(self.cosines < 0)

    @property
    def conflict_share(self) -> np.ndarray:
        """``[n, n]`` share of batches with :math:`\\cos(g_i, g_j) < t_{ij}` (below the noise baseline)."""
        return self._share(self.cosines < self.noise_threshold[None])

    def conflict_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(k, m)``: batches below the noise threshold and batches measured, per pair ``[n, n]``."""
        measured = self._measured_pair()
        below = (self.cosines < self.noise_threshold[None]) & measured
        return below.sum(axis=0), measured.sum(axis=0)

    def transfer_factors(self, transfer_lambda: float | None = None) -> np.ndarray:
        """:math:`c_j = 1 + \\lambda \\sum_{i \\ne j} w_{ij}` ``[n]`` (module docstring; uniform open peers)."""
        lam = self.transfer_lambda if transfer_lambda is None else float(transfer_lambda)
        n = self.n_tasks
        open_ = (self.affinity >= self.blocking_threshold) & ~np.eye(n, dtype=bool)
        rows = open_.sum(axis=1, keepdims=True)
        weights = np.where(open_, 1.0 / np.maximum(rows, 1), 0.0)
        return 1.0 + lam * weights.sum(axis=0)

    # ----------------------------------------------------------------- tables

    def _ordered_pairs(self) -> list[tuple[int, int]]:
        """Unordered pairs, each oriented so that the first task has the larger median norm."""
        medians = np.array([np.median(self.grad_norms[:, k]) if self.n_batches else 0.0 for k in range(self.n_tasks)])
        pairs = []
        for i in range(self.n_tasks):
            for j in range(i + 1, self.n_tasks):
                pairs.append((i, j) if medians[i] >= medians[j] else (j, i))
        return pairs

    def summary(self):
        """One row per pair of tasks (the task with the larger median norm first), as a DataFrame.

        Columns: median and 5 / 95 % quantiles of the norm ratio, median cosine, share of
        batches with a negative cosine, the noise threshold, the share below it (conflict),
        the affinity (both directions averaged) and the number of batches measured.
        """
        import pandas as pd

        threshold, negative, conflict = self.noise_threshold, self.negative_share, self.conflict_share
        _, measured = self.conflict_counts()
        rows = {}
        for i, j in self._ordered_pairs():
            q05, q50, q95 = self.ratio_quantiles(i, j, (0.05, 0.5, 0.95))
            cos = self.cosines[:, i, j][self._measured_pair()[:, i, j]]
            rows[f"{self.task_names[i]} / {self.task_names[j]}"] = {
                "median ratio": q50,
                "ratio 5%": q05,
                "ratio 95%": q95,
                "median cosine": float(np.median(cos)) if cos.size else math.nan,
                "share cos < 0": negative[i, j],
                "noise threshold": threshold[i, j],
                "share below noise": conflict[i, j],
                "affinity": 0.5 * (self.affinity[i, j] + self.affinity[j, i]),
                "batches": int(measured[i, j]),
            }
        return pd.DataFrame.from_dict(rows, orient="index")

    def task_summary(self):
        """One row per task: median loss, median gradient norm, median noise cosine, zero-gradient batches."""
        import pandas as pd

        rows = {}
        for k, name in enumerate(self.task_names):
            noise = self.noise_cosines[:, k][np.isfinite(self.noise_cosines[:, k])]
            rows[name] = {
                "median loss": float(np.median(self.losses[:, k])) if self.n_batches else math.nan,
                "median grad norm": float(np.median(self.grad_norms[:, k])) if self.n_batches else math.nan,
                "median noise cosine": float(np.median(noise)) if noise.size else math.nan,
                "zero-gradient batches": int((self.grad_norms[:, k] == 0).sum()),
            }
        return pd.DataFrame.from_dict(rows, orient="index")

    # ----------------------------------------------------------------- words and pictures

    def findings(self):
        """Plain-language statements, each with its number and the chapter that explains it."""
        from mtlbook.diagnose.findings import build_findings

        return build_findings(self)

    def plot(self, width: float = 12.0, height: float = 3.6):
        """A matplotlib ``Figure``: norm-ratio distributions, cosines against the noise baseline, affinity.

        The figure is made without pyplot (nothing is left open); show it with
        ``IPython.display.display(fig)`` or save it with ``fig.savefig``.
        """
        from mtlbook.diagnose.plots import report_figure

        return report_figure(self, width, height)

    def __repr__(self) -> str:
        return (f"DiagnosisReport(tasks={list(self.task_names)}, n_batches={self.n_batches}, "
                f"noise_baseline={self.has_noise_baseline}, source={self.source!r})")
