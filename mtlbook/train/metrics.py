r"""Per-task evaluation metrics: rank-based AUC, RMSE and accuracy (plain torch).

**AUC** is the probability that a random positive scores above a random negative, ties
counting one half. With the average rank :math:`r_k` of each score among all :math:`n`
scores (tied scores share the mean of their ranks), the Mann-Whitney identity gives

.. math::

    \mathrm{AUC} = \frac{\sum_{k \in \mathrm{pos}} r_k - n_+ (n_+ + 1)/2}{n_+\, n_-},

one sort instead of the :math:`n_+ n_-` pair comparisons. It is undefined (NaN here) when
only one class is present.

**RMSE** :math:`\sqrt{\frac1n\sum_k(\hat y_k - y_k)^2}`; **accuracy** is the share of rows
whose arg-max class equals the label. Every function takes an optional bool ``present``
mask and ignores rows marked False.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from mtlbook._checks import check_mask, check_registration
from mtlbook.data.batch import TaskSpec

__all__ = ["METRICS", "METRIC_FOR_KIND", "accuracy", "binary_auc", "mse", "register_metric", "rmse", "task_metric"]

#: The metric reported for each task kind (contrastive tasks report their loss only).
METRIC_FOR_KIND: dict[str, str | None] = {
    "binary": "auc",
    "regression": "rmse",
    "multiclass": "accuracy",
    "contrastive": None,
}


def _select(values: Tensor, present: Tensor | None, name: str) -> Tensor:
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if present is None:
        return values
    present = check_mask(present, values.shape[0], per="row", wrong_type=ValueError)
    return values[present.to(values.device)]


def binary_auc(scores: Tensor, labels: Tensor, present: Tensor | None = None) -> float:
    """Area under the ROC curve from ranks (ties averaged); NaN when a class is missing.

    Args:
        scores: ``[n]`` real scores (logits or probabilities: AUC only uses their order).
        labels: ``[n]`` targets; values ``> 0.5`` count as positive.
        present: optional bool ``[n]`` row mask.
    """
    scores = _select(scores, present, "scores").detach().double().reshape(-1)
    labels = _select(labels, present, "labels").detach().reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same length, got {scores.numel()} and {labels.numel()}")
    positive = labels.double() > 0.5
    n_pos = int(positive.sum())
    n_neg = int(positive.numel() - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    if not bool(torch.isfinite(scores).all()):
        return math.nan
    sorted_scores, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    # A tie group occupying 1-based ranks start+1 .. start+count has mean rank start + (count+1)/2.
    starts = torch.cumsum(counts, 0) - counts
    mean_rank = starts.double() + (counts.double() + 1.0) / 2.0
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    rank_sum = float(ranks[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def rmse(predictions: Tensor, targets: Tensor, present: Tensor | None = None) -> float:
    """Root mean squared error over present rows (NaN when no row is present)."""
    predictions = _select(predictions, present, "predictions").detach().double().reshape(-1)
    targets = _select(targets, present, "targets").detach().double().reshape(-1)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions and targets must have the same size, got {predictions.numel()} and {targets.numel()}")
    if predictions.numel() == 0:
        return math.nan
    return float(torch.sqrt(torch.mean((predictions - targets) ** 2)))


def mse(predictions: Tensor, targets: Tensor, present: Tensor | None = None) -> float:
    """Mean squared error over present rows (NaN when no row is present); :func:`rmse` squared."""
    value = rmse(predictions, targets, present)
    return value * value


def accuracy(logits: Tensor, labels: Tensor, present: Tensor | None = None) -> float:
    """Share of present rows whose arg-max over ``logits [n, k]`` equals ``labels [n]``."""
    logits = _select(logits, present, "logits").detach()
    labels = _select(labels, present, "labels").detach()
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [n, k] and labels [n], got {list(logits.shape)} and {list(labels.shape)}")
    if labels.numel() == 0:
        return math.nan
    return float((logits.argmax(dim=1) == labels.long()).double().mean())


#: Every per-task metric by name: ``(outputs, targets, present) -> float``. Higher is better
#: for ``auc`` and ``accuracy``, lower for ``rmse`` and ``mse``.
METRICS: dict[str, Callable[..., float]] = {"auc": binary_auc, "rmse": rmse, "mse": mse, "accuracy": accuracy}


def register_metric(name: str, metric: Callable[..., float]) -> None:
    """Add ``metric`` ``(outputs, targets, present) -> float`` to :data:`METRICS` under ``name``."""
    check_registration(name, METRICS, "metric", metric)
    METRICS[name] = metric


def task_metric(spec: TaskSpec, outputs: Tensor, targets: Tensor, present: Tensor | None = None) -> float | None:
    """The metric of :data:`METRIC_FOR_KIND` for one task (``None`` for contrastive tasks)."""
    metric = METRIC_FOR_KIND[spec.kind]
    if metric is None:
        return None
    return METRICS[metric](outputs, targets, present)
