"""The figure of :meth:`DiagnosisReport.plot` (pyplot-free, so nothing stays open)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

__all__ = ["report_figure"]


def report_figure(report, width: float = 12.0, height: float = 3.6) -> Figure:
    """Three panels: norm ratios against the largest task (log scale), each pair's cosines beside
    its null cosines (grey; the noise threshold in red), and the affinity heatmap. Side by side
    when the figure is at least 8 inches wide, stacked in three rows otherwise (a book column)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    if width >= 8.0:
        ax_ratio, ax_cos, ax_aff = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1.2, 0.9]})
    else:
        ax_ratio, ax_cos, ax_aff = fig.subplots(3, 1, gridspec_kw={"height_ratios": [1.0, 1.0, 1.3]})
    names, n = report.task_names, report.n_tasks
    if report.n_batches == 0:
        for ax in (ax_ratio, ax_cos, ax_aff):
            ax.text(0.5, 0.5, "no batch measured", ha="center", va="center", transform=ax.transAxes)
        return fig

    medians = np.median(report.grad_norms, axis=0)
    ref = int(np.argmax(medians))
    ratios = report.ratios
    finite = [ratios[:, ref, k][np.isfinite(ratios[:, ref, k])] for k in range(n) if k != ref]
    labels = [names[k] for k in range(n) if k != ref]
    pooled = np.concatenate([v for v in finite if v.size] or [np.ones(1)])
    low, high = np.log10(max(pooled.min(), 1e-12)) - 0.1, np.log10(max(pooled.max(), 1e-12)) + 0.1
    bins = np.logspace(low, high, 30)
    for values, label in zip(finite, labels):
        if values.size:
            ax_ratio.hist(values, bins=bins, alpha=0.6, label=f"{names[ref]} / {label}")
    ax_ratio.set_xscale("log")
    ax_ratio.axvline(report.imbalance_threshold, color="grey", ls=":", lw=1)
    ax_ratio.set_xlabel("gradient-norm ratio on the shared parameters")
    ax_ratio.set_ylabel("batches")
    ax_ratio.set_title("imbalance", fontsize=10)
    ax_ratio.legend(fontsize=7, frameon=False, loc="upper left")

    threshold = report.noise_threshold
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for k, (i, j) in enumerate(pairs):
        measured = (report.grad_norms[:, i] > 0) & (report.grad_norms[:, j] > 0)
        null = np.concatenate([report.null_cosines[:, i, j], report.null_cosines[:, j, i]])
        null = null[np.isfinite(null)]
        if null.size:
            box = ax_cos.boxplot([np.concatenate([null, -null])], positions=[2 * k], widths=0.6,
                                 showfliers=False, patch_artist=True)
            box["boxes"][0].set_facecolor("lightgrey")
        ax_cos.boxplot([report.cosines[measured, i, j]], positions=[2 * k + 1], widths=0.6, showfliers=False)
        ax_cos.plot([2 * k - 0.4, 2 * k + 1.4], [threshold[i, j]] * 2, color="tab:red", lw=1.5,
                    label="noise threshold" if k == 0 else None)
    ax_cos.set_xticks([2 * k + d for k in range(len(pairs)) for d in (0, 1)])
    ax_cos.set_xticklabels([label for i, j in pairs for label in ("noise", f"{names[i]}·{names[j]}")],
                           rotation=30, ha="right", fontsize=8)
    ax_cos.axhline(0.0, color="black", lw=0.8)
    ax_cos.set_ylim(-1.05, 1.05)
    ax_cos.set_ylabel("cosine per batch")
    ax_cos.set_title("pair cosines beside their noise baseline", fontsize=10)
    if pairs:
        ax_cos.legend(fontsize=7, frameon=False, loc="lower left")

    affinity = report.affinity
    image = ax_aff.imshow(affinity, vmin=-1, vmax=1, cmap="RdBu_r")
    for i in range(n):
        for j in range(n):
            ax_aff.text(j, i, f"{affinity[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(affinity[i, j]) > 0.6 else "black")
    ax_aff.set_xticks(range(n))
    ax_aff.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax_aff.set_yticks(range(n))
    ax_aff.set_yticklabels(names, fontsize=8)
    ax_aff.set_title(f"affinity (EMA, {report.n_batches} batches)", fontsize=10)
    fig.colorbar(image, ax=ax_aff, shrink=0.8)
    return fig
