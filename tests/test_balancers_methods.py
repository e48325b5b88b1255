"""The torchjd aggregators (MGDA, CAGrad, Nash-MTL, Aligned-MTL, UPGrad) and random loss
weighting, each checked on a tiny problem against a property of its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from mtlbook.balancers_random import RandomLossWeighting
from mtlbook.balancers_torchjd import (
    AlignedMTLBalancer,
    CAGradBalancer,
    MGDABalancer,
    NashMTLBalancer,
    TorchJDCombiner,
    UPGradBalancer,
)
from mtlbook.balancing import BALANCERS, build_balancer
from mtlbook.models import PLE
from mtlbook.train import Trainer, TrainerConfig

from _tiny import SPECS, make_dataset

TORCHJD = {"mgda": MGDABalancer, "cagrad": CAGradBalancer, "nash_mtl": NashMTLBalancer,
           "aligned_mtl": AlignedMTLBalancer, "upgrad": UPGradBalancer}  # fmt: skip
NEW = sorted(TORCHJD) + ["rlw"]


def conflicting_jacobian(seed: int, n: int = 3, d: int = 6) -> torch.Tensor:
    """Task-major ``[n, d]`` gradients where task 1 mostly opposes task 0."""
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(n, d, generator=g)
    jac[1] = -0.8 * jac[0] + 0.3 * jac[1]
    return jac


def test_registry_names_and_classes():
    for name, cls in TORCHJD.items():
        assert BALANCERS[name] is cls and issubclass(cls, TorchJDCombiner)
        assert cls.rewrites_shared_gradients
    assert BALANCERS["rlw"] is RandomLossWeighting and not RandomLossWeighting.rewrites_shared_gradients


# ------------------------------------------------------------------ MGDA


def min_norm_over_simplex(jac: torch.Tensor) -> float:
    """The reference: min over the simplex of ||alpha @ J||, by scipy's SLSQP in float64."""
    m = jac.double().numpy()
    n = m.shape[0]
    res = minimize(lambda a: float(np.sum((a @ m) ** 2)), np.full(n, 1 / n), method="SLSQP", bounds=[(0, 1)] * n,
                   constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}], options={"ftol": 1e-15, "maxiter": 500})  # fmt: skip
    assert res.success
    return math.sqrt(res.fun)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgda_weights_on_the_simplex_minimise_the_norm(seed):
    jac = conflicting_jacobian(seed)
    best = min_norm_over_simplex(jac)
    # a dense grid over the 3-simplex agrees with scipy (the reference itself is right)
    grid = torch.tensor([(i, j, 200 - i - j) for i in range(201) for j in range(201 - i)], dtype=torch.float64) / 200
    assert float((grid @ jac.double()).norm(dim=1).min()) == pytest.approx(best, rel=2e-3)

    tight = MGDABalancer(3, epsilon=1e-7, max_iters=10_000)
    d = tight.combine(jac)
    w = tight.combination_weights
    assert bool((w >= 0).all()) and float(w.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(d, w @ jac, atol=1e-5)
    assert float(d.norm()) == pytest.approx(best, rel=5e-3)
    # the default (torchjd's Frank-Wolfe tolerance) is on the simplex, never below the optimum
    default = MGDABalancer(3)
    d0 = default.combine(jac)
    assert float(default.combination_weights.sum()) == pytest.approx(1.0, abs=1e-5)
    assert best * (1 - 1e-4) <= float(d0.norm()) <= 1.2 * best
    # a common descent direction: every task improves at least by ||d||^2 (up to the solver)
    assert float((jac @ d).min()) >= 0.99 * float(d.norm()) ** 2


# ------------------------------------------------------------------ CAGrad


@pytest.mark.parametrize("c", [0.2, 0.5])
def test_cagrad_stays_in_its_ball_and_lifts_the_worst_task(c):
    jac = conflicting_jacobian(4).double()
    g0 = jac.mean(dim=0)
    d = CAGradBalancer(3, c=c).combine(jac.float()).double()
    radius = c * float(g0.norm())
    assert float((d - g0).norm()) == pytest.approx(radius, rel=1e-4)  # on the boundary of the ball
    worst = float((jac @ d).min())
    assert worst > float((jac @ g0).min())  # the worst task does better than under plain averaging
    # and no point of the ball does better (random points on its sphere, where the optimum lies)
    u = torch.randn(4000, jac.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    candidates = g0 + radius * u / u.norm(dim=1, keepdim=True)
    assert float((candidates @ jac.T).min(dim=1).values.max()) <= worst + 1e-4


def test_cagrad_with_c_zero_is_the_mean_gradient():
    jac = conflicting_jacobian(5)
    assert torch.allclose(CAGradBalancer(3, c=0.0).combine(jac), jac.mean(dim=0), atol=1e-5)


# ------------------------------------------------------------------ Nash-MTL


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_nash_mtl_satisfies_the_bargaining_condition(max_norm):
    jac = conflicting_jacobian(6).double()
    balancer = NashMTLBalancer(3, max_norm=max_norm)
    d = balancer.combine(jac.float()).double()
    alpha = balancer.combination_weights.double()
    assert bool((alpha > 0).all())
    assert torch.allclose(d, alpha @ jac, rtol=1e-4, atol=1e-6)
    # g_i . d = 1 / alpha_i up to one common scale (the Gramian normalisation, the norm cap)
    products = (jac @ d) * alpha
    assert float(products.std() / products.mean()) < 1e-4
    if max_norm > 0:
        assert float(d.norm()) <= max_norm + 1e-5
    # scaling one task's gradient by 10 scales its weight by 1/10, not the others' (invariance)
    scaled = jac.clone()
    scaled[2] *= 10
    other = NashMTLBalancer(3, max_norm=0.0)
    other.combine(scaled.float())
    ratio = other.combination_weights.double() / NashMTLBalancer_weights(jac)
    assert float(ratio[2] / ratio[0]) == pytest.approx(0.1, rel=1e-2)
    assert float(ratio[1] / ratio[0]) == pytest.approx(1.0, rel=1e-2)


def NashMTLBalancer_weights(jac: torch.Tensor) -> torch.Tensor:  # noqa: N802 - helper named after the class
    balancer = NashMTLBalancer(3, max_norm=0.0)
    balancer.combine(jac.float())
    return balancer.combination_weights.double()


# ------------------------------------------------------------------ Aligned-MTL


def test_aligned_mtl_is_the_condition_number_one_update():
    jac = conflicting_jacobian(7).double()
    d = AlignedMTLBalancer(3).combine(jac.float()).double()
    u, s, vh = torch.linalg.svd(jac, full_matrices=False)
    expected = s[-1] * vh.T @ u.T @ torch.full((3,), 1 / 3, dtype=torch.float64)  # sigma_min V U^T w
    assert torch.allclose(d, expected, rtol=1e-4, atol=1e-6)


def test_aligned_mtl_gives_orthogonal_tasks_equal_steps_whatever_their_scale():
    jac = torch.tensor([[10.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    d = AlignedMTLBalancer(2).combine(jac)
    assert torch.allclose(d, torch.tensor([0.5, 0.5, 0.0]), atol=1e-5)  # the mean would be [5, 0.5, 0]


# ------------------------------------------------------------------ UPGrad


@pytest.mark.parametrize("seed", range(5))
def test_upgrad_never_conflicts_with_any_task(seed):
    jac = conflicting_jacobian(seed, n=4, d=5)
    assert float((jac @ jac.mean(dim=0)).min()) < 0 or seed > 0  # seed 0: the mean conflicts
    d = UPGradBalancer(4).combine(jac)
    assert float((jac @ d).min()) >= -1e-4 * float(jac.norm()) ** 2


def test_upgrad_keeps_the_mean_when_nothing_conflicts():
    jac = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.3, 0.1, 1.0]])
    assert torch.allclose(UPGradBalancer(3).combine(jac), jac.mean(dim=0), atol=1e-3)


# ------------------------------------------------------------------ RLW


def test_rlw_weights_positive_sum_to_n_differ_and_are_seeded():
    balancer = RandomLossWeighting(3, seed=5)
    assert balancer.weights().tolist() == [1.0, 1.0, 1.0]
    draws = []
    for _ in range(200):
        out = balancer.weight_losses(torch.ones(3))
        assert torch.equal(out, balancer.weights())  # the losses are 1: the output is the draw
        draws.append(out)
    w = torch.stack(draws)
    assert bool((w > 0).all()) and torch.allclose(w.sum(dim=1), torch.full((200,), 3.0))
    assert not torch.equal(w[0], w[1]) and len({tuple(r.tolist()) for r in w}) == 200
    assert float((w.mean(dim=0) - 1).abs().max()) < 0.15  # E[n softmax(z)_i] = 1 by symmetry
    again = RandomLossWeighting(3, seed=5)
    assert torch.equal(again.weight_losses(torch.ones(3)), w[0])
    other = RandomLossWeighting(3, seed=6)
    assert not torch.equal(other.weight_losses(torch.ones(3)), w[0])


def test_rlw_state_dict_resumes_the_draws_and_masks_absent_tasks():
    a = RandomLossWeighting(2, seed=1)
    for _ in range(3):
        a.weight_losses(torch.ones(2))
    b = RandomLossWeighting(2, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weights(), b.weights())
    assert torch.equal(a.weight_losses(torch.ones(2)), b.weight_losses(torch.ones(2)))
    out = a.weight_losses(torch.tensor([2.0, float("nan")]), torch.tensor([True, False]))
    assert out[1].item() == 0.0 and out[0].item() == pytest.approx(2 * a.weights()[0].item())
    with pytest.raises(TypeError, match="seed must be an int"):
        RandomLossWeighting(2, seed=1.5)


# ------------------------------------------------------------------ all new methods


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_identical_task_gradients_give_a_positive_multiple_of_that_gradient(name):
    """Every registered balancer: when all tasks pull the same way, so does the update."""
    theta = nn.Parameter(torch.tensor([0.3, -0.2, 0.5]))
    direction = torch.tensor([1.0, 2.0, -1.0])
    balancer = build_balancer(name, 3)
    losses = balancer.weight_losses(torch.stack([direction @ theta + k for k in (1.0, 2.0, 3.0)]))
    balancer.backward(losses.sum(), losses, [theta])
    g = theta.grad
    cosine = float(g @ direction / (g.norm() * direction.norm()))
    assert cosine == pytest.approx(1.0, abs=1e-5) and float(g.norm()) > 0


@pytest.mark.parametrize("name", sorted(TORCHJD))
def test_combiners_handle_zero_and_non_finite_jacobians(name):
    balancer = build_balancer(name, 2)
    assert torch.equal(balancer.combine(torch.zeros(2, 4)), torch.zeros(4))
    jac = torch.tensor([[1.0, float("inf")], [0.0, 1.0]])
    assert not bool(torch.isfinite(balancer.combine(jac)).all())  # the scaler must see the overflow
    with pytest.raises(ValueError, match="grads must be"):
        balancer.combine(torch.ones(3, 4))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: MGDABalancer(2, epsilon=0), "epsilon"),
        (lambda: MGDABalancer(2, max_iters=0), "max_iters"),
        (lambda: CAGradBalancer(2, c=-1), "c must be"),
        (lambda: CAGradBalancer(2, c="big"), "c must be a number"),
        (lambda: NashMTLBalancer(2, max_norm=float("nan")), "max_norm"),
        (lambda: NashMTLBalancer(2, update_weights_every=0), "update_weights_every"),
        (lambda: NashMTLBalancer(2, optim_niter=1.5), "optim_niter"),
        (lambda: AlignedMTLBalancer(2, scale_mode="max"), "scale_mode"),
        (lambda: UPGradBalancer(0), "n_tasks"),
    ],
)
def test_bad_arguments_name_the_parameter(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_nash_mtl_under_a_loss_scaler_sees_the_unscaled_jacobian():
    """The norm cap is not scale-equivariant: the combiner unscales, combines, rescales."""
    results = []
    for scale in (None, lambda t: 1024.0 * t):
        theta = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
        balancer = NashMTLBalancer(2, max_norm=1.0)
        losses = balancer.weight_losses(torch.stack([(theta**2).sum(), (3 * theta).sum()]))
        balancer.backward(losses.sum(), losses, [theta], scale=scale)
        results.append(theta.grad.clone() / (1.0 if scale is None else 1024.0))
    assert torch.allclose(results[0], results[1], rtol=1e-4, atol=1e-6)
    assert float(results[0].norm()) <= 1.0 + 1e-5


@pytest.mark.parametrize("name", NEW)
def test_each_new_method_trains_a_tiny_ple_with_finite_losses(name):
    torch.manual_seed(0)
    model = PLE(5, SPECS, n_levels=1, n_shared_experts=2, expert_hidden=(8,), expert_dim=6, tower_hidden=(6,))
    cfg = TrainerConfig(phase1_epochs=3, phase2_epochs=0, batch_size=16, lr=1e-2, progress=False, patience=None,
                        seed=2, balancing=name)  # fmt: skip
    trainer = Trainer(model, cfg)
    history = trainer.fit(make_dataset(64), make_dataset(32, seed=1))
    losses = [[r["train"][f"{t.name}/loss"] for t in SPECS] for r in history.records]
    assert all(math.isfinite(v) for row in losses for v in row)
    assert sum(losses[-1]) < sum(losses[0])  # it learns
    assert history.records[-1]["skipped_nan"] == 0
    if isinstance(trainer.balancer, TorchJDCombiner):
        assert bool(torch.isfinite(trainer.balancer.combination_weights).all())
