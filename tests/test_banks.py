"""Expert banks (``experts="bank"``) against the module-per-expert form, for identical weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtlbook.adatt import TaskAffinityComputer
from mtlbook.gradients import cosine_matrix, per_task_gradients
from mtlbook.losses import task_losses
from mtlbook.models import (
    CGC,
    EXPERT_MODES,
    MMoE,
    PLE,
    BlockAttentionCGC,
    Expert,
    ExpertBank,
    GateBank,
    SharedBottom,
    SoftmaxGate,
    TaskTower,
    build_model,
    from_bank,
    to_bank,
)
from mtlbook.models.bank_storage import BankedLinear, convert_state_dict
from mtlbook.models.banks import experts_forward, stacked_linear
from mtlbook.train import Trainer, TrainerConfig

from _tiny import NAMES, SPECS, make_dataset  # binary, regression, 3-class

ATOL = 1e-6

# (name, constructor, kwargs): every model family, 1 and 2 levels, both combine modes,
# unequal expert counts (gates of different shapes), heterogeneous experts, dropout, linear towers
CASES = [
    ("shared_bottom", SharedBottom, dict(expert_hidden=(8,), expert_dim=6)),
    ("mmoe", MMoE, dict(n_experts=3, expert_hidden=(8,), expert_dim=6)),
    ("mmoe_hetero", MMoE, dict(n_experts=3, expert_hidden=[(8,), (4, 4), (8,)], expert_dim=6)),
    ("mmoe_dropout", MMoE, dict(n_experts=3, expert_hidden=(8,), expert_dim=6, dropout=0.3)),
    ("cgc", CGC, dict(n_shared_experts=2, n_task_experts=1, expert_hidden=(8,), expert_dim=6)),
    ("cgc_unequal", CGC, dict(n_shared_experts=1, n_task_experts={"click": 2, "value": 0, "kind": 1},
                              expert_hidden=(8,), expert_dim=6)),  # fmt: skip
    ("cgc_no_shared", CGC, dict(n_shared_experts=0, n_task_experts=2, expert_hidden=(8,), expert_dim=6)),
    ("ple1", PLE, dict(n_levels=1, n_shared_experts=2, n_task_experts=1, expert_hidden=(8,), expert_dim=6)),
    ("ple2", PLE, dict(n_levels=2, n_shared_experts=2, n_task_experts=1, expert_hidden=(8,), expert_dim=6)),
    ("ple2_two_own", PLE, dict(n_levels=2, n_shared_experts=1, n_task_experts=2, expert_hidden=(8, 4), expert_dim=6)),
    ("ple2_dropout_linear_towers", PLE, dict(n_levels=2, expert_hidden=(8,), expert_dim=6, dropout=0.25,
                                             tower_hidden=())),  # fmt: skip
    ("ple3_unequal", PLE, dict(n_levels=3, n_shared_experts=2, n_task_experts={"click": 1, "value": 2, "kind": 0},
                               expert_hidden=(8,), expert_dim=6)),  # fmt: skip
    ("block_cgc", BlockAttentionCGC, dict(n_shared_experts=2, n_task_experts=1, expert_hidden=(8,), expert_dim=6,
                                          shared_expert_dims=(4, 10))),  # fmt: skip
    ("ple2_block", PLE, dict(n_levels=2, combine="block", n_shared_experts=2, n_task_experts=1, expert_hidden=(8,),
                             expert_dim=6, shared_expert_hidden=[(8,), (4,)], shared_expert_dims=(4, 10))),  # fmt: skip
]
IDS = [c[0] for c in CASES]


def pair(cls, kwargs, seed: int = 0):
    """The same weights in both forms: a module-form model and its bank copy."""
    torch.manual_seed(seed)
    modules = cls(5, SPECS, experts="modules", **kwargs)
    bank = to_bank(modules)
    return modules.eval(), bank.eval()


def batch(n: int = 24, seed: int = 0):
    dataset = make_dataset(n, seed=seed)
    return dataset.collate(range(n))


def losses_of(model, b):
    return task_losses(model(b.inputs), b, SPECS)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------ outputs and gradients
@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=IDS)
def test_outputs_and_every_gradient_match_the_module_form(name, cls, kwargs):
    modules, bank = pair(cls, kwargs)
    assert bank.experts_mode == "bank" and modules.experts_mode == "modules"
    b = batch()
    out_m, out_b = modules(b.inputs), bank(b.inputs)
    assert list(out_m) == list(out_b) == list(NAMES)
    for task in NAMES:
        assert out_m[task].shape == out_b[task].shape
        close(out_m[task], out_b[task])
    # the forms are not bit-identical, but they are computed differently enough to matter
    task_losses(out_m, b, SPECS).sum().backward()
    task_losses(out_b, b, SPECS).sum().backward()
    grads_b = {n: p.grad for n, p in bank.named_parameters()}
    assert all(g is not None for g in grads_b.values())
    convert_state_dict(modules, grads_b)  # bank rows -> the module form's keys
    grads_m = {n: p.grad for n, p in modules.named_parameters()}
    assert grads_b.keys() == grads_m.keys()
    for pname, g in grads_m.items():
        close(g, grads_b[pname])


@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=IDS)
def test_forward_records_match(name, cls, kwargs):
    modules, bank = pair(cls, kwargs)
    x = batch().inputs
    modules(x), bank(x)
    assert modules.gate_weights.keys() == bank.gate_weights.keys()
    for key, w in modules.gate_weights.items():
        close(w, bank.gate_weights[key])
    assert len(modules.shared_outputs) == len(bank.shared_outputs)
    for a, b in zip(modules.shared_outputs, bank.shared_outputs):
        close(a, b)
    close(modules.gate_entropy(), bank.gate_entropy())


def test_bank_is_not_a_copy_of_the_module_path():
    # the bank really takes another path: no task expert, task gate or tower module is called
    # in its forward; the shared experts (few per level) are called one by one
    modules, bank = pair(PLE, dict(n_levels=2, expert_hidden=(8,), expert_dim=6))
    called = []
    for m in bank.modules():
        if isinstance(m, (Expert, SoftmaxGate, TaskTower)):
            m.register_forward_hook(lambda mod, i, o: called.append(mod))
    bank(batch().inputs)
    shared = [e for level in bank.levels for e in level.shared_experts]
    assert [m for m in called if isinstance(m, Expert)] == shared
    assert not any(isinstance(m, TaskTower) for m in called)
    gates_called = [m for m in called if isinstance(m, SoftmaxGate)]
    assert gates_called == [bank.levels[0].shared_gate]  # the task gates are banked


# ------------------------------------------------------------------------------ per-task gradients and affinity
@pytest.mark.parametrize("name", ["mmoe", "cgc_unequal", "ple2", "ple2_block"])
def test_per_task_gradients_match(name):
    cls, kwargs = next((c, k) for n, c, k in CASES if n == name)
    modules, bank = pair(cls, kwargs)
    b = batch()
    g_m = per_task_gradients(dict(zip(NAMES, losses_of(modules, b))), modules.shared_parameters())
    g_b = per_task_gradients(dict(zip(NAMES, losses_of(bank, b))), bank.shared_parameters())
    assert g_m.gradients.shape == g_b.gradients.shape and g_m.gradients.abs().sum() > 0
    close(g_m.gradients, g_b.gradients)
    close(cosine_matrix(g_m.gradients), cosine_matrix(g_b.gradients))


@pytest.mark.parametrize("parameter_set", ["all", "weights", "last_layer"])
@pytest.mark.parametrize("extraction", ["batched", "loop"])
@pytest.mark.parametrize("name", ["mmoe", "ple2"])
def test_affinity_matches(name, extraction, parameter_set):
    cls, kwargs = next((c, k) for n, c, k in CASES if n == name)
    modules, bank = pair(cls, kwargs)
    b = batch()
    results = []
    for model in (modules, bank):
        computer = TaskAffinityComputer(NAMES, extraction=extraction, parameter_set=parameter_set).attach(model)
        grads = computer.extract_gradients(losses_of(model, b))
        results.append((grads, computer.update(grads).clone()))
    (g_m, a_m), (g_b, a_b) = results
    assert g_m.abs().sum() > 0
    close(g_m, g_b)
    close(a_m, a_b)


def test_last_layer_hooks_see_the_tensors_the_mixture_reads():
    modules, bank = pair(PLE, dict(n_levels=2, expert_hidden=(8,), expert_dim=6))
    seen = []
    for layer in bank.last_shared_layers():
        layer.register_forward_hook(lambda mod, inputs, out: seen.append(out))
    out = bank(batch().inputs)
    assert len(seen) == len(bank.last_shared_layers()) == 2
    assert all(a is b for a, b in zip(seen, bank.shared_outputs))
    grads = torch.autograd.grad(out["click"].sum(), seen)
    assert all(g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------ training, dropout, parameters
def test_dropout_is_active_in_train_mode_and_off_in_eval():
    _, bank = pair(MMoE, dict(n_experts=2, expert_hidden=(16,), expert_dim=6, dropout=0.5))
    x = batch().inputs
    bank.train()
    torch.manual_seed(1)
    a = bank(x)["value"]
    torch.manual_seed(2)
    b = bank(x)["value"]
    assert not torch.equal(a, b)
    bank.eval()
    assert torch.equal(bank(x)["value"], bank(x)["value"])


@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=IDS)
def test_bank_storage_holds_the_module_forms_weights_in_fewer_tensors(name, cls, kwargs):
    modules, bank = pair(cls, kwargs)
    state = bank.state_dict()
    assert all(k.startswith("banks.") for k in state.keys() - modules.state_dict().keys())
    convert_state_dict(modules, state)  # the bank layout, rewritten, is the module form's
    assert set(state) == set(modules.state_dict())
    for key, value in modules.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert len(list(bank.parameters())) < len(list(modules.parameters()))
    # shared experts keep their own Parameters (optimizer groups, affinity); the three lists
    # still partition parameters() and hold as many numbers as the module form's
    names_m = {id(p): n for n, p in modules.named_parameters()}
    names_b = {id(p): n for n, p in bank.named_parameters()}
    assert [names_m[id(p)] for p in modules.shared_parameters()] == [names_b[id(p)] for p in bank.shared_parameters()]
    ids = [id(p) for method in ("shared_parameters", "gate_parameters", "task_parameters")
           for p in getattr(bank, method)()]  # fmt: skip
    assert sorted(ids) == sorted(names_b)
    for method in ("gate_parameters", "task_parameters"):
        assert sum(p.numel() for p in getattr(bank, method)()) == sum(p.numel() for p in getattr(modules, method)())
    assert len(bank.shared_experts) == len(modules.shared_experts)
    assert all(isinstance(layer, nn.Linear) for layer in bank.last_shared_layers())


def test_banked_linears_are_views_of_their_bank_row():
    modules, bank = pair(PLE, dict(n_levels=2, expert_hidden=(8,), expert_dim=6))
    head = bank.towers[1].head  # "value": row 1 of the bank of the two one-output towers
    assert isinstance(head, BankedLinear) and not list(head.parameters()) and head._row == 1
    assert not isinstance(bank.towers[2].head, BankedLinear)  # "kind" (3 classes) has no twin
    assert torch.equal(head.weight, modules.towers[1].head.weight)
    with torch.no_grad():
        head._bank.weight[1].add_(1.0)  # an optimizer step on the bank moves the module's view
    assert torch.equal(head.weight, modules.towers[1].head.weight + 1.0)
    # the module-by-module forward of a bank model still works and back-propagates into the bank
    bank.towers[1](torch.randn(4, 6)).sum().backward()
    assert head._bank.weight.grad[1].abs().sum() > 0 and head._bank.weight.grad[0].abs().sum() == 0
    assert bank(batch().inputs)["kind"].shape == (24, 3)


def test_bank_storage_follows_dtype_moves_and_copies():
    _, bank = pair(CGC, dict(n_shared_experts=2, n_task_experts=1, expert_hidden=(8,), expert_dim=6))
    x = batch().inputs
    expected = bank(x)["value"].double()
    double = copy.deepcopy(bank).double()
    assert double.towers[0].head.weight.dtype == torch.float64
    close(double(x)["value"], expected)
    twin = copy.deepcopy(bank)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    assert not torch.equal(bank(x)["value"], twin(x)["value"])  # the copy has its own banks
    assert twin.towers[0].head.weight.abs().sum() == 0


def test_module_checkpoint_loads_into_a_bank_model_and_back():
    torch.manual_seed(3)
    modules = PLE(5, SPECS, n_levels=2, expert_hidden=(8,), expert_dim=6, experts="modules").eval()
    torch.manual_seed(4)
    bank = PLE(5, SPECS, n_levels=2, expert_hidden=(8,), expert_dim=6, experts="bank").eval()
    x = batch().inputs
    assert not torch.allclose(modules(x)["click"], bank(x)["click"])
    bank.load_state_dict(modules.state_dict())  # strict: same keys and shapes
    close(modules(x)["click"], bank(x)["click"])
    back = from_bank(bank)
    assert back.experts_mode == "modules" and bank.experts_mode == "bank"
    assert torch.equal(back(x)["kind"], modules(x)["kind"])  # same path, same weights: bit-identical
    assert list(back.state_dict()) == list(modules.state_dict())
    # and a bank checkpoint loads into a module-form model
    torch.manual_seed(5)
    fresh = PLE(5, SPECS, n_levels=2, expert_hidden=(8,), expert_dim=6, experts="modules").eval()
    fresh.load_state_dict(bank.state_dict())
    assert torch.equal(fresh(x)["kind"], modules(x)["kind"])


def test_a_bank_checkpoint_with_the_wrong_bank_size_fails_clearly():
    bank = PLE(5, SPECS, n_levels=2, expert_hidden=(8,), expert_dim=6, experts="bank")
    state = bank.state_dict()
    key = next(k for k in state if k.startswith("banks.") and k.endswith("towers_s0_layer0.weight"))
    state[key] = state[key][:1]
    with pytest.raises(RuntimeError, match=r"expected \[2, d_in, d_out\]"):
        PLE(5, SPECS, n_levels=2, expert_hidden=(8,), expert_dim=6, experts="modules").load_state_dict(state)


def test_a_checkpoint_of_another_architecture_fails_with_a_clear_message():
    bank = PLE(5, SPECS, n_levels=2, expert_hidden=(8,), expert_dim=6, experts="bank")
    other = PLE(5, SPECS, n_levels=1, expert_hidden=(8,), expert_dim=6, experts="modules")
    with pytest.raises(RuntimeError, match="Missing key"):
        bank.load_state_dict(other.state_dict())


def test_trainer_fits_a_bank_model_with_one_optimizer_group_per_shared_expert():
    torch.manual_seed(0)
    model = PLE(5, SPECS, n_levels=2, n_shared_experts=2, n_task_experts=1, expert_hidden=(8,), expert_dim=6,
                tower_hidden=(6,), dropout=0.1, experts="bank")  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainerConfig(phase1_epochs=3, phase2_epochs=0, batch_size=16, lr=5e-3, warmup_epochs=1,
                           phase2_warmup_epochs=1, progress=False, patience=None, expert_lr={0: 1e-3})  # fmt: skip
    trainer = Trainer(model, config)
    history = trainer.fit(make_dataset())
    assert len(history) > 0
    assert model.experts_mode == "bank"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {f"shared_expert_{i}" for i in range(4)} <= set(groups)
    # the per-expert learning rate reaches expert 0's own Parameters (same schedule, 1e-3 / 5e-3)
    assert groups["shared_expert_0"]["lr"] == pytest.approx(0.2 * groups["shared_expert_1"]["lr"])
    assert {id(p) for p in groups["shared_expert_0"]["params"]} == {id(p) for p in model.shared_experts[0].parameters()}


# ------------------------------------------------------------------------------ building blocks
def test_expert_bank_matches_each_expert_for_shared_and_separate_inputs():
    torch.manual_seed(0)
    experts = [Expert(4, 3, (5, 6)) for _ in range(3)]
    x = torch.randn(7, 4)
    for out, e in zip(ExpertBank(experts)(x, training=False), experts):
        close(out, e(x))
    xs = torch.randn(3, 7, 4)
    for out, e, xi in zip(ExpertBank(experts)(xs, training=False), experts, xs):
        close(out, e(xi))


def test_gate_bank_and_stacked_linear_match_the_modules():
    torch.manual_seed(0)
    gates = [SoftmaxGate(4, 3) for _ in range(2)]
    u = torch.randn(2, 5, 4)
    w = GateBank(gates)(u)
    assert w.dtype == torch.float32
    for k, g in enumerate(gates):
        close(w[k], g(u[k]))
    layers = [nn.Linear(4, 2, bias=False) for _ in range(2)]
    close(stacked_linear(u, layers)[1], layers[1](u[1]))


def test_experts_forward_groups_heterogeneous_experts():
    torch.manual_seed(0)
    experts = [Expert(4, 3, (5,)), Expert(4, 3, (2, 2)), Expert(4, 3, (5,))]
    x = torch.randn(6, 4)
    for out, e in zip(experts_forward(experts, [x] * 3, training=False), experts):
        close(out, e(x))


def test_banks_reject_mixed_shapes():
    with pytest.raises(ValueError, match="same shape"):
        ExpertBank([Expert(4, 3, (5,)), Expert(4, 3, (6,))])
    with pytest.raises(ValueError, match="same in_dim and n_experts"):
        GateBank([SoftmaxGate(4, 3), SoftmaxGate(4, 2)])
    with pytest.raises(ValueError, match="at least one"):
        ExpertBank([])


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kind", ["shared_bottom", "mmoe", "cgc", "ple", "block_cgc"])
def test_bad_experts_value_is_a_clear_error(kind):
    with pytest.raises(ValueError, match=r"experts must be one of \('modules', 'bank'\), got 'banks'"):
        build_model(kind, 5, SPECS, experts="banks")
    with pytest.raises(TypeError, match="experts must be one of"):
        build_model(kind, 5, SPECS, experts=True)
    assert build_model(kind, 5, SPECS).experts_mode == "bank"  # the default: the fast path
    assert EXPERT_MODES == ("modules", "bank")


def test_to_bank_rejects_other_modules_and_leaves_the_model_alone():
    with pytest.raises(TypeError, match="experts= mode"):
        to_bank(nn.Linear(2, 2))
    model = MMoE(5, SPECS, experts="modules")
    banked = to_bank(model)
    assert model.experts_mode == "modules" and banked.experts_mode == "bank"
    assert banked is not model and copy.deepcopy(banked).experts_mode == "bank"
