r"""The learning-rate search of chapter 8: the same search for every method, on validation.

Every configuration of the real-data study gets the same search: the peak learning rates
:data:`LR_GRID` (log-spaced), each trained with the search seeds :data:`SEARCH_SEEDS`
(disjoint from the evaluation seeds ``0, 1, ...``, so the test cells never share a split or an
initialisation with a search cell) and scored on the **validation** split
(``run_cell(..., score_split="val")``; the test split is not evaluated).

**Criterion.** Let :math:`v_{c,\ell,k,t}` be the validation metric of configuration :math:`c`
at learning rate :math:`\ell`, search seed :math:`k`, task :math:`t`, and
:math:`\tilde v_{k,t}` its median over every (configuration, learning rate) of the search on
that dataset. The score of :math:`(c, \ell)` is the mean over seeds and tasks of the signed
relative change against that median,

.. math:: S(c, \ell) = \frac{1}{K T} \sum_{k,t} \sigma_t\,
          \frac{v_{c,\ell,k,t} - \tilde v_{k,t}}{|\tilde v_{k,t}|}
          \qquad (\sigma_t = +1 \text{ for AUC / accuracy}, -1 \text{ for RMSE}),

the study's own primary metric (a task-averaged relative change, :mod:`~mtlbook.experiments.design`)
measured on validation data. The chosen rate is :math:`\arg\max_\ell S(c, \ell)`, ties going to
the smaller rate (:func:`select_lr`). The median makes the score comparable across tasks in
different units and does not move when one configuration diverges.

**Trials.** Every configuration trains ``len(LR_GRID) * len(SEARCH_SEEDS)`` models on the
search. The tuned static-weight baseline ``ple_ls_tuned`` differs in one way, by design: each
of its cells (search and evaluation alike) trains ``LS_TRIALS`` weight vectors and keeps the one
best on validation, so it sees ``LS_TRIALS`` times as many validation trials as every other
method. Its search score is the validation metric of the weight trial it kept, which favours it
slightly on the search (the pick and the score share the split); this only affects which
learning rate it gets.

:data:`CHOSEN_LR` holds the rates picked from the committed search tables
:data:`SEARCH_TABLES` (a test checks that :func:`select_lr` on each table gives exactly these
values). The searches ran in five stages: the real problems' primary configurations, the
gradient-aggregation methods, the synthetic suites and two-task census, adaTT's knobs with the
first edition's balancers and the single-task models, then the scale check (two-task census on
the full split).
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from functools import partial
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from mtlbook.experiments.study_configs import StudySize

__all__ = [
    "CHOSEN_LR",
    "LR_GRID",
    "SEARCH_SEEDS",
    "SEARCH_TABLES",
    "chosen_config",
    "evaluation_lr",
    "lr_source",
    "lr_scores",
    "run_lr_search",
    "search_config",
    "search_rows",
    "select_lr",
]

#: The learning rates every configuration is tried with (log-spaced, about half a decade apart).
LR_GRID: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
#: The search seeds: disjoint from the evaluation seeds 0..N-1 of the study.
SEARCH_SEEDS: tuple[int, ...] = (100, 101)
#: The committed search tables (package data), in the order they were run. Each is scored on
#: its own (:func:`select_lr`: relative to its own median), so a later search never moves an
#: earlier choice.
SEARCH_TABLES: tuple[str, ...] = ("study_lr_search.csv", "study_lr_search_methods.csv", "study_lr_search_suites.csv",
                                  "study_lr_search_ablations.csv", "study_lr_search_census_full.csv")  # fmt: skip
#: The learning rate chosen for each (configuration, dataset) by :func:`select_lr` on the
#: committed search tables :data:`SEARCH_TABLES`.
CHOSEN_LR: dict[tuple[str, str], float] = {
    ("ple_uw", "census_many"): 0.003,
    ("ple_uw_adatt", "census_many"): 0.003,
    ("adatt_lambda0", "census_many"): 0.003,
    ("ple_uw_freeze", "census_many"): 0.003,
    ("ple_ls_tuned", "census_many"): 0.003,
    ("adatt_no_cofreeze", "census_many"): 0.003,
    ("ple_uw", "cmapss"): 0.01,
    ("ple_uw_adatt", "cmapss"): 0.01,
    ("adatt_lambda0", "cmapss"): 0.01,
    ("ple_uw_freeze", "cmapss"): 0.01,
    ("ple_ls_tuned", "cmapss"): 0.03,
    ("adatt_no_cofreeze", "cmapss"): 0.01,
    # the gradient-aggregation methods, searched later (mtlbook/tables/study_lr_search_methods.csv)
    ("ple_mgda", "census_many"): 0.03,
    ("ple_cagrad", "census_many"): 0.003,
    ("ple_nash", "census_many"): 0.003,
    ("ple_aligned", "census_many"): 0.003,
    ("ple_upgrad", "census_many"): 0.003,
    ("ple_rlw", "census_many"): 0.003,
    ("ple_mgda", "cmapss"): 0.01,
    ("ple_cagrad", "cmapss"): 0.03,
    ("ple_nash", "cmapss"): 0.003,
    ("ple_aligned", "cmapss"): 0.003,
    ("ple_upgrad", "cmapss"): 0.01,
    ("ple_rlw", "cmapss"): 0.03,
    # the synthetic suites and two-task census, searched after the real problems (mtlbook/tables/study_lr_search_suites.csv)
    ("adatt_lambda0", "suite_conflict"): 0.01,
    ("adatt_no_cofreeze", "suite_conflict"): 0.01,
    ("ple_adatt", "suite_conflict"): 0.03,
    ("ple_equal", "suite_conflict"): 0.03,
    ("ple_ls_tuned", "suite_conflict"): 0.03,
    ("ple_uw", "suite_conflict"): 0.01,
    ("ple_uw_adatt", "suite_conflict"): 0.01,
    ("ple_uw_freeze", "suite_conflict"): 0.01,
    ("adatt_lambda0", "suite_benign"): 0.01,
    ("adatt_no_cofreeze", "suite_benign"): 0.01,
    ("ple_adatt", "suite_benign"): 0.01,
    ("ple_equal", "suite_benign"): 0.01,
    ("ple_ls_tuned", "suite_benign"): 0.01,
    ("ple_uw", "suite_benign"): 0.01,
    ("ple_uw_adatt", "suite_benign"): 0.01,
    ("ple_uw_freeze", "suite_benign"): 0.01,
    ("adatt_lambda0", "census"): 0.01,
    ("adatt_no_cofreeze", "census"): 0.003,
    ("ple_adatt", "census"): 0.01,
    ("ple_equal", "census"): 0.003,
    ("ple_ls_tuned", "census"): 0.01,
    ("ple_uw", "census"): 0.003,
    ("ple_uw_adatt", "census"): 0.003,
    ("ple_uw_freeze", "census"): 0.01,
    # adaTT's knobs, the first edition's balancers and single-task models, searched last (mtlbook/tables/study_lr_search_ablations.csv)
    ("adatt_T0.5", "suite_conflict"): 0.01,
    ("adatt_T2", "suite_conflict"): 0.01,
    ("adatt_no_blocking", "suite_conflict"): 0.01,
    ("adatt_no_prior", "suite_conflict"): 0.01,
    ("adatt_zero_logit", "suite_conflict"): 0.01,
    ("ple_dwa", "suite_conflict"): 0.03,
    ("ple_gradnorm", "suite_conflict"): 0.03,
    ("ple_pcgrad", "suite_conflict"): 0.03,
    ("single_task", "suite_conflict"): 0.03,
    ("adatt_T0.5", "suite_benign"): 0.01,
    ("adatt_T2", "suite_benign"): 0.01,
    ("adatt_no_blocking", "suite_benign"): 0.01,
    ("adatt_no_prior", "suite_benign"): 0.01,
    ("adatt_zero_logit", "suite_benign"): 0.01,
    ("ple_dwa", "suite_benign"): 0.01,
    ("ple_gradnorm", "suite_benign"): 0.01,
    ("ple_pcgrad", "suite_benign"): 0.01,
    ("single_task", "suite_benign"): 0.01,
    ("adatt_T0.5", "census"): 0.003,
    ("adatt_T2", "census"): 0.003,
    ("adatt_no_blocking", "census"): 0.003,
    ("adatt_no_prior", "census"): 0.003,
    ("adatt_zero_logit", "census"): 0.003,
    ("ple_dwa", "census"): 0.003,
    ("ple_gradnorm", "census"): 0.003,
    ("ple_pcgrad", "census"): 0.003,
    ("single_task", "census"): 0.01,
    # the scale check: census-income two-task on the full split (mtlbook/tables/study_lr_search_census_full.csv)
    ("adatt_lambda0", "census_full"): 0.003,
    ("adatt_no_cofreeze", "census_full"): 0.003,
    ("ple_ls_tuned", "census_full"): 0.003,
    ("ple_uw", "census_full"): 0.003,
    ("ple_uw_adatt", "census_full"): 0.003,
    ("ple_uw_freeze", "census_full"): 0.003,
}

_NAME = re.compile(r"^(?P<config>.+)@lr=(?P<lr>[0-9.eE+-]+)$")


def search_config(name: str, lr: float):
    """The study configuration ``name`` at learning rate ``lr``, named ``"{name}@lr={lr:g}"``."""
    from mtlbook.experiments.study import get_config

    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    return replace(get_config(name), name=f"{name}@lr={lr:g}", lr=float(lr))


def lr_source(name: str) -> str:
    """The configuration whose chosen learning rate ``name`` is evaluated at.

    A method is evaluated at its own chosen rate. The design's controls (``kind ==
    "control"``: ``adatt_lambda0``, ``ple_uw_freeze``, ``adatt_no_cofreeze``) are instruments,
    not methods: they take the reference's rate (``ple_uw``), and adaTT's ablations (``kind ==
    "ablation"``) take default adaTT's, so that each contrast of
    :mod:`~mtlbook.experiments.design` changes the one part it isolates and not the learning
    rate as well. They are still searched like everything else (:data:`CHOSEN_LR`), so a
    reader can see where their own search would have picked another rate.
    """
    from mtlbook.experiments.study_configs import CANDIDATE, REFERENCE, get_config

    kind = get_config(name).kind
    return REFERENCE if kind == "control" else CANDIDATE if kind == "ablation" else name


def evaluation_lr(name: str, dataset: str, chosen: dict[tuple[str, str], float] | None = None) -> float:
    """The learning rate ``name`` is evaluated at on ``dataset``: ``chosen[(lr_source(name), dataset)]``."""
    chosen = CHOSEN_LR if chosen is None else chosen
    source = lr_source(name)
    if (source, dataset) not in chosen:
        known = sorted({c for c, d in chosen if d == dataset})
        raise ValueError(f"no chosen learning rate for config {source!r} on dataset {dataset!r} "
                         f"(needed by {name!r}); known: {known}")  # fmt: skip
    return float(chosen[(source, dataset)])


def chosen_config(name: str, dataset: str, chosen: dict[tuple[str, str], float] | None = None):
    """The study configuration ``name`` at its :func:`evaluation_lr` on ``dataset`` (same name)."""
    from mtlbook.experiments.study import get_config

    return replace(get_config(name), lr=evaluation_lr(name, dataset, chosen))


def search_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The search table with two more columns: ``base_config`` and ``lr`` (parsed from the names)."""
    parsed = table["config"].str.extract(_NAME)
    if parsed["config"].isna().any():
        bad = sorted(set(table.loc[parsed["config"].isna(), "config"]))
        raise ValueError(f"search table configs must look like 'name@lr=0.01', got {bad}")
    return table.assign(base_config=parsed["config"].to_numpy(), lr=parsed["lr"].astype(float).to_numpy())


def lr_scores(search: pd.DataFrame) -> pd.DataFrame:
    r"""Per (dataset, base_config, lr): ``score`` :math:`S(c, \ell)` in % and the seeds ``n``.

    ``search`` is a search table (with or without the columns of :func:`search_rows`).
    """
    from mtlbook.experiments.study import HIGHER_IS_BETTER, relative_improvement

    rows = search if {"base_config", "lr"} <= set(search.columns) else search_rows(search)
    rows = rows.loc[(rows["status"] == "ok") & np.isfinite(rows["value"].astype(float))].copy()
    if rows.empty:
        raise ValueError("search has no finished rows")
    median = rows.groupby(["dataset", "seed", "task"])["value"].transform("median")
    higher = rows["metric"].map(HIGHER_IS_BETTER)
    if higher.isna().any():
        raise ValueError(f"unknown metrics {sorted(set(rows.loc[higher.isna(), 'metric']))}")
    rows["change"] = 100.0 * relative_improvement(rows["value"].to_numpy(float), median.to_numpy(float),
                                                  higher.to_numpy(bool))  # fmt: skip
    per_seed = rows.groupby(["dataset", "base_config", "lr", "seed"], sort=False)["change"].mean().reset_index()
    out = per_seed.groupby(["dataset", "base_config", "lr"], sort=False).agg(score=("change", "mean"),
                                                                            n=("seed", "size")).reset_index()  # fmt: skip
    return out.sort_values(["dataset", "base_config", "lr"], kind="stable").reset_index(drop=True)


def select_lr(search: pd.DataFrame) -> pd.DataFrame:
    """:func:`lr_scores` with a ``chosen`` column: the argmax of ``score`` per (dataset,
    base_config), ties to the smaller learning rate."""
    scores = lr_scores(search)
    scores["chosen"] = False
    for _, group in scores.groupby(["dataset", "base_config"], sort=False):
        ordered = group.sort_values("lr", kind="stable")
        best = ordered.index[int(np.argmax(ordered["score"].to_numpy(float)))]
        scores.loc[best, "chosen"] = True
    return scores


def chosen_table(search: pd.DataFrame) -> dict[tuple[str, str], float]:
    """``{(config, dataset): lr}`` of :func:`select_lr`."""
    picked = select_lr(search)
    picked = picked.loc[picked["chosen"]]
    return {(c, d): float(lr) for c, d, lr in zip(picked["base_config"], picked["dataset"], picked["lr"])}


def run_lr_search(
    path: str | os.PathLike[str] | None,
    configs: Sequence[str],
    datasets: Iterable[str],
    lrs: Sequence[float] = LR_GRID,
    seeds: Sequence[int] = SEARCH_SEEDS,
    size: str | StudySize = "small",
    n_jobs: int = 1,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Run the search cells (validation scores) through :func:`~mtlbook.experiments.study.run_grid`
    (resumable, one row per (cell, task)) and return the table with :func:`search_rows`' columns."""
    from mtlbook.experiments.study import run_cell, run_grid

    if not lrs:
        raise ValueError("lrs must hold at least one learning rate")
    cells = [search_config(name, lr) for name in configs for lr in lrs]
    table = run_grid(path, configs=cells, datasets=datasets, seeds=list(seeds), size=size,
                     train_fn=partial(run_cell, score_split="val"), n_jobs=n_jobs, log=log)  # fmt: skip
    return search_rows(table)
