"""Trainer behaviour on a tiny PLE: phases, freezing, adaTT wiring, optimizer groups, guards."""

from __future__ import annotations

import math

import pytest
import torch

from mtlbook.train.callbacks import Callback
from mtlbook.adatt import AdaptiveTaskTransfer
from mtlbook.data.batch import Batch, MultiTaskDataset, TaskSpec
from mtlbook.losses import focal_loss
from mtlbook.models import PLE
from mtlbook.train import Trainer, TrainerConfig, TrainingWarning
from mtlbook.train.schedules import phase1_lr, phase2_lr

from _tiny import NAMES, SPECS, make_dataset  # the shared tiny problem


def make_model(seed: int = 0, expert_dim: int = 6, experts: str = "bank") -> PLE:
    torch.manual_seed(seed)
    return PLE(5, SPECS, n_levels=2, n_shared_experts=2, n_task_experts=1, expert_hidden=(8,),
               expert_dim=expert_dim, tower_hidden=(6,), experts=experts)  # fmt: skip


def make_adatt(warmup: int = 1, freeze: int = 2, interval: int = 2) -> AdaptiveTaskTransfer:
    return AdaptiveTaskTransfer(NAMES, warmup_epochs=warmup, freeze_epoch=freeze, grad_interval=interval)


def make_config(**overrides) -> TrainerConfig:
    base = dict(phase1_epochs=3, phase2_epochs=2, batch_size=16, lr=5e-3, warmup_epochs=1,
                phase2_warmup_epochs=1, progress=False, patience=None)  # fmt: skip
    base.update(overrides)
    return TrainerConfig(**base)


def batches(dataset: MultiTaskDataset, size: int = 16) -> list[Batch]:
    return [dataset.collate(range(i, min(i + size, len(dataset)))) for i in range(0, len(dataset), size)]


def clone_params(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def model_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ phases
def test_phase2_trains_only_the_task_side_and_adatt_comes_back():
    model, adatt = make_model(), make_adatt(freeze=10)
    seen = {}

    class Spy(Callback):  # runs after the default Phase2Freeze: sees phase 2 as it starts
        def on_phase_start(self, trainer):
            if trainer.phase != 2:
                return
            seen["shared"] = clone_params(model.shared_parameters())
            seen["gates"] = clone_params(model.gate_parameters())
            seen["task"] = clone_params(model.task_parameters())
            seen["adatt_enabled"] = adatt.enabled
            seen["requires_grad"] = [p.requires_grad for p in model.shared_parameters() + model.gate_parameters()]

    trainer = Trainer(model, make_config(), adatt=adatt, callbacks=[Spy()])
    history = trainer.fit(make_dataset())

    assert seen["adatt_enabled"] is False and not any(seen["requires_grad"])
    assert same(seen["shared"], clone_params(model.shared_parameters()))
    assert same(seen["gates"], clone_params(model.gate_parameters()))
    assert not same(seen["task"], clone_params(model.task_parameters()))  # the task side did train
    # frozen parameters are not in the phase-2 optimizer at all
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in model.shared_parameters() + model.gate_parameters()}
    assert all(set(r["lr"]) <= {"task", "balancer"} for r in history if r["phase"] == 2)
    assert [r["adatt_enabled"] for r in history] == [True] * 3 + [False] * 2
    # afterwards: the same adaTT object, enabled; trainability as before phase 2
    assert trainer.adatt is adatt and adatt.enabled
    assert all(p.requires_grad for p in model.shared_parameters() + model.gate_parameters())
    assert not bool(model.gates_frozen)
    assert history.phase_boundaries == [3]


def test_adatt_and_trainability_are_restored_when_phase2_raises():
    model, adatt = make_model(), make_adatt(freeze=10)

    class Failing(Callback):
        def on_epoch_start(self, trainer):
            if trainer.phase == 2:
                assert not trainer.adatt.enabled  # really disabled while phase 2 runs
                raise RuntimeError("boom in phase 2")

    trainer = Trainer(model, make_config(), adatt=adatt)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(make_dataset(), callbacks=[Failing()])
    assert trainer.adatt is adatt and adatt.enabled
    assert all(p.requires_grad for p in model.shared_parameters() + model.gate_parameters())
    assert not bool(model.gates_frozen)


def test_gates_freeze_together_with_adatt():
    model = make_model()
    trainer = Trainer(model, make_config(phase1_epochs=4, phase2_epochs=0), adatt=make_adatt(warmup=1, freeze=2))
    gates_at_start = []

    class Spy(Callback):
        def on_epoch_start(self, trainer):
            gates_at_start.append(clone_params(model.gate_parameters()))

    history = trainer.fit(make_dataset(), callbacks=[Spy()])
    assert history.adatt_phases == ["warmup", "dynamic", "frozen", "frozen"]
    assert [r["gates_frozen"] for r in history] == [False, False, True, True]
    assert not same(gates_at_start[1], gates_at_start[2])  # gates trained while adaTT was dynamic
    assert same(gates_at_start[2], clone_params(model.gate_parameters()))  # and not after
    assert bool(model.gates_frozen)


def test_adatt_measures_the_balanced_losses_of_the_training_forward(monkeypatch):
    adatt = make_adatt(warmup=1, freeze=2, interval=2)
    trainer = Trainer(make_model(), make_config(phase1_epochs=3, phase2_epochs=1), adatt=adatt)
    events = []
    weight_losses = trainer.balancer.weight_losses
    measure, transfer = adatt.measure, adatt.compute_transfer_loss

    def spy_weight(losses, present=None):
        out = weight_losses(losses, present)
        events.append(("balance", out))
        return out

    def spy_measure(losses, present=None):
        assert losses.requires_grad
        events.append(("measure", losses))
        return measure(losses, present)

    def spy_transfer(losses, task_gradients=None, present=None):
        events.append(("transfer", losses))
        return transfer(losses, task_gradients, present=present)

    monkeypatch.setattr(trainer.balancer, "weight_losses", spy_weight)
    monkeypatch.setattr(adatt, "measure", spy_measure)
    monkeypatch.setattr(adatt, "compute_transfer_loss", spy_transfer)
    trainer.fit(make_dataset())

    batches_per_epoch = 6
    for i, (kind, tensor) in enumerate(events):
        if kind == "measure":  # right after balancing, on that very tensor, before the transfer
            assert events[i - 1][0] == "balance" and events[i - 1][1] is tensor
            assert events[i + 1][0] == "transfer" and events[i + 1][1] is tensor
    n_measure = sum(kind == "measure" for kind, _ in events)
    # steps 0..11 cover the warmup and dynamic epochs: every 2nd step measures; none after
    assert n_measure == 2 * batches_per_epoch // 2
    assert sum(kind == "transfer" for kind, _ in events) == 3 * batches_per_epoch  # phase 1 only
    assert int(adatt.affinity_computer.n_updates) == n_measure


# ------------------------------------------------------------------------------ optimizer
def test_optimizer_has_one_group_per_shared_expert_with_overrides():
    model = make_model(experts="modules")  # one tower's own Parameter (a bank holds every tower's)
    frozen = model.towers[0].head.weight
    frozen.requires_grad_(False)  # frozen parameters must stay out of the optimizer
    cfg = make_config(phase1_epochs=1, phase2_epochs=0, expert_lr={1: 1e-3, 3: 2e-4}, expert_weight_decay={0: 0.0})
    trainer = Trainer(model, cfg, adatt=make_adatt())
    trainer.fit(make_dataset(32))
    groups = trainer.optimizer.param_groups
    names = [g["name"] for g in groups]
    assert names == ["shared_expert_0", "shared_expert_1", "shared_expert_2", "shared_expert_3",
                     "gates", "task", "balancer", "adatt"]  # fmt: skip
    for i, expert in enumerate(model.shared_experts):
        assert [id(p) for p in groups[i]["params"]] == [id(p) for p in expert.parameters()]
    assert [g["initial_lr"] for g in groups[:4]] == [5e-3, 1e-3, 5e-3, 2e-4]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.01, 0.01, 0.01, 0.01, 0.01, 0.0, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and id(frozen) not in ids
    expected = {id(p) for m in (model, trainer.balancer, trainer.adatt) for p in m.parameters() if p.requires_grad}
    assert set(ids) == expected


def test_recorded_learning_rates_follow_the_two_schedules():
    cfg = make_config(phase1_epochs=5, phase2_epochs=3, warmup_epochs=2, cosine_t0=2, cosine_t_mult=2,
                      phase2_warmup_epochs=1, expert_lr={2: 1e-3})  # fmt: skip
    history = Trainer(make_model(), cfg).fit(make_dataset(32))
    expected = [phase1_lr(e, 5e-3, 2, 0.1, 2, 2) for e in range(5)] + [phase2_lr(e, 3, 5e-3, 1, 0.1) for e in range(3)]
    assert history.lr("task") == pytest.approx(expected, rel=1e-9)
    assert history.lr("shared_expert_2")[:5] == pytest.approx([v / 5 for v in expected[:5]], rel=1e-9)
    assert all(math.isnan(v) for v in history.lr("shared_expert_2")[5:])


def test_model_dependent_config_errors_are_raised_at_construction(monkeypatch):
    with pytest.raises(ValueError, match="expert_lr"):
        Trainer(make_model(), make_config(expert_lr={4: 1e-3}))  # 2 levels x 2 shared = experts 0..3
    with pytest.raises(ValueError, match="expert_weight_decay"):
        Trainer(make_model(), make_config(expert_weight_decay={7: 0.0}))
    with pytest.raises(ValueError, match="losses"):
        Trainer(make_model(), make_config(losses={"ctr": "focal"}))
    with pytest.raises(ValueError, match="losses"):
        Trainer(make_model(), make_config(losses={"value": "focal"}))  # focal on a regression task
    with pytest.raises(ValueError, match="task_weights"):
        Trainer(make_model(), make_config(task_weights={"nope": 2.0}))
    with pytest.raises(ValueError, match="adatt"):
        Trainer(make_model(), make_config(adatt={"warmup_epochs": 1}), adatt=make_adatt())
    with pytest.raises(ValueError, match="task_names"):
        Trainer(make_model(), make_config(), adatt=AdaptiveTaskTransfer(("a", "b")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="amp"):
        Trainer(make_model(), make_config(amp="fp16"))


def test_adatt_can_be_built_from_the_config():
    trainer = Trainer(make_model(), make_config(phase1_epochs=2, phase2_epochs=0, adatt={"warmup_epochs": 1, "freeze_epoch": 5}))
    assert isinstance(trainer.adatt, AdaptiveTaskTransfer) and trainer.adatt.freeze_epoch == 5
    history = trainer.fit(make_dataset(32))
    assert history.adatt_phases == ["warmup", "dynamic"]
    assert len(history[-1]["affinity"]) == 3 and len(history[-1]["transfer_weights"][0]) == 3


# ------------------------------------------------------------------------------ guards
def _poisoned(dataset: MultiTaskDataset) -> list[Batch]:
    data = batches(dataset)
    bad = data[1]
    targets = dict(bad.targets)
    value = targets["value"].clone()
    value[bad.present["value"].nonzero()[0, 0]] = float("nan")  # a NaN in a *present* row
    targets["value"] = value
    data[1] = Batch(bad.inputs, targets, dict(bad.present))
    return data


def test_a_nan_loss_batch_is_skipped_and_leaves_the_weights_alone():
    dataset = make_dataset()
    clean = batches(dataset)
    model = make_model()
    trainer = Trainer(model, make_config())
    with pytest.warns(TrainingWarning, match="skipped 5 batch"):
        history = trainer.fit(_poisoned(dataset))
    assert [r["skipped_nan"] for r in history] == [1] * 5 and history.skipped_oom == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # skipping the batch is exactly as if it had never been there
    expected = Trainer(make_model(), make_config())
    reference = expected.fit([clean[0]] + clean[2:])
    assert same(clone_params(model.parameters()), clone_params(expected.model.parameters()))
    assert history.series("train", "loss") == reference.series("train", "loss")


def test_a_non_finite_gradient_skips_the_step():
    dataset = make_dataset()
    data = batches(dataset)
    model = make_model()
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 2 else grad

    model.shared_experts[1].output_layer.weight.register_hook(poison)  # a Parameter in either form
    trainer = Trainer(model, make_config(phase1_epochs=1, phase2_epochs=0))
    with pytest.warns(TrainingWarning):
        history = trainer.fit(data)
    assert history[0]["skipped_nan"] == 1 and history[0]["steps"] == len(data) - 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    expected = Trainer(make_model(), make_config(phase1_epochs=1, phase2_epochs=0))
    expected.fit([data[0]] + data[2:])
    assert same(clone_params(model.parameters()), clone_params(expected.model.parameters()))


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried... out of memory")],  # fmt: skip
)
def test_an_out_of_memory_batch_is_skipped(error):
    data = batches(make_dataset())
    model = make_model()
    forward = model.forward
    calls = {"n": 0}

    def flaky_forward(x):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 2:
                raise error
        return forward(x)

    model.forward = flaky_forward
    trainer = Trainer(model, make_config(phase1_epochs=1, phase2_epochs=0))
    with pytest.warns(TrainingWarning, match="1 after out-of-memory"):
        history = trainer.fit(data)
    assert history[0]["skipped_oom"] == 1 and history.skipped_nan == 0
    assert history[0]["steps"] == len(data) - 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    expected = Trainer(make_model(), make_config(phase1_epochs=1, phase2_epochs=0))
    expected.fit([data[0]] + data[2:])
    assert same(clone_params(model.parameters()), clone_params(expected.model.parameters()))


def test_other_runtime_errors_are_not_swallowed():
    model = make_model()

    def broken(x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    model.forward = broken
    with pytest.raises(RuntimeError, match="shapes"):
        Trainer(model, make_config()).fit(make_dataset(32))


# ------------------------------------------------------------------------------ pipeline pieces
def test_focal_loss_stays_float32_under_autocast(monkeypatch):  # spies on the public pipeline stage
    logits = torch.randn(8, dtype=torch.bfloat16)
    target = (torch.rand(8) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert focal_loss(logits, target).dtype == torch.float32
    seen = []
    cfg = make_config(phase1_epochs=1, phase2_epochs=0, amp="bf16", losses={"click": "focal"},
                      loss_kwargs={"click": {"gamma": 2.0, "alpha": 0.25}})  # fmt: skip
    trainer = Trainer(make_model(), cfg)
    original = trainer.pipeline.task_losses

    def spy(outputs, batch):
        out = original(outputs, batch)
        seen.append((torch.is_autocast_enabled("cpu"), outputs["click"].dtype, out.dtype))
        return out

    monkeypatch.setattr(trainer.pipeline, "task_losses", spy)
    history = trainer.fit(make_dataset(32))
    assert seen and all(enabled and out == torch.float32 for enabled, _, out in seen)
    assert any(dtype == torch.bfloat16 for _, dtype, _ in seen)  # the model really ran in bf16
    assert math.isfinite(history[0]["train"]["loss"])


@pytest.mark.parametrize("balancing", ["equal", "uncertainty", "gradnorm", "dwa", "pcgrad"])
def test_every_balancer_trains_to_finite_weights(balancing):
    model = make_model()
    cfg = make_config(phase1_epochs=2, phase2_epochs=1, balancing=balancing)
    history = Trainer(model, cfg, adatt=make_adatt()).fit(make_dataset(48))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(len(r["balancer_weights"]) == 3 for r in history)
    assert history.skipped_nan == 0


def test_gradient_accumulation_matches_one_big_batch():
    dataset = make_dataset(32, missing=False)  # equal halves: the mean of half-means is the full mean
    full = [dataset.collate(range(32))]
    halves = [dataset.collate(range(16)), dataset.collate(range(16, 32))]
    grads = []

    class Spy(Callback):
        def on_before_optimizer_step(self, trainer):
            grads.append([p.grad.clone() for p in trainer.model.parameters()])

    one = Trainer(make_model(), make_config(phase1_epochs=1, phase2_epochs=0), callbacks=[Spy()])
    one.fit(full)
    two = Trainer(make_model(), make_config(phase1_epochs=1, phase2_epochs=0, accumulation_steps=2))
    two.fit(halves, callbacks=[Spy()])
    assert one.step == two.step == 1 and len(grads) == 2
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert max(float(g.abs().max()) for g in grads[0]) > 1e-3  # not trivially zero


# ------------------------------------------------------------------------------ early stopping
def test_early_stopping_ends_the_phase_and_restores_the_best_weights():
    train, val = make_dataset(64, seed=0), make_dataset(32, seed=1)
    # mode "max" on a falling validation loss: epoch 0 stays the best, patience 1 stops at epoch 1
    cfg = make_config(phase1_epochs=6, phase2_epochs=2, monitor="loss", mode="max", patience=1)
    trainer = Trainer(make_model(), cfg)
    history = trainer.fit(train, val)
    assert history.phases == [1, 1, 2, 2]
    assert [r["best"] for r in history] == [True, False, True, False]
    assert [r["stopped_early"] for r in history] == [False, True, False, True]
    assert trainer.evaluate(val) == history[2]["val"]  # phase 2 ended on its best epoch's weights

    cfg = make_config(phase1_epochs=3, phase2_epochs=0, monitor="loss", mode="max", patience=5, restore_best=False)
    keep_last = Trainer(make_model(), cfg)
    history = keep_last.fit(train, val)
    assert len(history) == 3 and keep_last.evaluate(val) == history[-1]["val"]


def test_unknown_monitor_is_reported():
    cfg = make_config(phase1_epochs=1, phase2_epochs=0, monitor="click/rmse")
    with pytest.raises(ValueError, match="monitor"):
        Trainer(make_model(), cfg).fit(make_dataset(32), make_dataset(16, seed=1))


def test_history_records_metrics_and_progress_can_be_silenced(capsys, tmp_path):
    cfg = make_config(phase1_epochs=2, phase2_epochs=1, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    history = Trainer(make_model(), cfg, adatt=make_adatt()).fit(make_dataset(), make_dataset(32, seed=1))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    record = history[-1]
    for split in ("train", "val"):
        assert {"loss", "click/loss", "click/auc", "value/loss", "value/rmse", "kind/loss", "kind/accuracy"} <= set(record[split])
        assert 0.0 <= record[split]["click/auc"] <= 1.0
    assert record["phase"] == 2 and record["adatt_phase"] == "frozen" and record["time_s"] > 0
    assert (tmp_path / "last.pt").is_file()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["trainer"]["epoch"] == 2  # written after epoch 2 of 3


# ------------------------------------------------------------------------------ other models and shapes
@pytest.mark.parametrize("kind", ["shared_bottom", "mmoe", "cgc", "block_cgc"])
def test_every_model_kind_trains_through_both_phases(kind):
    from mtlbook.models import build_model

    torch.manual_seed(0)
    kwargs = {"expert_hidden": (8,), "expert_dim": 4, "tower_hidden": (4,)}
    model = build_model(kind, 5, SPECS, **kwargs)
    adatt = make_adatt()
    history = Trainer(model, make_config(phase1_epochs=2, phase2_epochs=1), adatt=adatt).fit(make_dataset(32))
    assert history.phases == [1, 1, 2] and adatt.enabled
    assert {f"shared_expert_{i}" for i in range(len(model.shared_experts))} <= set(history[0]["lr"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("phase1, phase2, expected", [(0, 2, [2, 2]), (2, 0, [1, 1]), (0, 0, [])])
def test_empty_phases_are_skipped(phase1, phase2, expected):
    model = make_model()
    history = Trainer(model, make_config(phase1_epochs=phase1, phase2_epochs=phase2)).fit(make_dataset(32))
    assert history.phases == expected
    assert all(p.requires_grad for p in model.parameters())  # phase 2 undone (or never applied)


def test_a_contrastive_task_reports_its_loss_only():
    specs = SPECS[:1] + (TaskSpec("brand", "contrastive", 4),)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=g)
    data = MultiTaskDataset(x, {"click": (x[:, 0] > 0).float(), "brand": (x[:, 1] > 0).long()}, specs)
    torch.manual_seed(0)
    model = PLE(5, specs, n_levels=1, n_shared_experts=2, expert_hidden=(8,), expert_dim=4, tower_hidden=(4,))
    history = Trainer(model, make_config(phase1_epochs=1, phase2_epochs=1)).fit(data, data)
    assert set(history[-1]["val"]) == {"loss", "click/loss", "click/auc", "brand/loss"}
    assert math.isfinite(history[-1]["val"]["brand/loss"])


def test_gate_entropy_weight_pushes_the_gates_the_documented_way():
    data = make_dataset(64)

    def trained_entropy(weight: float) -> float:
        model = make_model()
        cfg = make_config(phase1_epochs=4, phase2_epochs=0, lr=2e-2, gate_entropy_weight=weight)
        Trainer(model, cfg).fit(data)
        with torch.no_grad():
            model(data.inputs)
        return float(model.gate_entropy())

    spread, neutral, peaked = trained_entropy(5.0), trained_entropy(0.0), trained_entropy(-5.0)
    assert spread > neutral > peaked  # +lambda rewards spread-out gates, -lambda peaked ones


def test_a_model_level_gate_weight_is_flagged():
    torch.manual_seed(0)
    model = PLE(5, SPECS, n_levels=1, n_shared_experts=2, expert_hidden=(8,), expert_dim=4, gate_entropy_weight=0.1)
    with pytest.warns(TrainingWarning, match="gate_entropy_weight"):
        Trainer(model, make_config())
