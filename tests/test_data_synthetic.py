"""Synthetic generators: determinism, the MMoE correlation knob, the task suite's known truth."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from mtlbook.data import MultiTaskDataset, make_loader
from mtlbook.data.synthetic import (
    MMOE_ALPHAS,
    SUITE_REGIMES,
    make_mmoe_synthetic,
    make_suite_regime,
    make_task_suite,
)


def label_corr(dataset: MultiTaskDataset, a: str, b: str) -> float:
    return float(np.corrcoef(dataset.targets[a].double().numpy(), dataset.targets[b].double().numpy())[0, 1])


# --------------------------------------------------------------------------- MMoE generator


def test_mmoe_same_seed_same_data_other_seed_other_data():
    torch.manual_seed(0)
    a = make_mmoe_synthetic(300, 0.5, dim=20, seed=3)
    b = make_mmoe_synthetic(300, 0.5, dim=20, seed=3)
    c = make_mmoe_synthetic(300, 0.5, dim=20, seed=4)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets["y1"], b.targets["y1"])
    assert torch.equal(a.targets["y2"], b.targets["y2"])
    assert not torch.equal(a.inputs, c.inputs)
    assert not torch.allclose(a.truth.w1, c.truth.w1)


def test_mmoe_layout_and_tasks():
    ds = make_mmoe_synthetic(50, 0.3, dim=12)
    assert ds.inputs.shape == (50, 12) and ds.inputs.dtype == torch.float32
    assert ds.task_names == ("y1", "y2")
    assert all(s.kind == "regression" for s in ds.task_specs)
    assert ds.targets["y1"].shape == (50,) and ds.targets["y1"].dtype == torch.float32
    assert all(bool(m.all()) for m in ds.present.values())


@pytest.mark.parametrize("p", [-1.0, -0.3, 0.0, 0.5, 0.9, 1.0])
def test_mmoe_weight_vectors_have_requested_cosine_and_norm(p):
    truth = make_mmoe_synthetic(10, p, dim=30, seed=1).truth
    w1, w2 = truth.w1.double(), truth.w2.double()
    assert math.isclose(float(w1 @ w2 / (w1.norm() * w2.norm())), p, abs_tol=1e-5)
    assert math.isclose(float(w1.norm()), truth.scale, rel_tol=1e-5)
    assert math.isclose(float(w2.norm()), truth.scale, rel_tol=1e-5)


def test_mmoe_labels_follow_the_documented_formula():
    ds = make_mmoe_synthetic(200, 0.6, dim=16, seed=2)
    t = ds.truth
    x = ds.inputs.double()
    for w, task in ((t.w1.double(), "y1"), (t.w2.double(), "y2")):
        s = x @ w
        clean = s + torch.sin(s[:, None] * t.alphas.double()[None, :] + t.betas.double()[None, :]).sum(1)
        assert torch.allclose(clean.float(), ds.extras[f"clean_{task}"], atol=1e-4)
        residual = ds.targets[task] - ds.extras[f"clean_{task}"]
        assert 0.05 < float(residual.std()) < 0.2  # noise_std 0.1
    assert len(t.alphas) == len(MMOE_ALPHAS)


def test_mmoe_label_correlation_rises_with_p():
    c0, c05, c09, c1 = (label_corr(make_mmoe_synthetic(4000, p, seed=0), "y1", "y2") for p in (0.0, 0.5, 0.9, 1.0))
    assert abs(c0) < 0.06
    assert c05 > c0 + 0.2 and c09 > c05 + 0.2 and c1 > c09 + 0.1
    assert c1 > 0.99
    corr = [c0, c05]
    # non-linearity hides part of the relatedness in mid-range
    assert corr[1] < 0.5 - 0.05


def test_mmoe_correlation_curve_is_odd_and_seed_stable():
    for seed in (0, 1):
        plus = label_corr(make_mmoe_synthetic(4000, 0.7, seed=seed), "y1", "y2")
        minus = label_corr(make_mmoe_synthetic(4000, -0.7, seed=seed), "y1", "y2")
        assert plus > 0.3 and math.isclose(plus, -minus, abs_tol=0.05)
    assert label_corr(make_mmoe_synthetic(4000, -1.0), "y1", "y2") < -0.99


def test_mmoe_same_seed_shares_inputs_across_correlations():
    a = make_mmoe_synthetic(100, 0.1, dim=10, seed=5)
    b = make_mmoe_synthetic(100, 0.8, dim=10, seed=5)
    assert torch.equal(a.inputs, b.inputs)
    assert torch.equal(a.truth.w1, b.truth.w1) and torch.equal(a.targets["y1"], b.targets["y1"])
    assert not torch.equal(a.targets["y2"], b.targets["y2"])


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        (dict(n=10, correlation=1.5), ValueError, "correlation"),
        (dict(n=10, correlation=float("nan")), ValueError, "correlation"),
        (dict(n=0, correlation=0.5), ValueError, "n must"),
        (dict(n=True, correlation=0.5), TypeError, "n must"),
        (dict(n=10, correlation=0.5, dim=1), ValueError, "dim"),
        (dict(n=10, correlation=0.5, scale=0.0), ValueError, "scale"),
        (dict(n=10, correlation=0.5, seed=-1), ValueError, "seed"),
        (dict(n=10, correlation=0.5, alphas=[1.0, 2.0], betas=[0.0]), ValueError, "alphas"),
    ],
)
def test_mmoe_rejects_bad_arguments(kwargs, error, word):
    with pytest.raises(error, match=word):
        make_mmoe_synthetic(**kwargs)


# --------------------------------------------------------------------------- task suite


def test_suite_is_deterministic_under_a_seed():
    a, ta = make_task_suite(500, seed=7, missing_rate=0.2, with_clusters=True)
    b, tb = make_task_suite(500, seed=7, missing_rate=0.2, with_clusters=True)
    c, _ = make_task_suite(500, seed=8, missing_rate=0.2, with_clusters=True)
    assert torch.equal(a.inputs, b.inputs)
    for name in ta.task_names:
        assert torch.equal(a.targets[name], b.targets[name]) and torch.equal(a.present[name], b.present[name])
    assert torch.equal(a.extras["cluster_id"], b.extras["cluster_id"])
    assert torch.equal(ta.correlation, tb.correlation)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("n_tasks, n_groups", [(8, 3), (12, 4), (16, 5)])
def test_suite_shapes_groups_and_kinds(n_tasks, n_groups):
    ds, truth = make_task_suite(300, n_tasks=n_tasks, n_groups=n_groups, n_classes=4)
    assert ds.inputs.shape == (300, 32) and ds.task_names == truth.task_names
    assert len(truth.task_names) == n_tasks and len(truth.groups) == n_groups
    grouped = [t for members in truth.groups.values() for t in members]
    assert sorted(grouped) == sorted(truth.task_names)  # a partition
    assert all(truth.group_of[t] == g for g, members in truth.groups.items() for t in members)
    kinds = {s.kind for s in ds.task_specs}
    assert kinds == {"regression", "binary", "multiclass"}
    for spec in ds.task_specs:
        y = ds.targets[spec.name]
        assert y.shape == (300,)
        if spec.kind == "multiclass":
            assert y.dtype == torch.long and spec.n_classes == 4
            assert set(y.unique().tolist()) == set(range(4))
        elif spec.kind == "binary":
            assert y.dtype == torch.float32 and set(y.unique().tolist()) == {0.0, 1.0}
        else:
            assert y.dtype == torch.float32
    for matrix in (truth.correlation, truth.relation):
        assert matrix.shape == (n_tasks, n_tasks) and torch.equal(matrix, matrix.T)
    assert torch.allclose(truth.correlation.diagonal(), torch.ones(n_tasks))
    assert truth.directions.shape == (n_tasks, 32)
    assert torch.allclose(truth.directions @ truth.directions.T, truth.correlation, atol=1e-5)


def test_suite_truth_signs_agree_with_correlations():
    _, truth = make_task_suite(10, n_tasks=10, n_groups=4, group_strength=0.7)
    off = ~torch.eye(10, dtype=torch.bool)
    corr, rel = truth.correlation[off], truth.relation[off]
    assert torch.allclose(corr[rel == 1], torch.full_like(corr[rel == 1], 0.49), atol=1e-5)
    assert torch.allclose(corr[rel == -1], torch.full_like(corr[rel == -1], -0.49), atol=1e-5)
    assert torch.all(corr[rel == 0] == 0)
    assert truth.anti_correlated_groups == (("g0", "g1"), ("g2", "g3"))


def test_suite_anti_correlation_is_visible_in_the_labels():
    ds, truth = make_task_suite(4000, seed=1)
    names = truth.task_names
    seen = {1: 0, -1: 0, 0: 0}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if j <= i:
                continue
            c = label_corr(ds, a, b)
            r = int(truth.relation[i, j])
            seen[r] += 1
            if r == 1:
                assert c > 0.25, (a, b, c)
            elif r == -1:
                assert c < -0.25, (a, b, c)
            else:
                assert abs(c) < 0.08, (a, b, c)
    assert min(seen.values()) > 0  # the default suite has all three relations


def test_suite_benign_regime_has_no_negative_relations():
    ds, truth = make_suite_regime("benign", 3000, seed=2)
    assert truth.anti_correlated_groups == ()
    assert int(truth.relation.min()) == 0 and torch.all(truth.loss_scales == 1.0)
    for i, a in enumerate(truth.task_names):
        for b in truth.task_names[i + 1:]:
            assert label_corr(ds, a, b) > -0.08


def test_suite_loss_scale_imbalance():
    ds, truth = make_suite_regime("conflict", 4000, seed=0)
    assert SUITE_REGIMES["conflict"]["loss_scale_ratio"] == 30.0
    assert float(truth.loss_scales.max() / truth.loss_scales.min()) == pytest.approx(30.0)
    for spec, scale in zip(ds.task_specs, truth.loss_scales.tolist()):
        if spec.kind == "regression":
            assert scale == 30.0
            assert float(ds.targets[spec.name].std()) == pytest.approx(30.0, rel=0.08)
        else:
            assert scale == 1.0
    # the regression MSE of a zero predictor dwarfs the classification targets' spread
    reg = [float(ds.targets[s.name].pow(2).mean()) for s in ds.task_specs if s.kind == "regression"]
    binary = [float(ds.targets[s.name].var()) for s in ds.task_specs if s.kind == "binary"]
    assert min(reg) / max(binary) > 100 * 30


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.6])
def test_suite_missing_rate_is_honoured_per_task(rate):
    n = 1000
    ds, truth = make_task_suite(n, missing_rate=rate, seed=3)
    masks = [ds.present[t] for t in truth.task_names]
    for name, mask in zip(truth.task_names, masks):
        assert mask.dtype == torch.bool and int((~mask).sum()) == round(rate * n)
        assert torch.all(ds.targets[name][~mask] == 0)
    if rate > 0:
        assert not all(torch.equal(masks[0], m) for m in masks[1:])  # independent per task
    batch = next(iter(make_loader(ds, batch_size=64, shuffle=True, seed=0)))
    assert set(batch.present) == set(truth.task_names) and batch.inputs.shape == (64, 32)


def test_suite_cluster_ids():
    ds, truth = make_task_suite(4000, with_clusters=True, n_clusters=5, seed=4)
    ids = ds.extras["cluster_id"]
    assert ids.dtype == torch.long and ids.shape == (4000,) and truth.n_clusters == 5
    counts = torch.bincount(ids, minlength=5)
    assert counts.min() > 600  # 800 expected each
    # clusters are independent of the scores when cluster_effect = 0 ...
    reg = truth.task_names[0]
    means = torch.stack([ds.targets[reg][ids == k].mean() for k in range(5)])
    assert float(means.abs().max()) < 3.0  # std of the mean ~ 30/sqrt(800) ~ 1.1
    # ... and shift the targets when cluster_effect > 0
    shifted, _ = make_task_suite(4000, with_clusters=True, n_clusters=5, cluster_effect=1.0, seed=4)
    means = torch.stack([shifted.targets[reg][ids == k].mean() for k in range(5)])
    assert float(means.max() - means.min()) > 10.0
    assert "cluster_id" in ds.subset(torch.arange(10)).extras
    plain, _ = make_task_suite(100)
    assert "cluster_id" not in plain.extras


def test_suite_explicit_kinds():
    ds, truth = make_task_suite(200, n_tasks=4, n_groups=2, kinds=["binary", "binary", "multiclass", "regression"])
    assert [s.kind for s in ds.task_specs] == ["binary", "binary", "multiclass", "regression"]
    ds, _ = make_task_suite(200, n_tasks=4, n_groups=2, kinds="binary")
    assert {s.kind for s in ds.task_specs} == {"binary"}


def test_suite_is_fast():
    make_task_suite(100)  # warm-up
    start = time.perf_counter()
    make_task_suite(4000, n_tasks=16, n_groups=4, missing_rate=0.1, with_clusters=True)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        (dict(n=0), ValueError, "n must"),
        (dict(n=10, n_tasks=1), ValueError, "n_tasks"),
        (dict(n=10, n_groups=9), ValueError, "n_groups"),
        (dict(n=10, n_groups=1), ValueError, "anti_correlated"),
        (dict(n=10, missing_rate=1.0), ValueError, "missing_rate"),
        (dict(n=10, loss_scale_ratio=0.0), ValueError, "loss_scale_ratio"),
        (dict(n=10, group_strength=1.5), ValueError, "group_strength"),
        (dict(n=10, dim=8), ValueError, "dim"),
        (dict(n=10, kinds="contrastive"), ValueError, "kinds"),
        (dict(n=10, kinds=["binary"] * 3), ValueError, "kinds"),
        (dict(n=10, n_classes=1), ValueError, "n_classes"),
        (dict(n=10, anti_correlated=1), TypeError, "anti_correlated"),
    ],
)
def test_suite_rejects_bad_arguments(kwargs, error, word):
    with pytest.raises(error, match=word):
        make_task_suite(**kwargs)


def test_suite_regime_rejects_unknown_name_and_accepts_overrides():
    with pytest.raises(ValueError, match="regime"):
        make_suite_regime("chaotic", 10)
    ds, truth = make_suite_regime("conflict", 50, n_tasks=10, loss_scale_ratio=5.0)
    assert len(truth.task_names) == 10 and float(truth.loss_scales.max()) == 5.0
