r"""Chapter 3's census-income tables: two tasks with and without leaks, and many tasks.

Two stored tables, written by ``benchmarks/census_results.py`` and read by the chapter:

* **two-task** (``mtlbook/tables/census_two_task.csv``): Shared-Bottom, MMoE and PLE on the
  papers' pair (``income``, ``never_married``) in three variants (:data:`TWO_TASK_VARIANTS`):
  the papers' inputs, the same without the marital-status proxies (``leak_free=True``), and
  the papers' inputs on a split that keeps identical rows on one side (``dedupe=True``,
  MMoE only: :data:`DEDUPED_MODELS`).
* **many-task** (``mtlbook/tables/census_many_task.csv``): the same three models and one
  single-task network per task on ``tasks="all"``.

A *cell* is (table, variant, model, seed). Seed :math:`s` sets both the data split
(``load_census_income(seed=s)``) and the initial weights and batch order, so the spread over
seeds includes the split. Every cell trains on the full train split, selects the epoch with
the lowest validation loss and scores the test split (:func:`mtlbook.experiments.model_family.evaluate_tasks`:
AUC for binary tasks, accuracy for the multi-class one, MSE of the standardised target for
regression). :func:`run_cell` is deterministic on one CPU thread, so the chapter can re-run
any cell and compare it with its stored row.

Summary: :func:`summarise` gives, with :func:`mtlbook.experiments.study.t_interval`, the mean and the two-sided Student-t interval
:math:`\bar x \pm t_{0.975,\,n-1}\, s / \sqrt n` over seeds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "COLUMNS",
    "MANY_TASK_MODELS",
    "SETTINGS",
    "TABLES",
    "TWO_TASK_MODELS",
    "TWO_TASK_VARIANTS",
    "cells",
    "load_census_variant",
    "run_cell",
    "run_table",
    "summarise",
]

#: Loader arguments of each variant.
TWO_TASK_VARIANTS: dict[str, dict[str, Any]] = {
    "papers": {"leak_free": False},
    "leak_free": {"leak_free": True},
    "deduped": {"leak_free": False, "dedupe": True},
}
TWO_TASK_MODELS: tuple[str, ...] = ("shared_bottom", "mmoe", "ple")
#: The deduplicated split is measured with MMoE only (CPU budget: it answers "how much do
#: duplicates move the AUC", which one architecture shows).
DEDUPED_MODELS: tuple[str, ...] = ("mmoe",)
MANY_TASK_MODELS: tuple[str, ...] = ("single_task", "shared_bottom", "mmoe", "ple")
TABLES: tuple[str, ...] = ("two_task", "many_task")
#: Training settings of every cell (the chapter's census settings, on the full train split).
SETTINGS: dict[str, Any] = {"epochs": 5, "lr": 5e-3, "batch_size": 512, "width": 16}
#: The columns of both stored tables (one row per cell and task).
COLUMNS: tuple[str, ...] = (
    "table", "variant", "model", "seed", "task", "kind", "metric", "value",
    "n_train", "n_features", "epochs", "seconds",
)


def load_census_variant(table: str, variant: str, seed: int, path=None, verify_checksum: bool = True):
    """The :class:`~mtlbook.data.census.CensusIncome` problem of one cell."""
    from mtlbook.data.census import load_census_income

    if table == "two_task":
        if variant not in TWO_TASK_VARIANTS:
            raise ValueError(f"variant must be one of {tuple(TWO_TASK_VARIANTS)} for table 'two_task', got {variant!r}")
        return load_census_income(path, seed=seed, verify_checksum=verify_checksum, **TWO_TASK_VARIANTS[variant])
    if table == "many_task":
        if variant != "all":
            raise ValueError(f"variant must be 'all' for table 'many_task', got {variant!r}")
        return load_census_income(path, seed=seed, tasks="all", verify_checksum=verify_checksum)
    raise ValueError(f"table must be one of {TABLES}, got {table!r}")


def run_cell(table: str, variant: str, model: str, seed: int, *, settings: dict[str, Any] | None = None,
             path=None, verify_checksum: bool = True) -> "pd.DataFrame":
    """Train and score one cell; one row per task with the columns :data:`COLUMNS`.

    ``settings`` overrides entries of :data:`SETTINGS`; ``path`` and ``verify_checksum`` go to
    the loader.
    """
    from mtlbook.experiments import model_family as mf

    allowed = TWO_TASK_MODELS if table == "two_task" else MANY_TASK_MODELS
    if model not in allowed:
        raise ValueError(f"model must be one of {allowed} for table {table!r}, got {model!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    config = dict(SETTINGS, **(settings or {}))
    data = load_census_variant(table, variant, seed, path, verify_checksum)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # results do not depend on the machine's core count
    try:
        started = time.perf_counter()
        scores, _ = mf.compare_models(
            data.train, data.val, data.test, (model,), width=config["width"], epochs=config["epochs"],
            lr=config["lr"], batch_size=config["batch_size"], seed=seed,
        )
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    kinds = {s.name: s.kind for s in data.task_specs}
    scores = scores.assign(
        table=table, variant=variant, seed=seed, kind=scores["task"].map(kinds), n_train=len(data.train),
        n_features=data.n_features, epochs=config["epochs"], seconds=seconds,
    )
    return scores[list(COLUMNS)]


def cells(seeds: Sequence[int], tables: Sequence[str] = TABLES) -> list[tuple[str, str, str, int]]:
    """All cells, seed-major (every cell of seed 0 first), so a stopped run has whole seeds."""
    out = []
    for seed in seeds:
        if "two_task" in tables:
            for variant in TWO_TASK_VARIANTS:
                models = DEDUPED_MODELS if variant == "deduped" else TWO_TASK_MODELS
                out.extend(("two_task", variant, m, seed) for m in models)
        if "many_task" in tables:
            out.extend(("many_task", "all", m, seed) for m in MANY_TASK_MODELS)
    return out


def run_table(out_dir: Path, seeds: Sequence[int], tables: Sequence[str] = TABLES, *,
              log: Callable[[str], None] | None = None, path=None) -> None:
    """Run every missing cell and append its rows to ``out_dir/census_<table>.csv``.

    Cells already in the files are skipped, so a stopped run resumes where it stopped.
    """
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done: set[tuple] = set()
    for table in tables:
        file = out_dir / f"census_{table}.csv"
        if file.exists():
            old = pd.read_csv(file)
            done.update(zip(old["table"], old["variant"], old["model"], old["seed"]))
    for cell in cells(seeds, tables):
        if cell in done:
            continue
        rows = run_cell(*cell, path=path)
        file = out_dir / f"census_{cell[0]}.csv"
        rows.to_csv(file, mode="a", header=not file.exists(), index=False, float_format="%.10g")
        if log is not None:
            log(f"{cell}: {rows['seconds'].iloc[0]:.1f} s, " + ", ".join(
                f"{t}={v:.4f}" for t, v in zip(rows["task"], rows["value"])))


def summarise(table: "pd.DataFrame") -> "pd.DataFrame":
    """Mean, t-interval and number of seeds per (variant, model, task)."""
    import pandas as pd

    from mtlbook.experiments.study import t_interval

    rows = []
    for (variant, model, task), group in table.groupby(["variant", "model", "task"], sort=False):
        mean, low, high = t_interval(group["value"].to_numpy())
        rows.append({"variant": variant, "model": model, "task": task, "metric": group["metric"].iloc[0],
                     "mean": mean, "low": low, "high": high, "seeds": len(group)})
    return pd.DataFrame(rows)
