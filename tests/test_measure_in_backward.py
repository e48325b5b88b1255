"""Affinity measured inside the training backward (``TaskAffinityComputer.measure_in_backward``).

The backward of ``losses.sum()`` passes every task feature on its way; tensor hooks keep the
cotangents there (:class:`mtlbook.gradients.FeatureCotangents`) and the structured pass
starts from them instead of running a backward of its own. These tests check that the result
is the measurement *and* the backward the caller would have run: the same ``G`` (to float
rounding) and the same ``.grad`` (bit for bit: it is the same backward) as ``measure`` followed
by ``losses.sum().backward()``, on every mixture model in both forms, with absent tasks and
balancer weights; that every case the structured mode does not cover still measures and
backpropagates; that the hooks are gone afterwards; that training with it gives the weights
that measuring and backpropagating separately give; and the errors at the boundary.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlbook.adatt import TaskAffinityComputer
from mtlbook.gradients import FeatureCotangents, _private_cotangents
from mtlbook.losses import task_losses
from mtlbook.models import build_model, to_bank

from _tiny import NAMES, SPECS, make_dataset


def make(kind: str, bank: bool = False, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(kind, 5, SPECS, experts="modules", **kwargs)
    return to_bank(model) if bank else model


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float rounding: every entry within 1e-6 of the largest entry of ``b``."""
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())


def losses_of(model: nn.Module, seed: int = 1, mix: float = 0.0, scale=None) -> torch.Tensor:
    batch = make_dataset(48, seed=seed).collate(range(48))
    raw = task_losses(model(batch.inputs), batch, SPECS)
    if scale is not None:  # positive per-task weights, as a balancer's
        raw = raw * scale
    if mix:  # task 0's loss also reads task 1's output: not task-separable
        raw = torch.stack([raw[0] + mix * raw[1], raw[1], raw[2]])
    return raw


def both_ways(kind: str, bank: bool = False, present=None, mix: float = 0.0, scale=None, **computer):
    """(G, grads) of measure-then-backward and of gradients_in_backward, on two copies of one model."""
    results = []
    for together in (False, True):
        model = make(kind, bank)
        c = TaskAffinityComputer(NAMES, **computer).attach(model)
        losses = losses_of(model, mix=mix, scale=scale)
        if together:
            G = c.gradients_in_backward(losses, present)
        else:
            G = c.extract_gradients(losses, present=present)
            losses.sum().backward()
        results.append((G, [p.grad for p in model.parameters()], c))
    return results


@pytest.mark.parametrize("kind", ["mmoe", "cgc", "ple"])
@pytest.mark.parametrize("bank", [False, True])
def test_the_same_measurement_and_the_same_backward(kind, bank):
    (G_apart, grads_apart, _), (G_in, grads_in, c) = both_ways(kind, bank)
    assert c.mode == "structured"
    assert G_in.abs().sum() > 0
    assert_same(G_in, G_apart)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(grads_apart, grads_in))
    assert any(g is not None and g.abs().sum() > 0 for g in grads_in)


def test_absent_tasks_and_balancer_weights():
    present = torch.tensor([True, False, True])
    scale = torch.tensor([0.5, 2.0, 1.5])
    (G_apart, grads_apart, _), (G_in, grads_in, _) = both_ways("ple", True, present=present, scale=scale)
    assert torch.count_nonzero(G_in[1]) == 0 and torch.count_nonzero(G_in[0]) > 0
    assert_same(G_in, G_apart)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(grads_apart, grads_in))


@pytest.mark.parametrize(
    "case",
    [dict(extraction="cut"), dict(extraction="batched"), dict(parameter_set="last_layer"),
     dict(parameter_set="weights"), dict(mix=0.5)],  # fmt: skip
    ids=["cut", "batched", "last_layer", "weights", "mixed-loss"],
)
def test_where_the_structured_mode_does_not_apply_it_measures_then_backpropagates(case):
    mix = case.pop("mix", 0.0)
    (G_apart, grads_apart, _), (G_in, grads_in, _) = both_ways("cgc", True, mix=mix, **case)
    assert G_in.abs().sum() > 0
    assert_same(G_in, G_apart)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(grads_apart, grads_in))


def test_the_kept_cotangents_are_those_of_a_backward_of_their_own():
    model = make("ple", bank=True)
    losses = losses_of(model)
    levels = model.mixture_levels
    own = _private_cotangents(losses.sum(), levels, [0, 1, 2])
    kept = FeatureCotangents(levels)
    losses.sum().backward()
    kept.remove()
    for a, b in zip(kept.rows([0, 1, 2]), own):
        assert torch.equal(a, b)
    assert [r.shape[0] for r in kept.rows([0, 2])] == [2, 2]


def test_the_hooks_are_removed():
    model = make("cgc", bank=True)
    c = TaskAffinityComputer(NAMES).attach(model)
    c.measure_in_backward(losses_of(model))  # first call: the separability check
    c.measure_in_backward(losses_of(model, seed=2))
    features = model.mixture_levels[0].task_features
    tensors = [features] if isinstance(features, torch.Tensor) else list(features)
    assert all(not t._backward_hooks for t in tensors)


def test_the_affinity_update_is_measures():
    model_a, model_b = make("ple", True), make("ple", True)
    a = TaskAffinityComputer(NAMES).attach(model_a)
    b = TaskAffinityComputer(NAMES).attach(model_b)
    for seed in (1, 2, 3):
        la, lb = losses_of(model_a, seed), losses_of(model_b, seed)
        expected = a.measure(la)
        la.sum().backward()
        got = b.measure_in_backward(lb)
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert int(b.n_updates) == 3 and bool(b.pair_observed.all())


def test_training_with_it_gives_the_same_weights():
    """Five AdamW steps, measuring every step: the weights match those of measure + backward."""
    weights = []
    for together in (False, True):
        model = make("ple", True)
        c = TaskAffinityComputer(NAMES).attach(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(5):
            optimizer.zero_grad(set_to_none=True)
            losses = losses_of(model, seed=step)
            if together:
                c.measure_in_backward(losses)
            else:
                c.measure(losses)
                losses.sum().backward()
            optimizer.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_a_list_of_scalar_losses_works_too():
    model = make("cgc")
    c = TaskAffinityComputer(NAMES).attach(model)
    G = c.gradients_in_backward(list(losses_of(model).unbind(0)))
    assert G.shape[0] == 3 and G.abs().sum() > 0
    assert all(p.grad is not None for p in model.shared_parameters())


def test_bad_input_is_a_clear_error():
    model = make("cgc")
    with pytest.raises(ValueError, match="attach"):
        TaskAffinityComputer(NAMES).measure_in_backward(losses_of(model))
    c = TaskAffinityComputer(NAMES).attach(model)
    with pytest.raises(ValueError, match="require grad"):
        c.gradients_in_backward(torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        c.gradients_in_backward(losses_of(model)[:2])
    with pytest.raises(ValueError, match="scalar"):
        c.gradients_in_backward([torch.zeros(2, requires_grad=True)] * 3)
