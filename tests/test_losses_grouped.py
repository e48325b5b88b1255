"""grouped_task_losses: the per-task loss vector a group of tasks at a time, as task_losses computes it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtlbook.data.batch import Batch, TaskSpec
from mtlbook.losses import LOSSES, register_loss, task_losses
from mtlbook.losses_grouped import GROUPED_LOSSES, grouped_task_losses
from mtlbook.models import PLE
from mtlbook.train import Trainer, TrainerConfig

from _tiny import SPECS, make_dataset

RTOL, ATOL = 1e-6, 1e-6
B = 37  # not a multiple of any vector width: tails land in different places in the two paths

SPECS_MIXED = [
    TaskSpec("b0", "binary"), TaskSpec("r0", "regression"), TaskSpec("b1", "binary"),
    TaskSpec("c0", "multiclass", n_classes=4), TaskSpec("r1", "regression"), TaskSpec("c1", "multiclass", n_classes=4),
    TaskSpec("b2", "binary"), TaskSpec("r2", "regression"),
]  # fmt: skip


def mixed_problem(seed: int = 0, masks: bool = True) -> tuple[dict[str, torch.Tensor], Batch]:
    """Outputs with grad (one ``[B, 1]``, like a tower head) and targets with NaN / -1 placeholders."""
    g = torch.Generator().manual_seed(seed)
    outputs, targets, present = {}, {}, {}
    for i, spec in enumerate(SPECS_MIXED):
        mask = torch.rand(B, generator=g) > 0.3
        if spec.name == "b2":
            mask[:] = False  # a task with no present row in this batch
        if spec.kind == "multiclass":
            out = torch.randn(B, 4, generator=g)
            tgt = torch.randint(0, 4, (B,), generator=g)
            tgt[~mask] = -1
        else:
            out = torch.randn(B, 1, generator=g) if i == 0 else torch.randn(B, generator=g)  # b0: a [B, 1] head
            tgt = (torch.rand(B, generator=g) > 0.5).float() if spec.kind == "binary" else torch.randn(B, generator=g)
            tgt[~mask] = float("nan")
        outputs[spec.name] = out.requires_grad_(True)
        targets[spec.name] = tgt
        if masks:
            present[spec.name] = mask
    if not masks:  # no placeholders without masks
        targets = {n: torch.nan_to_num(t, nan=0.0) if t.is_floating_point() else t.clamp(min=0) for n, t in targets.items()}
    return outputs, Batch(torch.zeros(B, 3), targets, present)


def values_and_grads(fn, outputs, batch, **kwargs):
    losses = fn(outputs, batch, SPECS_MIXED, **kwargs)
    weights = torch.linspace(0.5, 2.0, len(losses))  # a weighted sum: each task's gradient counts
    grads = torch.autograd.grad((losses * weights).sum(), list(outputs.values()))
    return losses, grads


@pytest.mark.parametrize("masks", [True, False])
def test_grouped_losses_and_gradients_match_task_losses(masks):
    outputs, batch = mixed_problem(masks=masks)
    kwargs = {"loss_names": {"r1": "huber"}, "loss_kwargs": {"r1": {"delta": 0.5}, "c1": {"label_smoothing": 0.1}},
              "fixed_weights": {"b1": 0.25, "c0": 3.0}}  # fmt: skip
    expected, expected_grads = values_and_grads(task_losses, outputs, batch, **kwargs)
    got, got_grads = values_and_grads(grouped_task_losses, outputs, batch, **kwargs)
    assert got.dtype == torch.float32 and got.shape == (len(SPECS_MIXED),)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    for g, e in zip(got_grads, expected_grads):
        assert torch.isfinite(g).all()  # NaN placeholders never reach a gradient
        torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL)
    if masks:  # the task without a present row: a graph-connected zero, zero gradient
        assert got[SPECS_MIXED.index(TaskSpec("b2", "binary"))] == 0
        assert torch.count_nonzero(got_grads[6]) == 0


def test_tasks_of_one_loss_and_shape_share_one_kernel(monkeypatch):
    calls = {"bce": 0, "mse": 0, "ce": 0}
    originals = {"bce": F.binary_cross_entropy_with_logits, "mse": F.mse_loss, "ce": F.cross_entropy}

    def counting(name):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return wrapped

    monkeypatch.setattr(F, "binary_cross_entropy_with_logits", counting("bce"))
    monkeypatch.setattr(F, "mse_loss", counting("mse"))
    monkeypatch.setattr(F, "cross_entropy", counting("ce"))
    outputs, batch = mixed_problem()
    # b0's [B, 1] output is squeezed as in the per-task loss, so it joins the other binary tasks
    grouped_task_losses(outputs, batch, SPECS_MIXED)
    assert calls == {"bce": 1, "mse": 1, "ce": 1}
    task_losses(outputs, batch, SPECS_MIXED)
    assert calls == {"bce": 1 + 3, "mse": 1 + 3, "ce": 1 + 2}  # the per-task path: one call per task


def test_options_split_groups_and_other_losses_go_task_by_task():
    outputs, batch = mixed_problem()
    names = {"b0": "focal", "r0": "huber", "r1": "huber", "r2": "huber"}
    kwargs = {"r0": {"delta": 0.5}, "r1": {"delta": 2.0}, "r2": {"delta": 0.5}, "b0": {"gamma": 1.0}}
    expected = task_losses(outputs, batch, SPECS_MIXED, loss_names=names, loss_kwargs=kwargs)
    got = grouped_task_losses(outputs, batch, SPECS_MIXED, loss_names=names, loss_kwargs=kwargs)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert got[0] == expected[0]  # focal is not grouped: the very function task_losses calls
    assert "focal" not in GROUPED_LOSSES and "infonce" not in GROUPED_LOSSES


def test_a_registered_loss_is_computed_by_its_own_function():
    name = "grouped_test_abs"

    def mean_abs(output, target, present=None):
        return (output.reshape(-1) - target).abs().mean()

    register_loss(name, mean_abs, ["regression"])
    try:
        outputs, batch = mixed_problem(masks=False)
        names = {"r0": name, "r1": name, "r2": name}
        got = grouped_task_losses(outputs, batch, SPECS_MIXED, loss_names=names)
        for task in ("r0", "r1", "r2"):
            i = [s.name for s in SPECS_MIXED].index(task)
            assert got[i] == mean_abs(outputs[task], batch.targets[task])
    finally:
        LOSSES.pop(name)
        from mtlbook.losses import LOSS_TASK_KINDS

        LOSS_TASK_KINDS.pop(name)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda o, b: b.targets["b1"].__setitem__(0, 3.0), ValueError, r"labels in \[0, 1\]"),
    (lambda o, b: b.targets["c0"].__setitem__(b.present["c0"].nonzero()[0, 0], 7), ValueError, r"class indices in \[0, 4\)"),
    (lambda o, b: o.pop("r1"), ValueError, "outputs has no entry for task 'r1'"),
    (lambda o, b: b.targets.__setitem__("r0", b.targets["r0"][:5]), ValueError, "same shape"),
])  # fmt: skip
def test_bad_input_fails_as_in_task_losses(mutate, error, match):
    for fn in (task_losses, grouped_task_losses):
        outputs, batch = mixed_problem()
        batch.present["b1"][0] = True  # the bad label below sits on a present row
        mutate(outputs, batch)
        with pytest.raises(error, match=match):
            fn(outputs, batch, SPECS_MIXED)


@pytest.mark.parametrize("kwargs, match", [
    ({"fixed_weights": {"b0": -1.0}}, r"fixed_weights\['b0'\] must be a finite number in \[0.0, inf\)"),
    ({"loss_names": {"b0": "mse"}}, "does not fit a binary task"),
    ({"loss_kwargs": {"r0": {"delta": 0.0}}, "loss_names": {"r0": "huber", "r1": "huber"}}, r"delta must be a finite number in \(0.0"),
])  # fmt: skip
def test_bad_configuration_names_the_parameter(kwargs, match):
    outputs, batch = mixed_problem()
    with pytest.raises(ValueError, match=match):
        grouped_task_losses(outputs, batch, SPECS_MIXED, **kwargs)


def test_the_trainer_takes_the_fast_path_for_bank_models_only():
    config = TrainerConfig(phase1_epochs=1, phase2_epochs=0, batch_size=16, lr=5e-3, warmup_epochs=1,
                           phase2_warmup_epochs=1, progress=False, patience=None)  # fmt: skip
    results = {}
    for experts in ("modules", "bank"):
        torch.manual_seed(0)
        model = PLE(5, SPECS, n_levels=2, expert_hidden=(8,), expert_dim=6, tower_hidden=(6,), experts=experts)
        trainer = Trainer(model, config)
        trainer.fit(make_dataset())
        results[experts] = trainer
    modules, bank = results["modules"], results["bank"]
    assert not modules.pipeline.grouped and bank.pipeline.grouped
    assert modules.optimizer.defaults["foreach"] and not modules.optimizer.defaults["fused"]
    assert bank.optimizer.defaults["fused"]
    # the same training to float rounding: both start from the same weights (seeded)
    for a, b in zip(modules.history.series("train"), bank.history.series("train")):
        assert math.isclose(a, b, rel_tol=1e-4), (a, b)
    assert len(modules.history.series("train")) == len(bank.history.series("train")) > 0
