"""Figures for chapter 6 (adaTT: select and regulate) and the math appendix.

The central helper is :func:`transfer_pipeline`, which takes an
:class:`~mtlbook.adatt.AdaptiveTaskTransfer` apart into the stages of its peer selection so
that each stage can be drawn as a heatmap:

.. math::

    R = (W + A)(1 - r) + P r \\;\\to\\; \\mathcal B = \\{i = j\\} \\cup \\{A_{ij} < \\tau\\}
    \\;\\to\\; \\operatorname{softmax}_{j \\notin \\mathcal B}(R_{ij} / T)
    \\;\\to\\; \\text{absent columns} \\times 0

The stages are recomputed from the module's public state; the last one is checked against
:meth:`~mtlbook.adatt.AdaptiveTaskTransfer.transfer_weights` (the tests require them to be
equal), so a figure can never show a pipeline the package does not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from torch import Tensor

from mtlbook._checks import check_mask
from mtlbook.adatt import AdaptiveTaskTransfer

from .frames import new_figure

__all__ = [
    "PipelineStages",
    "transfer_module",
    "transfer_pipeline",
    "blocked_mass",
    "effective_peers",
    "plot_matrix",
    "transfer_frame",
    "plot_phase_timeline",
]

#: Grey for blocked cells: they are drawn as "not a number" so the colour map skips them.
BLOCKED_COLOR = "0.82"


@dataclass(frozen=True)
class PipelineStages:
    """The stages of :meth:`AdaptiveTaskTransfer.transfer_weights`, all ``[n, n]`` float32
    except ``blocked`` (bool) and ``present`` (bool ``[n]``).

    Attributes:
        affinity: :math:`A`.
        logits: :math:`W` (detached).
        prior: :math:`P` (zeros when no prior is configured).
        blend_ratio: :math:`r` used (0 without a prior).
        blended: :math:`R = (W + A)(1 - r) + P r`.
        blocked: the diagonal and every pair with :math:`A_{ij} < \\tau`.
        softmax: the weights before missing-task masking (as the module's ``blocking``
            computes them: exact zeros, or the zero-logit variant).
        weights: the final transfer weights (absent tasks' rows and columns set to 0).
        present: which tasks had targets.
    """

    affinity: Tensor
    logits: Tensor
    prior: Tensor
    blend_ratio: float
    blended: Tensor
    blocked: Tensor
    softmax: Tensor
    weights: Tensor
    present: Tensor


def _check_square(matrix: Tensor, n: int, name: str) -> Tensor:
    matrix = torch.as_tensor(matrix, dtype=torch.float32)
    if matrix.shape != (n, n) or not torch.isfinite(matrix).all():
        raise ValueError(f"{name} must be a finite [{n}, {n}] matrix, got shape {tuple(matrix.shape)}")
    return matrix


def transfer_module(
    task_names: Sequence[str],
    affinity: Tensor,
    logits: Tensor | None = None,
    epoch: int | None = None,
    **kwargs: object,
) -> AdaptiveTaskTransfer:
    """An :class:`AdaptiveTaskTransfer` whose affinity (and optionally ``W``) is set by hand.

    Args:
        task_names: task order.
        affinity: ``[n, n]`` values for :math:`A` (clamped to [-1, 1] like the EMA is).
        logits: ``[n, n]`` values for :math:`W` (default: its zero init).
        epoch: epoch to move to (default ``warmup_epochs``: the first dynamic epoch, where
            the prior blend is at its start value).
        **kwargs: passed to :class:`AdaptiveTaskTransfer`.
    """
    module = AdaptiveTaskTransfer(task_names, **kwargs)
    n = module.n_tasks
    with torch.no_grad():
        module.affinity_computer.affinity.copy_(_check_square(affinity, n, "affinity").clamp(-1.0, 1.0))
        module.affinity_computer.pair_observed.fill_(True)
        if logits is not None:
            module.transfer_logits.copy_(_check_square(logits, n, "logits"))
    module.set_epoch(module.warmup_epochs if epoch is None else epoch)
    return module


def transfer_pipeline(module: AdaptiveTaskTransfer, present: Tensor | Sequence[bool] | None = None) -> PipelineStages:
    """Every stage of ``module.transfer_weights(present)`` (see :class:`PipelineStages`)."""
    if not isinstance(module, AdaptiveTaskTransfer):
        raise TypeError(f"module must be an AdaptiveTaskTransfer, got {type(module).__name__}")
    n = module.n_tasks
    with torch.no_grad():
        mask = torch.ones(n, dtype=torch.bool) if present is None else torch.as_tensor(present)
        check_mask(mask, n, wrong_type=ValueError)
        affinity = module.affinity.float()
        logits = module.W.detach().clone().float()
        prior = module.prior.detach().clone().float()
        ratio = float(module.blend_ratio)
        blended = (logits + affinity) * (1.0 - ratio) + prior * ratio if bool(module.prior_configured) else logits + affinity
        blocked = torch.eye(n, dtype=torch.bool) | (affinity < module.negative_threshold)
        scores = blended / module.temperature
        if module.blocking == "exact":
            open_rows = ~blocked.all(dim=1, keepdim=True)
            softmax = torch.softmax(scores.masked_fill(blocked, float("-inf")).masked_fill(~open_rows, 0.0), dim=1)
            softmax = softmax.masked_fill(blocked, 0.0)
        else:
            softmax = torch.softmax(scores.masked_fill(blocked, 0.0), dim=1)
        weights = softmax * (mask[:, None] & mask[None, :]).float()
    return PipelineStages(affinity, logits, prior, ratio, blended, blocked, softmax, weights, mask)


def blocked_mass(weights: Tensor, blocked: Tensor, include_diagonal: bool = True) -> Tensor:
    """Per-row total weight on blocked entries, ``[n]``: 0 for a correct blocking.

    With ``include_diagonal=False`` only blocked *peers* count (the diagonal never enters
    the transfer loss, which sums over ``j != i``).
    """
    weights = torch.as_tensor(weights, dtype=torch.float32)
    blocked = torch.as_tensor(blocked)
    if weights.dim() != 2 or weights.shape[0] != weights.shape[1] or blocked.shape != weights.shape:
        raise ValueError("weights and blocked must be [n, n] of the same shape")
    if blocked.dtype != torch.bool:
        raise TypeError("blocked must be a bool tensor")
    if not include_diagonal:
        blocked = blocked & ~torch.eye(weights.shape[0], dtype=torch.bool)
    return (weights * blocked.float()).sum(dim=1)


def effective_peers(weights: Tensor) -> Tensor:
    """Per-row perplexity :math:`\\exp(H(w_i))`, ``[n]``, with :math:`H = -\\sum_j w_{ij} \\log w_{ij}`
    over the row renormalised to sum 1: the number of peers a row effectively listens to
    (1 for a one-hot row, ``k`` for a uniform row over ``k`` peers). An all-zero row gives 0."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.dim() != 2 or (weights < 0).any():
        raise ValueError("weights must be a non-negative [n, n] matrix")
    totals = weights.sum(dim=1, keepdim=True)
    p = torch.where(totals > 0, weights / totals.clamp_min(1e-300), torch.zeros_like(weights))
    entropy = -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(dim=1)
    return torch.where(totals.squeeze(1) > 0, torch.exp(entropy), torch.zeros_like(entropy)).float()


def plot_matrix(
    ax: Axes,
    matrix: Tensor,
    task_names: Sequence[str],
    title: str = "",
    *,
    vmin: float = -1.0,
    vmax: float = 1.0,
    cmap: str = "RdBu_r",
    blocked: Tensor | None = None,
    fmt: str = ".2f",
    annotate: bool = True,
    fontsize: float = 7.0,
) -> int:
    """Heatmap of an ``[n, n]`` task matrix (rows receive, columns give).

    Blocked cells (``blocked`` True) are drawn grey with a ``×`` whatever their value.
    Returns the number of cells drawn as blocked.
    """
    values = torch.as_tensor(matrix, dtype=torch.float32).numpy()
    n = len(task_names)
    if values.shape != (n, n):
        raise ValueError(f"matrix must be [{n}, {n}] to match task_names, got {values.shape}")
    mask = np.zeros((n, n), dtype=bool) if blocked is None else torch.as_tensor(blocked).numpy().astype(bool)
    if mask.shape != (n, n):
        raise ValueError(f"blocked must be [{n}, {n}], got {mask.shape}")
    colour_map = ListedColormap([BLOCKED_COLOR])
    image = ax.imshow(np.where(mask, np.nan, values), vmin=vmin, vmax=vmax, cmap=cmap)
    ax.imshow(np.where(mask, 0.0, np.nan), cmap=colour_map, vmin=0, vmax=1)
    if annotate:
        span = vmax - vmin
        for i in range(n):
            for j in range(n):
                if mask[i, j]:
                    ax.text(j, i, "×", ha="center", va="center", fontsize=fontsize + 2, color="0.35")
                else:
                    level = (values[i, j] - vmin) / span
                    # diverging maps are dark at both ends, sequential ones (viridis) at the low end
                    dark = abs(level - 0.5) > 0.3 if cmap == "RdBu_r" else level < 0.5
                    ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=fontsize,
                            color="white" if dark else "black")
    ax.set_xticks(range(n), task_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), task_names, fontsize=fontsize)
    ax.set_title(title, fontsize=fontsize + 2)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=fontsize)
    return int(mask.sum())


def transfer_frame(
    task_names: Sequence[str],
    affinity: Tensor,
    temperature: float,
    threshold: float,
    logits: Tensor | None = None,
    task_groups: Mapping[str, Sequence[str]] | None = None,
    width_px: int = 480,
    height_px: int = 300,
) -> Figure:
    """One explorer frame: the transfer weights at ``temperature`` and ``threshold``.

    Left: the weight heatmap with blocked pairs marked. Right: per task, the effective number
    of peers :func:`effective_peers` next to the number of unblocked peers. Built with
    :func:`transfer_module` at the first dynamic epoch.
    """
    module = transfer_module(task_names, affinity, logits, temperature=temperature,
                             negative_threshold=threshold, task_groups=task_groups)
    stages = transfer_pipeline(module)
    fig, (ax_heat, ax_bar) = new_figure(width_px, height_px, ncols=2, gridspec_kw={"width_ratios": [1.7, 1]})
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.27, top=0.9, wspace=0.4)
    n_blocked = plot_matrix(ax_heat, stages.weights, task_names, vmin=0.0, vmax=1.0, cmap="viridis",
                            blocked=stages.blocked, fmt=".2f", fontsize=6.5)
    ax_heat.set_title(f"w_ij  (T={temperature:g}, τ={threshold:g})", fontsize=8.5)
    positions = np.arange(len(task_names))
    open_peers = (~stages.blocked).sum(dim=1).numpy()
    ax_bar.barh(positions, open_peers, color="0.85", label="unblocked peers")
    ax_bar.barh(positions, effective_peers(stages.weights).numpy(), height=0.5, color="tab:purple",
                label="effective peers")
    ax_bar.set_yticks(positions, task_names, fontsize=6.5)
    ax_bar.invert_yaxis()
    ax_bar.set_xlim(0, len(task_names) - 1)
    ax_bar.set_xlabel("peers", fontsize=8)
    ax_bar.tick_params(labelsize=7)
    ax_bar.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.45, -0.22), ncol=1, frameon=False)
    ax_bar.set_title(f"{n_blocked - len(task_names)} peer pairs blocked", fontsize=8.5)
    return fig


def plot_phase_timeline(
    ax: Axes,
    epochs: Sequence[int],
    activity: Mapping[str, Sequence[bool]],
    phases: Sequence[str],
) -> None:
    """Horizontal bars: one row per entry of ``activity`` (label -> one flag per epoch),
    filled where the flag is True, with the phase of each epoch as the background colour."""
    epochs = list(epochs)
    if len(phases) != len(epochs) or any(len(flags) != len(epochs) for flags in activity.values()):
        raise ValueError("phases and every activity row need one entry per epoch")
    colours = {"warmup": "#fde0d9", "dynamic": "#dde4ff", "frozen": "#e3f0e4"}
    for e, phase in zip(epochs, phases):
        ax.axvspan(e - 0.5, e + 0.5, color=colours.get(phase, "white"), lw=0)
    labels = list(activity)
    for row, label in enumerate(labels):
        flags = list(activity[label])
        spans = [(e - 0.42, 0.84) for e, on in zip(epochs, flags) if on]
        ax.broken_barh(spans, (row - 0.3, 0.6), color="tab:blue")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    ax.set_xticks(epochs)
    ax.set_xlabel("epoch")
    seen: list[str] = []
    for e, phase in zip(epochs, phases):
        if phase not in seen:
            seen.append(phase)
            span = [x for x, p in zip(epochs, phases) if p == phase]
            ax.text((span[0] + span[-1]) / 2, -0.75, phase, ha="center", va="bottom", fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -1.0)
