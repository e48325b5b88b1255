"""Gradient-ratio measurement, task metrics, probe, projection and the instrumented loop."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from mtlbook.data.batch import MultiTaskDataset, TaskSpec, make_loader
from mtlbook.diagnostics import (
    class_separation,
    evaluate,
    gradient_norm_ratio,
    linear_probe,
    nasa_score,
    pca_projection,
    per_class_recall,
    rmse,
    shared_features,
    task_gradient_norms,
    task_gradients,
    train_with_diagnostics,
)
from mtlbook.losses import task_losses
from mtlbook.models import SharedBottom

SPECS = (TaskSpec("rul", "regression"), TaskSpec("health", "multiclass", 3))


# --------------------------------------------------------------------------- gradients


def test_ratio_matches_the_analytic_gradients_of_a_linear_trunk():
    """Trunk w in R^d; L_a = mean((Xw - y)^2), L_b = c * sum(w): both gradients in closed form."""
    torch.manual_seed(0)
    n, d, c = 16, 5, 0.25
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randn(n, dtype=torch.float64) * 10
    w = torch.randn(d, dtype=torch.float64, requires_grad=True)
    losses = torch.stack([((x @ w - y) ** 2).mean(), c * w.sum()])

    g_a = 2.0 / n * x.T @ (x @ w.detach() - y)  # d/dw mean((Xw - y)^2)
    g_b = torch.full((d,), c, dtype=torch.float64)  # d/dw c * sum(w)
    result = gradient_norm_ratio(losses, [w])
    np.testing.assert_allclose(result.norms.numpy(), [g_a.norm().item(), c * math.sqrt(d)], rtol=1e-12)
    assert result.rho == pytest.approx(g_a.norm().item() / (c * math.sqrt(d)), rel=1e-12)
    assert result.cosine == pytest.approx(float(g_a @ g_b / (g_a.norm() * g_b.norm())), rel=1e-12)
    # the graph survives the measurement: the real backward still runs and gives the sum
    losses.sum().backward()
    torch.testing.assert_close(w.grad, g_a + g_b)


def test_ratio_over_several_parameter_tensors_and_task_order():
    torch.manual_seed(1)
    a = torch.randn(3, 2, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    losses = torch.stack([3.0 * (a**2).sum(), (b**2).sum() + a.sum(), 0.5 * b.sum()])
    grads = task_gradients(losses, [a, b])
    expected = torch.stack([
        torch.cat([6.0 * a.detach().reshape(-1), torch.zeros(4)]),
        torch.cat([torch.ones(6), 2.0 * b.detach()]),
        torch.cat([torch.zeros(6), torch.full((4,), 0.5)]),
    ]).double()
    torch.testing.assert_close(grads, expected)
    norms = task_gradient_norms(losses, [a, b])
    swapped = gradient_norm_ratio(losses, [a, b], numerator=2, denominator=0)
    assert swapped.rho == pytest.approx(float(norms[2] / norms[0]))


def test_ratio_edge_cases():
    w = torch.ones(3, requires_grad=True)
    unused = torch.zeros(2, requires_grad=True)
    # task b does not reach the trunk: its gradient is zero, rho is infinite
    result = gradient_norm_ratio(torch.stack([w.sum(), unused.sum()]), [w])
    assert math.isinf(result.rho) and result.norms[1] == 0 and math.isnan(result.cosine)
    result = gradient_norm_ratio(torch.stack([unused.sum(), 2 * unused.sum()]), [w])
    assert math.isnan(result.rho)
    with pytest.raises(ValueError, match="denominator"):
        gradient_norm_ratio(torch.stack([w.sum(), w.sum()]), [w], denominator=2)
    with pytest.raises(ValueError, match="different tasks"):
        gradient_norm_ratio(torch.stack([w.sum(), w.sum()]), [w], 1, 1)
    with pytest.raises(ValueError, match="shared_parameters"):
        gradient_norm_ratio(torch.stack([w.sum(), w.sum()]), [])
    with pytest.raises(TypeError, match="task_losses"):
        gradient_norm_ratio([w.sum(), w.sum()], [w])


def test_ratio_is_scale_covariant_on_a_real_model():
    """Multiplying one task's loss by k multiplies its norm, and rho, by k."""
    torch.manual_seed(0)
    model = SharedBottom(4, SPECS, expert_hidden=(8,), expert_dim=6, tower_hidden=(5,))
    x = torch.randn(32, 4)
    outputs = model(x)
    batch_losses = torch.stack([(outputs["rul"] - 50.0).pow(2).mean(), outputs["health"].logsumexp(1).mean()])
    base = gradient_norm_ratio(batch_losses, model.shared_parameters())
    scaled = gradient_norm_ratio(batch_losses * torch.tensor([7.0, 1.0]), model.shared_parameters())
    assert scaled.rho == pytest.approx(7.0 * base.rho, rel=1e-6)
    assert scaled.cosine == pytest.approx(base.cosine, rel=1e-6)


# --------------------------------------------------------------------------- metrics


def test_nasa_score_by_hand():
    # d = -13 -> e - 1; d = 0 -> 0; d = 10 -> e - 1; d = 20 -> e^2 - 1
    prediction, target = [87.0, 50.0, 40.0, 20.0], [100.0, 50.0, 30.0, 0.0]
    expected = 2 * (math.e - 1) + math.e**2 - 1
    assert nasa_score(prediction, target) == pytest.approx(expected)
    assert nasa_score(prediction, target, "mean") == pytest.approx(expected / 4)
    assert nasa_score([5.0], [5.0]) == 0.0


def test_nasa_score_of_a_diverged_model_is_inf_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isinf(nasa_score([1e5, 10.0], [0.0, 10.0]))
        assert math.isinf(nasa_score([-1e5], [0.0]))


def test_nasa_score_punishes_late_predictions_more():
    for error in (1.0, 5.0, 20.0, 60.0):
        late = nasa_score([100.0 + error], [100.0])
        early = nasa_score([100.0 - error], [100.0])
        assert late > early > 0


def test_metric_argument_checks():
    with pytest.raises(ValueError, match="same length"):
        nasa_score([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="reduction"):
        nasa_score([1.0], [1.0], "median")
    with pytest.raises(ValueError, match="finite"):
        rmse([float("nan")], [1.0])
    with pytest.raises(ValueError, match="class indices"):
        per_class_recall([0, 3], [0, 1], 3)


def test_rmse_and_recall_by_hand():
    assert rmse([1.0, 2.0, 3.0], [1.0, 4.0, 3.0]) == pytest.approx(math.sqrt(4 / 3))
    recall = per_class_recall([0, 0, 1, 2, 2, 0], [0, 1, 1, 2, 2, 2], 4)
    np.testing.assert_allclose(recall[:3], [1.0, 0.5, 2 / 3])
    assert math.isnan(recall[3])  # class 3 never occurs


# --------------------------------------------------------------------------- probe and projection


def _blobs(n_per_class: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = separation * np.eye(3, 6)
    x = np.vstack([rng.normal(size=(n_per_class, 6)) + centres[k] for k in range(3)])
    return x, np.repeat(np.arange(3), n_per_class)


def test_probe_separates_separable_classes():
    x_train, y_train = _blobs(60, 12.0, seed=0)
    x_test, y_test = _blobs(40, 12.0, seed=1)
    result = linear_probe(x_train, y_train, x_test, y_test)
    assert result.accuracy == 1.0
    np.testing.assert_array_equal(result.recall, [1.0, 1.0, 1.0])
    assert result.majority_rate == pytest.approx(1 / 3)
    assert result.n_iter < 2000


def test_probe_is_at_chance_on_random_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(900, 6))
    y = rng.integers(0, 3, 900)
    result = linear_probe(x[:600], y[:600], x[600:], y[600:])
    assert result.accuracy < result.majority_rate + 0.1


def test_probe_argument_checks():
    x, y = _blobs(10, 5.0, 0)
    with pytest.raises(ValueError, match="same d"):
        linear_probe(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(x, np.zeros(len(y)), x, y)
    with pytest.raises(ValueError, match="C must be"):
        linear_probe(x, y, x, y, C=0.0)


def test_pca_recovers_a_dominant_direction():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=500)
    direction = np.array([3.0, -4.0, 0.0, 0.0]) / 5.0
    x = 10.0 * latent[:, None] * direction + 0.1 * rng.normal(size=(500, 4))
    coords, share = pca_projection(x, 2)
    assert coords.shape == (500, 2) and share[0] > 0.99 and share[0] + share[1] <= 1.0
    assert abs(np.corrcoef(coords[:, 0], latent)[0, 1]) > 0.999
    again, _ = pca_projection(x.copy(), 2)
    np.testing.assert_array_equal(coords, again)  # the sign convention makes it repeatable
    with pytest.raises(ValueError, match="n_components"):
        pca_projection(x, 5)


def test_class_separation_extremes():
    labels = np.repeat([0, 1, 2], 50)
    points = np.eye(3)[labels] * 5.0
    assert class_separation(points, labels) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    assert class_separation(rng.normal(size=(3000, 2)), rng.integers(0, 3, 3000)) < 0.01


# --------------------------------------------------------------------------- training loop


def tiny_problem(n: int = 240, seed: int = 0) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    life = 60 + 40 * x[:, 0] + 5 * torch.randn(n, generator=generator)
    health = torch.bucketize(-life, torch.tensor([-80.0, -40.0]))  # 0 above 80, 2 below 40
    data = MultiTaskDataset(x, {"rul": life, "health": health}, SPECS)
    n_train = 3 * n // 4
    return data.subset(torch.arange(0, n_train)), data.subset(torch.arange(n_train, n))


def test_loop_records_every_batch_and_the_ratio_it_reports():
    train, val = tiny_problem()
    run = train_with_diagnostics(train, val, epochs=2, batch_size=50, seed=3, model_kwargs={"expert_hidden": (8,), "expert_dim": 6, "tower_hidden": (5,)})
    assert run.n_batches == 2 * math.ceil(180 / 50)
    assert len(run.epochs) == 3 and run.diverged_at is None
    np.testing.assert_array_equal(run.batches["epoch"], np.repeat([1, 2], 4))
    np.testing.assert_allclose(run.batches["rho"], run.batches["norm_rul"] / run.batches["norm_health"])
    np.testing.assert_allclose(run.batches["rho_effective"], run.batches["rho"])  # equal weights
    assert np.all(np.abs(run.batches["cosine"]) <= 1.0 + 1e-12)

    # the first recorded ratio is the ratio of a fresh model (same seed) on the first batch
    torch.manual_seed(3)
    fresh = SharedBottom(4, SPECS, expert_hidden=(8,), expert_dim=6, tower_hidden=(5,))
    batch = next(iter(make_loader(train, batch_size=50, shuffle=True, seed=3)))
    first = gradient_norm_ratio(task_losses(fresh(batch.inputs), batch, SPECS), fresh.shared_parameters())
    assert run.batches["rho"][0] == pytest.approx(first.rho, rel=1e-6)


def test_loop_is_deterministic_and_weights_enter_the_effective_ratio():
    train, val = tiny_problem()
    options = dict(epochs=2, batch_size=60, seed=0, fixed_weights={"health": 10.0}, model_kwargs={"expert_hidden": (8,), "expert_dim": 6})
    first = train_with_diagnostics(train, val, **options)
    second = train_with_diagnostics(train, val, **options)
    for key in first.batches:
        np.testing.assert_array_equal(first.batches[key], second.batches[key])
    np.testing.assert_allclose(first.batches["rho_effective"], first.batches["rho"] / 10.0)
    np.testing.assert_allclose(first.batches["weight_health"], 10.0)


def test_uncertainty_weights_are_recorded_and_move():
    train, val = tiny_problem()
    run = train_with_diagnostics(train, val, balancer="uncertainty", balancer_lr=0.1, epochs=2, batch_size=60, model_kwargs={"expert_hidden": (8,), "expert_dim": 6})
    weights = run.batches["weight_rul"] / run.batches["weight_health"]
    np.testing.assert_allclose(run.batches["rho_effective"], run.batches["rho"] * weights, rtol=1e-6)
    assert weights[0] == pytest.approx(1.0) and weights[-1] < 0.9  # the big RUL loss is damped


def test_a_diverging_run_stops_and_says_where():
    train, val = tiny_problem()
    run = train_with_diagnostics(train, val, optimizer="sgd", lr=5.0, momentum=0.0, epochs=3, batch_size=30)
    assert run.diverged_at is not None and run.n_batches == run.diverged_at
    assert math.isnan(run.epochs[-1]["rmse"])


def test_features_and_evaluation_of_a_trained_model():
    train, val = tiny_problem()
    run = train_with_diagnostics(train, val, epochs=3, batch_size=60, model_kwargs={"expert_hidden": (8,), "expert_dim": 6})
    features = shared_features(run.model, val.inputs)
    assert features.shape == (len(val), 6)
    metrics = evaluate(run.model, val)
    assert metrics["rmse"] == run.epochs[-1]["rmse"] and metrics["accuracy"] == run.epochs[-1]["accuracy"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["recall"].shape == (3,)
    frame = run.epoch_frame(["healthy", "degrading", "critical"])
    assert list(frame.index) == [0, 1, 2, 3] and "recall_critical" in frame.columns


@pytest.mark.parametrize(
    "kwargs, error, match",
    [({"balancer": "pcgrad"}, ValueError, "balancer"), ({"optimizer": "rmsprop"}, ValueError, "optimizer"),
     ({"lr": 0.0}, ValueError, "lr"), ({"epochs": 0}, ValueError, "epochs"), ({"momentum": 1.0}, ValueError, "momentum"),
     ({"fixed_weights": {"nope": 1.0}}, ValueError, "unknown tasks"), ({"fixed_weights": {"rul": -1.0}}, ValueError, "fixed_weights"),
     ({"ratio_tasks": (0, 0)}, ValueError, "ratio_tasks"), ({"num_threads": 0}, ValueError, "num_threads")],
)
def test_loop_argument_checks(kwargs, error, match):
    train, val = tiny_problem(60)
    with pytest.raises(error, match=match):
        train_with_diagnostics(train, val, **kwargs)


def test_loop_restores_the_thread_count():
    train, val = tiny_problem(60)
    before = torch.get_num_threads()
    train_with_diagnostics(train, val, epochs=1, batch_size=30, num_threads=1)
    assert torch.get_num_threads() == before
