r"""Chapter 8's verdict design: which contrast isolates which part of adaTT, declared before the results.

Switching adaTT on in the trainer changes three things at once: it **measures** task
affinity (extra backward passes, no effect on the weights by itself), it **transfers** a
share of the peers' losses to each task, and it **freezes the CGC gates** when it enters its
frozen phase (the co-freeze contract of chapter 7). PLE + UW, the reference, does none of
them. The controls of :data:`mtlbook.experiments.study.PRIMARY_CONFIGS` switch them on one
at a time, and each :class:`Contrast` below compares two configurations that differ in one
part only:

========================  ===========================  ===========================  ===========
contrast                   candidate                    reference                    isolates
========================  ===========================  ===========================  ===========
``total``                  adaTT as shipped             PLE + UW                     everything
``transfer``               adaTT as shipped             adaTT with lambda = 0        transfer
``freeze``                 PLE + UW, gates frozen       PLE + UW                     gate freeze
``measurement``            adaTT with lambda = 0        PLE + UW, gates frozen       measuring
``transfer_no_freeze``     adaTT without co-freeze      PLE + UW                     transfer
========================  ===========================  ===========================  ===========

plus baselines (adaTT vs tuned static weights, tuned static weights vs PLE + UW, and the
sources' "PLE vs PLE + adaTT" on equal weights), and three more families declared with their
configurations: :data:`METHOD_CONTRASTS` (gradient aggregators vs UW), :data:`ABLATION_CONTRASTS`
(adaTT's knobs vs default adaTT) and :data:`WEIGHTING_CONTRASTS` (balancers, UW and single-task
models vs equal weights).

Every contrast is scored by the per-seed **task-averaged relative change** of the candidate
over the reference, in %: :math:`d_k = \frac{100}{T}\sum_t \Delta(m^{c}_{k,t}, m^{r}_{k,t})`
(:func:`mtlbook.experiments.study.relative_improvement`, positive = candidate better).

**Families** (Holm, :func:`mtlbook.experiments.study.holm`): ``"primary"`` holds the
``total``, ``transfer`` and ``freeze`` contrasts on every dataset; ``"secondary"`` the
others. **Decision rule**: a contrast is significant when its Holm-adjusted paired t-test
p-value is below :data:`ALPHA`; the exact sign-flip test is reported beside it as a check
that does not assume normality. **Equivalence**: TOST with margin
:data:`EQUIVALENCE_MARGIN` (in % of task-averaged relative change), fixed before the
second edition's table was analysed.

:func:`cause_verdict` turns the three primary contrasts of a dataset into a verdict that
names its cause: ``"transfer"``, ``"freeze"``, ``"transfer and freeze"`` or ``"nothing"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from mtlbook.experiments.inference import mde, sign_flip_test, tost
from mtlbook.experiments.study_configs import (
    ABLATION_CONFIGS, CANDIDATE, METHOD_CONFIGS, REFERENCE, SINGLE_TASK, WEIGHTING_CONFIGS, get_config,
)

__all__ = [
    "ABLATION_CONTRASTS",
    "ALPHA",
    "CONTRASTS",
    "EQUIVALENCE_MARGIN",
    "METHOD_CONTRASTS",
    "WEIGHTING_CONTRASTS",
    "Contrast",
    "cause_verdict",
    "contrast_differences",
    "contrast_table",
]

#: Significance level of every test (before Holm).
ALPHA = 0.05
#: TOST margin, in % of task-averaged relative change: smaller changes are called negligible.
EQUIVALENCE_MARGIN = 0.25


@dataclass(frozen=True)
class Contrast:
    """Candidate minus reference, paired by seed; ``isolates`` says which part of adaTT differs."""

    name: str
    candidate: str
    reference: str
    isolates: str
    family: str


#: The declared contrasts, in the order the chapter shows them.
CONTRASTS: tuple[Contrast, ...] = (
    Contrast("total", "ple_uw_adatt", "ple_uw", "adaTT as shipped (measure + transfer + gate freeze)", "primary"),
    Contrast("transfer", "ple_uw_adatt", "adatt_lambda0", "the transfer (same measuring and freeze)", "primary"),
    Contrast("freeze", "ple_uw_freeze", "ple_uw", "the gate freeze (no adaTT)", "primary"),
    Contrast("measurement", "adatt_lambda0", "ple_uw_freeze", "measuring with lambda = 0 (same freeze)", "secondary"),
    Contrast("transfer_no_freeze", "adatt_no_cofreeze", "ple_uw", "the transfer without the freeze", "secondary"),
    Contrast("vs_tuned_static", "ple_uw_adatt", "ple_ls_tuned", "adaTT vs tuned static weights", "secondary"),
    Contrast("tuned_static", "ple_ls_tuned", "ple_uw", "tuned static weights vs UW", "secondary"),
    Contrast("equal_weights", "ple_adatt", "ple_equal", "adaTT on equal weights (the sources' comparison)",
             "secondary"),  # fmt: skip
)

#: The gradient-aggregation methods (torchjd) and random loss weighting against the reference,
#: one family of their own ("methods"), so that adding them leaves the primary and secondary
#: families, and their Holm corrections, as declared. Each method replaces the loss weighting
#: (its base is itself, like GradNorm's): the contrast compares two ways to weight the same PLE.
METHOD_CONTRASTS: tuple[Contrast, ...] = tuple(
    Contrast(f"{name}_vs_uw", name, REFERENCE, f"{get_config(name).label} instead of UW", "methods")
    for name in METHOD_CONFIGS
)

#: adaTT's knobs against default adaTT: one setting differs in each (family ``"ablations"``).
ABLATION_CONTRASTS: tuple[Contrast, ...] = tuple(
    Contrast(name, name, CANDIDATE, f"{get_config(name).label} instead of the default", "ablations")
    for name in ABLATION_CONFIGS
)

#: The first edition's balancers, UW and the single-task models against PLE on equal weights
#: (family ``"weighting"``). GradNorm and DWA replace the equal weights, PCGrad projects the
#: equal-weight gradients: equal weights are the base each of them changes, so this is the
#: comparison that changes one thing (against PLE + UW it would change two).
#: ``single_task`` vs ``ple_equal`` asks whether sharing helps at all (negative = it does).
WEIGHTING_CONTRASTS: tuple[Contrast, ...] = tuple(
    Contrast(f"{name}_vs_equal", name, "ple_equal",
             "one model per task instead of one shared" if name == SINGLE_TASK
             else f"{get_config(name).label} instead of equal weights", "weighting")
    for name in (*(n for n in WEIGHTING_CONFIGS if n != SINGLE_TASK), REFERENCE, SINGLE_TASK)
)


def contrast_differences(table: pd.DataFrame, contrast: Contrast) -> pd.DataFrame:
    """Per (dataset, seed) of the contrast: ``d`` = the task-averaged relative change in %.

    Only seeds where both configurations finished are kept.
    """
    from mtlbook.experiments.study import relative_scores

    present = set(table.loc[table["status"] == "ok", "config"])
    if contrast.candidate not in present or contrast.reference not in present:
        return pd.DataFrame(columns=["dataset", "seed", "d"])
    scores = relative_scores(table, contrast.reference)
    mine = scores.loc[(scores["config"] == contrast.candidate) & (scores["task"] == "average")]
    return mine[["dataset", "seed", "score"]].rename(columns={"score": "d"}).sort_values(["dataset", "seed"])


def contrast_table(
    table: pd.DataFrame,
    contrasts: Sequence[Contrast] = CONTRASTS,
    margin: float = EQUIVALENCE_MARGIN,
    alpha: float = ALPHA,
) -> pd.DataFrame:
    r"""Every contrast on every dataset: the paired statistics the verdict rests on.

    Columns: ``contrast, family, candidate, reference, isolates, dataset, n, mean, ci_low,
    ci_high`` (95% t-interval), ``sd`` (of the :math:`d_k`), ``p_t`` (paired t-test),
    ``p_sign_flip`` (exact), ``p_holm`` / ``p_sign_flip_holm`` (Holm within the family),
    ``significant`` (``p_holm < alpha``), ``p_tost`` and ``equivalent`` (TOST, ``margin``),
    ``mde`` (80% power at ``alpha``) and ``mde_family`` (at the Bonferroni level
    ``alpha / m`` of the family's first Holm step: an upper bound under Holm). Contrasts
    without finished cells are left out, so a family's size ``m`` (column ``family_size``)
    counts the contrasts present.
    """
    from scipy import stats

    from mtlbook.experiments.study import t_interval

    rows = []
    for contrast in contrasts:
        diffs = contrast_differences(table, contrast)
        for dataset, group in diffs.groupby("dataset", sort=False):
            d = group["d"].to_numpy(float)
            n = int(d.size)
            mean, low, high = t_interval(d)
            sd = float(d.std(ddof=1)) if n > 1 else math.nan
            if n < 2:
                p_t = math.nan
            elif np.all(d == d[0]):
                p_t = 1.0 if d[0] == 0 else 0.0
            else:
                p_t = float(stats.ttest_1samp(d, 0.0).pvalue)
            equivalence = tost(d, margin, alpha) if n > 1 else {"p": math.nan, "equivalent": False}
            rows.append({
                "contrast": contrast.name, "family": contrast.family, "candidate": contrast.candidate,
                "reference": contrast.reference, "isolates": contrast.isolates, "dataset": dataset, "n": n,
                "mean": mean, "ci_low": low, "ci_high": high, "sd": sd, "p_t": p_t,
                "p_sign_flip": sign_flip_test(d), "p_tost": float(equivalence["p"]),
                "equivalent": bool(equivalence["equivalent"]),
            })  # fmt: skip
    columns = ["contrast", "family", "candidate", "reference", "isolates", "dataset", "n", "mean", "ci_low", "ci_high",
               "sd", "p_t", "p_sign_flip", "family_size", "p_holm", "p_sign_flip_holm", "significant", "p_tost",
               "equivalent", "mde", "mde_family"]  # fmt: skip
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=columns)
    from mtlbook.experiments.study import holm

    for column, target in (("p_t", "p_holm"), ("p_sign_flip", "p_sign_flip_holm")):
        out[target] = np.nan
        for _, index in out.groupby("family", sort=False).groups.items():
            out.loc[index, target] = holm(out.loc[index, column].to_numpy(float))
    out["family_size"] = out.groupby("family")["contrast"].transform("size").astype(int)
    out["significant"] = out["p_holm"] < alpha

    def _mde(sd: float, n: int, level: float) -> float:
        return mde(sd, n, level) if n >= 2 and math.isfinite(sd) and sd > 0 else 0.0

    out["mde"] = [_mde(sd, n, alpha) for sd, n in zip(out["sd"], out["n"])]
    out["mde_family"] = [_mde(sd, n, alpha / m) for sd, n, m in zip(out["sd"], out["n"], out["family_size"])]
    return out[columns]


def cause_verdict(contrasts: pd.DataFrame, dataset: str, margin: float = EQUIVALENCE_MARGIN) -> dict[str, object]:
    """The verdict on adaTT as shipped for one dataset, naming its cause.

    ``outcome``: ``"helps"`` / ``"hurts"`` when the ``total`` contrast is significant
    (Holm, primary family), else ``"no measurable difference"``. ``cause``: among the
    ``transfer`` and ``freeze`` contrasts, those significant with the sign of the total
    (``"transfer"``, ``"freeze"``, ``"transfer and freeze"``), ``"not attributed"`` when
    neither is, and ``"nothing"`` when the total is not significant. ``equivalent``: the
    total passes TOST within ``margin``.
    """
    rows = contrasts.loc[contrasts["dataset"] == dataset].set_index("contrast")
    if "total" not in rows.index:
        raise ValueError(f"contrasts has no 'total' row for dataset {dataset!r}")
    total = rows.loc["total"]
    significant = bool(total["significant"])
    outcome = ("helps" if total["mean"] > 0 else "hurts") if significant else "no measurable difference"
    parts = []
    if significant:
        for name in ("transfer", "freeze"):
            if name in rows.index and bool(rows.loc[name, "significant"]) and \
                    np.sign(rows.loc[name, "mean"]) == np.sign(total["mean"]):  # fmt: skip
                parts.append(name)
    cause = " and ".join(parts) if parts else ("not attributed" if significant else "nothing")
    return {"dataset": dataset, "outcome": outcome, "cause": cause, "n": int(total["n"]),
            "mean": float(total["mean"]), "ci_low": float(total["ci_low"]), "ci_high": float(total["ci_high"]),
            "p_holm": float(total["p_holm"]), "p_sign_flip": float(total["p_sign_flip"]),
            "mde": float(total["mde"]), "mde_family": float(total["mde_family"]),
            "equivalent": bool(total["equivalent"]), "margin": margin}  # fmt: skip
