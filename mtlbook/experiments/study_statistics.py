r"""Chapter 8's statistics over the results table (overview: :mod:`mtlbook.experiments.study`).

**Statistics** over :math:`n` seeds with values :math:`x_1..x_n`:

* mean and 95% t-interval (:func:`t_interval`):
  :math:`\bar x \pm t_{0.975,\,n-1}\, s/\sqrt n`, with :math:`s` the sample standard deviation;
* relative improvement of a metric :math:`m` over a reference :math:`m_0`
  (:func:`relative_improvement`), positive when :math:`m` is better:

  .. math:: \Delta(m, m_0) = \sigma\,\frac{m - m_0}{|m_0|}, \qquad
            \sigma = +1 \text{ (higher is better: AUC, accuracy)},\ -1 \text{ (RMSE)};

  the *MTL gain* of the PLE paper (Tang et al. 2020) is :math:`\Delta` of a multi-task model
  over the single-task model of the same task (:func:`mtl_gain`); averaging :math:`\Delta`
  over tasks gives one number per seed for tasks measured in different units;
* paired differences against a reference configuration (:func:`paired_differences`):
  :math:`d_k = x_k - x^{ref}_k` for seed :math:`k`, the t-interval of :math:`\bar d` and the
  two-sided paired t-test :math:`t = \bar d / (s_d/\sqrt n)` (``scipy.stats.ttest_rel``);
* Holm's step-down correction for :math:`m` tests (:func:`holm`, Holm 1979): with the
  p-values sorted, :math:`p_{(1)} \le \dots \le p_{(m)}`,

  .. math:: \tilde p_{(i)} = \max_{j \le i} \min\bigl(1,\ (m - j + 1)\, p_{(j)}\bigr),

  which controls the family-wise error rate at :math:`\alpha` when :math:`\tilde p < \alpha`
  is called significant.

:func:`verdict` turns the paired comparison of PLE + UW + adaTT against PLE + UW into
"helps", "hurts" or "no measurable difference" per dataset (Holm over the datasets), with its
time cost.

scipy is imported inside the functions that need it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from mtlbook.experiments.study_configs import CANDIDATE, HIGHER_IS_BETTER, REFERENCE, SINGLE_TASK, _normalise

__all__ = [
    "holm",
    "mtl_gain",
    "paired_differences",
    "relative_improvement",
    "relative_scores",
    "summarize",
    "t_interval",
    "time_ratios",
    "verdict",
    "verdict_text",
]


# --------------------------------------------------------------------------- statistics
def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    r"""Mean and two-sided t confidence interval: :math:`\bar x \pm t_{(1+c)/2,\,n-1}\, s/\sqrt n`.

    Non-finite values are dropped. Returns ``(mean, low, high)``; the interval is NaN for
    fewer than two values and has zero width when all values are equal.
    """
    from scipy import stats

    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    x = np.asarray(values, dtype=float).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    r"""Holm's step-down adjusted p-values (same order as given; NaN stays NaN and is not counted).

    With the :math:`m` finite p-values sorted ascending,
    :math:`\tilde p_{(i)} = \max_{j \le i} \min(1, (m - j + 1)\,p_{(j)})`.
    """
    p = np.asarray(pvalues, dtype=float).reshape(-1)
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"pvalues must lie in [0, 1], got {p[(p < 0) | (p > 1)].tolist()}")
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return adjusted
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def relative_improvement(value: Any, reference: Any, higher_is_better: Any) -> Any:
    r"""Signed relative improvement :math:`\sigma (m - m_0) / |m_0|` (positive = better).

    Works elementwise on numbers, numpy arrays or pandas Series; ``higher_is_better`` is a
    bool or an array of bools (:math:`\sigma = \pm 1`).
    """
    sign = np.where(np.asarray(higher_is_better, dtype=bool), 1.0, -1.0)
    reference_abs = np.abs(np.asarray(reference, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = sign * (np.asarray(value, dtype=float) - np.asarray(reference, dtype=float)) / reference_abs
    if np.ndim(out) == 0:
        return float(out)
    if isinstance(value, pd.Series):
        return pd.Series(out, index=value.index)
    return out


def _ok(table: pd.DataFrame) -> pd.DataFrame:
    table = _normalise(table)
    return table.loc[(table["status"] == "ok") & np.isfinite(table["value"])]


def _higher(metrics: pd.Series) -> np.ndarray:
    unknown = sorted(set(metrics) - set(HIGHER_IS_BETTER))
    if unknown:
        raise ValueError(f"metrics {unknown} have no known direction; known: {sorted(HIGHER_IS_BETTER)}")
    return metrics.map(HIGHER_IS_BETTER).to_numpy(dtype=bool)


def summarize(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per (config, dataset, task, metric): seeds ``n``, ``mean``, ``std``, ``ci_low``, ``ci_high``."""
    rows = []
    for (config, dataset, task, metric), group in _ok(table).groupby(["config", "dataset", "task", "metric"], sort=False):
        mean, low, high = t_interval(group["value"], confidence)
        std = float(group["value"].std(ddof=1)) if len(group) > 1 else math.nan
        rows.append({"config": config, "dataset": dataset, "task": task, "metric": metric, "n": len(group),
                     "mean": mean, "std": std, "ci_low": low, "ci_high": high})  # fmt: skip
    return pd.DataFrame(rows, columns=["config", "dataset", "task", "metric", "n", "mean", "std", "ci_low", "ci_high"])


def relative_scores(table: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """Relative improvement (in %) of every row over the ``reference`` config's row of the same
    (dataset, seed, task), plus one ``task="average"`` row per (config, dataset, seed): the mean
    over that cell's tasks. Cells without a reference of the same seed are left out."""
    ok = _ok(table)
    keys = ["dataset", "seed", "task", "metric"]
    base = ok.loc[ok["config"] == reference, keys + ["value"]].rename(columns={"value": "reference_value"})
    if base.empty:
        raise ValueError(f"reference config {reference!r} has no finished rows in the table")
    merged = ok.merge(base, on=keys, how="inner")
    merged["score"] = 100.0 * relative_improvement(merged["value"], merged["reference_value"], _higher(merged["metric"]))
    per_task = merged[["config", "dataset", "seed", "task", "metric", "value", "reference_value", "score"]]
    average = per_task.groupby(["config", "dataset", "seed"], sort=False, as_index=False)["score"].mean()
    average = average.assign(task="average", metric="rel_improvement_pct", value=average["score"], reference_value=0.0)
    return pd.concat([per_task, average[per_task.columns]], ignore_index=True)


def paired_differences(
    table: pd.DataFrame,
    reference: str = REFERENCE,
    configs: Sequence[str] | None = None,
    family_by: Sequence[str] = ("dataset", "scope"),
    confidence: float = 0.95,
    exclude: Sequence[str] = (SINGLE_TASK,),
) -> pd.DataFrame:
    r"""Every config against ``reference``, paired by seed, per task and averaged over tasks.

    Per (config, dataset, task): the seeds both configs finished, :math:`d_k = x_k - x^{ref}_k`
    in the metric's units (``mean_diff`` with its t-interval), ``improvement`` = the same
    difference signed so that positive is better, and the two-sided paired t-test
    (``t``, ``p``). For ``task="average"`` the values are the per-seed mean relative
    improvements in % (:func:`relative_scores`), so :math:`d_k` is that score itself. When
    every :math:`d_k` is equal the test is undefined; ``p`` is then 1 if they are all 0 (the
    two configs gave identical results) and 0 otherwise.

    ``p_holm`` applies :func:`holm` within each group of ``family_by`` (columns of the
    output; ``scope`` is ``"task"`` or ``"average"``), over all configs in that group.
    """
    from scipy import stats

    scores = relative_scores(table, reference)
    ok = _ok(table)
    ref = ok.loc[ok["config"] == reference]
    configs = [c for c in dict.fromkeys(ok["config"]) if c != reference and c not in exclude] if configs is None \
        else list(configs)  # fmt: skip
    rows = []
    for config in configs:
        mine = ok.loc[ok["config"] == config]
        merged = mine.merge(ref, on=["dataset", "seed", "task", "metric"], suffixes=("", "_ref"))
        average = scores.loc[(scores["config"] == config) & (scores["task"] == "average")]
        parts = [(merged, "task"), (average.assign(value_ref=0.0), "average")]
        for frame, scope in parts:
            for (dataset, task, metric), group in frame.groupby(["dataset", "task", "metric"], sort=False):
                d = (group["value"] - group["value_ref"]).to_numpy(dtype=float)
                mean, low, high = t_interval(d, confidence)
                sign = 1.0 if scope == "average" or HIGHER_IS_BETTER[metric] else -1.0
                if d.size < 2:
                    t_stat, p = math.nan, math.nan
                elif np.all(d == d[0]):
                    t_stat, p = (0.0, 1.0) if d[0] == 0 else (math.copysign(math.inf, d[0]), 0.0)
                else:
                    test = stats.ttest_rel(group["value"].to_numpy(float), group["value_ref"].to_numpy(float))
                    t_stat, p = float(test.statistic), float(test.pvalue)
                rows.append({"config": config, "dataset": dataset, "task": task, "metric": metric, "scope": scope,
                             "n": int(d.size), "mean_diff": mean, "ci_low": low, "ci_high": high,
                             "improvement": sign * mean, "t": t_stat, "p": p})  # fmt: skip
    columns = ["config", "dataset", "task", "metric", "scope", "n", "mean_diff", "ci_low", "ci_high", "improvement",
               "t", "p", "p_holm"]  # fmt: skip
    out = pd.DataFrame(rows, columns=columns)
    if out.empty:
        return out
    missing = [c for c in family_by if c not in out.columns]
    if missing:
        raise ValueError(f"family_by names unknown columns {missing}; use columns of {columns}")
    out["p_holm"] = np.nan
    groups = out.groupby(list(family_by), sort=False).groups.values() if family_by else [out.index]
    for index in groups:
        out.loc[index, "p_holm"] = holm(out.loc[index, "p"].to_numpy(float))
    return out


def mtl_gain(table: pd.DataFrame, single_task: str = SINGLE_TASK, confidence: float = 0.95) -> pd.DataFrame:
    r"""The MTL gain of every multi-task config over the single-task models, in %.

    For task :math:`t` and seed :math:`k`, :math:`100\,\Delta(m_{k,t}, m^{single}_{k,t})` with
    :math:`\Delta` of :func:`relative_improvement` (positive: the multi-task model beats the
    single-task model on that task); ``task="average"`` averages over the tasks first. Returns
    per (config, dataset, task): ``metric`` (``"gain_pct"``), ``n``, ``mean``, ``ci_low``, ``ci_high``.
    """
    scores = relative_scores(table, single_task)
    scores = scores.loc[scores["config"] != single_task]
    rows = []
    for (config, dataset, task), group in scores.groupby(["config", "dataset", "task"], sort=False):
        mean, low, high = t_interval(group["score"], confidence)
        rows.append({"config": config, "dataset": dataset, "task": task, "metric": "gain_pct", "n": len(group),
                     "mean": mean, "ci_low": low, "ci_high": high})  # fmt: skip
    return pd.DataFrame(rows, columns=["config", "dataset", "task", "metric", "n", "mean", "ci_low", "ci_high"])


def time_ratios(table: pd.DataFrame, reference: str = REFERENCE, confidence: float = 0.95) -> pd.DataFrame:
    r"""Training time of each config relative to ``reference``, paired by seed.

    Per (config, dataset): ``seconds`` (mean cell time), and the mean over seeds of
    :math:`\text{wall}_k / \text{wall}^{ref}_k` with its t-interval.
    """
    ok = _ok(table)
    cells = ok.groupby(["config", "dataset", "seed"], sort=False, as_index=False)["wall_time"].first()
    ref = cells.loc[cells["config"] == reference, ["dataset", "seed", "wall_time"]]
    merged = cells.merge(ref, on=["dataset", "seed"], suffixes=("", "_ref"))
    rows = []
    for (config, dataset), group in merged.groupby(["config", "dataset"], sort=False):
        mean, low, high = t_interval(group["wall_time"] / group["wall_time_ref"], confidence)
        rows.append({"config": config, "dataset": dataset, "n": len(group), "seconds": float(group["wall_time"].mean()),
                     "ratio": mean, "ci_low": low, "ci_high": high})  # fmt: skip
    return pd.DataFrame(rows, columns=["config", "dataset", "n", "seconds", "ratio", "ci_low", "ci_high"])


def verdict(
    table: pd.DataFrame,
    candidate: str = CANDIDATE,
    reference: str = REFERENCE,
    alpha: float = 0.05,
    paired: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per dataset: does ``candidate`` help, hurt, or make no measurable difference vs ``reference``?

    The call rests on the primary comparison, the averaged relative improvement
    (``task="average"`` of :func:`paired_differences`): its p-values, one per dataset, form
    one Holm family (``p_holm``). ``"helps"`` when ``p_holm < alpha`` and the mean is
    positive, ``"hurts"`` when ``p_holm < alpha`` and it is negative, otherwise ``"no
    measurable difference"``. Also counted: tasks significantly better / worse on their own
    (``p_holm`` of ``paired``, i.e. Holm over its per-task family), and the mean per-seed
    training-time ratio (:func:`time_ratios`).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    paired = paired_differences(table, reference) if paired is None else paired
    mine = paired.loc[paired["config"] == candidate]
    if mine.empty:
        raise ValueError(f"candidate {candidate!r} has no paired results against {reference!r}")
    times = time_ratios(table, reference)
    primary = mine.loc[mine["scope"] == "average"].reset_index(drop=True)
    primary_holm = holm(primary["p"].to_numpy(float))
    rows = []
    for index, average in primary.iterrows():
        dataset = average["dataset"]
        tasks = mine.loc[(mine["scope"] == "task") & (mine["dataset"] == dataset)]
        significant = tasks["p_holm"] < alpha
        p_holm = float(primary_holm[index])
        if p_holm < alpha:
            outcome = "helps" if average["improvement"] > 0 else "hurts"
        else:
            outcome = "no measurable difference"
        time_row = times.loc[(times["config"] == candidate) & (times["dataset"] == dataset)]
        rows.append({
            "dataset": dataset, "outcome": outcome, "n_seeds": int(average["n"]),
            "mean_rel_improvement_pct": float(average["improvement"]),
            "ci_low": float(average["ci_low"]), "ci_high": float(average["ci_high"]),
            "p": float(average["p"]), "p_holm": p_holm,
            "tasks_better": int((significant & (tasks["improvement"] > 0)).sum()),
            "tasks_worse": int((significant & (tasks["improvement"] < 0)).sum()),
            "n_tasks": len(tasks),
            "time_ratio": float(time_row["ratio"].iloc[0]) if len(time_row) else math.nan,
        })  # fmt: skip
    return pd.DataFrame(rows)


def verdict_text(verdicts: pd.DataFrame, candidate_label: str = "PLE + UW + adaTT",
                 reference_label: str = "PLE + UW", alpha: float = 0.05) -> str:  # fmt: skip
    """The :func:`verdict` table as plain sentences (Markdown bullets), one per dataset."""
    lines = []
    for row in verdicts.itertuples():
        change = (f"mean change {row.mean_rel_improvement_pct:+.3f}% averaged over tasks "
                  f"(95% CI {row.ci_low:+.3f}% to {row.ci_high:+.3f}%, Holm-corrected p = {row.p_holm:.3f})")  # fmt: skip
        if row.outcome == "no measurable difference":
            head = f"**{row.dataset}**: no measurable difference between {candidate_label} and {reference_label}"
        else:
            head = f"**{row.dataset}**: {candidate_label} {row.outcome} compared with {reference_label}"
        tasks = (f"{row.tasks_better} of {row.n_tasks} tasks significantly better and {row.tasks_worse} "
                 f"significantly worse on their own (Holm, alpha = {alpha})")  # fmt: skip
        lines.append(f"- {head}: {change}; {tasks}; training took {row.time_ratio:.2f} times as long "
                     f"({row.n_seeds} seeds).")  # fmt: skip
    return "\n".join(lines)

