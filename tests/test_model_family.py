"""Tests for mtlbook.experiments.model_family (chapter 3 experiment helpers)."""

from __future__ import annotations

import itertools
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from torch import nn

from mtlbook.data import MultiTaskDataset, TaskSpec, make_mmoe_synthetic
from mtlbook.data.batch import Batch, make_loader
from mtlbook.experiments import model_family as mf
from mtlbook.losses import task_losses
from mtlbook.models import build_model

REG2 = (TaskSpec("a", "regression"), TaskSpec("b", "regression"))
SMALL = dict(expert_hidden=(8,), expert_dim=4, tower_hidden=(8,))


def tiny_dataset(n: int = 32, n_features: int = 5, seed: int = 0, specs=REG2) -> MultiTaskDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_features, generator=g)
    targets = {}
    for spec in specs:
        if spec.kind == "binary":
            targets[spec.name] = (torch.rand(n, generator=g) < 0.4).float()
        else:
            targets[spec.name] = torch.randn(n, generator=g)
    return MultiTaskDataset(x, targets, specs)


class FixedHeads(nn.Module):
    """A 'model' whose outputs are input columns: lets a test choose the scores exactly."""

    def __init__(self, columns: dict[str, int]) -> None:
        super().__init__()
        self.columns = columns
        self.unused = nn.Linear(1, 1)

    def forward(self, x):
        return {name: x[:, j] for name, j in self.columns.items()}


def pairwise_auc(scores, labels) -> float:
    """Hand computation: share of (positive, negative) pairs ordered correctly, ties 1/2."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


# ----------------------------------------------------------------------------- label correlation


def test_label_correlation_matches_numpy_on_present_rows():
    data = tiny_dataset(40, seed=1)
    data.present["b"][::4] = False  # these rows must not count
    both = data.present["a"] & data.present["b"]
    expected = np.corrcoef(data.targets["a"][both].numpy(), data.targets["b"][both].numpy())[0, 1]
    assert mf.label_correlation(data, "a", "b") == pytest.approx(expected, abs=1e-6)
    assert mf.label_correlation(data, "a", "a") == pytest.approx(1.0, abs=1e-12)


def test_label_correlation_is_nan_for_constant_target_and_rejects_unknown_task():
    data = tiny_dataset(10)
    data.targets["b"] = torch.full((10,), 3.0)
    assert math.isnan(mf.label_correlation(data, "a", "b"))
    with pytest.raises(ValueError, match="task_b"):
        mf.label_correlation(data, "a", "nope")
    with pytest.raises(TypeError, match="dataset"):
        mf.label_correlation([1, 2], "a", "b")


def test_mmoe_label_correlation_rises_with_p_and_stays_below_it():
    ps = [-0.9, -0.5, 0.0, 0.5, 0.9, 1.0]
    curve = mf.correlation_curve(ps, n=4000, seed=3, dim=20)
    measured = curve["label_correlation"].to_numpy()
    assert list(curve["p"]) == ps
    assert np.all(np.diff(measured) > 0)  # strictly increasing in p
    assert measured[-1] > 0.99  # p = 1: the tasks differ only by noise
    assert abs(measured[2]) < 0.06  # p = 0: independent up to sampling noise (~1/sqrt(n))
    for p, r in zip(ps, measured):
        if 0.1 < abs(p) < 1.0:
            assert np.sign(r) == np.sign(p) and abs(r) < abs(p)  # sines shrink the linear link


# ----------------------------------------------------------------------------- AUC and MSE helper


def test_evaluate_tasks_auc_and_mse_match_hand_computation():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4, -1.0])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    predictions = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5, 3.0])
    values = torch.tensor([1.5, 2.0, 1.0, -1.0, 0.5, 0.0])
    data = MultiTaskDataset(
        torch.stack([scores, predictions], dim=1),
        {"click": labels, "value": values},
        (TaskSpec("click", "binary"), TaskSpec("value", "regression")),
    )
    got = mf.evaluate_tasks(FixedHeads({"click": 0, "value": 1}), data)
    # positives 0.35, 0.8, 0.4 vs negatives 0.1, 0.4, -1.0: 7 wins and one tie out of 9 pairs
    assert got["click"] == pytest.approx(7.5 / 9)
    assert got["click"] == pytest.approx(pairwise_auc(scores.tolist(), labels.tolist()))
    assert got["value"] == pytest.approx(((predictions - values) ** 2).mean().item())


def test_evaluate_tasks_ignores_missing_targets_and_agrees_with_pairwise_auc_on_a_model():
    torch.manual_seed(0)
    specs = (TaskSpec("c", "binary"), TaskSpec("r", "regression"))
    data = tiny_dataset(30, specs=specs, seed=4)
    data.present["c"][:6] = False
    data.targets["c"][:6] = 7.0  # placeholder that would break the AUC if it were used
    model = build_model("mmoe", 5, specs, n_experts=2, **SMALL)
    logits = mf.predict(model, data.inputs)
    keep = data.present["c"]
    expected = pairwise_auc(logits["c"][keep].tolist(), data.targets["c"][keep].tolist())
    assert mf.evaluate_tasks(model, data)["c"] == pytest.approx(expected, abs=1e-12)


def test_predict_restores_training_mode_and_chunks_consistently():
    torch.manual_seed(0)
    model = build_model("ple", 5, REG2, n_levels=2, **SMALL)
    model.train()
    x = tiny_dataset(50).inputs
    whole = mf.predict(model, x, batch_size=64)
    pieces = mf.predict(model, x, batch_size=7)
    assert model.training
    for name in whole:
        torch.testing.assert_close(whole[name], pieces[name])


# ----------------------------------------------------------------------------- gate utilisation


@pytest.mark.parametrize("kind", ["mmoe", "ple"])
def test_gate_utilisation_rows_sum_to_one_and_follow_gate_names(kind):
    torch.manual_seed(0)
    model = build_model(kind, 5, REG2, **SMALL)
    x = tiny_dataset(64).inputs
    table = mf.gate_utilisation(model, x)
    assert set(table["gate"]) == set(model.gate_expert_names)
    for gate, rows in table.groupby("gate"):
        assert rows["weight"].sum() == pytest.approx(1.0, abs=1e-6)
        assert ((rows["weight"] >= 0) & (rows["weight"] <= 1)).all()
        assert tuple(rows["expert"]) == model.gate_expert_names[gate]
    # the mean over rows of the last forward pass, computed by hand for one gate
    with torch.no_grad():
        model.eval()
        model(x)
    gate = next(iter(model.gate_weights))
    expected = model.gate_weights[gate].double().mean(0).numpy()
    np.testing.assert_allclose(table[table.gate == gate]["weight"].to_numpy(), expected, atol=1e-7)


def test_gate_utilisation_of_shared_bottom_is_empty_with_columns():
    torch.manual_seed(0)
    model = build_model("shared_bottom", 5, REG2, **SMALL)
    table = mf.gate_utilisation(model, tiny_dataset(8).inputs)
    assert len(table) == 0 and list(table.columns) == ["gate", "expert", "weight"]
    with pytest.raises(ValueError, match="inputs"):
        mf.gate_utilisation(model, torch.zeros(5))


def test_gate_distance_bounds_and_extremes():
    torch.manual_seed(0)
    x = tiny_dataset(32).inputs
    mmoe = mf.gate_utilisation(build_model("mmoe", 5, REG2, n_experts=3, **SMALL), x)
    assert mf.gate_distance(mmoe, "level0/a", "level0/a") == 0.0
    d = mf.gate_distance(mmoe, "level0/a", "level0/b")
    a = mmoe[mmoe.gate == "level0/a"]["weight"].to_numpy()
    b = mmoe[mmoe.gate == "level0/b"]["weight"].to_numpy()
    assert d == pytest.approx(0.5 * np.abs(a - b).sum()) and 0.0 <= d <= 1.0
    # task gates with private experts only: nothing in common, distance exactly 1
    private = mf.gate_utilisation(build_model("cgc", 5, REG2, n_shared_experts=0, n_task_experts=2, **SMALL), x)
    assert mf.gate_distance(private, "level0/a", "level0/b") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gate_b"):
        mf.gate_distance(mmoe, "level0/a", "level9/a")


def test_plot_gate_utilisation_blanks_experts_a_gate_cannot_see():
    from mtlbook.viz import new_figure

    torch.manual_seed(0)
    model = build_model("ple", 5, REG2, n_levels=1, n_shared_experts=1, n_task_experts=1, **SMALL)
    table = mf.gate_utilisation(model, tiny_dataset(16).inputs)
    fig, ax = new_figure()
    mf.plot_gate_utilisation(table, ax)
    grid = ax.images[0].get_array()
    # gates a, b over experts shared[0], a[0], b[0]: each task gate misses the other task's expert
    assert grid.shape == (2, 3)
    assert int(np.ma.getmaskarray(grid).sum()) == 2
    with pytest.raises(ValueError, match="columns"):
        mf.plot_gate_utilisation(table.drop(columns="weight"), ax)


# ----------------------------------------------------------------------------- gradients


def hand_shared_gradient(model, batch, task: str) -> np.ndarray:
    """Gradient of one task's MSE on the shared parameters via .backward() (no helper code)."""
    model.zero_grad(set_to_none=True)
    out = model(batch.inputs)
    loss = ((out[task] - batch.targets[task]) ** 2).mean()
    loss.backward()
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.shared_parameters()]
    model.zero_grad(set_to_none=True)
    return torch.cat(parts).double().numpy()


@pytest.mark.parametrize("kind", ["shared_bottom", "mmoe", "ple"])
def test_gradient_cosine_matches_hand_computation(kind):
    torch.manual_seed(1)
    model = build_model(kind, 5, REG2, **SMALL)
    batch = tiny_dataset(16, seed=2).full_batch()
    g_a = hand_shared_gradient(model, batch, "a")
    g_b = hand_shared_gradient(model, batch, "b")
    assert np.linalg.norm(g_a) > 0 and np.linalg.norm(g_b) > 0  # a real direction for both tasks
    expected = float(g_a @ g_b / (np.linalg.norm(g_a) * np.linalg.norm(g_b)))
    assert mf.gradient_cosine(model, batch, "a", "b") == pytest.approx(expected, abs=1e-5)
    assert mf.gradient_cosine(model, batch, "a", "a") == pytest.approx(1.0, abs=1e-5)


def test_task_gradients_rows_are_per_task_gradients_and_leave_grad_alone():
    torch.manual_seed(2)
    model = build_model("mmoe", 5, REG2, n_experts=3, **SMALL)
    batch = tiny_dataset(12, seed=3).full_batch()
    out = model(batch.inputs)
    losses = torch.stack([((out[t] - batch.targets[t]) ** 2).mean() for t in ("a", "b")])
    grads = mf.task_gradients(losses, model.shared_parameters())
    assert grads.shape == (2, sum(p.numel() for p in model.shared_parameters()))
    assert all(p.grad is None for p in model.parameters())
    np.testing.assert_allclose(grads[0].double().numpy(), hand_shared_gradient(model, batch, "a"), atol=1e-6)
    np.testing.assert_allclose(grads[1].double().numpy(), hand_shared_gradient(model, batch, "b"), atol=1e-6)


def test_task_gradients_are_zero_on_parameters_a_task_cannot_reach():
    torch.manual_seed(3)
    # module form: task b's expert owns its Parameters (in the bank form they are rows of one bank)
    model = build_model("cgc", 5, REG2, n_shared_experts=1, n_task_experts=1, experts="modules", **SMALL)
    batch = tiny_dataset(10).full_batch()
    out = model(batch.inputs)
    loss_a = ((out["a"] - batch.targets["a"]) ** 2).mean()
    loss_b = ((out["b"] - batch.targets["b"]) ** 2).mean()
    expert_of_b = list(model.levels[0].task_experts[1].parameters())
    grads = mf.task_gradients([loss_a, loss_b], expert_of_b)
    assert torch.count_nonzero(grads[0]) == 0  # task a never reads task b's private expert
    assert torch.count_nonzero(grads[1]) > 0
    with pytest.raises(ValueError, match="losses"):
        mf.task_gradients(torch.zeros(2, 2), expert_of_b)


def test_track_gradient_conflict_harm_flag_follows_the_cosine_threshold():
    torch.manual_seed(4)
    data = tiny_dataset(64, seed=5)
    model = build_model("ple", 5, REG2, **SMALL)
    log = mf.track_gradient_conflict(model, data, "a", "b", epochs=2, batch_size=16, lr=1e-2, seed=0)
    assert list(log["step"]) == list(range(8)) and list(log["epoch"]) == [0] * 4 + [1] * 4
    assert log["cosine"].between(-1 - 1e-6, 1 + 1e-6).all()
    # with two tasks: <g_a + g_b, g_b> < 0  <=>  cos(g_a, g_b) < -|g_b| / |g_a|
    margin = log["cosine"] + log["norm_b"] / log["norm_a"]
    clear = margin.abs() > 1e-4
    assert ((margin[clear] < 0) == log["harms_b"][clear]).all()
    margin_a = log["cosine"] + log["norm_a"] / log["norm_b"]
    clear_a = margin_a.abs() > 1e-4
    assert ((margin_a[clear_a] < 0) == log["harms_a"][clear_a]).all()
    with pytest.raises(ValueError, match="task_b"):
        mf.track_gradient_conflict(model, data, "a", "zzz")


def test_track_gradient_conflict_is_deterministic_and_trains():
    data = tiny_dataset(64, seed=6)
    logs = []
    for _ in range(2):
        torch.manual_seed(5)
        model = build_model("mmoe", 5, REG2, n_experts=2, **SMALL)
        logs.append(mf.track_gradient_conflict(model, data, "a", "b", epochs=3, batch_size=64, lr=3e-2, seed=1))
    assert logs[0].equals(logs[1])
    assert logs[0]["loss_a"].iloc[-1] < logs[0]["loss_a"].iloc[0]


# ----------------------------------------------------------------------------- models and studies


@pytest.mark.parametrize("n_features", [100, 499])
def test_family_parameter_counts_are_comparable(n_features):
    counts = [mf.count_parameters(mf.build_family_model(k, n_features, REG2)) for k in mf.FAMILY]
    assert max(counts) / min(counts) < 1.25


def test_build_family_model_is_seeded_and_validates_kind():
    one = mf.build_family_model("mmoe", 10, REG2, width=4, seed=7)
    two = mf.build_family_model("mmoe", 10, REG2, width=4, seed=7)
    three = mf.build_family_model("mmoe", 10, REG2, width=4, seed=8)
    for p, q in zip(one.parameters(), two.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(one.parameters(), three.parameters()))
    with pytest.raises(ValueError, match="kind"):
        mf.family_kwargs("cgc")
    with pytest.raises(ValueError, match="width"):
        mf.family_kwargs("mmoe", width=1)


def test_split_rows_and_single_task_view():
    data = tiny_dataset(20)
    train, val, test = mf.split_rows(data, 12, 5)
    assert (len(train), len(val), len(test)) == (12, 5, 3)
    torch.testing.assert_close(torch.cat([train.inputs, val.inputs, test.inputs]), data.inputs)
    with pytest.raises(ValueError, match="n_train"):
        mf.split_rows(data, 15, 5)
    view = mf.single_task_view(data, "b")
    assert view.task_names == ("b",) and torch.equal(view.targets["b"], data.targets["b"])
    with pytest.raises(ValueError, match="task"):
        mf.single_task_view(data, "c")


def test_compare_models_scores_every_model_and_task():
    data = make_mmoe_synthetic(260, 0.5, dim=6, seed=0)
    train, val, test = mf.split_rows(data, 160, 50)
    table, models = mf.compare_models(train, val, test, ("single_task", "mmoe"), width=4, epochs=2, batch_size=64)
    assert set(models) == {"single_task/y1", "single_task/y2", "mmoe"}
    assert len(table) == 4 and set(table["metric"]) == {"mse"}
    assert np.isfinite(table["value"]).all() and (table["value"] > 0).all()
    # single-task rows come from one-task networks: fewer parameters than a two-tower model
    single = table[table.model == "single_task"]["n_params"]
    assert (single == mf.count_parameters(models["single_task/y1"])).all()
    with pytest.raises(ValueError, match="kinds"):
        mf.compare_models(train, val, test, ("mmoe", "mmoe"))


def test_run_correlation_study_shapes_and_gate_sums():
    scores, gates = mf.run_correlation_study(
        [0.5, 1.0], [0], ("shared_bottom", "mmoe"), n_train=120, n_val=40, n_test=40, dim=6, width=4,
        epochs=1, batch_size=64,
    )
    assert len(scores) == 2 * 2 * 2  # correlations x models x tasks
    assert set(scores.columns) >= {"correlation", "seed", "model", "task", "mse", "n_params"}
    assert set(gates["model"]) == {"mmoe"}  # Shared-Bottom has no gates
    sums = gates.groupby(["correlation", "seed", "model", "gate"])["weight"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="correlations"):
        mf.run_correlation_study([1.5], [0])


def test_draw_architectures_makes_three_panels():
    fig = mf.draw_architectures()
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == ["Shared-Bottom", "MMoE", "PLE (2 levels)"]
    assert all(len(ax.patches) >= 6 for ax in fig.axes)


def test_track_gradient_conflict_noise_baseline_leaves_training_alone_and_matches_halves():
    from mtlbook.diagnose.noise import split_batch

    data = tiny_dataset(64, seed=7)
    logs = []
    for flag in (False, True):
        torch.manual_seed(3)
        model = build_model("ple", 5, REG2, **SMALL)
        logs.append(mf.track_gradient_conflict(model, data, "a", "b", epochs=2, batch_size=16, lr=1e-2, seed=0,
                                               noise_baseline=flag))
    plain, noisy = logs
    assert noisy[plain.columns].equals(plain)  # same training, same measurements
    for column in ("self_a", "self_b", "null_ab", "null_ba"):
        assert noisy[column].between(-1 - 1e-6, 1 + 1e-6).all()
    # recompute the first step by hand: same-task cosine of the two halves at the initial parameters
    torch.manual_seed(3)
    model = build_model("ple", 5, REG2, **SMALL)
    model.train()
    batch = next(iter(make_loader(data, batch_size=16, shuffle=True, seed=0)))
    grads = []
    for half in split_batch(batch):
        losses = task_losses(model(half.inputs), half, data.task_specs)
        grads.append(mf.task_gradients(losses, model.shared_parameters()))
    expected = torch.nn.functional.cosine_similarity(grads[0][0], grads[1][0], dim=0)
    assert noisy["self_a"].iloc[0] == pytest.approx(float(expected), abs=1e-5)
    with pytest.raises(TypeError, match="noise_baseline"):
        mf.track_gradient_conflict(model, data, "a", "b", noise_baseline=1)
