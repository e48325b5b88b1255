r"""Chapter 8: does adaTT help? A grid of trainings, a tidy results table, and its statistics.

**The grid.** Every *cell* is one (configuration, dataset, seed): a PLE model trained by
:class:`~mtlbook.train.Trainer` and scored on the test split. A configuration
(:class:`StudyConfig`, the list :data:`CONFIGS`) fixes the loss balancer and the adaTT
settings; a size (:class:`StudySize`, :data:`SIZES`) fixes models, epochs and rows. Within one
seed every configuration sees the same data split, the same initial weights and the same
batch order, so two configurations can be compared *paired by seed*.

**The table** (:data:`COLUMNS`) has one row per (cell, task) with ``value`` the test metric
(AUC, RMSE or accuracy, :data:`HIGHER_IS_BETTER` says which way is better), ``wall_time``
the cell's training seconds, ``status`` ``"ok"`` or ``"failed"`` and ``error`` the message
of a failed cell (one row with an empty task). :func:`run_grid` writes it after every cell
(temp file + :func:`os.replace`, so a crash never leaves half a file) and, when started
again, skips every cell whose rows say ``"ok"``.

**Statistics** over :math:`n` seeds with values :math:`x_1..x_n`:

* mean and 95% t-interval (:func:`t_interval`):
  :math:`\bar x \pm t_{0.975,\,n-1}\, s/\sqrt n`, with :math:`s` the sample standard deviation;
* relative improvement of a metric :math:`m` over a reference :math:`m_0`
  (:func:`relative_improvement`), positive when :math:`m` is better:

  .. math:: \Delta(m, m_0) = \sigma\,\frac{m - m_0}{|m_0|}, \qquad
            \sigma = +1 \text{ (higher is better: AUC, accuracy)},\ -1 \text{ (RMSE)};

  the *MTL gain* of the PLE paper (Tang et al. 2020) is :math:`\Delta` of a multi-task model
  over the single-task model of the same task (:func:`mtl_gain`); averaging :math:`\Delta`
  over tasks gives one number per seed for tasks measured in different units;
* paired differences against a reference configuration (:func:`paired_differences`):
  :math:`d_k = x_k - x^{ref}_k` for seed :math:`k`, the t-interval of :math:`\bar d` and the
  two-sided paired t-test :math:`t = \bar d / (s_d/\sqrt n)` (``scipy.stats.ttest_rel``);
* Holm's step-down correction for :math:`m` tests (:func:`holm`, Holm 1979): with the
  p-values sorted, :math:`p_{(1)} \le \dots \le p_{(m)}`,

  .. math:: \tilde p_{(i)} = \max_{j \le i} \min\bigl(1,\ (m - j + 1)\, p_{(j)}\bigr),

  which controls the family-wise error rate at :math:`\alpha` when :math:`\tilde p < \alpha`
  is called significant.

:func:`verdict` turns the paired comparison of PLE + UW + adaTT against PLE + UW into
"helps", "hurts" or "no measurable difference" per dataset (Holm over the datasets), with its
time cost.

pandas and scipy are needed here; matplotlib is imported inside the plotting functions.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from mtlbook.data.batch import MultiTaskDataset
from mtlbook.train.metrics import METRIC_FOR_KIND

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.axes import Axes

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

#: The results table's columns, in this order, in every file :func:`run_grid` writes.
COLUMNS: tuple[str, ...] = (
    "config",  # StudyConfig.name
    "dataset",  # one of DATASETS
    "seed",  # int
    "task",  # task name; "" on the single row of a failed cell
    "metric",  # "auc", "rmse" or "accuracy"
    "value",  # the test metric
    "wall_time",  # seconds of training for the whole cell (same on every row of a cell)
    "epochs_run",  # epochs actually trained (early stopping may cut a phase short)
    "size",  # StudySize.name that produced the row
    "status",  # "ok" or "failed"
    "error",  # "" or the failure / warning message
)
#: Direction of each metric: ``True`` when larger is better.
HIGHER_IS_BETTER: dict[str, bool] = {"auc": True, "accuracy": True, "rmse": False}
#: Datasets of the study: the synthetic suite in both regimes, census-income with the papers'
#: two tasks, census-income with the eight tasks of chapter 3 (``tasks="all"``) and C-MAPSS
#: FD001 as RUL + health state (chapter 2). New datasets go at the end: the cells of the
#: earlier ones never change.
DATASETS: tuple[str, ...] = ("suite_conflict", "suite_benign", "census", "census_many", "cmapss")
#: The real many-task datasets of the second edition (their own model sizes, lr search).
REAL_DATASETS: tuple[str, ...] = ("census_many", "cmapss")
#: Everything is compared with this configuration (PLE + uncertainty weighting).
REFERENCE = "ple_uw"
#: The configuration the chapter asks about (PLE + UW + adaTT with default settings).
CANDIDATE = "ple_uw_adatt"
#: The single-task baseline (one model per task) used for the MTL gain.
SINGLE_TASK = "single_task"
#: Weight trials per cell of the tuned static-weight baseline ``ple_ls_tuned``.
LS_TRIALS = 4
#: The configurations that separate adaTT's parts (chapter 8's verdict design): the reference,
#: adaTT as shipped, and three controls. ``adatt_lambda0`` measures and co-freezes but
#: transfers nothing; ``ple_uw_freeze`` freezes the gates at adaTT's freeze epoch without
#: adaTT; ``adatt_no_cofreeze`` transfers without freezing the gates.
PRIMARY_CONFIGS: tuple[str, ...] = ("ple_uw", "ple_uw_adatt", "adatt_lambda0", "ple_uw_freeze", "adatt_no_cofreeze")
#: The primary configurations of the real datasets: the design's controls plus the tuned
#: static-weight baseline (the comparison Xin et al. 2022 ask for).
REAL_PRIMARY_CONFIGS: tuple[str, ...] = ("ple_uw", "ple_uw_adatt", "adatt_lambda0", "ple_uw_freeze", "ple_ls_tuned",
                                         "adatt_no_cofreeze")  # fmt: skip
#: Baselines run after the primary configurations when time allows.
SECONDARY_CONFIGS: tuple[str, ...] = ("ple_ls_tuned", "ple_adatt", "ple_equal")


# --------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class StudyConfig:
    """One configuration of the grid.

    Attributes:
        name: key in the results table.
        label: short human-readable name for tables and figures.
        kind: ``"baseline"``, ``"balancer"``, ``"adatt"``, ``"ablation"``, ``"control"`` or
            ``"single_task"``.
        balancing: the trainer's loss balancer (``TrainerConfig.balancing``).
        adatt: ``None`` for no adaTT; otherwise overrides of the adaTT settings (a tuple of
            ``(keyword, value)`` pairs, applied over the size's schedule and the dataset's
            group prior; ``("task_groups", None)`` removes the prior).
        single_task: train one model per task instead of one multi-task model.
        gate_freeze: freeze the CGC gates from the size's ``adatt_freeze_epoch`` on without
            adaTT (``TrainerConfig.gate_freeze_epoch``): the co-freeze alone.
        cofreeze: with adaTT, freeze the gates when adaTT freezes (the trainer's default);
            ``False`` lets them train through phase 1 (``TrainerConfig.adatt_gate_cofreeze``).
        tuned_weights: static task weights chosen on the validation split
            (:mod:`mtlbook.experiments.static_weights`, :data:`LS_TRIALS` trials per cell).
        lr: the peak learning rate; ``None`` takes the size's ``lr``. The lr search of
            :mod:`mtlbook.experiments.lr_search` sets it per (configuration, dataset).
    """

    name: str
    label: str
    kind: str
    balancing: str = "uncertainty"
    adatt: tuple[tuple[str, Any], ...] | None = None
    single_task: bool = False
    gate_freeze: bool = False
    cofreeze: bool = True
    tuned_weights: bool = False
    lr: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not math.isfinite(self.lr) or self.lr <= 0):  # fmt: skip
            raise ValueError(f"lr must be None or a finite number > 0, got {self.lr!r}")
        kinds = ("baseline", "balancer", "adatt", "ablation", "control", "single_task")
        if self.kind not in kinds:
            raise ValueError(f"kind must be one of {kinds}, got {self.kind!r}")
        if self.adatt is not None and self.single_task:
            raise ValueError("a single-task configuration cannot use adaTT (there is no peer task)")
        if self.gate_freeze and self.adatt is not None:
            raise ValueError("gate_freeze is for configurations without adaTT (adaTT co-freezes the gates itself)")
        if not self.cofreeze and self.adatt is None:
            raise ValueError("cofreeze=False needs adaTT (without adaTT there is no co-freeze to switch off)")
        if self.tuned_weights and (self.balancing != "equal" or self.single_task or self.adatt is not None):
            raise ValueError("tuned_weights needs balancing='equal', one multi-task model and no adaTT")


#: The grid's configurations, in table order.
CONFIGS: tuple[StudyConfig, ...] = (
    StudyConfig("ple_equal", "PLE (equal weights)", "baseline", balancing="equal"),
    StudyConfig("ple_uw", "PLE + UW", "baseline"),
    StudyConfig("ple_uw_adatt", "PLE + UW + adaTT", "adatt", adatt=()),
    StudyConfig("ple_gradnorm", "PLE + GradNorm", "balancer", balancing="gradnorm"),
    StudyConfig("ple_dwa", "PLE + DWA", "balancer", balancing="dwa"),
    StudyConfig("ple_pcgrad", "PLE + PCGrad", "balancer", balancing="pcgrad"),
    StudyConfig("adatt_no_prior", "adaTT, no prior", "ablation", adatt=(("task_groups", None),)),
    # tau = -1: A_ij < -1 never happens (A is clamped to [-1, 1]), so nothing is blocked
    StudyConfig("adatt_no_blocking", "adaTT, no blocking", "ablation", adatt=(("negative_threshold", -1.0),)),
    StudyConfig("adatt_zero_logit", "adaTT, zero-logit blocking", "ablation", adatt=(("blocking", "zero_logit"),)),
    StudyConfig("adatt_T0.5", "adaTT, T = 0.5", "ablation", adatt=(("temperature", 0.5),)),
    StudyConfig("adatt_T2", "adaTT, T = 2", "ablation", adatt=(("temperature", 2.0),)),
    # the controls that separate adaTT's parts (transfer, measurement, gate co-freeze)
    StudyConfig("adatt_lambda0", "adaTT, λ = 0 (measure + co-freeze)", "control", adatt=(("transfer_lambda", 0.0),)),
    StudyConfig("ple_uw_freeze", "PLE + UW, gates frozen", "control", gate_freeze=True),
    StudyConfig("adatt_no_cofreeze", "adaTT, no gate co-freeze", "control", adatt=(), cofreeze=False),
    StudyConfig("ple_adatt", "PLE + adaTT (equal weights)", "adatt", balancing="equal", adatt=()),
    StudyConfig("ple_ls_tuned", "PLE, static weights tuned", "baseline", balancing="equal", tuned_weights=True),
    StudyConfig(SINGLE_TASK, "single-task models", "single_task", balancing="equal", single_task=True),
)
CONFIG_NAMES: tuple[str, ...] = tuple(c.name for c in CONFIGS)


def get_config(name: str) -> StudyConfig:
    """The :data:`CONFIGS` entry called ``name``."""
    for config in CONFIGS:
        if config.name == name:
            return config
    raise ValueError(f"config must be one of {CONFIG_NAMES}, got {name!r}")


# --------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class StudySize:
    """How big every cell of the grid is.

    Attributes:
        name: ``"small"`` or ``"full"`` (stored in the table's ``size`` column).
        seeds: the seeds of the grid.
        suite_rows: (train, val, test) rows of the synthetic suite.
        census_rows: (train, val, test) rows drawn from census-income's splits
            (``0`` = the whole split).
        model: keyword arguments of :class:`~mtlbook.models.PLE`.
        phase1_epochs, phase2_epochs, batch_size, lr, warmup_epochs, patience: trainer settings.
        adatt_warmup_epochs, adatt_freeze_epoch: adaTT's schedule, scaled to ``phase1_epochs``
            (the library defaults 2 and 10 assume a 15-epoch phase 1).
        adatt_grad_interval: steps between affinity measurements (library default 10; the
            small size measures every 5 steps so that its few, short epochs still feed the
            EMA a dozen or more measurements before adaTT freezes).
        per_dataset: settings of one dataset that differ from the above, ``{dataset:
            {field: value}}``; ``"rows"`` gives that dataset's (train, val, test) rows
            (``0`` = the whole split). :meth:`for_dataset` applies them.
    """

    name: str
    seeds: tuple[int, ...]
    suite_rows: tuple[int, int, int]
    census_rows: tuple[int, int, int]
    model: Mapping[str, Any]
    phase1_epochs: int
    phase2_epochs: int
    batch_size: int
    lr: float
    warmup_epochs: int
    patience: int | None
    adatt_warmup_epochs: int
    adatt_freeze_epoch: int
    adatt_grad_interval: int
    per_dataset: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def for_dataset(self, dataset: str) -> "StudySize":
        """This size with ``per_dataset[dataset]`` applied (itself, values unchanged, otherwise)."""
        overrides = {k: v for k, v in self.per_dataset.get(dataset, {}).items() if k != "rows"}
        return replace(self, **overrides)

    def rows_for(self, dataset: str) -> tuple[int, int, int]:
        """(train, val, test) rows of ``dataset`` (0 = the whole split)."""
        if "rows" in self.per_dataset.get(dataset, {}):
            return tuple(self.per_dataset[dataset]["rows"])  # type: ignore[return-value]
        return self.census_rows if dataset.startswith("census") else self.suite_rows


#: Settings of the real many-task datasets at the small size. The model width was chosen by a
#: validation check of three widths (``benchmarks/study_pilot.py``, table
#: ``mtlbook/tables/study_model_check.csv``: PLE + UW at lr 1e-2 on the validation split, the lr
#: search's two seeds, scored by the lr search's criterion): the width with the best mean
#: score, narrow (16 hidden units, 8-dim experts) on census many-task, medium (32, 16) on C-MAPSS.
#: Census many-task trains on 8,000 of its 69,833 training rows (the CPU budget), validates
#: on 4,000 and tests on the whole test split; C-MAPSS uses every row of its splits.
REAL_SETTINGS: dict[str, dict[str, Any]] = {
    "census_many": {
        "rows": (8000, 4000, 0),
        "model": {"n_levels": 1, "n_shared_experts": 2, "n_task_experts": 1, "expert_hidden": (16,),
                  "expert_dim": 8, "tower_hidden": (8,)},  # fmt: skip
        "batch_size": 128,
    },
    "cmapss": {
        "rows": (0, 0, 0),
        "model": {"n_levels": 1, "n_shared_experts": 2, "n_task_experts": 1, "expert_hidden": (32,),
                  "expert_dim": 16, "tower_hidden": (16,)},  # fmt: skip
        "batch_size": 128,
    },
}
#: The declared size of the real-data study, fixed from the pilot (``mtlbook/tables/study_pilot.csv``:
#: sd of adaTT - PLE + UW on census many-task 0.13 % over 6 pilot seeds, so 20 seeds give an
#: MDE near 0.09 %, under the 0.25 % the issue asks for):
#: lr search 6 configs x 3 lrs x 2 seeds x 2 datasets = 72 cells, evaluation 6 configs x
#: 20 seeds x 2 datasets = 240 cells; ``ple_ls_tuned`` trains 4 models per cell, so 468
#: trainings of about 4 s (census many-task) and 3.5 s (C-MAPSS) each on an idle core:
#: about 1,900 training-seconds, measured before the run.
REAL_SEEDS = 20

SIZES: dict[str, StudySize] = {
    # 1-10 s per cell on one (shared) thread: the whole default grid in about a quarter of an hour
    "small": StudySize(
        name="small",
        seeds=(0, 1, 2, 3, 4),
        suite_rows=(1200, 400, 1000),
        census_rows=(2000, 1000, 5000),
        model={"n_levels": 1, "n_shared_experts": 2, "n_task_experts": 1, "expert_hidden": (16,),
               "expert_dim": 8, "tower_hidden": (8,)},  # fmt: skip
        phase1_epochs=6,
        phase2_epochs=2,
        batch_size=64,
        lr=1e-2,
        warmup_epochs=1,
        patience=5,
        adatt_warmup_epochs=1,
        adatt_freeze_epoch=4,
        adatt_grad_interval=5,
        per_dataset=REAL_SETTINGS,
    ),
    # the library's schedule (adaTT warmup 2, freeze at 10 of 15 epochs), 20 seeds, more data
    "full": StudySize(
        name="full",
        seeds=tuple(range(20)),
        suite_rows=(6000, 2000, 2000),
        census_rows=(20000, 5000, 0),
        model={"n_levels": 2, "n_shared_experts": 2, "n_task_experts": 1, "expert_hidden": (32,),
               "expert_dim": 16, "tower_hidden": (16,)},  # fmt: skip
        phase1_epochs=15,
        phase2_epochs=5,
        batch_size=128,
        lr=3e-3,
        warmup_epochs=2,
        patience=5,
        adatt_warmup_epochs=2,
        adatt_freeze_epoch=10,
        adatt_grad_interval=10,
    ),
}


def get_size(size: str | StudySize) -> StudySize:
    """A :class:`StudySize` from its name (``"small"``, ``"full"``) or itself."""
    if isinstance(size, StudySize):
        return size
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)} or a StudySize, got {size!r}")
    return SIZES[size]


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
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
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
                 "grad_interval": size.adatt_grad_interval,
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
    model = PLE(train.n_features, train.task_specs, **dict(size.model))
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
    model = PLE(train.n_features, train.task_specs, **dict(size.model))
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


# --------------------------------------------------------------------------- the table on disk
def _empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=_DTYPES[c]) for c in COLUMNS})


_DTYPES: dict[str, str] = {
    "config": "object", "dataset": "object", "seed": "int64", "task": "object", "metric": "object",
    "value": "float64", "wall_time": "float64", "epochs_run": "int64", "size": "object", "status": "object",
    "error": "object",
}  # fmt: skip


def _normalise(table: pd.DataFrame) -> pd.DataFrame:
    """Columns in :data:`COLUMNS` order with their dtypes; empty strings instead of NaN in text."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"table is missing columns {missing}; expected {list(COLUMNS)}")
    table = table.loc[:, list(COLUMNS)].copy()
    for column in ("config", "dataset", "task", "metric", "size", "status", "error"):
        table[column] = table[column].fillna("").astype(str)
    for column, dtype in _DTYPES.items():
        if dtype != "object":
            table[column] = table[column].astype(dtype)
    return table.reset_index(drop=True)


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
    """Write ``table`` to ``path`` atomically: a temp file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _normalise(table)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            table.to_csv(stream, index=False)
            stream.flush()
            os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    return path


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
    dataset_order = {name: i for i, name in enumerate(DATASETS)}
    keys = pd.DataFrame({
        "d": table["dataset"].map(lambda d: dataset_order.get(d, len(DATASETS))),
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
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        raise ValueError(f"datasets must be among {DATASETS}, got {bad}")
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


# --------------------------------------------------------------------------- statistics
def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    r"""Mean and two-sided t confidence interval: :math:`\bar x \pm t_{(1+c)/2,\,n-1}\, s/\sqrt n`.

    Non-finite values are dropped. Returns ``(mean, low, high)``; the interval is NaN for
    fewer than two values and has zero width when all values are equal.
    """
    from scipy import stats

    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    x = np.asarray(values, dtype=float).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    r"""Holm's step-down adjusted p-values (same order as given; NaN stays NaN and is not counted).

    With the :math:`m` finite p-values sorted ascending,
    :math:`\tilde p_{(i)} = \max_{j \le i} \min(1, (m - j + 1)\,p_{(j)})`.
    """
    p = np.asarray(pvalues, dtype=float).reshape(-1)
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"pvalues must lie in [0, 1], got {p[(p < 0) | (p > 1)].tolist()}")
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return adjusted
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def relative_improvement(value: Any, reference: Any, higher_is_better: Any) -> Any:
    r"""Signed relative improvement :math:`\sigma (m - m_0) / |m_0|` (positive = better).

    Works elementwise on numbers, numpy arrays or pandas Series; ``higher_is_better`` is a
    bool or an array of bools (:math:`\sigma = \pm 1`).
    """
    sign = np.where(np.asarray(higher_is_better, dtype=bool), 1.0, -1.0)
    reference_abs = np.abs(np.asarray(reference, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = sign * (np.asarray(value, dtype=float) - np.asarray(reference, dtype=float)) / reference_abs
    if np.ndim(out) == 0:
        return float(out)
    if isinstance(value, pd.Series):
        return pd.Series(out, index=value.index)
    return out


def _ok(table: pd.DataFrame) -> pd.DataFrame:
    table = _normalise(table)
    return table.loc[(table["status"] == "ok") & np.isfinite(table["value"])]


def _higher(metrics: pd.Series) -> np.ndarray:
    unknown = sorted(set(metrics) - set(HIGHER_IS_BETTER))
    if unknown:
        raise ValueError(f"metrics {unknown} have no known direction; known: {sorted(HIGHER_IS_BETTER)}")
    return metrics.map(HIGHER_IS_BETTER).to_numpy(dtype=bool)


def summarize(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per (config, dataset, task, metric): seeds ``n``, ``mean``, ``std``, ``ci_low``, ``ci_high``."""
    rows = []
    for (config, dataset, task, metric), group in _ok(table).groupby(["config", "dataset", "task", "metric"], sort=False):
        mean, low, high = t_interval(group["value"], confidence)
        std = float(group["value"].std(ddof=1)) if len(group) > 1 else math.nan
        rows.append({"config": config, "dataset": dataset, "task": task, "metric": metric, "n": len(group),
                     "mean": mean, "std": std, "ci_low": low, "ci_high": high})  # fmt: skip
    return pd.DataFrame(rows, columns=["config", "dataset", "task", "metric", "n", "mean", "std", "ci_low", "ci_high"])


def relative_scores(table: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """Relative improvement (in %) of every row over the ``reference`` config's row of the same
    (dataset, seed, task), plus one ``task="average"`` row per (config, dataset, seed): the mean
    over that cell's tasks. Cells without a reference of the same seed are left out."""
    ok = _ok(table)
    keys = ["dataset", "seed", "task", "metric"]
    base = ok.loc[ok["config"] == reference, keys + ["value"]].rename(columns={"value": "reference_value"})
    if base.empty:
        raise ValueError(f"reference config {reference!r} has no finished rows in the table")
    merged = ok.merge(base, on=keys, how="inner")
    merged["score"] = 100.0 * relative_improvement(merged["value"], merged["reference_value"], _higher(merged["metric"]))
    per_task = merged[["config", "dataset", "seed", "task", "metric", "value", "reference_value", "score"]]
    average = per_task.groupby(["config", "dataset", "seed"], sort=False, as_index=False)["score"].mean()
    average = average.assign(task="average", metric="rel_improvement_pct", value=average["score"], reference_value=0.0)
    return pd.concat([per_task, average[per_task.columns]], ignore_index=True)


def paired_differences(
    table: pd.DataFrame,
    reference: str = REFERENCE,
    configs: Sequence[str] | None = None,
    family_by: Sequence[str] = ("dataset", "scope"),
    confidence: float = 0.95,
    exclude: Sequence[str] = (SINGLE_TASK,),
) -> pd.DataFrame:
    r"""Every config against ``reference``, paired by seed, per task and averaged over tasks.

    Per (config, dataset, task): the seeds both configs finished, :math:`d_k = x_k - x^{ref}_k`
    in the metric's units (``mean_diff`` with its t-interval), ``improvement`` = the same
    difference signed so that positive is better, and the two-sided paired t-test
    (``t``, ``p``). For ``task="average"`` the values are the per-seed mean relative
    improvements in % (:func:`relative_scores`), so :math:`d_k` is that score itself. When
    every :math:`d_k` is equal the test is undefined; ``p`` is then 1 if they are all 0 (the
    two configs gave identical results) and 0 otherwise.

    ``p_holm`` applies :func:`holm` within each group of ``family_by`` (columns of the
    output; ``scope`` is ``"task"`` or ``"average"``), over all configs in that group.
    """
    from scipy import stats

    scores = relative_scores(table, reference)
    ok = _ok(table)
    ref = ok.loc[ok["config"] == reference]
    configs = [c for c in dict.fromkeys(ok["config"]) if c != reference and c not in exclude] if configs is None \
        else list(configs)  # fmt: skip
    rows = []
    for config in configs:
        mine = ok.loc[ok["config"] == config]
        merged = mine.merge(ref, on=["dataset", "seed", "task", "metric"], suffixes=("", "_ref"))
        average = scores.loc[(scores["config"] == config) & (scores["task"] == "average")]
        parts = [(merged, "task"), (average.assign(value_ref=0.0), "average")]
        for frame, scope in parts:
            for (dataset, task, metric), group in frame.groupby(["dataset", "task", "metric"], sort=False):
                d = (group["value"] - group["value_ref"]).to_numpy(dtype=float)
                mean, low, high = t_interval(d, confidence)
                sign = 1.0 if scope == "average" or HIGHER_IS_BETTER[metric] else -1.0
                if d.size < 2:
                    t_stat, p = math.nan, math.nan
                elif np.all(d == d[0]):
                    t_stat, p = (0.0, 1.0) if d[0] == 0 else (math.copysign(math.inf, d[0]), 0.0)
                else:
                    test = stats.ttest_rel(group["value"].to_numpy(float), group["value_ref"].to_numpy(float))
                    t_stat, p = float(test.statistic), float(test.pvalue)
                rows.append({"config": config, "dataset": dataset, "task": task, "metric": metric, "scope": scope,
                             "n": int(d.size), "mean_diff": mean, "ci_low": low, "ci_high": high,
                             "improvement": sign * mean, "t": t_stat, "p": p})  # fmt: skip
    columns = ["config", "dataset", "task", "metric", "scope", "n", "mean_diff", "ci_low", "ci_high", "improvement",
               "t", "p", "p_holm"]  # fmt: skip
    out = pd.DataFrame(rows, columns=columns)
    if out.empty:
        return out
    missing = [c for c in family_by if c not in out.columns]
    if missing:
        raise ValueError(f"family_by names unknown columns {missing}; use columns of {columns}")
    out["p_holm"] = np.nan
    groups = out.groupby(list(family_by), sort=False).groups.values() if family_by else [out.index]
    for index in groups:
        out.loc[index, "p_holm"] = holm(out.loc[index, "p"].to_numpy(float))
    return out


def mtl_gain(table: pd.DataFrame, single_task: str = SINGLE_TASK, confidence: float = 0.95) -> pd.DataFrame:
    r"""The MTL gain of every multi-task config over the single-task models, in %.

    For task :math:`t` and seed :math:`k`, :math:`100\,\Delta(m_{k,t}, m^{single}_{k,t})` with
    :math:`\Delta` of :func:`relative_improvement` (positive: the multi-task model beats the
    single-task model on that task); ``task="average"`` averages over the tasks first. Returns
    per (config, dataset, task): ``metric`` (``"gain_pct"``), ``n``, ``mean``, ``ci_low``, ``ci_high``.
    """
    scores = relative_scores(table, single_task)
    scores = scores.loc[scores["config"] != single_task]
    rows = []
    for (config, dataset, task), group in scores.groupby(["config", "dataset", "task"], sort=False):
        mean, low, high = t_interval(group["score"], confidence)
        rows.append({"config": config, "dataset": dataset, "task": task, "metric": "gain_pct", "n": len(group),
                     "mean": mean, "ci_low": low, "ci_high": high})  # fmt: skip
    return pd.DataFrame(rows, columns=["config", "dataset", "task", "metric", "n", "mean", "ci_low", "ci_high"])


def time_ratios(table: pd.DataFrame, reference: str = REFERENCE, confidence: float = 0.95) -> pd.DataFrame:
    r"""Training time of each config relative to ``reference``, paired by seed.

    Per (config, dataset): ``seconds`` (mean cell time), and the mean over seeds of
    :math:`\text{wall}_k / \text{wall}^{ref}_k` with its t-interval.
    """
    ok = _ok(table)
    cells = ok.groupby(["config", "dataset", "seed"], sort=False, as_index=False)["wall_time"].first()
    ref = cells.loc[cells["config"] == reference, ["dataset", "seed", "wall_time"]]
    merged = cells.merge(ref, on=["dataset", "seed"], suffixes=("", "_ref"))
    rows = []
    for (config, dataset), group in merged.groupby(["config", "dataset"], sort=False):
        mean, low, high = t_interval(group["wall_time"] / group["wall_time_ref"], confidence)
        rows.append({"config": config, "dataset": dataset, "n": len(group), "seconds": float(group["wall_time"].mean()),
                     "ratio": mean, "ci_low": low, "ci_high": high})  # fmt: skip
    return pd.DataFrame(rows, columns=["config", "dataset", "n", "seconds", "ratio", "ci_low", "ci_high"])


def verdict(
    table: pd.DataFrame,
    candidate: str = CANDIDATE,
    reference: str = REFERENCE,
    alpha: float = 0.05,
    paired: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per dataset: does ``candidate`` help, hurt, or make no measurable difference vs ``reference``?

    The call rests on the primary comparison, the averaged relative improvement
    (``task="average"`` of :func:`paired_differences`): its p-values, one per dataset, form
    one Holm family (``p_holm``). ``"helps"`` when ``p_holm < alpha`` and the mean is
    positive, ``"hurts"`` when ``p_holm < alpha`` and it is negative, otherwise ``"no
    measurable difference"``. Also counted: tasks significantly better / worse on their own
    (``p_holm`` of ``paired``, i.e. Holm over its per-task family), and the mean per-seed
    training-time ratio (:func:`time_ratios`).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    paired = paired_differences(table, reference) if paired is None else paired
    mine = paired.loc[paired["config"] == candidate]
    if mine.empty:
        raise ValueError(f"candidate {candidate!r} has no paired results against {reference!r}")
    times = time_ratios(table, reference)
    primary = mine.loc[mine["scope"] == "average"].reset_index(drop=True)
    primary_holm = holm(primary["p"].to_numpy(float))
    rows = []
    for index, average in primary.iterrows():
        dataset = average["dataset"]
        tasks = mine.loc[(mine["scope"] == "task") & (mine["dataset"] == dataset)]
        significant = tasks["p_holm"] < alpha
        p_holm = float(primary_holm[index])
        if p_holm < alpha:
            outcome = "helps" if average["improvement"] > 0 else "hurts"
        else:
            outcome = "no measurable difference"
        time_row = times.loc[(times["config"] == candidate) & (times["dataset"] == dataset)]
        rows.append({
            "dataset": dataset, "outcome": outcome, "n_seeds": int(average["n"]),
            "mean_rel_improvement_pct": float(average["improvement"]),
            "ci_low": float(average["ci_low"]), "ci_high": float(average["ci_high"]),
            "p": float(average["p"]), "p_holm": p_holm,
            "tasks_better": int((significant & (tasks["improvement"] > 0)).sum()),
            "tasks_worse": int((significant & (tasks["improvement"] < 0)).sum()),
            "n_tasks": len(tasks),
            "time_ratio": float(time_row["ratio"].iloc[0]) if len(time_row) else math.nan,
        })  # fmt: skip
    return pd.DataFrame(rows)


def verdict_text(verdicts: pd.DataFrame, candidate_label: str = "PLE + UW + adaTT",
                 reference_label: str = "PLE + UW", alpha: float = 0.05) -> str:  # fmt: skip
    """The :func:`verdict` table as plain sentences (Markdown bullets), one per dataset."""
    lines = []
    for row in verdicts.itertuples():
        change = (f"mean change {row.mean_rel_improvement_pct:+.3f}% averaged over tasks "
                  f"(95% CI {row.ci_low:+.3f}% to {row.ci_high:+.3f}%, Holm-corrected p = {row.p_holm:.3f})")  # fmt: skip
        if row.outcome == "no measurable difference":
            head = f"**{row.dataset}**: no measurable difference between {candidate_label} and {reference_label}"
        else:
            head = f"**{row.dataset}**: {candidate_label} {row.outcome} compared with {reference_label}"
        tasks = (f"{row.tasks_better} of {row.n_tasks} tasks significantly better and {row.tasks_worse} "
                 f"significantly worse on their own (Holm, alpha = {alpha})")  # fmt: skip
        lines.append(f"- {head}: {change}; {tasks}; training took {row.time_ratio:.2f} times as long "
                     f"({row.n_seeds} seeds).")  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures
def plot_paired(paired: pd.DataFrame, dataset: str, ax: "Axes | None" = None,
                labels: Mapping[str, str] | None = None, alpha: float = 0.05) -> "Axes":  # fmt: skip
    """Horizontal bars: mean averaged relative improvement (%) over the reference with 95% CI,
    one bar per config; bars with ``p_holm < alpha`` are filled, the others hatched."""
    import matplotlib.pyplot as plt

    rows = paired.loc[(paired["dataset"] == dataset) & (paired["scope"] == "average")]
    if rows.empty:
        raise ValueError(f"paired has no averaged rows for dataset {dataset!r}")
    labels = labels or {c.name: c.label for c in CONFIGS}
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 1))
    y = np.arange(len(rows))[::-1]
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
    import matplotlib.pyplot as plt

    rows = summary.loc[(summary["dataset"] == dataset) & (summary["task"] == task)]
    if configs is not None:
        rows = rows.set_index("config").loc[[c for c in configs if c in set(rows["config"])]].reset_index()
    if rows.empty:
        raise ValueError(f"summary has no rows for dataset {dataset!r}, task {task!r}")
    labels = labels or {c.name: c.label for c in CONFIGS}
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 1))
    y = np.arange(len(rows))[::-1]
    means = rows["mean"].to_numpy(float)
    errors = np.vstack([means - rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float) - means])
    ax.errorbar(means, y, xerr=np.nan_to_num(errors), fmt="o", color="tab:blue", capsize=3)
    ax.set_yticks(y, [labels.get(c, c) for c in rows["config"]])
    ax.set_xlabel(xlabel or f"{task}: test {rows['metric'].iloc[0]} (mean, 95% CI)")
    ax.set_title(dataset)
    return ax

