"""Tests for mtlbook.models: gating, parameter groups, gradient isolation, freezing, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mtlbook.data.batch import TaskSpec
from mtlbook.models import (
    CGC,
    MMoE,
    PLE,
    BlockAttentionCGC,
    Expert,
    SharedBottom,
    SoftmaxGate,
    TaskTower,
    block_scales,
    build_model,
)

N_FEATURES = 6
SPECS = (TaskSpec("ctr", "binary"), TaskSpec("grade", "multiclass", 3), TaskSpec("value", "regression"))
SMALL = dict(expert_hidden=(8,), expert_dim=4, tower_hidden=(8,))


def make(kind: str, **kwargs):
    torch.manual_seed(0)
    return build_model(kind, N_FEATURES, SPECS, **{**SMALL, **kwargs})


ALL_KINDS = ["shared_bottom", "mmoe", "cgc", "ple", "block_cgc"]
GATED_KINDS = ["mmoe", "cgc", "ple", "block_cgc"]


def inputs(batch: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, N_FEATURES, generator=torch.Generator().manual_seed(seed))


def ids(params) -> set[int]:
    return {id(p) for p in params}


def task_loss(out: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return out[name].float().pow(2).mean()


# ----------------------------------------------------------------------------- outputs and gates


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("batch", [1, 7])
def test_output_shapes_follow_task_specs(kind, batch):
    model = make(kind)
    model.train()
    out = model(inputs(batch))
    assert list(out) == ["ctr", "grade", "value"]
    assert out["ctr"].shape == (batch,)
    assert out["value"].shape == (batch,)
    assert out["grade"].shape == (batch, 3)
    sum(task_loss(out, t) for t in out).backward()  # batch of one trains too (no BatchNorm)


@pytest.mark.parametrize("kind", GATED_KINDS)
def test_gate_weights_are_distributions_that_depend_on_the_input(kind):
    model = make(kind, n_shared_experts=2) if kind != "mmoe" else make(kind, n_experts=3)
    model(inputs(16))
    assert model.gate_weights, "a gated model must record its gate weights"
    for key, w in model.gate_weights.items():
        assert w.shape == (16, len(model.gate_expert_names[key]))
        assert w.dtype == torch.float32 and not w.requires_grad
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(16))
        assert w.std(dim=0).max() > 0, f"gate {key} ignores its input"


def test_shared_bottom_has_no_gates_and_zero_entropy():
    model = make("shared_bottom")
    model(inputs())
    assert model.gate_weights == {}
    assert model.gate_parameters() == []
    assert model.gate_entropy().item() == 0.0


def test_mmoe_gate_keys_and_expert_count():
    model = make("mmoe", n_experts=5)
    model(inputs())
    assert set(model.gate_weights) == {"level0/ctr", "level0/grade", "level0/value"}
    assert all(w.shape[1] == 5 for w in model.gate_weights.values())


@pytest.mark.parametrize("n_levels", [1, 2, 3])
def test_ple_has_a_shared_gate_on_every_level_but_the_last(n_levels):
    model = make("ple", n_levels=n_levels, n_shared_experts=2, n_task_experts=1)
    model(inputs())
    shared_keys = sorted(k for k in model.gate_weights if k.endswith("/shared"))
    assert shared_keys == [f"level{l}/shared" for l in range(n_levels - 1)]
    assert model.levels[-1].shared_gate is None
    for level in range(n_levels):
        for task in model.task_names:
            assert model.gate_weights[f"level{level}/{task}"].shape[1] == 2 + 1
    # the shared gate weighs every expert of its level: 2 shared + 3 tasks x 1
    for key in shared_keys:
        assert model.gate_weights[key].shape[1] == 2 + 3


def test_unequal_numbers_of_shared_and_task_experts():
    counts = {"ctr": 0, "grade": 3, "value": 1}
    model = make("ple", n_shared_experts=4, n_task_experts=counts, n_levels=2)
    out = model(inputs())
    for task, n in counts.items():
        assert model.gate_weights[f"level1/{task}"].shape[1] == 4 + n
        assert model.gate_expert_names[f"level1/{task}"][:4] == tuple(f"shared[{i}]" for i in range(4))
    assert model.gate_weights["level0/shared"].shape[1] == 4 + sum(counts.values())
    assert len(model.shared_experts) == 2 * 4
    assert all(torch.isfinite(v).all() for v in out.values())


def test_cgc_without_shared_experts_and_without_task_experts():
    only_task = make("cgc", n_shared_experts=0, n_task_experts=2)
    only_task(inputs())
    assert len(only_task.shared_experts) == 0 and only_task.shared_parameters() == []
    assert all(w.shape[1] == 2 for w in only_task.gate_weights.values())
    only_shared = make("cgc", n_shared_experts=3, n_task_experts=0)
    only_shared(inputs())
    assert all(w.shape[1] == 3 for w in only_shared.gate_weights.values())


def test_ple_without_shared_experts_has_no_shared_gate():
    model = make("ple", n_levels=3, n_shared_experts=0, n_task_experts=2)
    model(inputs())
    assert not any(k.endswith("/shared") for k in model.gate_weights)


def test_heterogeneous_hidden_widths():
    model = make("ple", n_shared_experts=2, shared_expert_hidden=[(3,), (16, 8)])
    model(inputs())
    widths = [tuple(m.out_features for m in e.body if isinstance(m, nn.Linear)) for e in model.levels[0].shared_experts]
    assert widths == [(3,), (16, 8)]
    assert {e.out_dim for e in model.shared_experts} == {4}  # projected to the common width
    mmoe = make("mmoe", n_experts=2, expert_hidden=[(2,), (9,)])
    assert [e.hidden for e in mmoe.experts] == [(2,), (9,)]


# ----------------------------------------------------------------------------- block attention


def test_block_attention_weights_sum_to_one_and_width_is_the_sum():
    dims = [2, 8, 5]
    model = make("block_cgc", n_shared_experts=3, shared_expert_dims=dims, n_task_experts={"ctr": 1, "grade": 0, "value": 2})
    model(inputs(9))
    for task, n in zip(model.task_names, model.n_task_experts):
        w = model.gate_weights[f"level0/{task}"]
        torch.testing.assert_close(w.sum(-1), torch.ones(9))
        assert model.tower(task).in_dim == sum(dims) + n * 4


def test_block_attention_output_is_the_scaled_concatenation():
    dims = [2, 8]
    model = make("block_cgc", n_shared_experts=2, shared_expert_dims=dims, n_task_experts=1)
    x = inputs(4)
    level = model.levels[0]
    shared = [e(x) for e in level.shared_experts]
    own = level.task_experts[0][0](x)
    w = level.task_gates[0](x)
    scales = [math.sqrt(14 / 3 / d) for d in (2, 8, 4)]  # mean width (2 + 8 + 4) / 3
    expected = torch.cat([w[:, i : i + 1] * scales[i] * e for i, e in enumerate(shared + [own])], dim=-1)
    _, features, _, _ = level(x, [x] * 3)
    torch.testing.assert_close(features[0], expected)


@pytest.mark.parametrize("widths", [[4], [4, 4, 4], [2, 32], [1, 7, 128]])
def test_block_scales_equalise_block_energy(widths):
    scales = block_scales(widths)
    energies = [c**2 * d for c, d in zip(scales, widths)]  # squared norm of a unit-entry block
    mean_width = sum(widths) / len(widths)
    assert all(math.isclose(e, mean_width) for e in energies)
    if len(set(widths)) == 1:
        assert all(math.isclose(c, 1.0) for c in scales)


def test_ple_block_mode_stacks_levels():
    model = make("ple", n_levels=2, combine="block", n_shared_experts=2, shared_expert_dims=[3, 6])
    out = model(inputs())
    # level 1 task experts read level 0's concatenation: 3 + 6 + 4
    assert model.levels[1].task_experts[0][0].in_dim == 13
    assert model.levels[1].shared_experts[0].in_dim == 3 + 6 + 3 * 4
    assert model.tower("ctr").in_dim == 13 and out["grade"].shape == (5, 3)


# ----------------------------------------------------------------------------- parameter groups


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_shared_parameters_are_exactly_the_shared_experts(kind):
    model = make(kind)
    shared = model.shared_parameters()
    from_modules = [p for e in model.shared_experts for p in e.parameters()]
    assert len(shared) == len(from_modules) and all(a is b for a, b in zip(shared, from_modules))
    assert len(ids(shared)) == len(shared)
    tower_ids = ids(model.towers.parameters())
    gate_ids = ids(model.gate_parameters())
    assert not ids(shared) & tower_ids
    assert not ids(shared) & gate_ids
    # shared / gate / task parameters partition the model
    task_ids = ids(model.task_parameters())
    assert ids(shared) | gate_ids | task_ids == ids(model.parameters())
    assert len(shared) + len(model.gate_parameters()) + len(model.task_parameters()) == len(list(model.parameters()))


def test_shared_parameters_exclude_task_experts():
    model = make("ple", n_levels=2, n_shared_experts=1, n_task_experts=2, experts="modules")  # own Parameters
    task_expert_ids = ids(p for level in model.levels for experts in level.task_experts for p in experts.parameters())
    assert task_expert_ids and not task_expert_ids & ids(model.shared_parameters())
    assert task_expert_ids <= ids(model.task_parameters())
    assert len(model.shared_experts) == 2  # one per level


def test_shared_experts_per_model_family():
    bottom = make("shared_bottom")
    assert list(bottom.shared_experts) == [bottom.bottom]
    mmoe = make("mmoe", n_experts=3)
    assert list(mmoe.shared_experts) == list(mmoe.experts)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_shared_outputs_and_last_shared_layers(kind):
    model = make(kind, n_levels=2) if kind == "ple" else make(kind)
    out = model(inputs())
    outputs = model.shared_outputs
    last = model.levels[-1].shared_experts if kind in ("ple", "cgc", "block_cgc") else model.shared_experts
    assert len(outputs) == len(last) == len(model.last_shared_layers())
    for layer, expert in zip(model.last_shared_layers(), last):
        assert isinstance(layer, nn.Linear) and layer is expert.output_layer
    assert ids(p for layer in model.last_shared_layers() for p in layer.parameters()) <= ids(model.shared_parameters())
    # each shared output is the very tensor its last layer produced (what adaTT's chain rule needs)
    produced = []
    hooks = [layer.register_forward_hook(lambda m, i, o: produced.append(o)) for layer in model.last_shared_layers()]
    out = model(inputs())
    for h in hooks:
        h.remove()
    outputs = model.shared_outputs
    assert len(produced) == len(outputs) and all(a is b for a, b in zip(produced, outputs))
    # not detached: a task's gradient with respect to the shared outputs is one autograd.grad away
    total = sum(task_loss(out, t) for t in out)
    grads = torch.autograd.grad(total, outputs, retain_graph=True, allow_unused=True)
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- gradient flow


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_task_loss_reaches_shared_experts_but_not_other_towers(kind):
    model = make(kind)
    out = model(inputs())
    task_loss(out, "ctr").backward()
    for name in ("grade", "value"):
        assert all(p.grad is None for p in model.tower(name).parameters())
    assert all(p.grad is not None for p in model.tower("ctr").parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.shared_parameters())


def test_cgc_task_experts_are_private():
    model = make("cgc", n_task_experts=1)
    task_loss(model(inputs()), "ctr").backward()
    level = model.levels[0]
    assert all(p.grad is not None for p in level.task_experts[0].parameters())
    for k in (1, 2):
        assert all(p.grad is None for p in level.task_experts[k].parameters())
        assert all(p.grad is None for p in level.task_gates[k].parameters())


def test_ple_lower_task_experts_reach_other_tasks_only_through_the_shared_gate():
    model = make("ple", n_levels=2, n_shared_experts=1, n_task_experts=1, experts="modules")  # own Parameters
    task_loss(model(inputs()), "ctr").backward()
    top, bottom = model.levels[1], model.levels[0]
    assert all(p.grad is None for p in top.task_experts[1].parameters())  # last level: private
    grade_low = list(bottom.task_experts[1].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in grade_low)  # via level0/shared


# ----------------------------------------------------------------------------- freezing and checkpoints


@pytest.mark.parametrize("kind", GATED_KINDS)
def test_freeze_gates_survives_a_state_dict_round_trip(kind):
    model = make(kind)
    model.freeze_gates(True)
    assert bool(model.gates_frozen)
    assert all(not p.requires_grad for p in model.gate_parameters())
    assert all(p.requires_grad for p in model.shared_parameters() + model.task_parameters())
    state = model.state_dict()
    assert "gates_frozen" in state

    fresh = make(kind)
    assert all(p.requires_grad for p in fresh.gate_parameters())
    fresh.load_state_dict(state)
    assert bool(fresh.gates_frozen)
    assert all(not p.requires_grad for p in fresh.gate_parameters())
    assert all(p.requires_grad for p in fresh.task_parameters())

    model.freeze_gates(False)
    fresh.load_state_dict(model.state_dict())
    assert not bool(fresh.gates_frozen)
    assert all(p.requires_grad for p in fresh.gate_parameters())


def test_frozen_gates_do_not_move_under_training():
    model = make("cgc")
    model.freeze_gates(True)
    before = [p.detach().clone() for p in model.gate_parameters()]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(inputs())
    sum(task_loss(out, t) for t in out).backward()
    optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.gate_parameters()))


def test_freeze_gates_rejects_non_bool():
    with pytest.raises(TypeError, match="flag"):
        make("cgc").freeze_gates(1)


def test_deepcopy_after_forward():
    model = make("ple")
    model(inputs())
    clone = copy.deepcopy(model)  # the live graph held for adaTT must not block copies
    assert clone.shared_outputs == [] and clone.gate_weights == {}
    torch.testing.assert_close(clone(inputs())["grade"], model(inputs())["grade"])


# ----------------------------------------------------------------------------- entropy regulariser


def test_gate_entropy_is_normalised_and_the_regulariser_applies_the_weight():
    x = inputs(8)
    plain = make("mmoe", n_experts=3)
    plain(x)
    entropy = plain.gate_entropy()
    assert 0.0 < entropy.item() <= 1.0 and entropy.requires_grad
    assert plain.gate_regularizer().item() == 0.0
    weighted = make("mmoe", n_experts=3, gate_entropy_weight=0.5)
    weighted(x)
    reg = weighted.gate_regularizer()
    torch.testing.assert_close(reg, -0.5 * entropy)
    reg.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weighted.gate_parameters())


def test_gate_entropy_matches_a_direct_computation():
    model = make("cgc", n_shared_experts=2, n_task_experts={"ctr": 0, "grade": 2, "value": 1})
    model(inputs(6))
    per_gate = []
    for w in model.gate_weights.values():
        m = w.shape[1]
        h = -(w * w.log()).sum(-1).mean() / math.log(m)
        per_gate.append(h)
    torch.testing.assert_close(model.gate_entropy().detach(), torch.stack(per_gate).mean())


def test_gate_entropy_is_zero_without_gates_and_inert_while_frozen():
    bottom = make("shared_bottom")
    bottom(inputs())
    assert bottom.gate_entropy().item() == 0.0 and bottom.gate_regularizer().item() == 0.0
    model = make("ple", gate_entropy_weight=1.0)
    model(inputs())
    assert model.gate_regularizer().requires_grad
    model.freeze_gates(True)
    model(inputs())
    value = model.gate_entropy()
    assert value.item() > 0 and not value.requires_grad  # still logged, moves nothing


def test_gate_entropy_is_one_for_uniform_gates():
    model = make("cgc")
    with torch.no_grad():
        for p in model.gate_parameters():
            p.zero_()  # zero logits -> uniform gates
    model(inputs())
    assert abs(model.gate_entropy().item() - 1.0) < 1e-6


# ----------------------------------------------------------------------------- dtypes and devices


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_autocast_bf16_on_cpu(kind):
    model = make(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs(4))
        loss = sum(task_loss(out, t) for t in out)
    loss.backward()
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    for w in model.gate_weights.values():
        torch.testing.assert_close(w.sum(-1), torch.ones(4))


def test_float64_input_is_cast_to_the_model_dtype():
    model = make("ple")
    out = model(inputs().double())
    assert out["ctr"].dtype == torch.float32


def test_towers_return_logits_with_the_right_shapes():
    tower = TaskTower(5, 1, hidden=())
    assert tower(torch.randn(3, 5)).shape == (3,)
    assert TaskTower.for_task(5, TaskSpec("e", "contrastive", 8))(torch.randn(3, 5)).shape == (3, 8)


def test_gate_softmax_and_expert_shapes():
    torch.manual_seed(0)
    gate, expert = SoftmaxGate(4, 3), Expert(4, 2, hidden=())
    w = gate(torch.randn(6, 4) * 100)  # large logits: still a distribution
    torch.testing.assert_close(w.sum(-1), torch.ones(6))
    assert expert(torch.randn(6, 4)).shape == (6, 2)


# ----------------------------------------------------------------------------- bad input


def test_task_spec_errors():
    with pytest.raises(ValueError, match="unique"):
        PLE(N_FEATURES, [TaskSpec("a", "binary"), TaskSpec("a", "regression")])
    with pytest.raises(TypeError, match="TaskSpec"):
        MMoE(N_FEATURES, [TaskSpec("a", "binary"), ("b", "binary")])
    with pytest.raises(TypeError, match="single TaskSpec"):
        SharedBottom(N_FEATURES, TaskSpec("a", "binary"))
    with pytest.raises(ValueError, match="at least one"):
        CGC(N_FEATURES, [])
    with pytest.raises(ValueError, match="reserved"):
        PLE(N_FEATURES, [TaskSpec("shared", "binary")])


def test_expert_count_errors():
    with pytest.raises(ValueError, match="zero experts"):
        CGC(N_FEATURES, SPECS, n_shared_experts=0, n_task_experts=0)
    with pytest.raises(ValueError, match=r"\['ctr'\].*zero experts"):
        PLE(N_FEATURES, SPECS, n_shared_experts=0, n_task_experts={"ctr": 0, "grade": 1, "value": 1})
    with pytest.raises(ValueError, match="n_experts must be an int >= 1"):
        MMoE(N_FEATURES, SPECS, n_experts=0)
    with pytest.raises(ValueError, match="unknown tasks"):
        CGC(N_FEATURES, SPECS, n_task_experts={"ctr": 1, "grade": 1, "value": 1, "nope": 1})
    with pytest.raises(ValueError, match="missing"):
        CGC(N_FEATURES, SPECS, n_task_experts={"ctr": 1})
    with pytest.raises(ValueError, match="n_shared_experts"):
        CGC(N_FEATURES, SPECS, n_shared_experts=-1)
    with pytest.raises(TypeError, match="n_task_experts"):
        CGC(N_FEATURES, SPECS, n_task_experts=1.5)


def test_level_and_width_errors():
    with pytest.raises(ValueError, match="n_levels must be an int >= 1"):
        PLE(N_FEATURES, SPECS, n_levels=0)
    with pytest.raises(TypeError, match="exactly one level"):
        CGC(N_FEATURES, SPECS, n_levels=2)
    with pytest.raises(ValueError, match="combine"):
        PLE(N_FEATURES, SPECS, combine="sum")
    with pytest.raises(ValueError, match="combine='block'"):
        CGC(N_FEATURES, SPECS, n_shared_experts=2, shared_expert_dims=[4, 8])
    with pytest.raises(ValueError, match="shared_expert_dims"):
        BlockAttentionCGC(N_FEATURES, SPECS, n_shared_experts=2, shared_expert_dims=[4])
    with pytest.raises(ValueError, match="shared_expert_hidden"):
        CGC(N_FEATURES, SPECS, n_shared_experts=2, shared_expert_hidden=[(4,), (4,), (4,)])
    with pytest.raises(ValueError, match="dropout"):
        MMoE(N_FEATURES, SPECS, dropout=1.0)
    with pytest.raises(ValueError, match="n_features"):
        SharedBottom(0, SPECS)
    with pytest.raises(ValueError, match="gate_entropy_weight"):
        MMoE(N_FEATURES, SPECS, gate_entropy_weight=float("nan"))
    with pytest.raises(ValueError, match="kind must be one of"):
        build_model("transformer", N_FEATURES, SPECS)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_forward_input_errors(kind):
    model = make(kind)
    with pytest.raises(ValueError, match=rf"expected n_features={N_FEATURES}.*got 5"):
        model(torch.randn(3, 5))
    with pytest.raises(ValueError, match="2-D"):
        model(torch.randn(N_FEATURES))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[0.0] * N_FEATURES])
    bad = inputs(3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad)


def test_check_finite_false_skips_the_nan_check():
    model = make("cgc", check_finite=False)
    bad = inputs(3)
    bad[0, 0] = float("nan")
    out = model(bad)
    assert torch.isnan(out["ctr"][0]) and torch.isfinite(out["ctr"][1:]).all()
