"""Chapter 8's figures: paired differences and per-task means (matplotlib is imported inside
the functions; overview: :mod:`mtlbook.experiments.study`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd

from mtlbook.experiments.study_configs import CONFIGS

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.axes import Axes

__all__ = [
    "plot_paired",
    "plot_task_means",
]


# --------------------------------------------------------------------------- figures
def _config_axes(rows: pd.DataFrame, ax: "Axes | None", labels: Mapping[str, str] | None):
    """An axes one row per config tall (a new figure if ``ax`` is None), the labels to use and
    the rows' y positions, first row on top."""
    import matplotlib.pyplot as plt

    labels = labels or {c.name: c.label for c in CONFIGS}
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 1))
    return ax, labels, np.arange(len(rows))[::-1]


def plot_paired(paired: pd.DataFrame, dataset: str, ax: "Axes | None" = None,
                labels: Mapping[str, str] | None = None, alpha: float = 0.05) -> "Axes":  # fmt: skip
    """Horizontal bars: mean averaged relative improvement (%) over the reference with 95% CI,
    one bar per config; bars with ``p_holm < alpha`` are filled, the others hatched."""
    rows = paired.loc[(paired["dataset"] == dataset) & (paired["scope"] == "average")]
    if rows.empty:
        raise ValueError(f"paired has no averaged rows for dataset {dataset!r}")
    ax, labels, y = _config_axes(rows, ax, labels)
    significant = rows["p_holm"].to_numpy(float) < alpha
    colors = np.where(rows["improvement"].to_numpy(float) > 0, "tab:green", "tab:red")
    errors = np.vstack([rows["mean_diff"] - rows["ci_low"], rows["ci_high"] - rows["mean_diff"]])
    for yi, mean, err_lo, err_hi, sig, color in zip(y, rows["mean_diff"], errors[0], errors[1], significant, colors):
        ax.barh(yi, mean, color=color if sig else "white", edgecolor=color, hatch=None if sig else "//")
        ax.errorbar(mean, yi, xerr=[[err_lo], [err_hi]], color="black", capsize=3)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(y, [labels.get(c, c) for c in rows["config"]])
    ax.set_xlabel("relative improvement over the reference, averaged over tasks (%)")
    ax.set_title(dataset)
    return ax


def plot_task_means(summary: pd.DataFrame, dataset: str, task: str, ax: "Axes | None" = None,
                    configs: Sequence[str] | None = None, labels: Mapping[str, str] | None = None,
                    xlabel: str | None = None) -> "Axes":  # fmt: skip
    """Mean of one task per config with its 95% t-interval (error bars), from :func:`summarize`
    or :func:`mtl_gain` (columns ``config, dataset, task, metric, mean, ci_low, ci_high``)."""
    rows = summary.loc[(summary["dataset"] == dataset) & (summary["task"] == task)]
    if configs is not None:
        rows = rows.set_index("config").loc[[c for c in configs if c in set(rows["config"])]].reset_index()
    if rows.empty:
        raise ValueError(f"summary has no rows for dataset {dataset!r}, task {task!r}")
    ax, labels, y = _config_axes(rows, ax, labels)
    means = rows["mean"].to_numpy(float)
    errors = np.vstack([means - rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float) - means])
    ax.errorbar(means, y, xerr=np.nan_to_num(errors), fmt="o", color="tab:blue", capsize=3)
    ax.set_yticks(y, [labels.get(c, c) for c in rows["config"]])
    ax.set_xlabel(xlabel or f"{task}: test {rows['metric'].iloc[0]} (mean, 95% CI)")
    ax.set_title(dataset)
    return ax

