"""adaTT's transfer loss is a task reweighting: ``effective_task_weights`` against autograd.

The summed transfer-enhanced loss is linear in the losses that carry gradient, so its
Jacobian with respect to the per-task losses is the weight vector ``c`` (appendix A.5).
"""

from __future__ import annotations

import pytest
import torch

from mtlbook.adatt import AdaptiveTaskTransfer


def make_module(n: int, seed: int, *, epoch: int = 3, **kwargs) -> AdaptiveTaskTransfer:
    """A module with a random symmetric affinity (some pairs below tau) and random W."""
    g = torch.Generator().manual_seed(seed)
    names = [f"t{i}" for i in range(n)]
    module = AdaptiveTaskTransfer(names, **kwargs)
    a = torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1
    a = ((a + a.T) / 2).fill_diagonal_(1.0).float()
    module.affinity_computer.update(cosine=a)
    with torch.no_grad():
        module.transfer_logits.copy_(torch.randn(n, n, generator=g))
    module.set_epoch(epoch)
    return module


def autograd_weights(module: AdaptiveTaskTransfer, losses: torch.Tensor, present=None) -> torch.Tensor:
    """d sum_i L_i^adaTT / d L_j by autograd, in float64."""
    leaf = losses.detach().double().clone().requires_grad_(True)
    total = module.compute_transfer_loss(leaf, present=present).sum()
    (grad,) = torch.autograd.grad(total, leaf)
    return grad


def random_losses(n: int, seed: int, scale_spread: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.exp(scale_spread * torch.randn(n, generator=g, dtype=torch.float64))


STATES = [
    # (n, seed, epoch, kwargs): dynamic with a prior, frozen, zero-logit blocking, a strong lambda
    (4, 0, 3, {}),
    (6, 1, 4, {"task_groups": {"a": ["t0", "t1", "t2"], "b": ["t3", "t4", "t5"]}}),
    (5, 2, 12, {}),
    (5, 3, 5, {"blocking": "zero_logit"}),
    (7, 4, 5, {"transfer_lambda": 2.0, "temperature": 0.5}),
    (3, 5, 10, {"transfer_lambda": 0.7, "negative_threshold": 0.2}),
]


@pytest.mark.parametrize("n, seed, epoch, kwargs", STATES)
def test_effective_weights_equal_the_autograd_jacobian(n, seed, epoch, kwargs):
    module = make_module(n, seed, epoch=epoch, **kwargs).double()
    assert module.phase in ("dynamic", "frozen")
    blocked = (module.affinity < module.negative_threshold).sum().item()
    for k in range(4):
        losses = random_losses(n, seed * 10 + k)
        c = module.effective_task_weights(losses)
        torch.testing.assert_close(c, autograd_weights(module, losses), atol=1e-6, rtol=0)
    assert blocked > 0 or seed == 0  # the random states do exercise blocked pairs


def test_capped_rows_contribute_nothing_and_the_states_do_cap():
    module = make_module(5, 7, transfer_lambda=3.0).double()
    losses = torch.tensor([1e-3, 1.0, 10.0, 0.2, 5.0], dtype=torch.float64)
    w = module.transfer_weights().double().fill_diagonal_(0.0)
    transfer = module.transfer_lambda * (w @ losses)
    capped = transfer > module.max_transfer_ratio * losses
    assert capped.any() and not capped.all()
    expected = 1 + module.transfer_lambda * (w * (~capped).double()[:, None]).sum(0)
    c = module.effective_task_weights(losses)
    torch.testing.assert_close(c, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(c, autograd_weights(module, losses), atol=1e-6, rtol=0)


def test_negative_losses_cap_every_row():
    """Uncertainty-weighted losses can be negative: the cap is then negative and always binds."""
    module = make_module(4, 8).double()
    losses = -torch.rand(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = module.effective_task_weights(losses)
    torch.testing.assert_close(c, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(c, autograd_weights(module, losses), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_absent_tasks_keep_weight_one_and_lend_nothing(seed):
    n = 6
    module = make_module(n, 20 + seed).double()
    present = torch.tensor([True, False, True, True, False, True])
    losses = random_losses(n, seed)
    losses_nan = losses.clone()
    losses_nan[~present] = float("nan")
    c = module.effective_task_weights(losses_nan, present)
    assert torch.equal(c[~present], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(c, autograd_weights(module, losses, present), atol=1e-6, rtol=0)
    # dropping the absent tasks' rows and columns gives the same weights for the others
    w = module.transfer_weights(present).double().fill_diagonal_(0.0)
    assert torch.all(w[:, ~present] == 0) and torch.all(w[~present] == 0)


def test_warmup_and_disabled_give_ones_and_match_autograd():
    module = make_module(4, 9, epoch=0).double()
    assert module.phase == "warmup"
    losses = random_losses(4, 0)
    torch.testing.assert_close(module.effective_task_weights(losses), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(autograd_weights(module, losses), torch.ones(4, dtype=torch.float64))
    module.set_epoch(3)
    assert not torch.allclose(module.effective_task_weights(losses), torch.ones(4, dtype=torch.float64))
    module.disable()
    torch.testing.assert_close(module.effective_task_weights(losses), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(autograd_weights(module, losses), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("n", [2, 3, 8])
def test_bounds(n, seed):
    module = make_module(n, 100 + seed, transfer_lambda=0.1 * (seed + 1)).double()
    c = module.effective_task_weights(random_losses(n, seed))
    lam = module.transfer_lambda
    assert torch.all(c >= 1.0 - 1e-12)
    assert torch.all(c <= 1.0 + lam * (n - 1) + 1e-12)
    # the total extra weight is lambda times the number of open rows that have a peer
    assert float(c.sum()) <= n + lam * n + 1e-9


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0])
def test_two_tasks_uncapped_both_get_one_plus_lambda(lam):
    module = make_module(2, 3, transfer_lambda=lam, max_transfer_ratio=100.0).double()
    with torch.no_grad():
        module.affinity_computer.affinity.copy_(torch.tensor([[1.0, 0.3], [0.3, 1.0]]))
    losses = torch.tensor([0.7, 2.0], dtype=torch.float64)
    c = module.effective_task_weights(losses)
    torch.testing.assert_close(c, torch.full((2,), 1.0 + lam, dtype=torch.float64))
    torch.testing.assert_close(c, autograd_weights(module, losses), atol=1e-6, rtol=0)
    # blocking the pair sets both back to 1
    with torch.no_grad():
        module.affinity_computer.affinity.copy_(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
    torch.testing.assert_close(module.effective_task_weights(losses), torch.ones(2, dtype=torch.float64))


def test_shared_gradient_is_the_c_weighted_sum_of_task_gradients():
    """On a real parameter: grad of sum L^adaTT = sum_j c_j grad L_j."""
    torch.manual_seed(0)
    module = make_module(4, 11, transfer_lambda=0.8).double()
    theta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(4, 3, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [3.0], [0.5]], dtype=torch.float64)
    losses = ((theta[None] - targets) ** 2).sum(1)
    (g_total,) = torch.autograd.grad(module.compute_transfer_loss(losses).sum(), theta, retain_graph=True)
    per_task = torch.stack([torch.autograd.grad(losses[j], theta, retain_graph=True)[0] for j in range(4)])
    c = module.effective_task_weights(losses)
    torch.testing.assert_close(g_total, c @ per_task, atol=1e-9, rtol=0)


def test_does_not_touch_the_stored_transfer_matrix_or_w_grad():
    module = make_module(4, 12)
    before = module.transfer_matrix
    module.effective_task_weights(torch.ones(4))
    assert torch.equal(module.transfer_matrix, before)
    assert module.transfer_logits.grad is None


def test_bad_input_raises():
    module = make_module(3, 13)
    with pytest.raises(ValueError, match="task_losses"):
        module.effective_task_weights(torch.ones(4))
    with pytest.raises((ValueError, TypeError), match="present"):
        module.effective_task_weights(torch.ones(3), present=[True, False])
