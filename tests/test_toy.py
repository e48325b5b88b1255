"""Tests for mtlbook.toy: closed forms, the three update rules, divergence, grid, torch."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from mtlbook import toy

RHOS = [1.0, 3.0, 10.0, 100.0, 500.0, 2000.0]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("rho", [0.01, 0.5, 1.0, 7.3, 500.0, 1e6])
def test_fixed_point_zeroes_the_gradient_and_lies_between_the_optima(rho):
    theta_star = toy.fixed_point(rho)
    assert -1.0 < theta_star < 1.0
    assert abs(toy.gradient(theta_star, rho)) <= 1e-9 * (rho + 1)
    # the minimiser: the summed loss is larger on both sides
    total = lambda t: sum(toy.losses(t, rho))  # noqa: E731
    assert total(theta_star) < total(theta_star + 1e-3)
    assert total(theta_star) < total(theta_star - 1e-3)


def test_fixed_point_known_values_and_monotone_in_rho():
    assert toy.fixed_point(1) == 0.0
    assert toy.fixed_point(10) == pytest.approx(9 / 11)
    assert toy.fixed_point(500) == pytest.approx(499 / 501)
    values = [toy.fixed_point(r) for r in np.geomspace(0.1, 1e4, 50)]
    assert np.all(np.diff(values) > 0)


def test_losses_and_gradient_formulas():
    theta, rho = 0.3, 7.0
    loss1, loss2 = toy.losses(theta, rho)
    assert loss1 == pytest.approx(0.5 * 7.0 * 0.49)
    assert loss2 == pytest.approx(0.5 * 1.69)
    h = 1e-6
    numeric = (sum(toy.losses(theta + h, rho)) - sum(toy.losses(theta - h, rho))) / (2 * h)
    assert toy.gradient(theta, rho) == pytest.approx(numeric, rel=1e-7)


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_stable_lr_is_the_convergence_boundary(rho, optimizer):
    momentum = 0.9 if optimizer == "momentum" else 0.0
    bound = toy.stable_lr(rho, momentum=momentum)
    theta_star = toy.fixed_point(rho)
    below = toy.simulate(rho, optimizer, lr=0.97 * bound, n_steps=3000, theta0=0.0)
    above = toy.simulate(rho, optimizer, lr=1.03 * bound, n_steps=3000, theta0=0.0)
    assert not below.diverged
    assert abs(below.final_theta - theta_star) < 1e-6 or rho == 1.0
    if rho == 1.0:  # theta0 = theta* = 0: already at the fixed point, nothing can move
        assert np.all(below.theta == 0.0) and np.all(above.theta == 0.0)
    else:
        assert above.diverged


def test_at_exactly_stable_lr_sgd_oscillates_without_converging_or_diverging():
    # rho = 3: stable_lr = 0.5 and the contraction factor 1 - lr (rho + 1) is exactly -1
    rho = 3.0
    result = toy.simulate(rho, "sgd", lr=toy.stable_lr(rho), n_steps=200, theta0=0.0)
    theta_star = toy.fixed_point(rho)
    assert not result.diverged
    np.testing.assert_allclose(np.abs(result.theta - theta_star), abs(0.0 - theta_star), rtol=1e-12)
    np.testing.assert_allclose(result.theta[::2], 0.0, atol=1e-12)  # back at the start every 2 steps
    assert result.steps_to_within(1e-3) is None


def test_stable_lr_values():
    assert toy.stable_lr(1.0) == 1.0
    assert toy.stable_lr(499.0) == pytest.approx(2 / 500)
    assert toy.stable_lr(9.0, momentum=0.9) == pytest.approx(2 * 1.9 / 10)


# ------------------------------------------------------------------ the simulator


@pytest.mark.parametrize("rho", [2.0, 10.0, 50.0])
@pytest.mark.parametrize("lr_fraction", [0.1, 0.5, 0.9, 0.99])
def test_sgd_matches_the_closed_form_trajectory(rho, lr_fraction):
    lr, theta0 = lr_fraction * toy.stable_lr(rho), -0.7
    result = toy.simulate(rho, "sgd", lr=lr, n_steps=40, theta0=theta0)
    theta_star = toy.fixed_point(rho)
    t = np.arange(41)
    expected = theta_star + (1 - lr * (rho + 1)) ** t * (theta0 - theta_star)
    np.testing.assert_allclose(result.theta, expected, rtol=0, atol=1e-12)


def test_result_convention_entry_zero_is_the_start():
    result = toy.simulate(10.0, "adam", lr=0.01, n_steps=25, theta0=0.4)
    assert result.theta.shape == result.loss1.shape == result.loss2.shape == (26,)
    assert result.theta[0] == 0.4
    loss1, loss2 = toy.losses(result.theta, 10.0)
    np.testing.assert_array_equal(result.loss1, loss1)
    np.testing.assert_array_equal(result.loss2, loss2)
    assert result.final_theta == result.theta[-1]
    assert result.fixed_point == toy.fixed_point(10.0)
    assert (result.rho, result.optimizer, result.lr, result.n_steps) == (10.0, "adam", 0.01, 25)
    assert result.hyperparameters == {"betas": (0.9, 0.999), "eps": 1e-8}


@pytest.mark.parametrize("optimizer", toy.OPTIMIZERS)
def test_every_rule_has_the_fixed_point_as_a_rest_point(optimizer):
    # rho = 3: theta* = 0.5 exactly, so the gradient there is exactly 0 in floating point
    # (with a rounded theta*, Adam would blow the 1e-15 gradient up to a step of size ~lr)
    rho = 3.0
    result = toy.simulate(rho, optimizer, lr=0.01, n_steps=30, theta0=toy.fixed_point(rho))
    np.testing.assert_allclose(result.theta, toy.fixed_point(rho), atol=1e-12)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("momentum", 0.05), ("sgd", 1e300), ("momentum", 1e200)])
def test_divergence_is_detected_quietly(optimizer, lr):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow RuntimeWarning would fail here
        result = toy.simulate(500.0, optimizer, lr=lr, n_steps=200)
    assert result.diverged
    k = result.diverged_at
    assert 1 <= k <= 200
    assert np.all(np.isfinite(result.theta[:k]))
    assert np.all(np.abs(result.theta[:k]) <= toy.DIVERGENCE_BOUND)
    assert np.all(np.isnan(result.theta[k:]))
    assert np.all(np.isnan(result.loss1[k:])) and np.all(np.isnan(result.loss2[k:]))
    assert math.isnan(result.final_theta)
    assert result.steps_to_within(1.0) is None


def test_sgd_divergence_step_matches_the_geometric_growth():
    # |theta_t - theta*| = |q|^t |theta* - theta0| with q = 1 - lr (rho + 1); the run stops at the
    # first t where |theta_t| exceeds the bound (theta0 = 0, so the bound is DIVERGENCE_BOUND).
    rho, lr = 500.0, 0.05
    q, theta_star = 1 - lr * (rho + 1), toy.fixed_point(rho)
    t = np.arange(1, 40)
    theta = theta_star + q**t * (0.0 - theta_star)
    expected = int(t[np.abs(theta) > toy.DIVERGENCE_BOUND][0])
    assert toy.simulate(rho, "sgd", lr=lr, n_steps=60).diverged_at == expected


@pytest.mark.parametrize("rho", RHOS)
def test_adam_never_diverges_and_reaches_the_same_fixed_point(rho):
    result = toy.simulate(rho, "adam", lr=0.05, n_steps=400)
    assert not result.diverged
    assert abs(result.final_theta - toy.fixed_point(rho)) < 1e-3
    # Adam's step is bounded by roughly lr, whatever the gradient scale
    assert np.max(np.abs(np.diff(result.theta))) < 0.05 * 1.01


def test_momentum_zero_is_plain_sgd():
    a = toy.simulate(20.0, "momentum", lr=0.03, n_steps=50, momentum=0.0)
    b = toy.simulate(20.0, "sgd", lr=0.03, n_steps=50)
    np.testing.assert_allclose(a.theta, b.theta, rtol=0, atol=1e-15)


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-6])
def test_steps_to_within_for_sgd_matches_the_closed_form(tol):
    rho, lr = 10.0, 0.03
    result = toy.simulate(rho, "sgd", lr=lr, n_steps=200)
    q = abs(1 - lr * (rho + 1))
    error0 = abs(toy.fixed_point(rho))
    expected = math.ceil(math.log(tol / error0) / math.log(q))
    assert result.steps_to_within(tol) == expected
    k = result.steps_to_within(tol)
    assert abs(result.theta[k] - result.fixed_point) <= tol < abs(result.theta[k - 1] - result.fixed_point)


def test_steps_to_within_requires_staying_inside():
    # momentum overshoots: entering the band and leaving it again must not count
    result = toy.simulate(10.0, "momentum", lr=0.05, n_steps=300)
    k = result.steps_to_within(1e-3)
    errors = np.abs(result.theta - result.fixed_point)
    assert np.all(errors[k:] <= 1e-3) and errors[k - 1] > 1e-3
    first_entry = int(np.argmax(errors <= 1e-3))
    assert first_entry < k  # it did pass through the band earlier
    with pytest.raises(ValueError, match="tol"):
        result.steps_to_within(0.0)


# ------------------------------------------------------------------ the grid


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("momentum", 0.05), ("adam", 0.05), ("sgd", 0.003)])
def test_simulate_grid_equals_simulate_row_by_row(optimizer, lr):
    rhos = [1.0, 2.5, 10.0, 39.0, 41.0, 100.0, 500.0, 2000.0]
    grid = toy.simulate_grid(rhos, optimizer, lr=lr, n_steps=80, theta0=0.2)
    assert grid.theta.shape == grid.loss1.shape == grid.loss2.shape == (len(rhos), 81)
    for i, rho in enumerate(rhos):
        single = toy.simulate(rho, optimizer, lr=lr, n_steps=80, theta0=0.2)
        row = grid.row(i)
        np.testing.assert_allclose(row.theta, single.theta, rtol=1e-13, atol=0, equal_nan=True)
        np.testing.assert_allclose(row.loss1, single.loss1, rtol=1e-13, atol=0, equal_nan=True)
        np.testing.assert_allclose(row.loss2, single.loss2, rtol=1e-13, atol=0, equal_nan=True)
        assert row.diverged == single.diverged == bool(grid.diverged[i])
        assert row.diverged_at == single.diverged_at
    np.testing.assert_allclose(grid.fixed_points, [toy.fixed_point(r) for r in rhos])
    if optimizer == "sgd" and lr == 0.05:  # stable iff rho < 2 / lr - 1 = 39
        # rho = 41 is unstable but grows only like 1.1^t: past the bound after ~150 steps
        np.testing.assert_array_equal(grid.diverged, np.array(rhos) >= 100.0)
        errors = np.abs(grid.theta[:, -1] - grid.fixed_points)
        assert errors[4] > 100 * abs(0.2 - grid.fixed_points[4])  # rho = 41 moves away
        assert errors[2] < 1e-12  # rho = 10 has converged


def test_simulate_grid_accepts_numpy_input_and_rejects_bad_rhos():
    grid = toy.simulate_grid(np.array([1, 2, 3]), "sgd", lr=0.1, n_steps=5)
    assert grid.rhos.dtype == np.float64
    for bad in ([], [1.0, -2.0], [1.0, float("nan")], "abc", [[1.0, 2.0]], [1.0, "2"]):
        with pytest.raises(ValueError, match="rhos"):
            toy.simulate_grid(bad, "sgd")


# ------------------------------------------------------------------ torch


def test_toy_model_losses_and_autograd_gradient():
    model = ToyModel = toy.ToyModel(theta0=0.25)
    assert model.theta.dtype == torch.float64 and model.theta.requires_grad
    assert [p for p in ToyModel.parameters()] == [model.theta]
    loss1, loss2 = model.losses(12.0)
    np.testing.assert_allclose([loss1.item(), loss2.item()], toy.losses(0.25, 12.0))
    model(12.0).backward()
    assert model.theta.grad.item() == pytest.approx(toy.gradient(0.25, 12.0))


@pytest.mark.parametrize("optimizer", toy.OPTIMIZERS)
@pytest.mark.parametrize("rho,lr", [(1.0, 0.05), (10.0, 0.05), (10.0, 0.01), (100.0, 0.005), (500.0, 0.05), (2000.0, 0.0005)])
def test_torch_matches_numpy(optimizer, rho, lr):
    numpy_run = toy.simulate(rho, optimizer, lr=lr, n_steps=150, theta0=-0.3)
    torch_run = toy.simulate_torch(rho, optimizer, lr=lr, n_steps=150, theta0=-0.3)
    assert numpy_run.diverged == torch_run.diverged
    assert numpy_run.diverged_at == torch_run.diverged_at
    if not numpy_run.diverged:
        np.testing.assert_allclose(torch_run.theta, numpy_run.theta, rtol=0, atol=1e-6)
        np.testing.assert_allclose(torch_run.loss2, numpy_run.loss2, rtol=0, atol=1e-6)


def test_torch_matches_numpy_with_custom_hyperparameters():
    a = toy.simulate(30.0, "adam", lr=0.02, n_steps=100, betas=(0.5, 0.9), eps=1e-4)
    b = toy.simulate_torch(30.0, "adam", lr=0.02, n_steps=100, betas=(0.5, 0.9), eps=1e-4)
    np.testing.assert_allclose(a.theta, b.theta, atol=1e-9)
    c = toy.simulate(30.0, "momentum", lr=0.02, n_steps=100, momentum=0.5)
    d = toy.simulate_torch(30.0, "momentum", lr=0.02, n_steps=100, momentum=0.5)
    np.testing.assert_allclose(c.theta, d.theta, atol=1e-9)
    assert not np.allclose(a.theta, toy.simulate(30.0, "adam", lr=0.02, n_steps=100).theta)


def test_torch_divergence_is_detected():
    result = toy.simulate_torch(500.0, "sgd", lr=0.05, n_steps=100)
    assert result.diverged and np.all(np.isnan(result.theta[result.diverged_at:]))


# ------------------------------------------------------------------ bad input

BAD_CALLS = [
    ({"rho": 0.0}, "rho"),
    ({"rho": -1.0}, "rho"),
    ({"rho": float("inf")}, "rho"),
    ({"rho": float("nan")}, "rho"),
    ({"rho": "10"}, "rho"),
    ({"rho": True}, "rho"),
    ({"lr": 0.0}, "lr"),
    ({"lr": -0.1}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"n_steps": 0}, "n_steps"),
    ({"n_steps": 2.0}, "n_steps"),
    ({"n_steps": True}, "n_steps"),
    ({"theta0": float("inf")}, "theta0"),
    ({"theta0": None}, "theta0"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"optimizer": "sgd", "momentum": 0.9}, "accepted keywords"),
    ({"optimizer": "momentum", "momentum": 1.0}, "momentum"),
    ({"optimizer": "adam", "betas": (0.9,)}, "betas"),
    ({"optimizer": "adam", "eps": 0.0}, "eps"),
]


@pytest.mark.parametrize("simulator", [toy.simulate, toy.simulate_torch])
@pytest.mark.parametrize("kwargs,name", BAD_CALLS)
def test_bad_input_raises_value_error_naming_the_parameter(simulator, kwargs, name):
    call = {"rho": 10.0, "optimizer": "sgd", "lr": 0.05, "n_steps": 10, "theta0": 0.0, **kwargs}
    with pytest.raises(ValueError, match=name):
        simulator(**call)


def test_bad_input_in_closed_forms_and_grid():
    with pytest.raises(ValueError, match="rho"):
        toy.fixed_point(0)
    with pytest.raises(ValueError, match="rho"):
        toy.stable_lr(-3)
    with pytest.raises(ValueError, match="momentum"):
        toy.stable_lr(3, momentum=1.5)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        toy.simulate_grid([1.0], "lbfgs")
    with pytest.raises(ValueError, match="lr"):
        toy.simulate_grid([1.0], "sgd", lr=float("inf"))
    with pytest.raises(ValueError, match="theta0"):
        toy.ToyModel(theta0=float("nan"))
