"""Tests for mtlbook.adatt: affinity measurement, group prior, transfer weights and loss."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from mtlbook.adatt import AdaptiveTaskTransfer, TaskAffinityComputer, build_group_prior, cosine_matrix

TASKS3 = ("a", "b", "c")
TASKS4 = ("a", "b", "c", "d")


# --------------------------------------------------------------------------- fixtures
class TinyMTL(nn.Module):
    """Shared experts (Linear-Tanh-Linear-act) and one linear tower per task.

    Exposes what mtlbook models expose for adaTT: shared_parameters(), shared_outputs and
    last_shared_layers().
    """

    def __init__(self, n_tasks: int = 3, d_in: int = 4, d_hidden: int = 5, n_experts: int = 2, act: str = "relu"):
        super().__init__()
        last_act = {"relu": nn.ReLU, "tanh": nn.Tanh, "none": nn.Identity}[act]
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_hidden), last_act())
            for _ in range(n_experts)
        )
        self.towers = nn.ModuleList(nn.Linear(n_experts * d_hidden, 1) for _ in range(n_tasks))
        self.shared_outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.shared_outputs = [expert(x) for expert in self.experts]
        h = torch.cat(self.shared_outputs, dim=-1)
        return [tower(h).squeeze(-1) for tower in self.towers]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def last_shared_layers(self) -> list[nn.Linear]:
        return [expert[2] for expert in self.experts]


def make_problem(n_tasks: int = 3, act: str = "relu", seed: int = 0, batch: int = 8):
    torch.manual_seed(seed)
    model = TinyMTL(n_tasks=n_tasks, act=act)
    x = torch.randn(batch, 4)
    y = torch.randn(n_tasks, batch)
    return model, x, y


def stacked_losses(model: TinyMTL, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    outs = model(x)
    # different scales per task, so that gradients differ in norm as well as direction
    return torch.stack([(k + 1.0) * ((o - y[k]) ** 2).mean() for k, o in enumerate(outs)])


def full_gradients(losses, params) -> torch.Tensor:
    """Reference: per-task gradients by plain autograd, one call per task."""
    rows = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def set_affinity(module: AdaptiveTaskTransfer | TaskAffinityComputer, matrix: torch.Tensor) -> None:
    computer = module.affinity_computer if isinstance(module, AdaptiveTaskTransfer) else module
    computer.update(cosine=matrix)  # first observation initialises A = C


def symmetric(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, n, generator=g) * 2 - 1
    m = (m + m.T) / 2
    return m.fill_diagonal_(1.0)


# --------------------------------------------------------------------------- cosine
def test_cosine_matrix_matches_pairwise_loop_and_handles_zero_rows():
    torch.manual_seed(0)
    g = torch.randn(5, 7) * torch.tensor([[1.0], [1e-3], [50.0], [1.0], [1.0]])
    g[3] = 0.0
    c = cosine_matrix(g)
    assert torch.isfinite(c).all()
    for i in range(5):
        for j in range(5):
            ni, nj = g[i].norm(), g[j].norm()
            expected = 0.0 if ni == 0 or nj == 0 else float(g[i] @ g[j] / (ni * nj))
            assert c[i, j].item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(c, c.T)


def test_identical_losses_give_one_and_negated_give_minus_one():
    model, x, y = make_problem(n_tasks=3)
    base = ((model(x)[0] - y[0]) ** 2).mean()
    losses = torch.stack([base, base, -base])
    computer = TaskAffinityComputer(TASKS3).attach(model)
    a = computer.measure(losses)
    assert a[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert a[0, 2].item() == pytest.approx(-1.0, abs=1e-6)
    assert a[1, 2].item() == pytest.approx(-1.0, abs=1e-6)
    assert torch.allclose(a.diagonal(), torch.ones(3))


# --------------------------------------------------------------------------- EMA
@pytest.mark.parametrize("beta", [0.9, 0.5, 0.0])
def test_ema_recursion_by_hand(beta):
    computer = TaskAffinityComputer(TASKS3, ema_decay=beta)
    c1, c2, c3 = symmetric(3, 1), symmetric(3, 2), symmetric(3, 3)
    computer.update(cosine=c1)
    assert torch.allclose(computer.affinity, c1)  # first observation initialises
    computer.update(cosine=c2)
    expected = beta * c1 + (1 - beta) * c2
    assert torch.allclose(computer.affinity, expected, atol=1e-6)
    computer.update(cosine=c3)
    expected = beta * expected + (1 - beta) * c3
    assert torch.allclose(computer.affinity, expected, atol=1e-6)
    assert int(computer.n_updates) == 3


def test_update_from_gradients_equals_update_from_cosine():
    torch.manual_seed(1)
    g1, g2 = torch.randn(3, 6), torch.randn(3, 6)
    from_grads = TaskAffinityComputer(TASKS3)
    from_cos = TaskAffinityComputer(TASKS3)
    for g in (g1, g2):
        from_grads.update(g)
        from_cos.update(cosine=cosine_matrix(g))
    assert torch.allclose(from_grads.affinity, from_cos.affinity, atol=1e-6)


def test_affinity_is_clamped_to_unit_interval():
    computer = TaskAffinityComputer(("a", "b"))
    computer.update(cosine=torch.full((2, 2), 1.5))
    assert torch.equal(computer.affinity, torch.ones(2, 2))
    computer.update(cosine=torch.full((2, 2), -3.0))
    assert torch.allclose(computer.affinity, torch.full((2, 2), 0.9 - 0.3))  # in range: untouched
    for _ in range(200):  # an EMA of values just below -1 would drift below -1 without the clamp
        computer.update(cosine=torch.full((2, 2), -1.0 - 1e-4))
    assert computer.affinity.min().item() == -1.0


def test_absent_tasks_keep_their_pairs_and_first_observation_initialises_per_pair():
    computer = TaskAffinityComputer(TASKS3, ema_decay=0.9)
    c1, c2 = symmetric(3, 4), symmetric(3, 5)
    computer.update(cosine=c1, present=torch.tensor([True, True, False]))
    a = computer.affinity
    assert a[0, 1].item() == pytest.approx(c1[0, 1].item())
    # pairs with the absent task keep the initial value (identity: 0 off-diagonal, 1 on it)
    assert a[0, 2].item() == 0.0 and a[2, 1].item() == 0.0 and a[2, 2].item() == 1.0
    assert not computer.pair_observed[0, 2] and computer.pair_observed[0, 1]
    computer.update(cosine=c2)
    a = computer.affinity
    assert a[0, 1].item() == pytest.approx(0.9 * c1[0, 1].item() + 0.1 * c2[0, 1].item(), abs=1e-6)
    assert a[0, 2].item() == pytest.approx(c2[0, 2].item(), abs=1e-6)  # first time seen together
    # later absences keep the value rather than pulling it toward 0
    before = computer.affinity.clone()
    computer.update(cosine=torch.zeros(3, 3), present=torch.tensor([False, True, True]))
    assert computer.affinity[0, 1] == before[0, 1] and computer.affinity[0, 2] == before[0, 2]
    assert computer.affinity[1, 2] != before[1, 2]


def test_zero_or_nonfinite_gradient_rows_count_as_unobserved():
    computer = TaskAffinityComputer(TASKS3)
    g = torch.randn(3, 4)
    g[1] = 0.0
    g[2, 0] = float("nan")
    computer.update(g)
    assert torch.equal(computer.affinity, torch.eye(3))
    assert computer.pair_observed.sum().item() == 1  # only (a, a)


def test_buffers_are_saved_restored_and_follow_to():
    computer = TaskAffinityComputer(TASKS3)
    computer.update(cosine=symmetric(3, 6), present=torch.tensor([True, True, False]))
    assert list(computer.parameters()) == []
    state = computer.state_dict()
    assert set(state) == {"affinity", "pair_observed", "n_updates"}
    restored = TaskAffinityComputer(TASKS3)
    restored.load_state_dict(state)
    assert torch.equal(restored.affinity, computer.affinity)
    assert torch.equal(restored.pair_observed, computer.pair_observed)
    assert int(restored.n_updates) == 1
    restored.to(torch.float64)
    assert restored.affinity.dtype == torch.float64 and restored.n_updates.dtype == torch.long
    restored.to("meta")  # any device move, without needing a GPU
    assert restored.affinity.device.type == "meta" and restored.pair_observed.device.type == "meta"


# --------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("parameter_set", ["all", "weights", "last_layer"])
def test_loop_and_batched_extraction_agree(parameter_set):
    model, x, y = make_problem()
    present = torch.tensor([True, False, True])
    results = {}
    for mode in ("loop", "batched"):
        computer = TaskAffinityComputer(TASKS3, extraction=mode, parameter_set=parameter_set).attach(model)
        losses = stacked_losses(model, x, y)
        results[mode] = computer.extract_gradients(losses, present=present)
    assert torch.allclose(results["loop"], results["batched"], atol=1e-6)
    assert torch.count_nonzero(results["batched"][1]) == 0
    assert torch.count_nonzero(results["batched"][0]) > 0


@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_all_parameters_match_reference_and_backward_still_works(mode):
    model, x, y = make_problem()
    params = model.shared_parameters()
    computer = TaskAffinityComputer(TASKS3, extraction=mode).attach(model)
    losses = stacked_losses(model, x, y)
    g = computer.extract_gradients(losses)
    assert g.shape == (3, sum(p.numel() for p in params))
    assert torch.allclose(g, full_gradients(losses, params), atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # extraction does not touch .grad
    losses.sum().backward()  # the trainer's own backward on the same graph
    after = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    stacked_losses(model, x, y).sum().backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(after, model.parameters()))


def test_weights_only_is_the_full_gradient_restricted_to_matrices():
    model, x, y = make_problem()
    params = model.shared_parameters()
    losses = stacked_losses(model, x, y)
    full = TaskAffinityComputer(TASKS3).extract_gradients(losses, params)
    weights = TaskAffinityComputer(TASKS3, parameter_set="weights").extract_gradients(losses, params)
    columns, offset = [], 0
    for p in params:
        if p.dim() >= 2:
            columns.extend(range(offset, offset + p.numel()))
        offset += p.numel()
    assert weights.shape == (3, len(columns)) and len(columns) < full.shape[1]
    assert torch.allclose(weights, full[:, columns], atol=1e-7)


@pytest.mark.parametrize("act", ["relu", "tanh", "none"])
@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_last_layer_equals_full_gradient_on_that_layer(act, mode):
    model, x, y = make_problem(act=act, seed=2)
    layer_params = [p for layer in model.last_shared_layers() for p in (layer.weight, layer.bias)]
    computer = TaskAffinityComputer(TASKS3, extraction=mode, parameter_set="last_layer").attach(model)
    losses = stacked_losses(model, x, y)
    cheap = computer.extract_gradients(losses)
    reference = full_gradients(losses, layer_params)
    assert cheap.shape == reference.shape
    assert torch.allclose(cheap, reference, atol=1e-5)
    losses.sum().backward()  # still possible afterwards


def test_last_layer_sums_over_repeated_calls_of_a_shared_layer():
    torch.manual_seed(3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 4)
            self.last = nn.Linear(4, 4)
            self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))

        def forward(self, x):
            h = torch.tanh(self.inner(x))
            z = torch.relu(self.last(h)) + torch.tanh(self.last(2 * h))  # same layer twice
            return [head(z).squeeze(-1) for head in self.heads]

        def shared_parameters(self):
            return list(self.inner.parameters()) + list(self.last.parameters())

        def last_shared_layers(self):
            return [self.last]

    model = Twice()
    computer = TaskAffinityComputer(("a", "b"), parameter_set="last_layer").attach(model)
    x, y = torch.randn(6, 3), torch.randn(2, 6)
    outs = model(x)
    losses = torch.stack([((o - y[k]) ** 2).mean() for k, o in enumerate(outs)])
    assert len(computer._capture.calls[0]) == 2
    reference = full_gradients(losses, [model.last.weight, model.last.bias])
    assert torch.allclose(computer.extract_gradients(losses), reference, atol=1e-5)
    model(x)  # a new forward replaces, not appends
    assert len(computer._capture.calls[0]) == 2


def test_last_layer_with_explicit_tensors():
    torch.manual_seed(4)
    body, last, head = nn.Linear(3, 5), nn.Linear(5, 2), nn.Linear(2, 2)
    x = torch.randn(7, 3)
    h = torch.tanh(body(x))
    u = last(h)  # pre-activation output of the last Linear
    out = head(torch.relu(u))
    losses = torch.stack([out[:, 0].pow(2).mean(), (out[:, 1] - 1).abs().mean()])
    computer = TaskAffinityComputer(("a", "b"), parameter_set="last_layer")
    g = computer.extract_gradients(losses, last_layers=[last], shared_outputs=[u], layer_inputs=[h])
    assert torch.allclose(g, full_gradients(losses, [last.weight, last.bias]), atol=1e-5)
    with pytest.raises(ValueError, match="layer_inputs"):
        computer.extract_gradients(losses, last_layers=[last], shared_outputs=[u])


def test_hooks_skip_no_grad_forwards_and_release_removes_them():
    model, x, _ = make_problem()
    computer = TaskAffinityComputer(TASKS3, parameter_set="last_layer").attach(model)
    with torch.no_grad():
        outs = model(x)
    losses = torch.stack([o.mean() for o in outs]).requires_grad_()
    with pytest.raises(ValueError, match="no activations captured"):
        computer.extract_gradients(losses)
    computer.release()
    assert all(len(layer._forward_hooks) == 0 for layer in model.last_shared_layers())
    assert len(model._forward_pre_hooks) == 0 and not computer.attached


def test_a_deep_copy_of_the_model_does_not_disturb_the_capture():
    model, x, y = make_problem()
    computer = TaskAffinityComputer(TASKS3, parameter_set="last_layer").attach(model)
    losses = stacked_losses(model, x, y)
    expected = computer.extract_gradients(losses)
    model.shared_outputs = []  # live tensors; mtlbook models leave them out of copies too
    snapshot = copy.deepcopy(model)  # e.g. a best-model snapshot taken by the trainer
    snapshot(torch.randn(3, 4))
    assert torch.equal(computer.extract_gradients(losses), expected)


class _CountBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _CountBackward.calls += 1
        return grad


@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_absent_task_graph_is_not_traversed_with_a_list_of_losses(mode):
    model, x, y = make_problem()
    outs = model(x)
    losses = [((o - y[k]) ** 2).mean() for k, o in enumerate(outs)]
    losses[2] = _CountBackward.apply(losses[2])
    _CountBackward.calls = 0
    computer = TaskAffinityComputer(TASKS3, extraction=mode).attach(model)
    g = computer.extract_gradients(losses, present=torch.tensor([True, True, False]))
    assert _CountBackward.calls == 0
    assert torch.count_nonzero(g[2]) == 0 and torch.count_nonzero(g[0]) > 0


def test_measure_uses_the_attached_model_and_stores_cosine():
    model, x, y = make_problem()
    computer = TaskAffinityComputer(TASKS3).attach(model)
    losses = stacked_losses(model, x, y)
    expected = cosine_matrix(full_gradients(losses, model.shared_parameters()))
    a = computer.measure(losses)
    assert torch.allclose(a, expected.clamp(-1, 1), atol=1e-6)
    a.zero_()  # a copy: the buffer is unaffected
    assert computer.affinity.abs().sum() > 0


# --------------------------------------------------------------------------- prior
def test_group_prior_rows_diagonal_and_ratios():
    names = ("a", "b", "c", "d", "e", "f")
    prior = build_group_prior(names, {"g1": ["a", "b", "c"], "g2": ["d", "e"]}, 0.3, 0.7)
    assert torch.allclose(prior.sum(dim=1), torch.ones(6))
    assert torch.equal(prior.diagonal(), torch.zeros(6))
    assert prior[0, 1].item() / prior[0, 3].item() == pytest.approx(0.7 / 0.3)
    assert prior[3, 4].item() / prior[3, 0].item() == pytest.approx(0.7 / 0.3)
    assert torch.allclose(prior[5, :5], torch.full((5,), 0.2))  # no group: inter peers only
    per_group = build_group_prior(names, {"g1": ["a", "b", "c"], "g2": ["d", "e"]}, 0.3, {"g1": 0.8, "g2": 0.6})
    assert per_group[0, 1].item() / per_group[0, 4].item() == pytest.approx(0.8 / 0.3)
    assert per_group[3, 4].item() / per_group[3, 0].item() == pytest.approx(0.6 / 0.3)


def test_group_prior_degenerate_rows_are_zero_not_nan():
    assert torch.equal(build_group_prior(("a",), {"g": ["a"]}), torch.zeros(1, 1))
    prior = build_group_prior(TASKS3, {"g": ["a", "b"]}, inter_group_strength=0.0, intra_group_strength=0.5)
    assert torch.equal(prior[2], torch.zeros(3))  # c: alone, inter strength 0
    assert torch.allclose(prior[0], torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": {"g": ["a", "zzz"]}}, "unknown task"),
        ({"groups": {"g": ["a"], "h": ["a", "b"]}}, "more than once"),
        ({"groups": {"g": ["a", "a"]}}, "more than once"),
        ({"groups": {"g": ["a"]}, "inter_group_strength": 1.5}, "inter_group_strength"),
        ({"groups": {"g": ["a"]}, "intra_group_strength": -0.1}, "intra_group_strength"),
        ({"groups": {"g": ["a"]}, "intra_group_strength": {"h": 0.5}}, "intra_group_strength"),
    ],
)
def test_group_prior_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_group_prior(TASKS3, **kwargs)


# --------------------------------------------------------------------------- transfer weights
def affinity4() -> torch.Tensor:
    a = torch.eye(4)
    pairs = {(0, 1): -0.5, (0, 2): 0.3, (0, 3): -0.05, (1, 2): 0.6, (1, 3): 0.1, (2, 3): -0.2}
    for (i, j), v in pairs.items():
        a[i, j] = a[j, i] = v
    return a


def dynamic_module(**kwargs) -> AdaptiveTaskTransfer:
    module = AdaptiveTaskTransfer(TASKS4, warmup_epochs=1, freeze_epoch=3, **kwargs)
    module.set_epoch(1)
    set_affinity(module, affinity4())
    return module


def test_blocked_entries_get_exactly_zero_and_rows_are_softmax_over_peers():
    module = dynamic_module(temperature=0.7)
    w = module.transfer_weights()
    a = affinity4()
    blocked = torch.eye(4, dtype=torch.bool) | (a < -0.1)
    assert torch.all(w[blocked] == 0.0)
    assert torch.all(w[~blocked] > 0)
    assert torch.allclose(w.sum(dim=1), torch.ones(4))
    # W = 0, no prior: the ratio of two peers is exp((A_ij - A_ik) / T)
    assert (w[0, 2] / w[0, 3]).item() == pytest.approx(math.exp((0.3 + 0.05) / 0.7), rel=1e-5)
    assert torch.equal(module.transfer_matrix, w.detach())


def test_zero_logit_blocking_leaks_weight_to_blocked_pairs():
    module = dynamic_module(blocking="zero_logit")
    w = module.transfer_weights()
    assert w[0, 1].item() > 0 and w[0, 0].item() > 0  # the flaw the book demonstrates
    assert torch.allclose(w.sum(dim=1), torch.ones(4))


def test_fully_blocked_row_is_zero_without_nan():
    module = AdaptiveTaskTransfer(TASKS3, warmup_epochs=0, freeze_epoch=1)
    a = torch.tensor([[1.0, -0.5, -0.9], [-0.5, 1.0, 0.4], [-0.9, 0.4, 1.0]])
    set_affinity(module, a)
    w = module.transfer_weights()
    assert torch.equal(w[0], torch.zeros(3))
    assert w[1, 2].item() == pytest.approx(1.0) and w[2, 1].item() == pytest.approx(1.0)
    (w * torch.randn(3, 3)).sum().backward()
    assert torch.isfinite(module.transfer_logits.grad).all()
    out = module.compute_transfer_loss(torch.tensor([1.0, 2.0, 3.0]))
    assert out[0].item() == 1.0 and torch.isfinite(out).all()


def test_absent_columns_are_zeroed_after_softmax_without_renormalising():
    module = dynamic_module()
    full = module.transfer_weights()
    present = torch.tensor([True, True, False, True])
    w = module.transfer_weights(present)
    assert torch.all(w[:, 2] == 0) and torch.all(w[2] == 0)
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[:, 2] = False
    keep[2] = False
    assert torch.equal(w[keep], full[keep])
    assert w[1].sum().item() < 1.0


def test_prior_blend_enters_the_logits():
    groups = {"g1": ["a", "b"], "g2": ["c", "d"]}
    module = AdaptiveTaskTransfer(TASKS4, warmup_epochs=1, freeze_epoch=5, task_groups=groups, temperature=0.5)
    module.set_epoch(3)
    set_affinity(module, affinity4())
    with torch.no_grad():
        module.transfer_logits.copy_(torch.randn(4, 4) * 0.1)
    r = module.blend_ratio
    assert r == pytest.approx(0.5 - 0.4 * 2 / 4)
    a, p = affinity4(), build_group_prior(TASKS4, groups)
    mixed = (module.transfer_logits.detach() + a) * (1 - r) + p * r
    blocked = torch.eye(4, dtype=torch.bool) | (a < -0.1)
    expected = torch.softmax((mixed / 0.5).masked_fill(blocked, float("-inf")), dim=1).masked_fill(blocked, 0.0)
    assert torch.allclose(module.transfer_weights(), expected, atol=1e-6)


def test_detect_negative_transfer():
    module = dynamic_module()
    assert module.detect_negative_transfer() == {"a": ["b"], "b": ["a"], "c": ["d"], "d": ["c"]}
    assert AdaptiveTaskTransfer(TASKS3).detect_negative_transfer() == {}


# --------------------------------------------------------------------------- transfer loss
def test_transfer_loss_formula_and_cap():
    module = dynamic_module(transfer_lambda=0.1, max_transfer_ratio=0.5)
    losses = torch.tensor([0.01, 2.0, 3.0, 4.0], requires_grad=True)
    out = module.compute_transfer_loss(losses)
    w = module.transfer_matrix
    peer = 0.1 * (w @ losses.detach())
    expected = losses.detach() + torch.minimum(peer, 0.5 * losses.detach())
    assert torch.allclose(out, expected)
    assert out[0].item() == pytest.approx(0.015)  # capped at half its own loss
    assert out[1].item() == pytest.approx(2.0 + peer[1].item())  # not capped
    (grad_capped,) = torch.autograd.grad(out[0], losses, retain_graph=True)
    assert torch.equal(grad_capped, torch.tensor([1.0, 0.0, 0.0, 0.0]))  # the cap is detached
    (grad_free,) = torch.autograd.grad(out[1], losses)
    expected_grad = 0.1 * w[1]
    expected_grad[1] = 1.0
    assert torch.allclose(grad_free, expected_grad)


def test_absent_task_losses_do_not_leak_even_when_nan():
    module = dynamic_module()
    losses = torch.tensor([1.0, 2.0, float("nan"), 4.0], requires_grad=True)
    present = torch.tensor([True, True, False, True])
    out = module.compute_transfer_loss(losses, present=present)
    assert torch.isfinite(out[present]).all() and torch.isnan(out[2])
    (grad,) = torch.autograd.grad(out[present].sum(), losses)
    assert torch.isfinite(grad).all() and grad[2].item() == 0.0
    zero_loss = module.compute_transfer_loss(torch.tensor([1.0, 2.0, 0.0, 4.0]), present=present)
    assert zero_loss[2].item() == 0.0


def test_wrong_loss_shape_raises():
    module = AdaptiveTaskTransfer(TASKS3)
    with pytest.raises(ValueError, match="task_losses"):
        module.compute_transfer_loss(torch.ones(2))
    with pytest.raises(ValueError, match="task_losses"):
        module.compute_transfer_loss(torch.ones(3, 1))
    with pytest.raises(ValueError, match="present"):
        module.compute_transfer_loss(torch.ones(3), present=torch.ones(2, dtype=torch.bool))


# --------------------------------------------------------------------------- schedule
def test_blend_schedule():
    module = AdaptiveTaskTransfer(TASKS3, warmup_epochs=2, freeze_epoch=6, task_groups={"g": ["a", "b"]})
    expected = {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.4, 4: 0.3, 5: 0.2, 6: 0.1, 9: 0.1}
    for epoch, r in expected.items():
        assert module.prior_blend_ratio(epoch) == pytest.approx(r)
    module.on_epoch_end(3)
    assert module.epoch == 4 and module.blend_ratio == pytest.approx(0.3)
    assert AdaptiveTaskTransfer(TASKS3, warmup_epochs=2, freeze_epoch=6).blend_ratio == 0.0


def test_phase_transitions_and_requires_grad():
    module = AdaptiveTaskTransfer(TASKS3, warmup_epochs=2, freeze_epoch=4)
    assert module.phase == "warmup" and module.transfer_logits.requires_grad
    phases = [module.on_epoch_end(e) for e in range(5)]
    assert phases == ["warmup", "dynamic", "dynamic", "frozen", "frozen"]
    assert not module.transfer_logits.requires_grad
    assert module.set_epoch(1) == "warmup" and module.transfer_logits.requires_grad


@pytest.mark.parametrize("epoch, gets_grad", [(0, False), (1, True), (2, True), (3, False)])
def test_w_learns_only_in_the_dynamic_phase(epoch, gets_grad):
    module = AdaptiveTaskTransfer(TASKS4, warmup_epochs=1, freeze_epoch=3)
    set_affinity(module, affinity4())
    module.set_epoch(epoch)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    out = module.compute_transfer_loss(losses)
    out.sum().backward()
    grad = module.transfer_logits.grad
    if gets_grad:
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None
    if epoch == 0:
        assert torch.equal(out, losses)  # warmup: unchanged
    else:
        assert losses.grad[0].item() > 1.0  # peers' losses still train, frozen included


def test_frozen_weights_are_detached_even_if_requires_grad_is_switched_back_on():
    module = AdaptiveTaskTransfer(TASKS4, warmup_epochs=1, freeze_epoch=3)
    set_affinity(module, affinity4())
    module.set_epoch(3)
    module.transfer_logits.requires_grad_(True)  # e.g. a careless optimizer setup
    out = module.compute_transfer_loss(torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True))
    out.sum().backward()
    assert module.transfer_logits.grad is None


def test_extraction_is_excluded_from_torch_compile():
    assert getattr(TaskAffinityComputer.extract_gradients, "_torchdynamo_disable", False)


def test_disabled_module_passes_losses_through_and_does_not_measure():
    module = dynamic_module()
    module.disable()
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(module.compute_transfer_loss(losses, task_gradients=torch.randn(4, 5)), losses)
    assert int(module.affinity_computer.n_updates) == 1 and not module.should_measure(0)
    module.enable()
    assert module.enabled and not torch.equal(module.compute_transfer_loss(losses), losses)


def test_gradients_update_affinity_only_in_measuring_phases():
    module = AdaptiveTaskTransfer(TASKS3, warmup_epochs=1, freeze_epoch=2)
    g = torch.randn(3, 5)
    for epoch, expected_updates in [(0, 1), (1, 2), (2, 2)]:
        module.set_epoch(epoch)
        module.compute_transfer_loss(torch.ones(3), task_gradients=g)
        assert int(module.affinity_computer.n_updates) == expected_updates
    assert torch.allclose(module.affinity, cosine_matrix(g), atol=1e-6)


def test_should_measure_and_measure_passthrough():
    model, x, y = make_problem()
    module = AdaptiveTaskTransfer(TASKS3, grad_interval=3, warmup_epochs=1, freeze_epoch=2).attach(model)
    assert [module.should_measure(s) for s in range(7)] == [True, False, False, True, False, False, True]
    module.measure(stacked_losses(model, x, y))
    assert int(module.affinity_computer.n_updates) == 1
    module.set_epoch(2)
    assert not module.should_measure(3)
    module.measure(stacked_losses(model, x, y))  # frozen: no measurement
    assert int(module.affinity_computer.n_updates) == 1


def test_state_round_trip_restores_phase_and_requires_grad():
    module = AdaptiveTaskTransfer(TASKS3, warmup_epochs=1, freeze_epoch=3, task_groups={"g": ["a", "b"]})
    set_affinity(module, symmetric(3, 7))
    with torch.no_grad():
        module.transfer_logits.add_(torch.randn(3, 3))
    module.set_epoch(4)
    module.disable()
    buffer = io.BytesIO()
    torch.save(nn.ModuleDict({"adatt": module}).state_dict(), buffer)
    buffer.seek(0)
    fresh = AdaptiveTaskTransfer(TASKS3, warmup_epochs=1, freeze_epoch=3)
    assert fresh.transfer_logits.requires_grad
    nn.ModuleDict({"adatt": fresh}).load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.epoch == 4 and fresh.phase == "frozen" and not fresh.enabled
    assert not fresh.transfer_logits.requires_grad  # synced by the load hook
    assert torch.equal(fresh.transfer_logits, module.transfer_logits)
    assert torch.equal(fresh.affinity, module.affinity) and torch.equal(fresh.prior, module.prior)
    assert bool(fresh.prior_configured) and fresh.blend_ratio == pytest.approx(0.1)
    assert "last_transfer_weights" not in fresh.state_dict()
    fresh.to(torch.float64)
    assert fresh.prior.dtype == torch.float64 and fresh.affinity_computer.affinity.dtype == torch.float64


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"warmup_epochs": 3, "freeze_epoch": 3}, "freeze_epoch"),
        ({"warmup_epochs": 4, "freeze_epoch": 2}, "freeze_epoch"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"negative_threshold": 1.5}, "negative_threshold"),
        ({"negative_threshold": -1.01}, "negative_threshold"),
        ({"transfer_lambda": -0.1}, "transfer_lambda"),
        ({"max_transfer_ratio": -0.5}, "max_transfer_ratio"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"grad_interval": 0}, "grad_interval"),
        ({"extraction": "magic"}, "extraction"),
        ({"parameter_set": "biases"}, "parameter_set"),
        ({"blocking": "soft"}, "blocking"),
        ({"task_groups": {"g": ["a", "zzz"]}}, "task_groups"),
        ({"task_groups": {"g": ["a"], "h": ["a"]}}, "task_groups"),
        ({"task_groups": {"g": ["a", "b"]}, "intra_group_strength": 1.2}, "intra_group_strength"),
        ({"intra_group_strength": 1.2}, "intra_group_strength"),
        ({"inter_group_strength": -0.3}, "inter_group_strength"),
        ({"prior_blend_start": 1.5}, "prior_blend_start"),
        ({"prior_blend_end": -0.1}, "prior_blend_end"),
    ],
)
def test_transfer_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveTaskTransfer(TASKS3, **kwargs)


def test_other_validation_errors():
    with pytest.raises(ValueError, match="task_names"):
        AdaptiveTaskTransfer(("a", "a"))
    with pytest.raises(ValueError, match="ema_decay"):
        TaskAffinityComputer(TASKS3, ema_decay=1.0)
    with pytest.raises(ValueError, match="parameter_set"):
        TaskAffinityComputer(TASKS3, parameter_set="bias")
    computer = TaskAffinityComputer(TASKS3)
    with pytest.raises(ValueError, match="exactly one"):
        computer.update()
    with pytest.raises(ValueError, match="gradients"):
        computer.update(torch.randn(2, 5))
    with pytest.raises(ValueError, match="require grad"):
        computer.extract_gradients(torch.ones(3), [nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="attach"):
        computer.measure(torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="epoch"):
        AdaptiveTaskTransfer(TASKS3).set_epoch(-1)
