"""Census-income as a many-task problem: catalogue, leakage audit, relations, duplicates."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlbook.data import load_census_income
from mtlbook.data.census import CENSUS_COLUMNS
from mtlbook.data.census_audit import (
    AUDIT_ALLOW,
    AUDIT_THRESHOLD,
    _code_auc,
    duplicate_report,
    label_association,
    leakage_audit,
    single_column_scores,
    task_groups,
)
from mtlbook.data.census_tasks import ALL_TASKS, DEFAULT_TASKS, EDUCATION_LEVELS, TASK_CATALOGUE, resolve_tasks
from mtlbook.train.metrics import binary_auc

DATA_ROOT = Path(os.environ.get("MTLBOOK_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CENSUS_GZ = DATA_ROOT / "census-income" / "census-income.test.gz"


@pytest.fixture(scope="module")
def papers():
    return load_census_income(seed=0)


@pytest.fixture(scope="module")
def many():
    return load_census_income(seed=0, tasks="all")


def _raw_rows(n: int | None = None) -> list[list[str]]:
    with gzip.open(CENSUS_GZ, "rt", encoding="latin-1") as handle:
        lines = [line.rstrip("\n") for line in handle if line.strip()]
    lines = lines if n is None else lines[:n]
    return [[field.strip() for field in line.split(",")] for line in lines]


def _small_file(tmp_path: Path, n: int = 600) -> Path:
    with gzip.open(CENSUS_GZ, "rt", encoding="latin-1") as handle:
        lines = [next(handle) for _ in range(n)]
    path = tmp_path / "census-income.test.gz"
    with gzip.open(path, "wt", encoding="latin-1") as handle:
        handle.writelines(lines)
    return path


# --------------------------------------------------------------------------- catalogue
def test_catalogue_has_enough_candidates_of_several_kinds():
    assert len(TASK_CATALOGUE) >= 8
    assert len(ALL_TASKS) >= 6 and set(DEFAULT_TASKS) <= set(ALL_TASKS)
    assert {TASK_CATALOGUE[t].kind for t in ALL_TASKS} == {"binary", "regression", "multiclass"}
    for task in TASK_CATALOGUE.values():
        assert task.reason and task.target
        assert set(task.columns + task.proxies) <= set(CENSUS_COLUMNS), task.name
        assert task.included == (task.name in ALL_TASKS)
        assert (task.n_classes is not None) == (task.kind == "multiclass")
        if task.kind == "multiclass":
            assert len(task.classes) == task.n_classes
    assert sum(len(v) for v in EDUCATION_LEVELS.values()) == 16  # every level but "Children"


def test_resolve_tasks_errors():
    assert [t.name for t in resolve_tasks(None)] == list(DEFAULT_TASKS)
    assert [t.name for t in resolve_tasks("all")] == list(ALL_TASKS)
    assert [t.name for t in resolve_tasks("veteran")] == ["veteran"]  # an "out" task by name
    with pytest.raises(ValueError, match="unknown task names.*'salary'"):
        resolve_tasks(["income", "salary"])
    with pytest.raises(ValueError, match="must not repeat.*income"):
        resolve_tasks(["income", "income"])
    with pytest.raises(ValueError, match="at least one task"):
        resolve_tasks([])
    with pytest.raises(TypeError, match="task names"):
        resolve_tasks(["income", 3])
    with pytest.raises(TypeError, match="tasks must be"):
        resolve_tasks(7)


def test_loader_argument_errors(tmp_path):
    path = _small_file(tmp_path, 200)
    with pytest.raises(ValueError, match="unknown task names"):
        load_census_income(path, tasks=["nope"], verify_checksum=False)
    with pytest.raises(ValueError, match="at least one task"):
        load_census_income(path, tasks=(), verify_checksum=False)
    with pytest.raises(TypeError, match="leak_free"):
        load_census_income(path, leak_free="yes", verify_checksum=False)
    with pytest.raises(TypeError, match="dedupe"):
        load_census_income(path, dedupe=1, verify_checksum=False)


# --------------------------------------------------------------------------- tasks, kinds, missing values
def test_default_selection_keeps_the_papers_inputs(papers):
    assert tuple(s.name for s in papers.task_specs) == DEFAULT_TASKS and not papers.leak_free
    assert papers.excluded_columns == ("marital_status", "instance_weight", "income")
    explicit = load_census_income(seed=0, tasks=list(DEFAULT_TASKS))  # same pair, same inputs
    assert explicit.feature_names == papers.feature_names
    assert torch.equal(explicit.test.inputs, papers.test.inputs)
    assert len(papers.feature_columns) == papers.n_features == 499


def test_all_tasks_kinds_classes_and_missing_targets(many):
    raw = _raw_rows()
    col = {c: i for i, c in enumerate(CENSUS_COLUMNS)}
    specs = {s.name: s for s in many.task_specs}
    assert tuple(specs) == ALL_TASKS
    assert specs["education"].kind == "multiclass" and specs["education"].n_classes == 4
    assert specs["weeks_worked"].kind == "regression"
    for split in (many.train, many.val, many.test):
        rows = split.extras["row"].numpy()
        assert torch.isfinite(split.inputs).all()
        for name, spec in specs.items():
            target, present = split.targets[name], split.present[name]
            assert torch.isfinite(target.float()).all()
            if spec.kind == "binary":
                assert set(target.unique().tolist()) <= {0.0, 1.0}
                assert not torch.any(target[~present] != 0)  # placeholders are 0
            if spec.kind == "multiclass":
                assert target.dtype == torch.long and int(target.min()) >= 0 and int(target.max()) < 4
        # children (education "Children") and the 1995 wave (no migration question) have no target
        children = np.array([raw[r][col["education"]] == "Children" for r in rows])
        assert np.array_equal(~split.present["education"].numpy(), children)
        wave_95 = np.array([raw[r][col["year"]] == "95" for r in rows])
        asked = np.array([raw[r][col["lived_in_house_1_year_ago"]] in ("Yes", "No") for r in rows])
        assert np.array_equal(split.present["moved_last_year"].numpy(), asked) and not asked[wave_95].any()
        moved = np.array([raw[r][col["lived_in_house_1_year_ago"]] == "No" for r in rows], dtype=np.float32)
        assert np.array_equal(split.targets["moved_last_year"].numpy(), moved)
    # class counts: every education level is well populated in the train split
    counts = torch.bincount(many.train.targets["education"][many.train.present["education"]], minlength=4)
    assert int(counts.min()) > 5_000
    rates = {n: float(many.train.targets[n][many.train.present[n]].mean())
             for n, s in specs.items() if s.kind == "binary"}
    assert all(0.05 < r < 0.5 for r in rates.values()), rates


def test_defining_and_proxy_columns_leave_every_task_inputs(many):
    inputs = set(many.feature_columns)
    assert "instance_weight" not in inputs and many.leak_free
    for name in ALL_TASKS:
        task = TASK_CATALOGUE[name]
        for column in task.columns + task.proxies:
            assert column not in inputs and column in many.excluded_columns, (name, column)
    assert {"age", "sex", "race", "occupation_code", "tax_filer_status"} <= inputs
    # leak_free=False keeps the proxies but never the defining columns
    loose = load_census_income(seed=0, tasks=["never_married", "self_employed"], leak_free=False)
    assert {"household_family_status", "own_business_or_self_employed"} <= set(loose.feature_columns)
    assert not {"marital_status", "class_of_worker"} & set(loose.feature_columns)


# --------------------------------------------------------------------------- leakage audit
def test_no_single_column_predicts_a_task_of_all(many):
    audit = leakage_audit(many)
    assert list(audit["task"]) == list(ALL_TASKS)
    for row in audit.itertuples():
        allowed = (row.task, row.strongest_column) in AUDIT_ALLOW
        assert row.score <= AUDIT_THRESHOLD or allowed, f"{row.task}: {row.strongest_column} scores {row.score:.4f}"
        assert row.score >= row.runner_up_score
    assert not audit["leak"].any()


def test_audit_catches_the_papers_marital_status_proxy(papers):
    audit = leakage_audit(papers).set_index("task")
    assert audit.loc["never_married", "strongest_column"] == "household_family_status"
    assert audit.loc["never_married", "score"] > 0.97 and audit.loc["never_married", "leak"]
    clean = leakage_audit(load_census_income(seed=0, leak_free=True)).set_index("task")
    assert not clean["leak"].any()
    assert clean.loc["never_married", "strongest_column"] == "age"  # legitimate, and below the bar


def test_audit_scores_match_a_direct_computation(papers):
    scores = single_column_scores(papers)
    sex = scores[(scores.task == "income") & (scores.column == "sex")]["score"].item()
    male = papers.train.inputs[:, papers.feature_names.index("sex=Male")]
    y = papers.train.targets["income"]
    rate = torch.where(male > 0, y[male > 0].mean(), y[male == 0].mean())
    assert sex == pytest.approx(binary_auc(rate.double(), y.double()), abs=1e-12)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 30, 4000)
    labels = (rng.random(4000) < 0.05 + 0.02 * (codes % 7)).astype(float)
    count, positives = np.bincount(codes).astype(float), np.bincount(codes, weights=labels)
    direct = binary_auc(torch.from_numpy((positives / count)[codes]), torch.from_numpy(labels))
    assert _code_auc(count, positives) == pytest.approx(direct, abs=1e-12)
    with pytest.raises(ValueError, match="threshold"):
        leakage_audit(papers, threshold=2.0)
    with pytest.raises(TypeError, match="CensusIncome"):
        leakage_audit(papers.train)


# --------------------------------------------------------------------------- label relations
def test_label_association_and_groups(many):
    assoc = label_association(many)
    values = assoc.to_numpy()
    assert np.allclose(values, values.T, equal_nan=True) and np.allclose(np.diag(values), 1.0)
    assert np.nanmax(np.abs(values)) <= 1.0 + 1e-12
    assert assoc.loc["never_married", "weeks_worked"] < -0.2  # children never married and never worked
    assert assoc.loc["income", "investment_income"] > 0.2
    assert 0.0 <= assoc.loc["education", "income"] <= 1.0  # Cramer's V for the multi-class task
    groups = task_groups(assoc, 0.2)
    assert sorted(t for g in groups for t in g) == sorted(ALL_TASKS)
    assert any({"income", "investment_income"} <= set(g) for g in groups)
    assert task_groups(assoc, 1.0) == [[t] for t in ALL_TASKS]
    with pytest.raises(ValueError, match="threshold"):
        task_groups(assoc, 0.0)


# --------------------------------------------------------------------------- splits and duplicates
def test_duplicates_reported_and_dedupe_keeps_them_on_one_side(papers):
    report = duplicate_report(papers)
    assert 0.15 < report.loc["test", "share"] < 0.35  # about a quarter of test rows repeat a train row
    deduped = load_census_income(seed=0, dedupe=True)
    assert (duplicate_report(deduped).loc[["val", "test"], "with_copy_in_train"] == 0).all()
    groups = [set(s.extras["duplicate_group"].tolist()) for s in (deduped.train, deduped.val, deduped.test)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    sizes = np.array([len(deduped.train), len(deduped.val), len(deduped.test)]) / 99_762
    assert np.allclose(sizes, (0.7, 0.15, 0.15), atol=0.01)
    rows = torch.cat([deduped.train.extras["row"], deduped.val.extras["row"], deduped.test.extras["row"]])
    assert torch.equal(rows.sort().values, torch.arange(99_762))
    # identical rows really are identical (all columns but the weight)
    raw = _raw_rows()
    g = papers.train.extras["duplicate_group"].numpy()
    r = papers.train.extras["row"].numpy()
    values, counts = np.unique(g, return_counts=True)
    for group in values[counts > 1][:20]:
        members = r[g == group]
        first = raw[members[0]][:24] + raw[members[0]][25:]
        assert all(raw[m][:24] + raw[m][25:] == first for m in members)


def test_splits_reproducible_by_seed(tmp_path):
    path = _small_file(tmp_path)
    for dedupe in (False, True):
        a = load_census_income(path, seed=3, tasks="all", dedupe=dedupe, verify_checksum=False)
        b = load_census_income(path, seed=3, tasks="all", dedupe=dedupe, verify_checksum=False)
        c = load_census_income(path, seed=4, tasks="all", dedupe=dedupe, verify_checksum=False)
        for name in ("train", "val", "test"):
            assert torch.equal(getattr(a, name).extras["row"], getattr(b, name).extras["row"])
            assert torch.equal(getattr(a, name).inputs, getattr(b, name).inputs)
        assert not torch.equal(a.test.extras["row"], c.test.extras["row"])


def test_statistics_come_from_the_train_split_only(tmp_path):
    path = _small_file(tmp_path)
    data = load_census_income(path, seed=1, tasks="all", verify_checksum=False, log_money=False)
    raw = _raw_rows(600)
    weeks = np.array([float(r[CENSUS_COLUMNS.index("weeks_worked_in_year")]) for r in raw])
    ages = np.array([float(r[0]) for r in raw])
    train = data.train.extras["row"].numpy()
    assert data.target_mean["weeks_worked"] == pytest.approx(weeks[train].mean())
    assert data.target_std["weeks_worked"] == pytest.approx(weeks[train].std())
    assert float(data.numeric_mean[data.numeric_features.index("age")]) == pytest.approx(ages[train].mean(), rel=1e-6)
    assert abs(float(data.numeric_mean[0]) - ages.mean()) > 1e-6  # not the mean over all rows
    scaled = data.test.targets["weeks_worked"].double().numpy()
    expected = (weeks[data.test.extras["row"].numpy()] - weeks[train].mean()) / weeks[train].std()
    assert np.allclose(scaled, expected, atol=1e-5)
    # categories seen only outside train encode as zeros: each row has at most one hot per column
    k = len(data.numeric_features)
    assert torch.all(data.test.inputs[:, k:].sum(1) <= len(data.categorical_features))
    assert math.isclose(float(data.train.targets["weeks_worked"].mean()), 0.0, abs_tol=1e-5)


# --------------------------------------------------------------------------- the stored-table driver
def test_census_study_cells_and_errors(tmp_path):
    from mtlbook.experiments import census_study as cs

    cells = cs.cells([0, 1])
    assert cells[0] == ("two_task", "papers", "shared_bottom", 0) and cells[-1] == ("many_task", "all", "ple", 1)
    assert all(c[3] == 0 for c in cells[: len(cells) // 2])  # seed-major: whole seeds first
    assert ("two_task", "deduped", "mmoe", 0) in cells and ("two_task", "deduped", "ple", 0) not in cells
    path = _small_file(tmp_path, 600)
    with pytest.raises(ValueError, match="variant"):
        cs.run_cell("two_task", "nope", "mmoe", 0, path=path)
    with pytest.raises(ValueError, match="model"):
        cs.run_cell("two_task", "papers", "single_task", 0, path=path)
    with pytest.raises(ValueError, match="table"):
        cs.load_census_variant("three_task", "papers", 0, path, False)
    small = {"epochs": 1, "batch_size": 128}
    a = cs.run_cell("many_task", "all", "mmoe", 1, settings=small, path=path, verify_checksum=False)
    b = cs.run_cell("many_task", "all", "mmoe", 1, settings=small, path=path, verify_checksum=False)
    assert list(a.columns) == list(cs.COLUMNS) and list(a["task"]) == list(ALL_TASKS)
    assert a["value"].tolist() == b["value"].tolist()  # deterministic: the chapter re-runs a cell
    summary = cs.summarise(pd_concat([a, b.assign(seed=2, value=b["value"] + 0.01)]))
    assert (summary["seeds"] == 2).all() and (summary["low"] < summary["mean"]).all()


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)
