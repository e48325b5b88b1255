r"""Chapter 8's grid runner and its results table on disk (overview: :mod:`mtlbook.experiments.study`).

**The table** (:data:`COLUMNS`) has one row per (cell, task) with ``value`` the test metric
(AUC, RMSE or accuracy, :data:`HIGHER_IS_BETTER` says which way is better), ``wall_time``
the cell's training seconds, ``status`` ``"ok"`` or ``"failed"`` and ``error`` the message
of a failed cell (one row with an empty task). :func:`run_grid` writes it after every cell
(temp file + :func:`~mtlbook.train.checkpoint.atomic_write_bytes`, so a crash never leaves half a file) and, when started
again, skips every cell whose rows say ``"ok"``.

"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

from mtlbook.experiments.study import (
    COLUMNS,
    CONFIG_NAMES,
    CONFIGS,
    ALL_DATASETS,
    DATASETS,
    CellResult,
    StudyConfig,
    StudySize,
    get_config,
    get_size,
    run_cell,
)
from mtlbook.experiments.study_configs import _DTYPES, _empty_table, _normalise
from mtlbook.train.checkpoint import atomic_write_bytes

__all__ = [
    "TrainFn",
    "cell_rows",
    "load_table",
    "run_grid",
    "write_table",
]


# --------------------------------------------------------------------------- the table on disk
def load_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a results table written by :func:`run_grid` (floats read back bit-exactly)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column, dtype in _DTYPES.items():
        if column in table.columns and dtype == "float64":
            # Python's float() parses the shortest repr pandas wrote back to the same double
            table[column] = [math.nan if text == "" else float(text) for text in table[column]]
        elif column in table.columns and dtype == "int64":
            table[column] = [int(text) for text in table[column]]
    return _normalise(table)


def write_table(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` to ``path`` atomically (:func:`~mtlbook.train.checkpoint.atomic_write_bytes`)."""
    return atomic_write_bytes(_normalise(table).to_csv(index=False).encode("utf-8"), path)


def cell_rows(config: str, dataset: str, seed: int, size: str, result: CellResult | BaseException) -> pd.DataFrame:
    """The table rows of one finished cell, or the single ``"failed"`` row of one that raised."""
    if isinstance(result, BaseException):
        message = f"{type(result).__name__}: {result}".replace("\n", " ")
        rows = [{"config": config, "dataset": dataset, "seed": seed, "task": "", "metric": "", "value": math.nan,
                 "wall_time": math.nan, "epochs_run": 0, "size": size, "status": "failed", "error": message}]  # fmt: skip
    else:
        rows = [{"config": config, "dataset": dataset, "seed": seed, "task": task, "metric": metric,
                 "value": float(value), "wall_time": float(result.wall_time), "epochs_run": int(result.epochs_run),
                 "size": size, "status": "ok", "error": result.note.replace("\n", " ")}
                for task, metric, value in result.metrics]  # fmt: skip
        if not rows:
            raise ValueError(f"cell ({config}, {dataset}, {seed}) returned no metrics")
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _sort(table: pd.DataFrame, configs: Sequence[str]) -> pd.DataFrame:
    order = {name: i for i, name in enumerate(list(configs) + [c for c in CONFIG_NAMES if c not in configs])}
    dataset_order = {name: i for i, name in enumerate(ALL_DATASETS)}
    keys = pd.DataFrame({
        "d": table["dataset"].map(lambda d: dataset_order.get(d, len(ALL_DATASETS))),
        "dn": table["dataset"], "s": table["seed"],
        "c": table["config"].map(lambda c: order.get(c, len(order))), "cn": table["config"],
    })  # fmt: skip
    index = keys.sort_values(["d", "dn", "s", "c", "cn"], kind="stable").index
    return table.loc[index].reset_index(drop=True)


TrainFn = Callable[[StudyConfig, str, int, StudySize], CellResult]


def _run_safely(train_fn: TrainFn, config: StudyConfig, dataset: str, seed: int,
                size: StudySize) -> tuple[StudyConfig, str, int, CellResult | BaseException]:  # fmt: skip
    """One cell, with its exception returned instead of raised (a failing cell must not end the grid)."""
    try:
        return config, dataset, seed, train_fn(config, dataset, seed, size)
    except Exception as error:
        return config, dataset, seed, error


def run_grid(
    path: str | os.PathLike[str] | None,
    configs: Iterable[StudyConfig | str] = CONFIGS,
    datasets: Iterable[str] = DATASETS,
    seeds: Iterable[int] | None = None,
    size: str | StudySize = "small",
    *,
    train_fn: TrainFn = run_cell,
    retry_failed: bool = True,
    n_jobs: int = 1,
    log: Callable[[str], None] | None = None,
    backend: str = "loky",
) -> pd.DataFrame:
    """Run every (config, dataset, seed) cell not yet done and return the whole table.

    Args:
        path: the CSV to resume from and write to after every cell (``None``: memory only).
            Cells whose rows have ``status == "ok"`` are skipped; failed cells are run again
            when ``retry_failed``. Rows of other cells already in the file are kept.
        configs, datasets: what to run (names or :class:`StudyConfig`).
        seeds: the seeds (default: ``size.seeds``).
        size: ``"small"``, ``"full"`` or a :class:`StudySize`.
        train_fn: ``train_fn(config, dataset, seed, size) -> CellResult`` (default
            :func:`run_cell`; tests pass a fake). An exception is recorded as one
            ``"failed"`` row with its message and the grid goes on.
        n_jobs: cells run at once. 1: in this process, in order; more: ``joblib.Parallel``
            with its default process backend (loky), results recorded as they arrive, so
            the file is written after every cell either way. Every cell trains on one
            thread and does not depend on the others, so the table is the same for any
            ``n_jobs`` (only the ``wall_time`` column differs).
        log: called with one line per finished cell.
        backend: the joblib backend of the parallel run (``joblib.parallel_config(backend=...)``):
            ``"loky"`` (local processes, the default), or ``"dask"`` to send the cells to the
            workers of the ``dask.distributed.Client`` created beforehand (a cluster of one or
            many machines). With ``"dask"`` the cells always go through joblib, and joblib's
            Dask backend spreads them over every worker of the cluster whatever ``n_jobs``
            says. Any other registered joblib backend name works too.
    """
    size = get_size(size)
    configs = [get_config(c) if isinstance(c, str) else c for c in configs]
    if not all(isinstance(c, StudyConfig) for c in configs):
        raise TypeError("configs must hold StudyConfig objects or config names")
    datasets = list(datasets)
    bad = [d for d in datasets if d not in ALL_DATASETS]
    if bad:
        raise ValueError(f"datasets must be among {ALL_DATASETS}, got {bad}")
    seeds = list(size.seeds if seeds is None else seeds)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be ints >= 0, got {seeds}")
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
        raise ValueError(f"n_jobs must be an int >= 1, got {n_jobs!r}")
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"backend must be a joblib backend name such as 'loky' or 'dask', got {backend!r}")
    names = [c.name for c in configs]

    table = load_table(path) if path is not None and Path(path).exists() else _empty_table()
    finished = set(zip(table["config"], table["dataset"], table["seed"], table["status"]))
    done = {(c, d, s) for c, d, s, status in finished if status == "ok" or (status == "failed" and not retry_failed)}
    todo = [(c, d, s) for d in datasets for s in seeds for c in configs if (c.name, d, s) not in done]

    def record(config: StudyConfig, dataset: str, seed: int, result: CellResult | BaseException) -> None:
        nonlocal table
        rows = cell_rows(config.name, dataset, seed, size.name, result)
        stale = (table["config"] == config.name) & (table["dataset"] == dataset) & (table["seed"] == seed)
        table = _sort(pd.concat([table.loc[~stale], rows], ignore_index=True) if stale.any() or len(table)
                      else rows, names)  # fmt: skip
        if path is not None:
            write_table(table, path)
        if log is not None:
            what = "FAILED " + rows["error"].iloc[0] if rows["status"].iloc[0] == "failed" else (
                f"{rows['wall_time'].iloc[0]:.1f} s")  # fmt: skip
            log(f"{config.name:>18s} {dataset:>15s} seed {seed:>2d}: {what}")

    if n_jobs == 1 and backend == "loky":
        for config, dataset, seed in todo:
            record(*_run_safely(train_fn, config, dataset, seed, size))
    elif todo:
        from joblib import Parallel, delayed, parallel_config

        with parallel_config(backend=backend):
            parallel = Parallel(n_jobs=n_jobs, return_as="generator_unordered")
            for outcome in parallel(delayed(_run_safely)(train_fn, c, d, s, size) for c, d, s in todo):
                record(*outcome)
    return _normalise(table)

