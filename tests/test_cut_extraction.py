"""The cut extraction of per-task gradients: exact, and cheap for the right reason.

``extraction="cut"`` splits the chain rule at the model's outputs (:func:`mtlbook.gradients.cut_gradients`).
These tests check that it gives the loop's and the batched mode's ``G`` (to float rounding:
within 1e-6 of the largest entry; on some CPUs the three agree bit for bit) on every model
family and balancer weighting, that it falls back to the loop where the cut does not hold,
that it never runs another task's branch (the reason it is cheap, checked by counting backward
calls, not by timing), and that adaTT trains with it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlbook.adatt import TaskAffinityComputer
from mtlbook.balancing import UncertaintyBalancer
from mtlbook.gradients import EXTRACTIONS, cut_gradients, stacked_gradients
from mtlbook.losses import present_tasks, task_losses
from mtlbook.models import build_model, to_bank
from mtlbook.train import Trainer, TrainerConfig

from _tiny import NAMES, SPECS, make_dataset, train_adatt

MODES = ("cut", "loop", "batched")


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float rounding: every entry within 1e-6 of the largest entry of ``b``."""
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())


def make(kind: str, seed: int = 0, bank: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(kind, 5, SPECS, experts="modules")
    return to_bank(model) if bank else model


def measure(model: nn.Module, mode: str, parameter_set: str = "all", weighted: bool = True, present=None) -> torch.Tensor:
    """``G`` of one batch of the tiny problem, losses reweighted by uncertainty weighting."""
    batch = make_dataset(48, seed=1).collate(range(48))
    computer = TaskAffinityComputer(NAMES, extraction=mode, parameter_set=parameter_set).attach(model)
    raw = task_losses(model(batch.inputs), batch, SPECS)
    if weighted:  # a balancer couples the losses through one vector: the case the cut is for
        balancer = UncertaintyBalancer(len(NAMES))
        with torch.no_grad():
            next(balancer.parameters()).copy_(torch.tensor([0.3, -0.2, 0.1]))
        raw = balancer.weight_losses(raw, present_tasks(batch, NAMES))
    return computer.extract_gradients(raw, present=present)


@pytest.mark.parametrize("kind", ["shared_bottom", "mmoe", "ple", "cgc"])
@pytest.mark.parametrize("bank", [False, True])
def test_the_three_extractions_give_the_same_gradients(kind, bank):
    results = {mode: measure(make(kind, bank=bank), mode) for mode in MODES}
    assert results["cut"].abs().sum() > 0
    assert_same(results["cut"], results["loop"])
    assert_same(results["cut"], results["batched"])


@pytest.mark.parametrize("parameter_set", ["weights", "last_layer"])
def test_cut_agrees_on_the_cheaper_parameter_sets(parameter_set):
    results = {mode: measure(make("ple"), mode, parameter_set) for mode in MODES}
    assert_same(results["cut"], results["loop"])
    assert_same(results["cut"], results["batched"])


def test_absent_tasks_have_zero_rows_in_cut_mode():
    present = torch.tensor([True, False, True])
    cut = measure(make("ple"), "cut", present=present)
    assert torch.count_nonzero(cut[1]) == 0 and torch.count_nonzero(cut[0]) > 0
    assert_same(cut, measure(make("ple"), "loop", present=present))


def test_a_loss_that_bypasses_the_outputs_is_taken_the_loop_way():
    """An auxiliary term on a shared expert's output reaches the shared parameters without
    passing through the outputs: the cut alone would miss it, so that root goes the loop way."""
    model = make("ple")
    batch = make_dataset(32, seed=2).collate(range(32))
    params = model.shared_parameters()
    out = model(batch.inputs)
    raw = task_losses(out, batch, SPECS)
    aux = model.shared_outputs[0].pow(2).mean()  # reaches theta_s, never the outputs
    roots = [raw[0], raw[1] + 0.0 * raw[2], aux]
    outputs = list(out.values())
    cut = cut_gradients(roots, [0, 1, 2], outputs, params)
    loop = stacked_gradients(roots, [0, 1, 2], params, "loop")
    for c, ref in zip(cut, loop):
        assert (c is None) == (ref is None)
        if ref is not None:
            assert float((c - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    assert any(c is not None and c[2].abs().sum() > 0 for c in cut)


def test_cut_without_attach_is_the_loop():
    model = make("ple")
    batch = make_dataset(32, seed=3).collate(range(32))
    raw = task_losses(model(batch.inputs), batch, SPECS)
    params = model.shared_parameters()
    cut = TaskAffinityComputer(NAMES, extraction="cut").extract_gradients(raw, params)
    loop = TaskAffinityComputer(NAMES, extraction="loop").extract_gradients(raw, params)
    assert torch.equal(cut, loop)  # the same code path: the loop itself


def test_cut_never_runs_another_tasks_tower():
    """The loop's backward from L_k runs every tower (with an exact zero); the cut runs only
    tower k. Counted with tensor hooks on each tower's weight gradient path."""
    model = make("ple")
    batch = make_dataset(32, seed=4).collate(range(32))
    calls = {name: 0 for name in NAMES}
    out = model(batch.inputs)
    # a hook on each task's output counts the backward passes that run through that tower
    for name in NAMES:
        out[name].register_hook(lambda grad, name=name: calls.__setitem__(name, calls[name] + 1))
    raw = task_losses(out, batch, SPECS)
    roots = list(raw.unbind(0))
    params = model.shared_parameters()
    stacked_gradients(roots, [0, 1, 2], params, "loop")
    assert calls == {name: 3 for name in NAMES}  # every tower, for every task
    calls.update({name: 0 for name in NAMES})
    stacked_gradients(roots, [0, 1, 2], params, "cut", list(out.values()))
    # once in the batched pass that finds every task's cotangents (loss and balancer only),
    # then once in its own task's backward: never in another task's
    assert calls == {name: 1 + 1 for name in NAMES}


def test_unknown_extraction_names_the_choices():
    with pytest.raises(ValueError, match=r"extraction must be one of \('auto', 'batched', 'loop', 'cut', 'structured'\)"):
        TaskAffinityComputer(NAMES, extraction="vmap")
    with pytest.raises(ValueError, match=r"extraction must be one of \('batched', 'loop', 'cut', 'structured'\)"):
        stacked_gradients([torch.zeros((), requires_grad=True)], [0], [torch.zeros(1, requires_grad=True)], "fast")
    # the default is "auto" (the cheapest exact mode the attached model allows; the study pins "batched")
    assert EXTRACTIONS[0] == "batched" and TaskAffinityComputer(NAMES).extraction == "auto"


def test_adatt_trains_with_the_cut_and_measures_what_the_batched_call_measures():
    """Two epochs, measuring at every step: the affinity the cut accumulates is the batched
    call's to float rounding (the runs may drift apart by rounding, so the bound is loose)."""
    cut, batched = train_adatt("cut"), train_adatt("batched")
    assert cut.affinity_computer.extraction == "cut" and int(cut.affinity_computer.n_updates) > 0
    assert int(cut.affinity_computer.n_updates) == int(batched.affinity_computer.n_updates)
    a, b = cut.affinity_computer.affinity, batched.affinity_computer.affinity
    assert not torch.equal(b, torch.eye(len(NAMES)))  # affinity was measured
    assert float((a - b).abs().max()) < 1e-4


def test_the_trainer_optimizer_is_foreach_and_matches_the_loop():
    """AdamW with ``foreach=True`` (one multi-tensor kernel per update term) gives the same
    weights as the per-tensor loop it replaces."""
    batch = make_dataset(64, seed=5).collate(range(64))
    weights = []
    for foreach in (False, True):
        torch.manual_seed(0)
        model = build_model("ple", 5, SPECS)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, foreach=foreach)
        for _ in range(20):
            opt.zero_grad(set_to_none=True)
            task_losses(model(batch.inputs), batch, SPECS).sum().backward()
            opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    config = TrainerConfig(phase1_epochs=1, phase2_epochs=0, batch_size=32, progress=False, patience=None)
    trainer = Trainer(build_model("ple", 5, SPECS, experts="modules"), config)
    trainer.fit(make_dataset(64))
    assert all(group["foreach"] for group in trainer.optimizer.param_groups)  # the module form's path
    trainer = Trainer(build_model("ple", 5, SPECS), config)  # the bank form (default): fused
    trainer.fit(make_dataset(64))
    assert all(group["fused"] and not group["foreach"] for group in trainer.optimizer.param_groups)
