"""Figures of a training :class:`~mtlbook.train.history.History` (matplotlib, imported lazily).

* :func:`plot_losses`: per-task train (solid) and validation (dashed) curves of one metric.
* :func:`plot_lr`: the learning rate of each param group over epochs, on a log axis, with the
  trainer phases and adaTT's warmup / dynamic / frozen phases shaded.
* :func:`plot_affinity`: the affinity or transfer-weight matrix at one epoch as a heatmap.

Each function draws into ``ax`` (a new figure when ``None``) and returns the axes, so a
notebook line can end with ``;`` and print nothing.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from mtlbook.train.history import History

__all__ = ["plot_affinity", "plot_losses", "plot_lr"]

_ADATT_COLOURS = {"warmup": "#fde0c5", "dynamic": "#d5e8d4", "frozen": "#dae8fc"}


def _axes(ax: Any, figsize: tuple[float, float] = (6.0, 3.5)) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def _check_history(history: Any) -> History:
    if not isinstance(history, History):
        raise TypeError(f"history must be a History, got {type(history).__name__}")
    if len(history) == 0:
        raise ValueError("history is empty: train at least one epoch first")
    return history


def _mark_phase_boundaries(ax: Any, history: History) -> None:
    for epoch in history.phase_boundaries:
        ax.axvline(epoch - 0.5, color="0.3", linestyle=":", linewidth=1.0)


def plot_losses(
    history: History,
    metric: str = "loss",
    tasks: Sequence[str] | None = None,
    split: str = "both",
    ax: Any = None,
) -> Any:
    """Per-task curves of ``metric`` (``"loss"``, ``"auc"``, ``"rmse"`` or ``"accuracy"``).

    Args:
        history: the run.
        metric: which per-task metric; ``"total"`` plots the summed fixed-weighted loss.
        tasks: subset of tasks (default: all that have the metric).
        split: ``"train"``, ``"val"`` or ``"both"``.
        ax: axes to draw into.
    """
    history = _check_history(history)
    if split not in ("train", "val", "both"):
        raise ValueError(f"split must be 'train', 'val' or 'both', got {split!r}")
    names = list(history.task_names if tasks is None else tasks)
    unknown = [t for t in names if t not in history.task_names]
    if unknown:
        raise ValueError(f"tasks {unknown} are not in the history (tasks: {history.task_names})")
    ax = _axes(ax)
    epochs = history.epochs
    splits = ("train", "val") if split == "both" else (split,)
    keys = [("total", "loss")] if metric == "total" else [(t, f"{t}/{metric}") for t in names]
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    drawn = 0
    for k, (label, key) in enumerate(keys):
        for s in splits:
            values = history.series(s, key)
            if all(math.isnan(v) for v in values):
                continue
            ax.plot(epochs, values, linestyle="-" if s == "train" else "--", color=colours[k % len(colours)],
                    label=f"{label} ({s})")  # fmt: skip
            drawn += 1
    if drawn == 0:
        raise ValueError(f"no recorded values for metric {metric!r} in split {split!r}")
    _mark_phase_boundaries(ax, history)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.legend(fontsize="small", ncol=2)
    return ax


def _active_adatt_spans(history: History) -> list[tuple[int, int, str]]:
    """Runs of adaTT phases over the epochs where adaTT was enabled (not phase 2)."""
    spans: list[tuple[int, int, str]] = []
    for r in history:
        phase = r.get("adatt_phase") if r.get("adatt_enabled", True) else None
        e = int(r["epoch"])
        if phase not in _ADATT_COLOURS:
            continue
        if spans and spans[-1][2] == phase and spans[-1][1] == e:
            spans[-1] = (spans[-1][0], e + 1, phase)
        else:
            spans.append((e, e + 1, phase))
    return spans


def plot_lr(history: History, groups: Sequence[str] | None = None, shade_adatt: bool = True, ax: Any = None) -> Any:
    """Learning rate per param group over epochs (log scale) with phase shading.

    Phase 2 epochs get a grey hatch; adaTT's warmup / dynamic / frozen epochs get light
    orange / green / blue backgrounds when ``shade_adatt`` (only where adaTT was enabled).
    """
    history = _check_history(history)
    names = history.group_names if groups is None else list(groups)
    ax = _axes(ax)
    if shade_adatt:
        for start, stop, phase in _active_adatt_spans(history):
            ax.axvspan(start - 0.5, stop - 0.5, color=_ADATT_COLOURS[phase], alpha=0.8, linewidth=0,
                       label=f"adaTT {phase}")  # fmt: skip
    for start, stop, phase in history.spans("phase"):
        if phase == 2:
            ax.axvspan(start - 0.5, stop - 0.5, facecolor="none", edgecolor="0.5", hatch="//", linewidth=0,
                       label="phase 2 (finetune)")  # fmt: skip
    for name in names:
        ax.plot(history.epochs, history.lr(name), marker=".", label=name)
    _mark_phase_boundaries(ax, history)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per shaded phase
    ax.legend(unique.values(), unique.keys(), fontsize="small", ncol=2)
    return ax


def plot_affinity(history: History, epoch: int = -1, which: str = "affinity", ax: Any = None) -> Any:
    """Heatmap of ``which`` (``"affinity"`` in [-1, 1] or ``"transfer_weights"``) at ``epoch``.

    Row ``i`` is the receiving task, column ``j`` the peer (task-major, as everywhere).
    """
    history = _check_history(history)
    if which not in ("affinity", "transfer_weights"):
        raise ValueError(f"which must be 'affinity' or 'transfer_weights', got {which!r}")
    matrix = history.matrix(which, epoch).numpy()
    record = history[epoch] if epoch < 0 else next(r for r in history if r["epoch"] == epoch)
    ax = _axes(ax, figsize=(4.2, 3.6))
    if which == "affinity":
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    else:
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(float(matrix.max()), 1e-12))
    n = len(history.task_names)
    ax.set_xticks(range(n), history.task_names, rotation=45, ha="right")
    ax.set_yticks(range(n), history.task_names)
    ax.set_xlabel("peer j")
    ax.set_ylabel("task i")
    ax.set_title(f"{which.replace('_', ' ')} at epoch {record['epoch']}")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return ax
