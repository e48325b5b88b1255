r"""Chapter 8: does adaTT help? A grid of trainings, a tidy results table, and its statistics.

**The grid.** Every *cell* is one (configuration, dataset, seed): a PLE model trained by
:class:`~mtlbook.train.Trainer` and scored on the test split. A configuration
(:class:`StudyConfig`, the list :data:`CONFIGS`) fixes the loss balancer and the adaTT
settings; a size (:class:`StudySize`, :data:`SIZES`) fixes models, epochs and rows. Within one
seed every configuration sees the same data split, the same initial weights and the same
batch order, so two configurations can be compared *paired by seed*.

**Where the parts live.** This module holds the data and one cell and re-exports every
name of the study: the configurations, sizes and constants are in
:mod:`mtlbook.experiments.study_configs`, the results table and :func:`run_grid` in
:mod:`mtlbook.experiments.study_runner`, the statistics and :func:`verdict` in
:mod:`mtlbook.experiments.study_statistics` and the figures in
:mod:`mtlbook.experiments.study_plots`.

pandas and scipy are needed here; matplotlib is imported inside the plotting functions.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from mtlbook.data.batch import MultiTaskDataset
from mtlbook.experiments.study_configs import (  # noqa: F401 - re-exported
    ABLATION_CONFIGS,
    ALL_DATASETS,
    CANDIDATE,
    COLUMNS,
    CONFIG_NAMES,
    CONFIGS,
    DATASETS,
    HIGHER_IS_BETTER,
    LS_TRIALS,
    PRIMARY_CONFIGS,
    REAL_DATASETS,
    REAL_PRIMARY_CONFIGS,
    REAL_SEEDS,
    REAL_SEEDS_EXTENDED,
    REAL_SETTINGS,
    REFERENCE,
    SCALE_DATASETS,
    SCALE_SETTINGS,
    METHOD_CONFIGS,
    METHOD_SEEDS,
    SECONDARY_CONFIGS,
    SINGLE_TASK,
    SIZES,
    StudyConfig,
    StudySize,
    WEIGHTING_CONFIGS,
    get_config,
    get_size,
)
from mtlbook.experiments.study_plots import plot_paired, plot_task_means  # noqa: F401 - re-exported
from mtlbook.experiments.study_statistics import (  # noqa: F401 - re-exported
    holm,
    mtl_gain,
    paired_differences,
    relative_improvement,
    relative_scores,
    summarize,
    t_interval,
    time_ratios,
    verdict,
    verdict_text,
)
from mtlbook.train.metrics import METRIC_FOR_KIND

__all__ = [
    "COLUMNS",
    "CONFIGS",
    "CONFIG_NAMES",
    "DATASETS",
    "HIGHER_IS_BETTER",
    "REFERENCE",
    "CANDIDATE",
    "SINGLE_TASK",
    "SIZES",
    "CellResult",
    "StudyConfig",
    "StudyData",
    "StudySize",
    "cell_rows",
    "get_config",
    "get_size",
    "holm",
    "load_study_data",
    "load_table",
    "mtl_gain",
    "paired_differences",
    "plot_paired",
    "plot_task_means",
    "relative_improvement",
    "relative_scores",
    "run_cell",
    "run_grid",
    "summarize",
    "t_interval",
    "time_ratios",
    "trainer_config",
    "verdict",
    "verdict_text",
    "write_table",
]


# --------------------------------------------------------------------------- data
@dataclass
class StudyData:
    """The three splits of one (dataset, seed) and the task groups used by adaTT's prior."""

    train: MultiTaskDataset
    val: MultiTaskDataset
    test: MultiTaskDataset
    task_groups: dict[str, tuple[str, ...]]


_DATA_CACHE: dict[tuple[str, int, tuple[int, ...], tuple[int, ...]], StudyData] = {}


def _head(dataset: MultiTaskDataset, rows: int, generator: torch.Generator) -> MultiTaskDataset:
    """``rows`` rows drawn without replacement (all rows, in order, when ``rows`` is 0 or too big)."""
    if rows <= 0 or rows >= len(dataset):
        return dataset
    pick = torch.randperm(len(dataset), generator=generator)[:rows].sort().values
    return dataset.subset(pick)


def load_study_data(dataset: str, seed: int, size: str | StudySize = "small") -> StudyData:
    """The splits of ``dataset`` for ``seed`` (cached: the last few calls are kept).

    * ``"suite_conflict"`` / ``"suite_benign"``: :func:`mtlbook.data.make_suite_regime` with
      ``sum(size.suite_rows)`` rows and seed ``seed``, cut into train / val / test in row order
      (the rows are i.i.d.); the groups are the generator's true groups.
    * ``"census"``: :func:`mtlbook.data.load_census_income` split with seed ``seed``, then
      ``size.census_rows`` rows drawn from each split with a generator seeded by ``seed``;
      one group holding both tasks.
    * ``"census_full"`` (the scale check): the same as ``"census"`` with
      ``size.rows_for("census_full")`` rows (at the small size every row of every split).
    * ``"census_many"``: the same with ``tasks="all"`` (the eight tasks of chapter 3, proxies
      of every task removed from the inputs) and ``size.rows_for("census_many")`` rows; one
      group holding all tasks.
    * ``"cmapss"``: C-MAPSS FD001 as RUL + health state
      (:func:`mtlbook.data.cmapss_health.make_cmapss_health`, engines split into train /
      validation with seed ``seed``). The test split is every cycle of every test engine that
      has a full window (labels from the RUL file), not only each engine's last cycle: 100
      rows would measure a relative change of a few tenths of a percent with too much noise.
      One group holding both tasks.
    """
    size = get_size(size)
    if dataset not in ALL_DATASETS:
        raise ValueError(f"dataset must be one of {ALL_DATASETS}, got {dataset!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    rows_wanted = size.rows_for(dataset)
    key = (dataset, seed, size.suite_rows, rows_wanted)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    if dataset.startswith("suite_"):
        from mtlbook.data import make_suite_regime

        n_train, n_val, n_test = size.suite_rows
        data, truth = make_suite_regime(dataset.removeprefix("suite_"), n_train + n_val + n_test, seed=seed)
        rows = torch.arange(len(data))
        result = StudyData(
            data.subset(rows[:n_train]),
            data.subset(rows[n_train : n_train + n_val]),
            data.subset(rows[n_train + n_val :]),
            {g: tuple(tasks) for g, tasks in truth.groups.items()},
        )
    elif dataset == "cmapss":
        result = _load_cmapss(seed)
    else:
        from mtlbook.data import load_census_income

        census = load_census_income(seed=seed, tasks="all" if dataset == "census_many" else None)
        generator = torch.Generator().manual_seed(seed)
        parts = [_head(split, rows, generator) for split, rows in zip((census.train, census.val, census.test),
                                                                       rows_wanted)]  # fmt: skip
        result = StudyData(parts[0], parts[1], parts[2], {"census": tuple(census.train.task_names)})
        del census  # the full file is ~200 MB as float32; keep only the draws
    if len(_DATA_CACHE) >= 3:
        _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
    _DATA_CACHE[key] = result
    return result


def _load_cmapss(seed: int) -> StudyData:
    """FD001 RUL + health for one seed (engine split), test = every full-window test cycle."""
    from mtlbook.data.cmapss import load_cmapss
    from mtlbook.data.cmapss_health import _dataset, make_cmapss_health, window_features

    raw = load_cmapss("FD001")
    health = make_cmapss_health(raw, seed=seed)
    test = raw.test
    full = (test["cycle"] >= health.window).to_numpy()
    x = window_features(test["unit"].to_numpy(), test["cycle"].to_numpy(),
                        test[list(health.sensors)].to_numpy(np.float64), health.window)[full]  # fmt: skip
    x = (x - health.feature_mean) / health.feature_std
    test_set = _dataset(x, test[full].reset_index(drop=True), health.rul_cap, health.thresholds)
    return StudyData(health.train, health.val, test_set, {"cmapss": tuple(health.train.task_names)})


# --------------------------------------------------------------------------- one cell
@dataclass
class CellResult:
    """What one cell produced: ``metrics`` = ``[(task, metric, value), ...]``, its training time."""

    metrics: list[tuple[str, str, float]]
    wall_time: float
    epochs_run: int = 0
    note: str = ""


def trainer_config(config: StudyConfig, seed: int, size: str | StudySize, task_groups: Mapping | None = None,
                   task_weights: Mapping[str, float] | None = None):  # fmt: skip
    """The :class:`~mtlbook.train.TrainerConfig` of one cell (CPU, float32, no progress bars).

    ``task_weights`` are the fixed weights :math:`c_i` (only the tuned static-weight
    configuration sets them)."""
    from mtlbook.train import TrainerConfig

    size = get_size(size)
    adatt = None
    if config.adatt is not None:
        adatt = {"warmup_epochs": size.adatt_warmup_epochs, "freeze_epoch": size.adatt_freeze_epoch,
                 "grad_interval": size.adatt_grad_interval, "extraction": size.adatt_extraction,
                 "task_groups": None if task_groups is None else {g: list(t) for g, t in task_groups.items()}}  # fmt: skip
        adatt.update(dict(config.adatt))
    return TrainerConfig(
        phase1_epochs=size.phase1_epochs,
        phase2_epochs=size.phase2_epochs,
        batch_size=size.batch_size,
        eval_batch_size=8192,
        lr=size.lr if config.lr is None else float(config.lr),
        warmup_epochs=size.warmup_epochs,
        cosine_t0=max(size.phase1_epochs - size.warmup_epochs, 1),
        cosine_t_mult=1,
        phase2_warmup_epochs=0,
        balancing=config.balancing,
        adatt=adatt,
        adatt_gate_cofreeze=config.cofreeze,
        gate_freeze_epoch=size.adatt_freeze_epoch if config.gate_freeze else None,
        task_weights={} if task_weights is None else {t: float(w) for t, w in task_weights.items()},
        amp="off",
        device="cpu",
        patience=size.patience,
        seed=seed,
        progress=False,
    )


def _train_and_score(config: StudyConfig, train: MultiTaskDataset, val: MultiTaskDataset, test: MultiTaskDataset,
                     seed: int, size: StudySize, task_groups: Mapping | None,
                     task_weights: Mapping[str, float] | None = None,
                     val_scores: dict[str, float] | None = None) -> tuple[dict[str, float], float, int, str]:  # fmt: skip
    """Train one model and score it on ``test`` (and, when ``val_scores`` is a dict, fill it
    with the validation metrics of the trained model)."""
    from mtlbook.models import PLE
    from mtlbook.train import Trainer

    torch.manual_seed(seed)  # same initial weights for every configuration of this seed
    model = PLE(train.n_features, train.task_specs, **size.model_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(model, trainer_config(config, seed, size, task_groups, task_weights))
        started = time.perf_counter()
        history = trainer.fit(train, val)
        seconds = time.perf_counter() - started
        scores = trainer.evaluate(test)
        if val_scores is not None:
            val_scores.update(trainer.evaluate(val))
    note = "; ".join(sorted({f"{w.category.__name__}: {w.message}" for w in caught}))
    return scores, seconds, len(history), note


def _initial_losses(train: MultiTaskDataset, seed: int, size: StudySize) -> dict[str, float]:
    """Per-task training loss :math:`L_i(0)` of the freshly initialised model of ``seed``."""
    from mtlbook.models import PLE
    from mtlbook.train import Trainer

    torch.manual_seed(seed)
    model = PLE(train.n_features, train.task_specs, **size.model_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = Trainer(model, trainer_config(get_config("ple_equal"), seed, size)).evaluate(train)
    return {s.name: float(scores[f"{s.name}/loss"]) for s in train.task_specs}


def _run_tuned_weights(config: StudyConfig, data: StudyData, seed: int, size: StudySize) -> CellResult:
    """The tuned static-weight cell: :data:`LS_TRIALS` trainings, the best on validation is scored."""
    from mtlbook.experiments.static_weights import select_trial, weight_trials

    specs = data.train.task_specs
    trials = weight_trials(_initial_losses(data.train, seed, size), LS_TRIALS, seed)
    val_metrics, test_metrics, total, epochs, notes = [], [], 0.0, 0, []
    for weights in trials:
        val_scores: dict[str, float] = {}
        scores, seconds, n_epochs, note = _train_and_score(config, data.train, data.val, data.test, seed, size,
                                                           None, weights, val_scores)  # fmt: skip
        metric = {s.name: METRIC_FOR_KIND[s.kind] for s in specs}
        val_metrics.append({t: (m, float(val_scores[f"{t}/{m}"])) for t, m in metric.items()})
        test_metrics.append([(t, m, float(scores[f"{t}/{m}"])) for t, m in metric.items()])
        total, epochs = total + seconds, epochs + n_epochs
        notes += [note] if note else []
    best = select_trial(val_metrics, HIGHER_IS_BETTER)
    chosen = ", ".join(f"{t}={w:.4g}" for t, w in trials[best].items())
    notes.append(f"static weights: trial {best} of {len(trials)} chosen on validation ({chosen})")
    return CellResult(test_metrics[best], total, epochs, "; ".join(notes))


def run_cell(config: StudyConfig | str, dataset: str, seed: int, size: str | StudySize = "small",
             score_split: str = "test") -> CellResult:  # fmt: skip
    """Train and score one cell of the grid on one CPU thread.

    ``score_split="val"`` scores the validation split instead of the test split (the lr
    search of :mod:`mtlbook.experiments.lr_search`; the test split is then never evaluated).
    The size's settings for ``dataset`` (:meth:`StudySize.for_dataset`) apply.

    A multi-task configuration trains one PLE on all tasks; the single-task configuration
    trains one PLE per task (same architecture, one tower) with equal weighting, and its
    ``wall_time`` is the sum over tasks. Every model of seed ``seed`` starts from
    ``torch.manual_seed(seed)`` and the trainer's loader is seeded with ``seed``, so a cell
    gives the same numbers every time it runs. Warnings raised during training are returned
    in ``note`` instead of being printed. The tuned static-weight configuration trains
    :data:`LS_TRIALS` models (one per weight trial), keeps the one with the best validation
    score and counts all of them in ``wall_time``.
    """
    config = get_config(config) if isinstance(config, str) else config
    if not isinstance(config, StudyConfig):
        raise TypeError(f"config must be a StudyConfig or a config name, got {type(config).__name__}")
    if score_split not in ("test", "val"):
        raise ValueError(f"score_split must be 'test' or 'val', got {score_split!r}")
    size = get_size(size)
    data = load_study_data(dataset, seed, size)
    if score_split == "val":
        data = StudyData(data.train, data.val, data.val, data.task_groups)
    size = size.for_dataset(dataset)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if config.single_task:
            from mtlbook.experiments.model_family import single_task_view

            metrics, total, epochs, notes = [], 0.0, 0, []
            for spec in data.train.task_specs:
                views = [single_task_view(d, spec.name) for d in (data.train, data.val, data.test)]
                scores, seconds, n_epochs, note = _train_and_score(config, *views, seed, size, None)
                metric = METRIC_FOR_KIND[spec.kind]
                metrics.append((spec.name, metric, float(scores[f"{spec.name}/{metric}"])))
                total, epochs = total + seconds, epochs + n_epochs
                notes += [note] if note else []
            return CellResult(metrics, total, epochs, "; ".join(notes))
        if config.tuned_weights:
            return _run_tuned_weights(config, data, seed, size)
        scores, seconds, epochs, note = _train_and_score(config, data.train, data.val, data.test, seed, size,
                                                         data.task_groups)  # fmt: skip
        metrics = [(s.name, METRIC_FOR_KIND[s.kind], float(scores[f"{s.name}/{METRIC_FOR_KIND[s.kind]}"]))
                   for s in data.train.task_specs]  # fmt: skip
        return CellResult(metrics, seconds, epochs, note)
    finally:
        torch.set_num_threads(threads)



# --------------------------------------------------------------------------- the grid runner
#: Names of :mod:`mtlbook.experiments.study_runner` re-exported here on first use (the runner
#: imports :func:`run_cell` from this module, so an import at load time would be circular).
_RUNNER_NAMES = frozenset({"TrainFn", "cell_rows", "load_table", "run_grid", "write_table"})


def __getattr__(name: str):
    """``study.run_grid`` and ``from mtlbook.experiments.study import run_grid`` (PEP 562)."""
    if name in _RUNNER_NAMES:
        from mtlbook.experiments import study_runner

        return getattr(study_runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _RUNNER_NAMES)
