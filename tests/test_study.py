"""Tests of the chapter 8 study runner and its statistics (mtlbook.experiments.study)."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from mtlbook.experiments import study
from mtlbook.experiments.study import (
    COLUMNS,
    CellResult,
    StudyConfig,
    get_config,
    holm,
    load_table,
    mtl_gain,
    paired_differences,
    relative_improvement,
    run_cell,
    run_grid,
    summarize,
    t_interval,
    time_ratios,
    trainer_config,
    verdict,
    verdict_text,
    write_table,
)


# --------------------------------------------------------------------------- a fake trainer
class FakeTrainer:
    """Stands in for run_cell: counts calls, returns seed-dependent numbers, can fail on cue."""

    def __init__(self, fail: set[tuple[str, str, int]] = frozenset()) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.fail = set(fail)

    def __call__(self, config: StudyConfig, dataset: str, seed: int, size) -> CellResult:
        self.calls.append((config.name, dataset, seed))
        if (config.name, dataset, seed) in self.fail:
            raise RuntimeError(f"boom in {config.name}\nsecond line")
        value = 0.8 + 0.01 * seed + (0.002 if config.name == "ple_uw_adatt" else 0.0)
        return CellResult([("a", "auc", value), ("b", "rmse", 2.0 - value)], wall_time=1.0 + seed, epochs_run=3)


CONFIGS2 = ("ple_uw", "ple_uw_adatt")


def test_resume_skips_finished_cells(tmp_path):
    path = tmp_path / "grid.csv"
    fake = FakeTrainer()
    table = run_grid(path, CONFIGS2, ["suite_conflict"], [0, 1], train_fn=fake)
    assert len(fake.calls) == 4
    assert len(table) == 8  # 4 cells x 2 tasks
    again = FakeTrainer()
    table2 = run_grid(path, CONFIGS2, ["suite_conflict"], [0, 1], train_fn=again)
    assert again.calls == []
    pd.testing.assert_frame_equal(table, table2)
    # one more seed: only its two cells run, the old rows are kept
    more = FakeTrainer()
    table3 = run_grid(path, CONFIGS2, ["suite_conflict"], [0, 1, 2], train_fn=more)
    assert sorted(more.calls) == [("ple_uw", "suite_conflict", 2), ("ple_uw_adatt", "suite_conflict", 2)]
    assert len(table3) == 12
    assert set(load_table(path)["seed"]) == {0, 1, 2}


def test_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path):
    path = tmp_path / "grid.csv"
    fake = FakeTrainer(fail={("ple_uw_adatt", "suite_conflict", 0)})
    table = run_grid(path, CONFIGS2, ["suite_conflict"], [0, 1], train_fn=fake)
    assert len(fake.calls) == 4  # the cells after the failure still ran
    failed = table.loc[table["status"] == "failed"]
    assert len(failed) == 1
    row = failed.iloc[0]
    assert (row["config"], row["seed"], row["task"]) == ("ple_uw_adatt", 0, "")
    assert "RuntimeError" in row["error"] and "boom" in row["error"] and "\n" not in row["error"]
    assert math.isnan(row["value"])
    assert (table.loc[table["status"] == "ok", "error"] == "").all()
    # failed cells are kept with retry_failed=False, retried (and replaced) otherwise
    keep = FakeTrainer()
    run_grid(path, CONFIGS2, ["suite_conflict"], [0, 1], train_fn=keep, retry_failed=False)
    assert keep.calls == []
    retry = FakeTrainer()
    fixed = run_grid(path, CONFIGS2, ["suite_conflict"], [0, 1], train_fn=retry)
    assert retry.calls == [("ple_uw_adatt", "suite_conflict", 0)]
    assert (fixed["status"] == "ok").all() and len(fixed) == 8


def test_schema_is_stable(tmp_path):
    path = tmp_path / "grid.csv"
    run_grid(path, CONFIGS2, ["census"], [3], train_fn=FakeTrainer(fail={("ple_uw", "census", 3)}))
    header = path.read_text().splitlines()[0].split(",")
    assert tuple(header) == COLUMNS
    table = load_table(path)
    assert tuple(table.columns) == COLUMNS
    assert table["seed"].dtype == np.int64 and table["value"].dtype == np.float64
    # floats come back bit-exactly (the chapter compares a live rerun with the stored row)
    ok = table.loc[table["status"] == "ok"]
    value = 0.8 + 0.01 * 3 + 0.002  # what FakeTrainer computes for seed 3
    assert ok["value"].tolist() == [value, 2.0 - value]
    # a table that lacks a column is refused
    with pytest.raises(ValueError, match="missing columns"):
        write_table(table.drop(columns=["wall_time"]), tmp_path / "bad.csv")


def test_parallel_jobs_give_the_same_table(tmp_path):
    serial = run_grid(None, CONFIGS2, ["census"], [0, 1], train_fn=FakeTrainer())
    path = tmp_path / "p.csv"
    parallel = run_grid(path, CONFIGS2, ["census"], [0, 1], train_fn=FakeTrainer(), n_jobs=2)
    pd.testing.assert_frame_equal(serial, parallel)
    pd.testing.assert_frame_equal(load_table(path), parallel)  # the file holds every cell
    # a failing cell in a worker process is recorded, not raised
    failing = run_grid(None, CONFIGS2, ["census"], [0, 1], train_fn=FakeTrainer(fail={("ple_uw", "census", 1)}),
                       n_jobs=2)  # fmt: skip
    bad = failing.loc[failing["status"] == "failed"]
    assert len(bad) == 1 and "boom" in bad["error"].iloc[0]


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "grid.csv"
    table = run_grid(path, ["ple_uw"], ["census"], [0], train_fn=FakeTrainer())
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_table(table.assign(value=0.0), path)
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["grid.csv"]  # and no temp file is left behind


def test_run_grid_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="config must be one of"):
        run_grid(None, ["no_such_config"], ["census"], [0], train_fn=FakeTrainer())
    with pytest.raises(ValueError, match="datasets must be among"):
        run_grid(None, ["ple_uw"], ["mnist"], [0], train_fn=FakeTrainer())
    with pytest.raises(ValueError, match="seeds must be ints"):
        run_grid(None, ["ple_uw"], ["census"], [-1], train_fn=FakeTrainer())
    with pytest.raises(ValueError, match="n_jobs"):
        run_grid(None, ["ple_uw"], ["census"], [0], train_fn=FakeTrainer(), n_jobs=0)
    with pytest.raises(ValueError, match="size must be one of"):
        run_grid(None, ["ple_uw"], ["census"], [0], size="huge", train_fn=FakeTrainer())


# --------------------------------------------------------------------------- statistics
def test_t_interval_matches_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 5, 20):
        x = rng.normal(3.0, 2.0, size=n)
        mean, low, high = t_interval(x, 0.95)
        ref_low, ref_high = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
        assert mean == pytest.approx(x.mean())
        assert (low, high) == pytest.approx((ref_low, ref_high), rel=1e-12)
    # wider at higher confidence; degenerate cases
    assert t_interval([1.0, 2.0, 4.0], 0.99)[1] < t_interval([1.0, 2.0, 4.0], 0.9)[1]
    assert t_interval([5.0, 5.0, 5.0]) == (5.0, 5.0, 5.0)
    mean, low, high = t_interval([2.0, float("nan")])
    assert mean == 2.0 and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], 1.5)


def test_holm_by_hand_and_properties():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.5, np.nan, 0.2])
    assert math.isnan(adjusted[1]) and adjusted[[0, 2]] == pytest.approx([0.5, 0.4])
    rng = np.random.default_rng(1)
    p = rng.uniform(size=30) ** 3
    q = holm(p)
    assert np.all(q >= p) and np.all(q <= 1.0)
    order = np.argsort(p)
    assert np.all(np.diff(q[order]) >= 0)  # monotone in the raw p-values
    assert q.min() == pytest.approx(min(1.0, 30 * p.min()))
    with pytest.raises(ValueError, match="pvalues"):
        holm([0.2, 1.2])


def test_relative_improvement_signs():
    assert relative_improvement(0.9, 0.8, True) == pytest.approx(0.125)
    assert relative_improvement(9.0, 10.0, False) == pytest.approx(0.1)  # lower RMSE = better
    assert relative_improvement(11.0, 10.0, False) == pytest.approx(-0.1)
    out = relative_improvement(np.array([1.0, 1.0]), np.array([2.0, 2.0]), np.array([True, False]))
    assert out == pytest.approx([-0.5, 0.5])


def _table(rows):
    base = {"wall_time": 1.0, "epochs_run": 1, "size": "test", "status": "ok", "error": ""}
    return pd.DataFrame([{**base, **r} for r in rows], columns=list(COLUMNS))


def test_mtl_gain_formula():
    rows = []
    for seed, (auc_st, rmse_st, auc_mtl, rmse_mtl) in enumerate([(0.8, 10.0, 0.9, 9.0), (0.8, 10.0, 0.84, 10.5)]):
        rows += [
            {"config": "single_task", "dataset": "census", "seed": seed, "task": "a", "metric": "auc", "value": auc_st},
            {"config": "single_task", "dataset": "census", "seed": seed, "task": "b", "metric": "rmse", "value": rmse_st},
            {"config": "ple_uw", "dataset": "census", "seed": seed, "task": "a", "metric": "auc", "value": auc_mtl},
            {"config": "ple_uw", "dataset": "census", "seed": seed, "task": "b", "metric": "rmse", "value": rmse_mtl},
        ]
    gain = mtl_gain(_table(rows)).set_index("task")
    # seed 0: a +12.5 %, b +10 %; seed 1: a +5 %, b -5 %
    assert gain.loc["a", "mean"] == pytest.approx((12.5 + 5.0) / 2)
    assert gain.loc["b", "mean"] == pytest.approx((10.0 - 5.0) / 2)
    assert gain.loc["average", "mean"] == pytest.approx(((12.5 + 10) / 2 + (5 - 5) / 2) / 2)
    assert set(gain.index) == {"a", "b", "average"} and (gain["n"] == 2).all()


def _paired_table(shift, n_seeds=6, noise=0.004, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_seeds):
        base_a, base_b = 0.8 + 0.02 * rng.normal(), 3.0 + 0.1 * rng.normal()
        for config, d in (("ple_uw", 0.0), ("ple_uw_adatt", shift), ("ple_equal", 0.0)):
            wall = 2.0 if config == "ple_uw_adatt" else 1.0
            rows += [
                {"config": config, "dataset": "census", "seed": s, "task": "a", "metric": "auc",
                 "value": base_a + d + (noise * rng.normal() if d else 0.0), "wall_time": wall},
                {"config": config, "dataset": "census", "seed": s, "task": "b", "metric": "rmse",
                 "value": base_b - 10 * d + (noise * rng.normal() if d else 0.0), "wall_time": wall},
            ]  # fmt: skip
    return _table(rows)


def test_paired_differences_match_scipy_and_holm():
    table = _paired_table(0.01)
    paired = paired_differences(table)
    assert set(paired["config"]) == {"ple_uw_adatt", "ple_equal"}
    row = paired.loc[(paired["config"] == "ple_uw_adatt") & (paired["task"] == "a")].iloc[0]
    mine = table.loc[(table["config"] == "ple_uw_adatt") & (table["task"] == "a"), "value"].to_numpy()
    ref = table.loc[(table["config"] == "ple_uw") & (table["task"] == "a"), "value"].to_numpy()
    test = stats.ttest_rel(mine, ref)
    assert row["p"] == pytest.approx(test.pvalue) and row["t"] == pytest.approx(test.statistic)
    assert row["mean_diff"] == pytest.approx((mine - ref).mean())
    assert row["ci_low"] < row["mean_diff"] < row["ci_high"]
    rmse_row = paired.loc[(paired["config"] == "ple_uw_adatt") & (paired["task"] == "b")].iloc[0]
    assert rmse_row["mean_diff"] < 0 and rmse_row["improvement"] > 0  # lower RMSE counts as better
    # ple_equal is identical to the reference: p = 1 without a scipy warning
    same = paired.loc[paired["config"] == "ple_equal"]
    assert (same["p"] == 1.0).all() and (same["mean_diff"] == 0.0).all()
    # Holm within each (dataset, scope) family
    for _, family in paired.groupby(["dataset", "scope"]):
        assert family["p_holm"].to_numpy() == pytest.approx(holm(family["p"].to_numpy()))


def test_verdict_helps_hurts_or_no_difference():
    helps = verdict(_paired_table(0.02)).iloc[0]
    assert helps["outcome"] == "helps" and helps["mean_rel_improvement_pct"] > 0 and helps["p_holm"] < 0.05
    assert helps["time_ratio"] == pytest.approx(2.0)
    assert helps["tasks_better"] == 2 and helps["tasks_worse"] == 0
    hurts = verdict(_paired_table(-0.02)).iloc[0]
    assert hurts["outcome"] == "hurts" and hurts["mean_rel_improvement_pct"] < 0
    flat = verdict(_paired_table(1e-5, noise=0.01)).iloc[0]
    assert flat["outcome"] == "no measurable difference"
    # the primary comparison is Holm-corrected over the datasets
    two = pd.concat([_paired_table(0.02), _paired_table(0.002, noise=0.01, seed=3).assign(dataset="suite_benign")])
    both = verdict(two)
    assert list(both["dataset"]) == ["census", "suite_benign"]
    assert both["p_holm"].to_numpy() == pytest.approx(holm(both["p"].to_numpy()))
    text = verdict_text(verdict(_paired_table(0.02)))
    assert "helps" in text and "2.00 times as long" in text
    with pytest.raises(ValueError, match="candidate"):
        verdict(_paired_table(0.02), candidate="ple_pcgrad")


def test_summarize_and_time_ratios():
    table = _paired_table(0.01)
    summary = summarize(table)
    row = summary.loc[(summary["config"] == "ple_uw") & (summary["task"] == "a")].iloc[0]
    values = table.loc[(table["config"] == "ple_uw") & (table["task"] == "a"), "value"]
    assert row["n"] == 6 and row["mean"] == pytest.approx(values.mean())
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(t_interval(values)[1:])
    ratios = time_ratios(table).set_index("config")
    assert ratios.loc["ple_uw_adatt", "ratio"] == pytest.approx(2.0)
    assert ratios.loc["ple_uw", "ratio"] == pytest.approx(1.0)
    # failed rows are ignored by the statistics
    failed = pd.concat([table, _table([{"config": "ple_uw", "dataset": "census", "seed": 99, "task": "",
                                        "metric": "", "value": np.nan, "status": "failed", "error": "x"}])])  # fmt: skip
    assert summarize(failed).equals(summary)


# --------------------------------------------------------------------------- configurations and a real cell
def test_configurations():
    with pytest.raises(ValueError, match="config must be one of"):
        get_config("ple_magic")
    with pytest.raises(ValueError, match="single-task"):
        StudyConfig("x", "x", "single_task", adatt=(), single_task=True)
    groups = {"g0": ("a", "b")}
    default = trainer_config(get_config("ple_uw_adatt"), 0, "small", groups)
    assert default.balancing == "uncertainty" and default.adatt["task_groups"] == {"g0": ["a", "b"]}
    assert default.adatt["warmup_epochs"] < default.adatt["freeze_epoch"] <= default.phase1_epochs
    assert trainer_config(get_config("adatt_no_prior"), 0, "small", groups).adatt["task_groups"] is None
    assert trainer_config(get_config("adatt_no_blocking"), 0, "small", groups).adatt["negative_threshold"] == -1.0
    assert trainer_config(get_config("adatt_zero_logit"), 0, "small", groups).adatt["blocking"] == "zero_logit"
    assert trainer_config(get_config("ple_pcgrad"), 0, "small", groups).adatt is None


def test_verdict_controls_configure_the_trainer():
    small = study.SIZES["small"]
    groups = {"g0": ("a", "b")}
    lambda0 = trainer_config(get_config("adatt_lambda0"), 0, "small", groups)
    assert lambda0.adatt["transfer_lambda"] == 0.0 and lambda0.adatt_gate_cofreeze and lambda0.gate_freeze_epoch is None
    assert lambda0.balancing == "uncertainty"
    freeze = trainer_config(get_config("ple_uw_freeze"), 0, "small", groups)
    assert freeze.adatt is None and freeze.balancing == "uncertainty"
    assert freeze.gate_freeze_epoch == small.adatt_freeze_epoch == lambda0.adatt["freeze_epoch"]
    no_cofreeze = trainer_config(get_config("adatt_no_cofreeze"), 0, "small", groups)
    assert no_cofreeze.adatt is not None and "transfer_lambda" not in no_cofreeze.adatt
    assert no_cofreeze.adatt_gate_cofreeze is False and no_cofreeze.gate_freeze_epoch is None
    ple_adatt = trainer_config(get_config("ple_adatt"), 0, "small", groups)
    assert ple_adatt.balancing == "equal" and ple_adatt.adatt is not None and ple_adatt.adatt_gate_cofreeze
    default = trainer_config(get_config("ple_uw_adatt"), 0, "small", groups)
    assert default.adatt_gate_cofreeze and default.gate_freeze_epoch is None and default.task_weights == {}
    tuned = get_config("ple_ls_tuned")
    assert tuned.tuned_weights and tuned.balancing == "equal" and tuned.adatt is None
    weighted = trainer_config(tuned, 0, "small", None, {"a": 0.5, "b": 2.0})
    assert weighted.task_weights == {"a": 0.5, "b": 2.0}
    assert set(study.PRIMARY_CONFIGS) <= set(study.CONFIG_NAMES) and set(study.SECONDARY_CONFIGS) <= set(study.CONFIG_NAMES)
    # contradictory settings are refused
    with pytest.raises(ValueError, match="gate_freeze"):
        StudyConfig("x", "x", "control", adatt=(), gate_freeze=True)
    with pytest.raises(ValueError, match="cofreeze"):
        StudyConfig("x", "x", "control", cofreeze=False)
    with pytest.raises(ValueError, match="tuned_weights"):
        StudyConfig("x", "x", "baseline", tuned_weights=True)  # UW balancing


TINY = dict(name="tiny", suite_rows=(96, 48, 64), phase1_epochs=2, phase2_epochs=1, batch_size=48,
            adatt_warmup_epochs=0, adatt_freeze_epoch=1, adatt_grad_interval=1,
            model={"n_levels": 1, "n_shared_experts": 1, "n_task_experts": 1, "expert_hidden": (4,),
                   "expert_dim": 4, "tower_hidden": (4,)})  # fmt: skip


def test_lambda0_equals_the_gate_clock_and_the_cofreeze_matters():
    """adaTT with lambda = 0 changes training only through the gate freeze: bit-identical to
    PLE + UW with the gates frozen at the same epoch, and different from PLE + UW."""
    tiny = dataclasses.replace(study.SIZES["small"], **TINY)
    lambda0 = run_cell("adatt_lambda0", "suite_conflict", 2, tiny)
    freeze = run_cell("ple_uw_freeze", "suite_conflict", 2, tiny)
    plain = run_cell("ple_uw", "suite_conflict", 2, tiny)
    no_cofreeze = run_cell("adatt_no_cofreeze", "suite_conflict", 2, tiny)
    default = run_cell("ple_uw_adatt", "suite_conflict", 2, tiny)
    assert lambda0.metrics == freeze.metrics
    assert freeze.metrics != plain.metrics
    assert no_cofreeze.metrics != default.metrics


def test_tuned_static_weights_cell_picks_a_trial_on_validation():
    tiny = dataclasses.replace(study.SIZES["small"], **TINY)
    tuned = run_cell("ple_ls_tuned", "suite_benign", 1, tiny)
    equal = run_cell("ple_equal", "suite_benign", 1, tiny)
    assert "static weights: trial" in tuned.note and f"of {study.LS_TRIALS}" in tuned.note
    assert tuned.epochs_run == study.LS_TRIALS * equal.epochs_run  # every trial trained, all counted
    assert [t for t, _, _ in tuned.metrics] == [t for t, _, _ in equal.metrics]
    if "trial 0 " in tuned.note:  # trial 0 is raw equal weights: the ple_equal run itself
        assert tuned.metrics == equal.metrics
    assert tuned.metrics == run_cell("ple_ls_tuned", "suite_benign", 1, tiny).metrics


def test_run_cell_is_deterministic_and_complete():
    torch.manual_seed(0)
    tiny = dataclasses.replace(
        study.SIZES["small"], name="tiny", suite_rows=(96, 48, 64), phase1_epochs=2, phase2_epochs=1,
        batch_size=48, adatt_warmup_epochs=0, adatt_freeze_epoch=1, adatt_grad_interval=1,
        model={"n_levels": 1, "n_shared_experts": 1, "n_task_experts": 1, "expert_hidden": (4,),
               "expert_dim": 4, "tower_hidden": (4,)},
    )  # fmt: skip
    first = run_cell("ple_uw_adatt", "suite_conflict", 1, tiny)
    second = run_cell("ple_uw_adatt", "suite_conflict", 1, tiny)
    assert first.metrics == second.metrics  # bit-identical reruns
    assert [m[1] for m in first.metrics] == ["rmse", "auc", "accuracy"] * 2 + ["rmse", "auc"]
    assert all(np.isfinite(v) for _, _, v in first.metrics)
    assert first.epochs_run == 3 and first.wall_time > 0
    assert torch.get_num_threads() == 1  # conftest's setting is restored


# --------------------------------------------------------------------------- the real datasets and the lr search
from pathlib import Path  # noqa: E402

from mtlbook.data.census_tasks import ALL_TASKS  # noqa: E402
from mtlbook.experiments import lr_search  # noqa: E402
from mtlbook.experiments.lr_search import (  # noqa: E402
    CHOSEN_LR, LR_GRID, SEARCH_SEEDS, chosen_config, chosen_table, lr_scores, search_config, select_lr,
)

REPO = Path(__file__).resolve().parents[1]


def test_real_datasets_load_with_their_tasks():
    small = study.SIZES["small"]
    few = dataclasses.replace(small, per_dataset={**small.per_dataset,
                                                  "census_many": {**small.per_dataset["census_many"],
                                                                  "rows": (300, 200, 400)}})  # fmt: skip
    many = study.load_study_data("census_many", 0, few)
    assert tuple(many.train.task_names) == tuple(ALL_TASKS) and len(ALL_TASKS) == 8
    assert (len(many.train), len(many.val), len(many.test)) == (300, 200, 400)
    assert set(many.task_groups["census"]) == set(ALL_TASKS)
    assert {s.kind for s in many.train.task_specs} == {"binary", "multiclass", "regression"}
    cmapss = study.load_study_data("cmapss", 0, small)
    assert tuple(cmapss.train.task_names) == ("rul", "health") and set(cmapss.task_groups["cmapss"]) == {"rul", "health"}
    units = cmapss.test.extras["unit"].unique()
    assert len(units) == 100 and len(cmapss.test) > 50 * len(units)  # every full-window cycle of the test engines
    assert int(cmapss.test.extras["cycle"].min()) >= 30
    # another seed splits the training engines differently; the test engines stay
    other = study.load_study_data("cmapss", 1, small)
    assert not torch.equal(other.val.extras["unit"].unique(), cmapss.val.extras["unit"].unique())
    assert torch.equal(other.test.targets["rul"], cmapss.test.targets["rul"])
    with pytest.raises(ValueError, match="dataset must be one of"):
        study.load_study_data("census_few", 0, small)


def test_per_dataset_settings_leave_the_old_datasets_alone():
    small = study.SIZES["small"]
    assert study.DATASETS[:3] == ("suite_conflict", "suite_benign", "census")  # new datasets only appended
    for dataset in study.DATASETS[:3]:
        same = small.for_dataset(dataset)
        assert all(getattr(same, f.name) == getattr(small, f.name) for f in dataclasses.fields(small))
    assert small.rows_for("census") == small.census_rows and small.rows_for("suite_benign") == small.suite_rows
    many = small.for_dataset("census_many")
    assert many.model == study.REAL_SETTINGS["census_many"]["model"]
    assert small.rows_for("census_many") == study.REAL_SETTINGS["census_many"]["rows"]


def test_config_learning_rate_reaches_the_trainer():
    config = search_config("ple_uw_adatt", 0.03)
    assert config.name == "ple_uw_adatt@lr=0.03" and config.lr == 0.03 and config.adatt == ()
    assert trainer_config(config, 0, "small").lr == 0.03
    assert trainer_config(get_config("ple_uw"), 0, "small").lr == study.SIZES["small"].lr
    for bad in (0.0, -1e-3, math.inf, True, "0.01"):
        with pytest.raises(ValueError, match="lr must be"):
            search_config("ple_uw", bad)
        with pytest.raises(ValueError, match="lr must be"):
            StudyConfig("x", "x", "baseline", lr=bad)
    assert chosen_config("ple_uw", "cmapss", {("ple_uw", "cmapss"): 3e-3}).lr == 3e-3
    # a control takes the reference's rate, an ablation default adaTT's, whatever their own search chose
    own = {("ple_uw", "census"): 3e-3, ("adatt_lambda0", "census"): 1e-2, ("ple_uw_adatt", "census"): 3e-2,
           ("adatt_T2", "census"): 1e-2}
    assert chosen_config("adatt_lambda0", "census", own).lr == 3e-3
    assert chosen_config("adatt_T2", "census", own).lr == 3e-2
    assert chosen_config("ple_uw_adatt", "census", own).lr == 3e-2
    with pytest.raises(ValueError, match="needed by 'ple_uw_freeze'"):
        chosen_config("ple_uw_freeze", "census", {("ple_uw_freeze", "census"): 1e-2})
    with pytest.raises(ValueError, match="no chosen learning rate"):
        chosen_config("ple_uw", "census_many", {})


def _search_table(scores: dict[tuple[str, float], tuple[float, float]]) -> pd.DataFrame:
    """A search table with two seeds and two tasks (an AUC and an RMSE) per (config, lr)."""
    rows = []
    for (config, lr), (auc, rmse) in scores.items():
        for seed in (100, 101):
            for task, metric, value in (("a", "auc", auc + 0.01 * seed), ("b", "rmse", rmse)):
                rows.append({"config": f"{config}@lr={lr:g}", "dataset": "census_many", "seed": seed, "task": task,
                             "metric": metric, "value": value, "wall_time": 1.0, "epochs_run": 1, "size": "small",
                             "status": "ok", "error": ""})  # fmt: skip
    return pd.DataFrame(rows)


def test_lr_search_picks_the_argmax_of_the_stated_criterion():
    scores = {("p", 0.003): (0.80, 2.0), ("p", 0.01): (0.82, 2.1), ("p", 0.03): (0.70, 1.5),
              ("q", 0.003): (0.81, 1.9), ("q", 0.01): (0.81, 1.9), ("q", 0.03): (0.60, 3.0)}  # fmt: skip
    table = _search_table(scores)
    # the criterion by hand: per seed and task, the median over all six (config, lr); signed change
    expected = {}
    for seed in (100, 101):
        auc = {k: a + 0.01 * seed for k, (a, _) in scores.items()}
        rmse = {k: r for k, (_, r) in scores.items()}
        med_a, med_r = np.median(list(auc.values())), np.median(list(rmse.values()))
        for key in scores:
            change = ((auc[key] - med_a) / med_a - (rmse[key] - med_r) / med_r) / 2
            expected.setdefault(key, []).append(100 * change)
    got = lr_scores(table).set_index(["base_config", "lr"])["score"]
    for key, values in expected.items():
        assert got.loc[key] == pytest.approx(np.mean(values))
    picked = select_lr(table)
    best = {c: max((k for k in expected if k[0] == c), key=lambda k: np.mean(expected[k])) for c in ("p", "q")}
    assert best["p"] == ("p", 0.03)  # the much better RMSE outweighs the AUC loss
    assert chosen_table(table) == {("p", "census_many"): 0.03, ("q", "census_many"): 0.003}  # tie -> smaller lr
    assert picked["chosen"].sum() == 2
    with pytest.raises(ValueError, match="name@lr"):
        lr_scores(table.assign(config="ple_uw"))


def test_chosen_learning_rates_come_from_the_committed_search():
    searches = {name: load_table(REPO / "mtlbook" / "tables" / name) for name in lr_search.SEARCH_TABLES}
    expected = {}
    for table in searches.values():  # each search scored on its own median
        picked = chosen_table(table)
        assert not set(picked) & set(expected)  # no (config, dataset) searched twice
        expected.update(picked)
    assert CHOSEN_LR == expected
    assert set(CHOSEN_LR.values()) <= set(LR_GRID)
    every_method = (set(study.REAL_PRIMARY_CONFIGS) | set(study.METHOD_CONFIGS) | set(study.PRIMARY_CONFIGS)
                    | set(study.SECONDARY_CONFIGS) | set(study.ABLATION_CONFIGS) | set(study.WEIGHTING_CONFIGS))
    assert {c for c, _ in CHOSEN_LR} == every_method
    # the verdict's configurations have a searched lr on every dataset of the study
    for name in study.PRIMARY_CONFIGS:
        assert {d for c, d in CHOSEN_LR if c == name} == set(study.ALL_DATASETS)
    for table in searches.values():
        assert set(table["seed"]) == set(SEARCH_SEEDS) and not set(SEARCH_SEEDS) & set(range(50))
        counts = lr_search.search_rows(table).drop_duplicates(["config", "dataset", "seed"]).groupby(
            ["dataset", "base_config"]).size()
        assert (counts == len(LR_GRID) * len(SEARCH_SEEDS)).all()  # the same trials for every method
        assert set(table["dataset"]) <= set(study.ALL_DATASETS)


# Another vendor's CPU rounds a few kernels differently in the last bit, and a few hundred
# steps carry that to about 1e-8 relative; a different learning rate moves a metric by far more.
CROSS_CPU_RTOL = 1e-6


@pytest.mark.parametrize("config, dataset, name", [("ple_uw", "census", "study_verdict.csv"),
                                                   ("ple_pcgrad", "suite_conflict", "study_verdict.csv"),
                                                   ("adatt_lambda0", "census", "study_verdict.csv"),
                                                   ("ple_uw_adatt", "census_full", "study_census_full.csv")])
def test_verdict_cells_ran_at_their_chosen_lr(config, dataset, name):
    # the table has no lr column: a cell the search moved off the size's lr, re-run at its
    # evaluation lr, must give back its stored rows (bit for bit on the CPU kind that computed
    # them, to CROSS_CPU_RTOL on any other), and at the size's lr it must not.
    # adatt_lambda0 on census: its own search picked the size's lr, the reference's did not
    assert lr_search.evaluation_lr(config, dataset) != study.SIZES["small"].lr
    table = load_table(REPO / "mtlbook" / "tables" / name)
    stored = table.loc[(table["config"] == config) & (table["dataset"] == dataset) & (table["seed"] == 0)]
    chosen = lr_search.chosen_config(config, dataset)
    live = study.run_cell(chosen, dataset, 0, "small")
    assert [task for task, _, _ in live.metrics] == list(stored["task"])
    live_values = np.array([value for _, _, value in live.metrics])
    np.testing.assert_allclose(live_values, stored["value"].to_numpy(), rtol=CROSS_CPU_RTOL, atol=0)
    at_size_lr = study.run_cell(study.get_config(config), dataset, 0, "small")  # lr: the size's
    other_values = np.array([value for _, _, value in at_size_lr.metrics])
    assert not np.allclose(other_values, stored["value"].to_numpy(), rtol=100 * CROSS_CPU_RTOL, atol=0)
    assert set(zip(table["config"], table["dataset"])) <= set(CHOSEN_LR)  # every cell had a search


def test_scale_check_trains_on_every_row_of_census_and_stays_out_of_the_design():
    from mtlbook.data import load_census_income

    full = study.load_study_data("census_full", 0, "small")
    census = load_census_income(seed=0)
    assert (len(full.train), len(full.val), len(full.test)) == (len(census.train), len(census.val), len(census.test))
    assert torch.equal(full.test.inputs, census.test.inputs)  # the same split of the same seed, every row
    small = study.load_study_data("census", 0, "small")
    assert len(small.train) == study.SIZES["small"].census_rows[0] < len(full.train)
    assert "census_full" not in study.DATASETS and "census_full" in study.ALL_DATASETS
    # its table holds only the scale check, so its tests never join the design's Holm families
    table = load_table(REPO / "mtlbook" / "tables" / "study_census_full.csv")
    assert set(table["dataset"]) == {"census_full"}
    assert set(table["config"]) == set(study.REAL_PRIMARY_CONFIGS)
    assert (table.drop_duplicates(["config", "seed"]).groupby("config").size() >= study.REAL_SEEDS).all()
    verdict = load_table(REPO / "mtlbook" / "tables" / "study_verdict.csv")
    assert "census_full" not in set(verdict["dataset"])


def test_lr_search_scores_validation_not_test(tmp_path):
    tiny = dataclasses.replace(study.SIZES["small"], **TINY)
    val = run_cell("ple_uw", "suite_benign", 3, tiny, score_split="val")
    test = run_cell("ple_uw", "suite_benign", 3, tiny)
    assert val.metrics != test.metrics and [m[:2] for m in val.metrics] == [m[:2] for m in test.metrics]
    with pytest.raises(ValueError, match="score_split"):
        run_cell("ple_uw", "suite_benign", 3, tiny, score_split="train")
    searched = lr_search.run_lr_search(tmp_path / "search.csv", ["ple_uw"], ["suite_benign"], lrs=(1e-2, 3e-2),
                                       seeds=(3,), size=tiny)  # fmt: skip
    assert sorted(set(searched["lr"])) == [1e-2, 3e-2]
    at_default = searched.loc[searched["lr"] == 1e-2].sort_values("task")
    assert sorted(zip(at_default["task"], at_default["value"])) == sorted((t, v) for t, _, v in val.metrics)


def test_atomic_write_bytes_gives_the_usual_mode_and_checks_its_input(tmp_path):
    from mtlbook.train.checkpoint import atomic_write_bytes

    path = atomic_write_bytes(b"a,b\n1,2\n", tmp_path / "sub" / "t.csv")
    assert path.read_bytes() == b"a,b\n1,2\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(TypeError, match="data must be bytes"):
        atomic_write_bytes("text", tmp_path / "t.csv")


def test_study_reexports_the_split_modules():
    from mtlbook.experiments import study_plots, study_runner, study_statistics

    assert study.run_grid is study_runner.run_grid and study.verdict is study_statistics.verdict
    assert study.plot_paired is study_plots.plot_paired and "run_grid" in dir(study)
    with pytest.raises(AttributeError, match="no attribute"):
        study.no_such_name


def test_study_plots_draw_one_row_per_config_and_refuse_missing_data():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = load_table(REPO / "mtlbook" / "tables" / "study_verdict.csv")
    census = table.loc[table["dataset"] == "census"]
    paired = study.paired_differences(census)
    # every config but the reference and the single-task models (paired_differences leaves them out)
    n_configs = len(set(census["config"]) - {"ple_uw", "single_task"})
    assert "single_task" in set(census["config"])
    ax = study.plot_paired(paired, "census")
    assert len(ax.patches) == n_configs and len(ax.get_yticklabels()) == n_configs
    ax = study.plot_task_means(study.summarize(census), "census", "income", configs=["ple_uw", "ple_uw_adatt"])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["PLE + UW", "PLE + UW + adaTT"]
    with pytest.raises(ValueError, match="no averaged rows"):
        study.plot_paired(paired, "cmapss")
    with pytest.raises(ValueError, match="no rows"):
        study.plot_task_means(study.summarize(census), "census", "weeks_worked")
    plt.close("all")


# --------------------------------------------------------------------------- the study computed another way (timing runs)
def test_with_compute_trains_the_same_models_up_to_rounding():
    """Bank experts and structured extraction change how a cell computes, not what it trains:
    the same metrics to float rounding, and the size's other settings untouched."""
    from mtlbook.experiments.study_configs import with_compute

    tiny = dataclasses.replace(study.SIZES["small"], **TINY)
    fast = with_compute(tiny, "bank", "structured")
    assert fast.model["experts"] == "bank" and fast.adatt_extraction == "structured"
    assert "experts" not in tiny.model and tiny.adatt_extraction == "batched"  # the original is not changed
    assert dataclasses.replace(fast, model=tiny.model, adatt_extraction="batched") == tiny
    assert trainer_config(get_config("ple_uw_adatt"), 0, fast).adatt["extraction"] == "structured"
    assert trainer_config(get_config("ple_uw_adatt"), 0, tiny).adatt["extraction"] == "batched"
    assert with_compute(tiny) == tiny
    default = run_cell("ple_uw_adatt", "suite_conflict", 1, tiny)
    other = run_cell("ple_uw_adatt", "suite_conflict", 1, fast)
    assert [m[:2] for m in other.metrics] == [m[:2] for m in default.metrics]
    np.testing.assert_allclose([m[2] for m in other.metrics], [m[2] for m in default.metrics], rtol=1e-4)
    with pytest.raises(ValueError, match="experts must be one of"):
        with_compute(tiny, experts="stacked")
    with pytest.raises(ValueError, match="extraction must be one of"):
        with_compute(tiny, extraction="vmap")
    with pytest.raises(ValueError, match="adatt_extraction must be one of"):
        dataclasses.replace(tiny, adatt_extraction="vmap")


def test_run_study_keeps_timing_runs_out_of_the_stored_tables(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_study", Path(__file__).parents[1] / "benchmarks" / "run_study.py")
    run_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_study)
    for argv in (["--experts", "bank"], ["--extraction", "structured", "--out", "mtlbook/tables/study_small.csv"]):
        with pytest.raises(SystemExit) as stopped:
            run_study.main(argv)
        assert stopped.value.code == 2
        assert "need --out outside mtlbook/tables" in capsys.readouterr().err
