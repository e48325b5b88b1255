r"""Findings: what a :class:`~mtlbook.diagnose.report.DiagnosisReport` says, in words.

Each :class:`Finding` carries the number behind it and the chapter that explains it. The
rules, in the order they are reported:

1. **Detached tasks.** A task whose gradient on the shared parameters is zero on every batch
   does not train the trunk at all.
2. **Imbalance** (chapter 2). Reference task: the largest median gradient norm. For every
   other task :math:`i`, :math:`\rho_i = \mathrm{median}_b\, \lVert g_{\mathrm{ref}}(b)\rVert /
   \lVert g_i(b) \rVert`; at or above ``imbalance_threshold`` (10) the finding suggests a
   static weight of about :math:`\rho_i` (one significant digit) as the first remedy to try.
3. **Conflict** (chapter 3, noise baseline of GUIDE section 8). A pair conflicts when its
   cosine falls below the noise threshold on more batches than noise alone explains: a
   one-sided binomial test of the count against ``alpha`` at level 0.01.
4. **Noisy tasks** (chapter 5). A task whose two half-batch gradients agree at a median
   cosine below 0.2 has batch gradients that are mostly noise; one batch's cosines say little.
5. **Blocking** (chapter 6). Pairs whose affinity is below :math:`\tau`; or none.
6. **Transfer** (appendix A.5, chapter 8). The task weights :math:`c_j` adaTT's transfer loss
   implies (see :meth:`~mtlbook.diagnose.report.DiagnosisReport.transfer_factors`), set beside
   the gradient imbalance.
7. **Drift** (chapter 2, monitors with >= 8 measurements). The median ratio of the first
   and the last quarter of the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mtlbook.diagnose.noise import binomial_tail

__all__ = ["Finding", "build_findings", "suggested_weight", "NOISY_TASK_COSINE", "CONFLICT_P_VALUE"]

#: A median noise cosine below this marks a task whose batch gradients are mostly noise.
NOISY_TASK_COSINE = 0.2
#: Level of the one-sided binomial test that calls a conflict.
CONFLICT_P_VALUE = 0.01


@dataclass(frozen=True)
class Finding:
    """One statement about the model.

    Attributes:
        kind: ``"detached"``, ``"imbalance"``, ``"balance"``, ``"conflict"``, ``"no-conflict"``,
            ``"noisy-task"``, ``"blocking"``, ``"no-blocking"``, ``"transfer"``, ``"drift"``,
            ``"no-noise-baseline"`` or ``"skipped"``.
        text: the statement, ending with the chapter that explains it.
        value: the number behind it (a ratio, a share, a cosine, a percentage).
        chapter: where the book explains it, e.g. ``"chapter 2"``.
        tasks: the tasks it is about.
    """

    kind: str
    text: str
    value: float
    chapter: str
    tasks: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.text


def _sig(x: float, digits: int = 1) -> float:
    """``x`` rounded to ``digits`` significant digits (for suggested weights)."""
    if not math.isfinite(x) or x == 0:
        return x
    return round(x, -int(math.floor(math.log10(abs(x)))) + digits - 1)


def suggested_weight(ratio: float) -> float:
    """The static weight an imbalance finding suggests: the median ratio to one significant digit."""
    return _sig(float(ratio), 1)


def _fmt_ratio(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}" if x < 1 else f"{x:.1f}"


def _imbalance(report) -> tuple[list[Finding], float]:
    names = report.task_names
    live = [k for k in range(report.n_tasks) if names[k] not in report.detached_tasks]
    if len(live) < 2:
        return [], math.nan
    medians = np.array([np.median(report.grad_norms[:, k]) for k in live])
    ref = live[int(np.argmax(medians))]
    out, largest = [], 1.0
    for k in live:
        if k == ref:
            continue
        q05, q50, q95 = report.ratio_quantiles(ref, k, (0.05, 0.5, 0.95))
        if not math.isfinite(q50):
            continue
        largest = max(largest, q50)
        if q50 >= report.imbalance_threshold:
            weight = suggested_weight(q50)
            out.append(Finding(
                "imbalance",
                f"{names[k]}'s gradient on the shared parameters is {_fmt_ratio(q50)}x smaller than "
                f"{names[ref]}'s in the median batch (90% of batches between {_fmt_ratio(q05)}x and "
                f"{_fmt_ratio(q95)}x): a static weight of about {weight:g} on {names[k]}'s loss is the "
                f"cheapest remedy to try, tuned on validation data (chapter 2).",
                float(q50), "chapter 2", (names[ref], names[k]),
            ))
    if not out:
        out.append(Finding(
            "balance",
            f"The tasks' gradient norms are within a factor {_fmt_ratio(largest)} of each other in the median "
            f"batch (below the {report.imbalance_threshold:g}x this report calls an imbalance): loss "
            f"reweighting has little imbalance to fix (chapter 2).",
            float(largest), "chapter 2", tuple(names[k] for k in live),
        ))
    return out, float(largest)


def _conflict(report) -> list[Finding]:
    names = report.task_names
    counts, measured = report.conflict_counts()
    share, negative = report.conflict_share, report.negative_share
    threshold = report.noise_threshold
    out, worst = [], (None, -1.0)
    for i in range(report.n_tasks):
        for j in range(i + 1, report.n_tasks):
            if measured[i, j] == 0:
                continue
            if share[i, j] > worst[1]:
                worst = ((i, j), float(share[i, j]))
            p = binomial_tail(int(counts[i, j]), int(measured[i, j]), report.alpha)
            if report.has_noise_baseline and share[i, j] > report.alpha and p < CONFLICT_P_VALUE:
                out.append(Finding(
                    "conflict",
                    f"{names[i]} and {names[j]} conflict: their cosine is below the noise threshold "
                    f"({threshold[i, j]:.2f}) on {100 * share[i, j]:.0f}% of {measured[i, j]} batches, where noise "
                    f"alone gives {100 * report.alpha:.0f}% (binomial p = {p:.1g}); chapter 3 measures where such "
                    f"conflict lives and chapter 8 compares remedies for it (chapter 3).",
                    float(share[i, j]), "chapter 3", (names[i], names[j]),
                ))
    if not out and worst[0] is not None:
        i, j = worst[0]
        if report.has_noise_baseline:
            text = (f"No pair conflicts beyond noise: the largest share of batches below the noise threshold is "
                    f"{100 * share[i, j]:.0f}% ({names[i]}, {names[j]}), against {100 * report.alpha:.0f}% from noise "
                    f"alone, although {100 * negative[i, j]:.0f}% of their cosines are negative; gradient surgery "
                    f"has no measured conflict to remove (chapter 3).")
        else:
            text = (f"{100 * negative[i, j]:.0f}% of the cosines between {names[i]} and {names[j]} are negative, "
                    f"but without a noise baseline (noise_baseline=False) that is no evidence of conflict: "
                    f"two noisy gradients often point apart by chance (chapter 3).")
        out.append(Finding("no-conflict", text, float(share[i, j]), "chapter 3", (names[i], names[j])))
    return out


def _noisy(report) -> list[Finding]:
    out = []
    for k, name in enumerate(report.task_names):
        values = report.noise_cosines[:, k]
        values = values[np.isfinite(values)]
        if values.size and name not in report.detached_tasks:
            median = float(np.median(values))
            if median < NOISY_TASK_COSINE:
                out.append(Finding(
                    "noisy-task",
                    f"{name}'s batch gradient is mostly noise: its gradients on two halves of a batch agree at a "
                    f"median cosine of {median:.2f}; single-batch cosines with {name} say little, and an average "
                    f"over many batches (the affinity's EMA) or larger batches sees more (chapter 5).",
                    median, "chapter 5", (name,),
                ))
    return out


def _blocking(report) -> list[Finding]:
    names, tau = report.task_names, report.blocking_threshold
    a = report.affinity
    n = report.n_tasks
    if n < 2 or report.n_batches == 0:
        return []
    off = ~np.eye(n, dtype=bool)
    below = [(i, j) for i in range(n) for j in range(i + 1, n) if min(a[i, j], a[j, i]) < tau]
    if below:
        listed = ", ".join(f"{names[i]}-{names[j]} ({min(a[i, j], a[j, i]):.2f})" for i, j in below)
        return [Finding(
            "blocking",
            f"{len(below)} pair(s) have an affinity below the blocking threshold {tau:g}: {listed}; adaTT would "
            f"block transfer between them (chapter 6).",
            float(min(a[off])), "chapter 6", tuple(sorted({names[k] for p in below for k in p})),
        )]
    i, j = np.unravel_index(np.argmin(np.where(off, a, np.inf)), a.shape)
    return [Finding(
        "no-blocking",
        f"No pair's affinity is below the blocking threshold {tau:g} (lowest {a[i, j]:.2f}, {names[i]}-{names[j]}): "
        f"adaTT's blocking would never act (chapter 6).",
        float(a[i, j]), "chapter 6", (names[i], names[j]),
    )]


def _transfer(report, imbalance: float) -> list[Finding]:
    if report.n_tasks < 2 or report.n_batches == 0:
        return []
    c = report.transfer_factors()
    most = 100.0 * (float(c.max()) - 1.0)
    relative = 100.0 * (float(c.max() / c.min()) - 1.0)
    tail = ""
    if math.isfinite(imbalance) and imbalance >= report.imbalance_threshold:
        tail = f"; it cannot undo a gradient ratio of {_fmt_ratio(imbalance)}, and chapter 8 finds the transfer does not help"
    return [Finding(
        "transfer",
        f"adaTT's transfer loss would change task weights by at most {most:.0f}% (c_j = 1 + lambda * sum_i w_ij "
        f"between {c.min():.3f} and {c.max():.3f} with lambda = {report.transfer_lambda:g} and a uniform softmax "
        f"over unblocked peers; at most 1 + lambda when every row lends to all its peers), and the ratio of any two "
        f"task weights by at most {relative:.0f}%{tail} (appendix A.5).",
        most, "appendix A.5", report.task_names,
    )]


def _drift(report) -> list[Finding]:
    if report.source != "monitor" or report.n_batches < 8:
        return []
    names = report.task_names
    live = [k for k in range(report.n_tasks) if names[k] not in report.detached_tasks]
    if len(live) < 2:
        return []
    medians = np.array([np.median(report.grad_norms[:, k]) for k in live])
    ref = live[int(np.argmax(medians))]
    quarter = report.n_batches // 4
    out = []
    for k in live:
        if k == ref:
            continue
        ratio = report.ratios[:, ref, k]
        first, last = ratio[:quarter], ratio[-quarter:]
        first, last = first[np.isfinite(first)], last[np.isfinite(last)]
        if first.size and last.size:
            a, b = float(np.median(first)), float(np.median(last))
            out.append(Finding(
                "drift",
                f"Over training, the median ratio of {names[ref]}'s to {names[k]}'s gradient norm went from "
                f"{_fmt_ratio(a)} (first quarter of the {report.n_batches} measurements, steps "
                f"{report.steps[0]}-{report.steps[quarter - 1]}) to {_fmt_ratio(b)} (last quarter): a weight "
                f"tuned at one time is not right at every time (chapter 2).",
                b / a if a > 0 else math.nan, "chapter 2", (names[ref], names[k]),
            ))
    return out


def build_findings(report) -> list[Finding]:
    """All findings of ``report``, in the order of the module docstring."""
    out: list[Finding] = []
    if report.n_batches == 0:
        return [Finding("skipped", "Nothing was measured: the report has no batch.", 0.0, "chapter 9")]
    for name in report.detached_tasks:
        out.append(Finding(
            "detached",
            f"{name}'s loss never reaches the shared parameters (zero gradient on all {report.n_batches} batches): "
            f"check that its head reads the shared trunk and that the loss is not computed under no_grad or "
            f"from detached outputs (chapter 9).",
            0.0, "chapter 9", (name,),
        ))
    for reason, count in report.skipped.items():
        out.append(Finding("skipped", f"{count} measurement(s) were skipped: {reason}.", float(count), "chapter 7"))
    imbalance, largest = _imbalance(report)
    out += imbalance
    out += _conflict(report)
    if not report.has_noise_baseline:
        out.append(Finding(
            "no-noise-baseline",
            "No noise baseline was measured, so conflict is judged by the sign of the cosine alone; pass batches "
            "the default split can halve (or split=...) to measure one (chapter 9).",
            math.nan, "chapter 9",
        ))
    out += _noisy(report)
    out += _blocking(report)
    out += _transfer(report, largest)
    out += _drift(report)
    return out
