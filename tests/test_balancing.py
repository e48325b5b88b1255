"""Tests for mtlbook.balancing: each balancer against the paper's formula on small cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtlbook.balancing import (
    BALANCERS,
    DWA,
    EqualWeighting,
    GradNorm,
    LossBalancer,
    PCGrad,
    UncertaintyBalancer,
    build_balancer,
)
from mtlbook.losses import UncertaintyWeighting


class TwoHeads(nn.Module):
    """A shared linear trunk and one linear head per task (tiny)."""

    def __init__(self, n_tasks: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Linear(3, 4)
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(n_tasks))

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def losses(self, x: torch.Tensor, ys: list[torch.Tensor], scales: list[float]) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        return torch.stack([s * ((head(h).squeeze(-1) - y) ** 2).mean() for head, y, s in zip(self.heads, ys, scales)])


def _data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, [x[:, 0] + 0.1 * torch.randn(n, generator=g), -x[:, 1] + 0.1 * torch.randn(n, generator=g)]


# ------------------------------------------------------------------ interface / registry


def test_build_balancer_names() -> None:
    assert set(BALANCERS) == {"equal", "uncertainty", "gradnorm", "dwa", "pcgrad", "rlw"} | {
        "mgda", "cagrad", "nash_mtl", "aligned_mtl", "upgrad"
    }
    for name, cls in BALANCERS.items():
        balancer = build_balancer(name, 3)
        assert isinstance(balancer, cls) and isinstance(balancer, LossBalancer)
        assert balancer.weights().shape == (3,)
    assert build_balancer("dwa", 2, temperature=5.0).temperature == 5.0
    with pytest.raises(ValueError, match="gradnorm"):
        build_balancer("magic", 2)
    with pytest.raises(ValueError, match="n_tasks"):
        build_balancer("equal", 0)


def test_equal_weighting_zeroes_absent_tasks() -> None:
    balancer = EqualWeighting(3)
    losses = torch.tensor([1.0, float("nan"), 2.0])
    weighted = balancer.weight_losses(losses, torch.tensor([True, False, True]))
    assert weighted.tolist() == [1.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="shape"):
        balancer.weight_losses(torch.ones(2))
    with pytest.raises(TypeError, match="present"):
        balancer.weight_losses(losses, torch.ones(3))


def test_only_uncertainty_has_parameters() -> None:
    assert [n for n, _ in UncertaintyBalancer(2).named_parameters()] == ["uncertainty.log_var"]
    for name in ("equal", "dwa", "gradnorm", "pcgrad"):
        assert list(build_balancer(name, 2).parameters()) == []


def test_uncertainty_balancer_matches_module() -> None:
    balancer = UncertaintyBalancer(2)
    reference = UncertaintyWeighting(2)
    with torch.no_grad():
        balancer.uncertainty.log_var.copy_(torch.tensor([0.5, -1.0]))
        reference.log_var.copy_(torch.tensor([0.5, -1.0]))
    losses = torch.tensor([1.0, 3.0])
    assert torch.allclose(balancer.weight_losses(losses), reference(losses))
    assert torch.allclose(balancer.weights(), reference.weights())


def test_default_backward_and_scale() -> None:
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    balancer = EqualWeighting(2)
    weighted = balancer.weight_losses(torch.stack([p[0] ** 2, 3 * p[1]]))
    balancer.backward(weighted.sum(), weighted, [p], scale=lambda t: 4.0 * t)
    assert p.grad.tolist() == [8.0, 12.0]


# ------------------------------------------------------------------ DWA ------------------


def test_dwa_matches_paper_formula() -> None:
    temperature = 2.0
    dwa = DWA(3, temperature=temperature)
    history = [[1.0, 2.0, 4.0], [0.5, 1.8, 4.0], [0.4, 0.9, 4.4]]
    assert dwa.weights().tolist() == [1.0, 1.0, 1.0]  # epoch 0
    dwa.on_epoch_end(0, torch.tensor(history[0]))
    assert dwa.weights().tolist() == [1.0, 1.0, 1.0]  # epoch 1
    for epoch in (1, 2):
        dwa.on_epoch_end(epoch, torch.tensor(history[epoch]))
        ratios = [history[epoch][i] / history[epoch - 1][i] for i in range(3)]
        exps = [math.exp(r / temperature) for r in ratios]
        expected = [3 * e / sum(exps) for e in exps]
        assert dwa.weights().tolist() == pytest.approx(expected, rel=1e-6)
        assert float(dwa.weights().sum()) == pytest.approx(3.0)
    # ratios (0.8, 0.5, 1.1): the task whose loss rose weighs most, the one that halved least
    w = dwa.weights()
    assert w[2] > w[0] > w[1]
    weighted = dwa.weight_losses(torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(weighted, w)


def test_dwa_temperature_and_bad_history() -> None:
    sharp, flat = DWA(2, temperature=0.5), DWA(2, temperature=50.0)
    for b in (sharp, flat):
        b.on_epoch_end(0, torch.tensor([1.0, 1.0]))
        b.on_epoch_end(1, torch.tensor([0.5, 1.0]))
    assert (sharp.weights()[1] - sharp.weights()[0]) > (flat.weights()[1] - flat.weights()[0]) > 0
    dwa = DWA(2)
    dwa.on_epoch_end(0, torch.tensor([0.0, 1.0]))  # task 0 never present: a 0 mean
    dwa.on_epoch_end(1, torch.tensor([float("nan"), 1.0]))
    assert torch.isfinite(dwa.weights()).all()
    assert dwa.weights().tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="temperature"):
        DWA(2, temperature=0.0)
    with pytest.raises(ValueError, match="epoch_mean_losses"):
        dwa.on_epoch_end(2, torch.ones(3))


def test_dwa_state_dict_round_trip() -> None:
    a = DWA(2)
    a.on_epoch_end(0, torch.tensor([2.0, 1.0]))
    a.on_epoch_end(1, torch.tensor([1.0, 1.0]))
    b = DWA(2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weights(), b.weights())
    a.on_epoch_end(2, torch.tensor([0.9, 0.3]))
    b.on_epoch_end(2, torch.tensor([0.9, 0.3]))
    assert torch.equal(a.weights(), b.weights())


# ------------------------------------------------------------------ GradNorm -------------


def test_gradnorm_grad_norms_and_sgd_update_match_manual() -> None:
    model = TwoHeads()
    x, ys = _data()
    shared = model.shared_parameters()
    balancer = GradNorm(2, alpha=1.5, lr=0.1, optimizer="sgd")
    with torch.no_grad():
        balancer.task_weights.copy_(torch.tensor([0.5, 1.5]))
    losses = model.losses(x, ys, [1.0, 5.0])
    weighted = balancer.weight_losses(losses)
    objective = weighted.sum()

    # manual G_i = ||grad_W (w_i L_i)|| and the plain gradient of the objective
    manual_g = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(weighted[i], shared, retain_graph=True)]).norm() for i in range(2)]
    )
    plain = torch.autograd.grad(objective, list(model.parameters()), retain_graph=True)

    balancer.backward(objective, weighted, shared)
    assert torch.allclose(balancer.last_grad_norms, manual_g, rtol=1e-5)
    for p, g in zip(model.parameters(), plain):
        assert torch.allclose(p.grad, g)  # the network update uses the weights as they were

    # first step: L~ = 1 for all, so every target is mean(G); one SGD step on |G - target|
    w = torch.tensor([0.5, 1.5])
    raw = manual_g / w
    target = manual_g.mean()
    assert torch.allclose(balancer.last_targets, target.expand(2), rtol=1e-5)
    stepped = w - 0.1 * torch.sign(manual_g - target) * raw
    expected = stepped * 2 / stepped.sum()
    assert torch.allclose(balancer.weights(), expected, rtol=1e-5)
    assert float(balancer.weights().sum()) == pytest.approx(2.0)


def _linear_losses(p: torch.Tensor, k: list[float]) -> torch.Tensor:
    return torch.stack([ki * p.sum() for ki in k])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_gradnorm_slower_task_gains_weight(optimizer) -> None:
    p = nn.Parameter(torch.ones(3))
    balancer = GradNorm(2, alpha=1.5, lr=0.025, optimizer=optimizer)
    # step 0 records L(0) = (3, 3); equal rates and equal gradient norms: nothing moves
    weighted = balancer.weight_losses(_linear_losses(p, [1.0, 1.0]))
    balancer.backward(weighted.sum(), weighted, [p])
    assert balancer.weights().tolist() == pytest.approx([1.0, 1.0])
    assert balancer.initial_losses.tolist() == [3.0, 3.0]
    # step 1: task 0's loss halved, task 1's fell only 10 %: task 1 trains slower
    weighted = balancer.weight_losses(_linear_losses(p, [0.5, 0.9]))
    balancer.backward(weighted.sum(), weighted, [p])
    w = balancer.weights()
    assert w[1] > 1.0 > w[0]
    assert float(w.sum()) == pytest.approx(2.0)
    # the targets follow G_bar * r^alpha with r = L~ / mean(L~)
    g = torch.tensor([0.5, 0.9]) * math.sqrt(3)
    rate = torch.tensor([0.5, 0.9]) / 0.7
    assert torch.allclose(balancer.last_targets, g.mean() * rate**1.5, rtol=1e-5)


def test_gradnorm_equalises_gradient_norms_at_equal_rates() -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.ones(3))
    balancer = GradNorm(2, lr=0.02)
    for _ in range(200):  # p never moves, so the training rates stay equal
        weighted = balancer.weight_losses(_linear_losses(p, [1.0, 3.0]))
        balancer.backward(weighted.sum(), weighted, [p])
        p.grad = None
    w = balancer.weights()
    # equilibrium: w_0 * 1 = w_1 * 3 with w_0 + w_1 = 2, i.e. (1.5, 0.5)
    assert w.tolist() == pytest.approx([1.5, 0.5], abs=0.05)


def test_gradnorm_absent_task_keeps_weight_and_validates() -> None:
    p = nn.Parameter(torch.ones(2))
    balancer = GradNorm(3, optimizer="sgd", lr=0.1)
    losses = torch.stack([p.sum(), 4 * p.sum(), torch.tensor(float("nan"))])
    present = torch.tensor([True, True, False])
    weighted = balancer.weight_losses(losses, present)
    assert weighted[2].item() == 0.0
    balancer.backward(weighted.sum(), weighted, [p])
    assert math.isnan(balancer.initial_losses[2].item())  # not recorded while absent
    w = balancer.weights()
    assert w[2].item() == pytest.approx(1.0)  # the absent task's weight does not move
    # present tasks: G = (1, 4) * sqrt(2); target = mean(G); SGD step, then they keep sum 2
    norms = torch.tensor([1.0, 4.0]) * math.sqrt(2)
    stepped = 1.0 - 0.1 * torch.sign(norms - norms.mean()) * norms
    assert w[:2].tolist() == pytest.approx((stepped * 2 / stepped.sum()).tolist(), rel=1e-5)
    assert float(w.sum()) == pytest.approx(3.0)
    with pytest.raises(RuntimeError, match="weight_losses"):
        balancer.backward(weighted.sum(), weighted, [p])
    with pytest.raises(ValueError, match="alpha"):
        GradNorm(2, alpha=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        GradNorm(2, optimizer="rmsprop")


# ------------------------------------------------------------------ PCGrad ---------------


def _pcgrad_step(balancer: PCGrad, g1: list[float], g2: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    theta = nn.Parameter(torch.zeros(2))
    head = nn.Parameter(torch.tensor([1.0]))
    a, b = torch.tensor(g1), torch.tensor(g2)
    losses = torch.stack([a @ theta + (head**2).sum(), b @ theta + 3 * head.sum()])
    weighted = balancer.weight_losses(losses)
    balancer.backward(weighted.sum(), weighted, [theta])
    return theta.grad, head.grad


def test_pcgrad_two_conflicting_gradients_by_hand() -> None:
    # g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1 < 0
    # g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1); sum = (0.5, 1.5)
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    projected = PCGrad(2).project(grads)
    assert torch.allclose(projected, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    assert projected[0] @ grads[1] == pytest.approx(0.0, abs=1e-7)  # orthogonal to the other
    assert projected[1] @ grads[0] == pytest.approx(0.0, abs=1e-7)
    shared_grad, head_grad = _pcgrad_step(PCGrad(2), [1.0, 0.0], [-1.0, 1.0])
    assert torch.allclose(shared_grad, torch.tensor([0.5, 1.5]))
    assert head_grad.tolist() == [5.0]  # plain: d/dh (h^2 + 3h) at 1


def test_pcgrad_leaves_non_conflicting_gradients() -> None:
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    assert torch.equal(PCGrad(3).project(grads), grads)
    shared_grad, _ = _pcgrad_step(PCGrad(2), [1.0, 0.0], [1.0, 1.0])
    assert torch.allclose(shared_grad, torch.tensor([2.0, 1.0]))


def test_pcgrad_deterministic_under_seed_and_resumable() -> None:
    torch.manual_seed(0)
    grads = torch.randn(5, 8)
    grads[1] = -grads[0] + 0.1 * torch.randn(8)  # make sure there is conflict
    a, b = PCGrad(5, seed=3), PCGrad(5, seed=3)
    first = a.project(grads)
    assert torch.equal(first, b.project(grads))
    assert not torch.equal(first, grads)

    # an independent loop of the paper's procedure with the same stream of orders
    generator = torch.Generator().manual_seed(3)
    expected = grads.clone()
    for i in range(5):
        for j in torch.randperm(5, generator=generator).tolist():
            dot = float(expected[i] @ grads[j])
            if j != i and dot < 0:
                expected[i] -= dot / float(grads[j] @ grads[j]) * grads[j]
    assert torch.allclose(first, expected, atol=1e-6)

    c = PCGrad(5, seed=3)
    c.load_state_dict(a.state_dict())  # the generator state travels with state_dict
    assert torch.equal(a.project(grads), c.project(grads))


def test_pcgrad_two_tasks_always_orthogonal_property() -> None:
    torch.manual_seed(1)
    balancer = PCGrad(2)
    for _ in range(20):
        grads = torch.randn(2, 6)
        projected = balancer.project(grads)
        dot = float(grads[0] @ grads[1])
        if dot < 0:
            assert abs(float(projected[0] @ grads[1])) < 1e-5
            assert abs(float(projected[1] @ grads[0])) < 1e-5
        else:
            assert torch.equal(projected, grads)


def test_pcgrad_non_shared_params_get_plain_gradient_and_extras_pass() -> None:
    model = TwoHeads()
    x, ys = _data()
    shared = model.shared_parameters()
    balancer = PCGrad(2)
    losses = model.losses(x, ys, [1.0, 1.0])
    weighted = balancer.weight_losses(losses)
    regulariser = 0.05 * sum((p**2).sum() for p in model.parameters())
    objective = weighted.sum() + regulariser

    task_grads = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(weighted[i], shared, retain_graph=True)]) for i in range(2)]
    )
    plain = torch.autograd.grad(objective, list(model.parameters()), retain_graph=True)
    projected = PCGrad(2).project(task_grads).sum(0)
    reg_shared = torch.cat([(0.1 * p.detach()).reshape(-1) for p in shared])

    for p in shared:  # gradient accumulation: an earlier micro-batch's gradient survives
        p.grad = torch.ones_like(p)
    balancer.backward(objective, weighted, shared)

    shared_ids = {id(p) for p in shared}
    for p, g in zip(model.parameters(), plain):
        if id(p) not in shared_ids:
            assert torch.allclose(p.grad, g)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(got, 1.0 + projected + reg_shared, atol=1e-6)


def test_pcgrad_scale_and_frozen_shared() -> None:
    shared_grad, head_grad = _pcgrad_step(PCGrad(2), [1.0, 0.0], [-1.0, 1.0])
    theta = nn.Parameter(torch.zeros(2))
    head = nn.Parameter(torch.tensor([1.0]))
    losses = torch.stack([torch.tensor([1.0, 0.0]) @ theta + (head**2).sum(), torch.tensor([-1.0, 1.0]) @ theta + 3 * head.sum()])
    balancer = PCGrad(2)
    weighted = balancer.weight_losses(losses)
    balancer.backward(weighted.sum(), weighted, [theta], scale=lambda t: 1024.0 * t)
    assert torch.allclose(theta.grad, 1024.0 * shared_grad)
    assert torch.allclose(head.grad, 1024.0 * head_grad)
    # with the shared parameters frozen, backward is the plain one
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    h = nn.Parameter(torch.tensor([2.0]))
    weighted = balancer.weight_losses(torch.stack([(h**2).sum(), (frozen.sum() + h).sum()]))
    balancer.backward(weighted.sum(), weighted, [frozen])
    assert h.grad.tolist() == [5.0] and frozen.grad is None


# ------------------------------------------------------------------ all together ---------


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_every_balancer_trains_a_tiny_model(name) -> None:
    model = TwoHeads(seed=1)
    x, ys = _data(32, seed=2)
    balancer = build_balancer(name, 2)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(balancer.parameters()), lr=0.05)
    with torch.no_grad():
        start = model.losses(x, ys, [1.0, 1.0]).sum().item()
    for epoch in range(4):
        for _ in range(10):
            optimizer.zero_grad()
            losses = model.losses(x, ys, [1.0, 1.0])
            weighted = balancer.weight_losses(losses, torch.tensor([True, True]))
            balancer.backward(weighted.sum(), weighted, model.shared_parameters())
            optimizer.step()
        balancer.on_epoch_end(epoch, losses.detach())
    with torch.no_grad():
        end = model.losses(x, ys, [1.0, 1.0]).sum().item()
    assert end < 0.8 * start
    assert torch.isfinite(balancer.weights()).all()


def test_gradnorm_under_loss_scaling_sees_unscaled_norms() -> None:
    results = []
    for scale in (None, lambda t: 1024.0 * t):
        p = nn.Parameter(torch.ones(3))
        balancer = GradNorm(2, optimizer="sgd", lr=0.1)
        weighted = balancer.weight_losses(_linear_losses(p, [1.0, 2.0]))
        balancer.backward(weighted.sum(), weighted, [p], scale=scale)
        results.append((balancer.last_grad_norms, balancer.weights(), p.grad.clone()))
    (g0, w0, p0), (g1, w1, p1) = results
    assert torch.allclose(g0, g1) and torch.allclose(w0, w1)
    assert torch.allclose(p1, 1024.0 * p0)  # the network gradient itself is scaled
