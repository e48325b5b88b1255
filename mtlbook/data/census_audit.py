r"""Checks on a loaded Census-Income problem: leakage, label relations, duplicate rows.

* :func:`single_column_scores` / :func:`leakage_audit`: how well each **single input column**
  predicts each task on the train split. A column becomes codes (its category; for a numeric
  column its distinct values, or 64 train-quantile bins when it has more than 128), and the
  column's prediction for a row is the train-split mean target of the row's code,
  :math:`\hat y(x) = \bar y_{c(x)}`. The score is

  - binary: the ROC AUC of :math:`\hat y` (the best AUC any function of that column alone can
    reach on the train rows, since the code mean is the monotone optimum);
  - regression: :math:`R^2 = 1 - \sum (y - \hat y)^2 / \sum (y - \bar y)^2` (the correlation ratio
    :math:`\eta^2`);
  - multiclass: the mean one-vs-rest AUC over the classes, each class scored by its share
    within the code.

  These are in-sample numbers (fitted and scored on the train rows); with at most 128 codes
  and tens of thousands of rows the optimism is small.
* :func:`label_association`: the tasks' pairwise association on the train split, over the rows
  where both targets exist: Pearson :math:`r` between binary/regression targets (phi for two
  binary ones, point-biserial for binary vs regression), Cramer's :math:`V` when a multi-class
  task is involved (regression binned into quintiles). :func:`task_groups` links tasks whose
  :math:`|r|` or :math:`V` reaches a threshold and returns the connected components.
* :func:`duplicate_report`: how many validation/test rows have an exact copy (every column but
  the survey weight) among the training rows.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from mtlbook.data.batch import MultiTaskDataset

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from mtlbook.data.census import CensusIncome

__all__ = [
    "AUDIT_ALLOW",
    "AUDIT_THRESHOLD",
    "column_codes",
    "duplicate_report",
    "label_association",
    "leakage_audit",
    "single_column_scores",
    "task_groups",
]

#: A single column scoring above this (AUC, or R^2 for regression) counts as a leak.
AUDIT_THRESHOLD = 0.95
#: (task, column) pairs allowed above the threshold, with the reason. Empty: none is needed
#: for ``tasks="all"`` (``age`` for ``never_married`` stays below it; see the book, chapter 3).
AUDIT_ALLOW: dict[tuple[str, str], str] = {}


def _check_census(data) -> None:
    from mtlbook.data.census import CensusIncome

    if not isinstance(data, CensusIncome):
        raise TypeError(f"data must be a CensusIncome from load_census_income, got {type(data).__name__}")
    if len(data.feature_columns) != data.n_features:
        raise ValueError("data.feature_columns must name the source column of every input")


def column_codes(data: "CensusIncome", split: MultiTaskDataset, column: str, max_codes: int = 128) -> np.ndarray:
    """Integer code per row of ``split`` for one input ``column`` of ``data``.

    A one-hot block gives the index of its hot entry (0 when the category was unseen in
    training, so the row is all zeros); a numeric column gives its distinct train values, or
    64 train-quantile bins when it has more than ``max_codes`` distinct values.
    """
    _check_census(data)
    where = [j for j, c in enumerate(data.feature_columns) if c == column]
    if not where:
        raise ValueError(f"column must be one of the inputs' source columns {sorted(set(data.feature_columns))}, got {column!r}")
    block = split.inputs[:, where].numpy()
    if column in data.numeric_features:
        train_values = data.train.inputs[:, where[0]].numpy()
        distinct = np.unique(train_values)
        if len(distinct) > max_codes:
            edges = np.unique(np.quantile(train_values, np.linspace(0, 1, 65)[1:-1]))
            return np.searchsorted(edges, block[:, 0], side="right")
        return np.searchsorted(distinct, block[:, 0])
    hot = block.argmax(axis=1) + 1
    return np.where(block.max(axis=1) > 0, hot, 0)


def _code_auc(count: np.ndarray, positives: np.ndarray) -> float:
    r"""AUC of the score "positive share of the row's code", from per-code counts.

    Codes with the same share are merged (tied scores count one half, as in
    :func:`mtlbook.train.metrics.binary_auc`); then, in increasing order of the share,
    :math:`\text{AUC} = \sum_s p_s (N_{<s} + n_s / 2) / (P N)`.
    """
    negatives = count - positives
    used = count > 0
    share = positives[used] / count[used]
    order, inverse = np.unique(share, return_inverse=True)
    p = np.bincount(inverse, weights=positives[used], minlength=len(order))
    q = np.bincount(inverse, weights=negatives[used], minlength=len(order))
    total_p, total_q = p.sum(), q.sum()
    if total_p == 0 or total_q == 0:
        return math.nan
    below = np.cumsum(q) - q
    return float((p * (below + 0.5 * q)).sum() / (total_p * total_q))


def _score(kind: str, codes: np.ndarray, y: np.ndarray, n_classes: int | None) -> float:
    n_codes = int(codes.max()) + 1
    count = np.bincount(codes, minlength=n_codes).astype(np.float64)
    if kind == "multiclass":
        aucs = [_code_auc(count, np.bincount(codes, weights=(y == k).astype(np.float64), minlength=n_codes))
                for k in range(int(n_classes))]
        aucs = [a for a in aucs if not math.isnan(a)]
        return float(np.mean(aucs)) if aucs else math.nan
    if kind == "regression":
        mean = np.bincount(codes, weights=y, minlength=n_codes) / np.maximum(count, 1.0)
        total = float(((y - y.mean()) ** 2).sum())
        return 1.0 - float(((y - mean[codes]) ** 2).sum()) / total if total > 0 else math.nan
    return _code_auc(count, np.bincount(codes, weights=y, minlength=n_codes))


def single_column_scores(data: "CensusIncome") -> "pd.DataFrame":
    """Score of every (task, input column) pair on the train split (see the module docstring).

    Returns a long DataFrame with columns ``task``, ``kind``, ``column``, ``metric``
    (``"auc"``, ``"r2"`` or ``"macro_auc"``) and ``score``.
    """
    import pandas as pd

    _check_census(data)
    train = data.train
    columns = list(dict.fromkeys(data.feature_columns))
    codes = {c: column_codes(data, train, c) for c in columns}
    rows = []
    for spec in data.task_specs:
        mask = train.present[spec.name].numpy()
        y = train.targets[spec.name].numpy()[mask].astype(np.float64)
        metric = {"binary": "auc", "regression": "r2", "multiclass": "macro_auc"}[spec.kind]
        for column in columns:
            score = _score(spec.kind, codes[column][mask], y, spec.n_classes)
            rows.append({"task": spec.name, "kind": spec.kind, "column": column, "metric": metric, "score": score})
    return pd.DataFrame(rows)


def leakage_audit(data: "CensusIncome", threshold: float = AUDIT_THRESHOLD) -> "pd.DataFrame":
    """For every task, the strongest single input column on the train split and its score.

    Columns: ``task``, ``kind``, ``metric``, ``strongest_column``, ``score``, ``runner_up``,
    ``runner_up_score``, ``leak`` (``score > threshold`` and the pair is not in
    :data:`AUDIT_ALLOW`), ``allowed_because`` (the reason from :data:`AUDIT_ALLOW`, or "").
    """
    import pandas as pd

    if not isinstance(threshold, (int, float)) or not 0.5 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a number in [0.5, 1], got {threshold!r}")
    scores = single_column_scores(data)
    rows = []
    for task, table in scores.groupby("task", sort=False):
        ranked = table.sort_values("score", ascending=False, kind="stable")
        best, second = ranked.iloc[0], ranked.iloc[1] if len(ranked) > 1 else None
        reason = AUDIT_ALLOW.get((task, best["column"]), "")
        rows.append({
            "task": task, "kind": best["kind"], "metric": best["metric"],
            "strongest_column": best["column"], "score": float(best["score"]),
            "runner_up": None if second is None else second["column"],
            "runner_up_score": math.nan if second is None else float(second["score"]),
            "leak": bool(best["score"] > threshold and not reason), "allowed_because": reason,
        })
    return pd.DataFrame(rows)


def _cramers_v(a: np.ndarray, b: np.ndarray) -> float:
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1.0)
    n = table.sum()
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
    chi2 = float(((table - expected) ** 2 / np.where(expected > 0, expected, 1.0)).sum())
    k = min(table.shape) - 1
    return math.sqrt(chi2 / (n * k)) if k > 0 else math.nan


def label_association(data: "CensusIncome") -> "pd.DataFrame":
    """Task-by-task association of the targets on the train split (see the module docstring).

    Returns a square DataFrame indexed by task name; the diagonal is 1. Entries involving a
    multiclass task are Cramer's V (in [0, 1], unsigned); the others are Pearson r (signed).
    """
    import pandas as pd

    _check_census(data)
    train = data.train
    specs = data.task_specs
    names = [s.name for s in specs]
    out = pd.DataFrame(np.eye(len(specs)), index=names, columns=names)
    for i, a in enumerate(specs):
        for b in specs[i + 1 :]:
            both = (train.present[a.name] & train.present[b.name]).numpy()
            ya = train.targets[a.name].numpy()[both].astype(np.float64)
            yb = train.targets[b.name].numpy()[both].astype(np.float64)
            if len(ya) < 2:
                value = math.nan
            elif "multiclass" in (a.kind, b.kind):
                def discrete(y, kind):
                    return np.searchsorted(np.quantile(y, [0.2, 0.4, 0.6, 0.8]), y) if kind == "regression" else y
                value = _cramers_v(discrete(ya, a.kind), discrete(yb, b.kind))
            else:
                value = float(np.corrcoef(ya, yb)[0, 1]) if ya.std() > 0 and yb.std() > 0 else math.nan
            out.loc[a.name, b.name] = out.loc[b.name, a.name] = value
    return out


def task_groups(association: "pd.DataFrame", threshold: float = 0.2) -> list[list[str]]:
    """Connected components of the graph linking tasks with ``|association| >= threshold``.

    Singletons are kept, so every task appears in exactly one group; groups are listed by
    their first task's position.
    """
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    names = list(association.index)
    strong = np.abs(association.to_numpy()) >= threshold
    seen: set[int] = set()
    groups = []
    for start in range(len(names)):
        if start in seen:
            continue
        stack, group = [start], []
        seen.add(start)
        while stack:
            i = stack.pop()
            group.append(i)
            for j in np.flatnonzero(strong[i]):
                if int(j) not in seen:
                    seen.add(int(j))
                    stack.append(int(j))
        groups.append([names[i] for i in sorted(group)])
    return groups


def duplicate_report(data: "CensusIncome") -> "pd.DataFrame":
    """Rows of each split with an exact copy (all columns but the weight) in the train split.

    Returns one row per split (``train``, ``val``, ``test``) with ``rows``,
    ``with_copy_in_train`` (for ``train``: rows whose group has more than one train row) and
    ``share``.
    """
    import pandas as pd

    _check_census(data)
    train_groups = data.train.extras["duplicate_group"].numpy()
    unique, counts = np.unique(train_groups, return_counts=True)
    rows = []
    for name in ("train", "val", "test"):
        groups = getattr(data, name).extras["duplicate_group"].numpy()
        if name == "train":
            hit = counts[np.searchsorted(unique, groups)] > 1
        else:
            hit = np.isin(groups, unique)
        rows.append({"split": name, "rows": len(groups), "with_copy_in_train": int(hit.sum()),
                     "share": float(hit.mean()) if len(groups) else math.nan})
    return pd.DataFrame(rows).set_index("split")
