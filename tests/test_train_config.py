"""TrainerConfig validation, the closed-form schedules, metrics and History (no training runs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtlbook.train import History, TrainerConfig
from mtlbook.train.metrics import accuracy, binary_auc, rmse
from mtlbook.train.schedules import build_phase1_scheduler, build_phase2_scheduler, phase1_lr, phase2_lr


# ------------------------------------------------------------------------------ config
def test_defaults_are_the_documented_ones():
    cfg = TrainerConfig()
    assert (cfg.phase1_epochs, cfg.phase2_epochs) == (15, 8)
    assert cfg.lr == 5e-4 and cfg.weight_decay == 0.01 and cfg.grad_clip == 5.0
    assert cfg.accumulation_steps == 1
    assert (cfg.warmup_epochs, cfg.warmup_start_factor, cfg.cosine_t0, cfg.cosine_t_mult) == (5, 0.1, 10, 2)
    assert cfg.phase2_warmup_epochs == 2
    assert cfg.balancing == "uncertainty" and cfg.gate_entropy_weight == 0.01
    assert cfg.amp == "auto" and cfg.compile_forward is False
    assert cfg.expert_lr == {} and cfg.expert_weight_decay == {}


@pytest.mark.parametrize(
    "field, value",
    [
        ("phase1_epochs", -1),
        ("phase2_epochs", -3),
        ("phase1_epochs", 2.0),
        ("phase2_epochs", True),
        ("batch_size", 0),
        ("eval_batch_size", 0),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", float("nan")),
        ("weight_decay", -0.1),
        ("betas", (0.9, 1.0)),
        ("betas", (0.9,)),
        ("expert_lr", {0: 0.0}),
        ("expert_lr", {-1: 1e-3}),
        ("expert_lr", {"a": 1e-3}),
        ("expert_weight_decay", {0: -1.0}),
        ("grad_clip", 0.0),
        ("grad_clip", -5.0),
        ("accumulation_steps", 0),
        ("warmup_epochs", -1),
        ("warmup_start_factor", 0.0),
        ("warmup_start_factor", 1.5),
        ("cosine_t0", 0),
        ("cosine_t_mult", 0),
        ("phase2_warmup_epochs", -1),
        ("min_lr", -1.0),
        ("min_lr", 1.0),
        ("losses", {"ctr": "hinge"}),
        ("loss_kwargs", {"ctr": 3}),
        ("task_weights", {"ctr": -1.0}),
        ("balancing", "magic"),
        ("balancing_kwargs", [1]),
        ("gate_entropy_weight", float("inf")),
        ("gate_entropy_weight", "0.1"),
        ("adatt", 3),
        ("amp", "fp8"),
        ("amp", "on"),
        ("monitor", ""),
        ("monitor", "ctr/f1"),
        ("mode", "up"),
        ("patience", 0),
        ("min_delta", -0.1),
        ("restore_best", "yes"),
        ("checkpoint_every", 0),
        ("seed", -1),
        ("progress", 1),
        ("compile_forward", "yes"),
        ("compile_forward", 1),
    ],
)
def test_every_bad_value_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainerConfig(**{field: value})


def test_fp16_on_an_explicit_cpu_device_is_refused():
    with pytest.raises(ValueError, match="amp"):
        TrainerConfig(amp="fp16", device="cpu")
    TrainerConfig(amp="bf16", device="cpu")  # bf16 autocast exists on CPU


def test_replace_validates_and_dict_round_trip():
    cfg = TrainerConfig(expert_lr={1: 1e-3}, betas=(0.8, 0.99), losses={"t": "focal"}, adatt={"warmup_epochs": 1})
    assert TrainerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="lr"):
        cfg.replace(lr=-1.0)
    with pytest.raises(ValueError, match="unknown fields"):
        TrainerConfig.from_dict({"learning_rate": 1e-3})


@pytest.mark.parametrize("monitor, expected", [("loss", "min"), ("a/auc", "max"), ("a/accuracy", "max"), ("a/rmse", "min")])
def test_auto_mode_follows_the_monitored_metric(monitor, expected):
    assert TrainerConfig(monitor=monitor).resolved_mode == expected
    assert TrainerConfig(monitor=monitor, mode="min").resolved_mode == "min"


# ------------------------------------------------------------------------------ schedules
def _expected_phase1(epoch, base, warmup=5, factor=0.1, t0=10, mult=2, eta_min=0.0):
    """Independent restatement: cycle starts are at warmup + T0*(mult^k - 1)/(mult - 1)."""
    if epoch < warmup:
        return base * (factor + (1 - factor) * epoch / warmup)
    t = epoch - warmup
    k = 0
    while True:  # find the cycle whose [start, start + length) holds t
        start = t0 * (mult**k - 1) // (mult - 1) if mult > 1 else t0 * k
        length = t0 * mult**k
        if start <= t < start + length:
            return eta_min + (base - eta_min) * 0.5 * (1 + math.cos(math.pi * (t - start) / length))
        k += 1


def _run_scheduler(build, epochs, lrs=(5e-4, 2e-3)):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    optimizer = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])
    scheduler = build(optimizer)
    seen = []
    for _ in range(epochs):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return np.array(seen)


def test_phase1_schedule_matches_the_formula_for_every_group():
    seen = _run_scheduler(lambda opt: build_phase1_scheduler(opt), 50)
    for g, base in enumerate((5e-4, 2e-3)):
        expected = [_expected_phase1(e, base) for e in range(50)]
        np.testing.assert_allclose(seen[:, g], expected, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(expected, [phase1_lr(e, base) for e in range(50)], rtol=1e-12)
    # landmarks of the documented shape: start at 0.1 lr, peak after warmup, restarts at 5, 15, 35
    assert seen[0, 0] == pytest.approx(5e-5)
    assert seen[5, 0] == pytest.approx(5e-4) and seen[4, 0] == pytest.approx(0.82 * 5e-4)
    for restart in (15, 35):
        assert seen[restart, 0] == pytest.approx(5e-4)
        assert seen[restart - 1, 0] < 0.05 * 5e-4


def test_phase1_schedule_without_warmup_and_with_floor():
    seen = _run_scheduler(lambda opt: build_phase1_scheduler(opt, warmup_epochs=0, t0=3, t_mult=1, eta_min=1e-5), 9, (1e-3,))
    expected = [_expected_phase1(e, 1e-3, warmup=0, t0=3, mult=1, eta_min=1e-5) for e in range(9)]
    np.testing.assert_allclose(seen[:, 0], expected, rtol=1e-9)


@pytest.mark.parametrize("epochs, warmup", [(8, 2), (5, 0), (2, 2), (1, 3)])
def test_phase2_schedule_is_warmup_then_plain_cosine(epochs, warmup):
    seen = _run_scheduler(lambda opt: build_phase2_scheduler(opt, epochs, warmup), epochs)
    for g, base in enumerate((5e-4, 2e-3)):
        expected = []
        for e in range(epochs):
            if e < warmup:
                expected.append(base * (0.1 + 0.9 * e / warmup))
            else:
                expected.append(0.5 * base * (1 + math.cos(math.pi * (e - warmup) / max(epochs - warmup, 1))))
        np.testing.assert_allclose(seen[:, g], expected, rtol=1e-9)
        np.testing.assert_allclose(expected, [phase2_lr(e, epochs, base, warmup) for e in range(epochs)], rtol=1e-12)
    if epochs - warmup > 1:  # plain cosine: monotone decay after the warmup, no restart
        assert np.all(np.diff(seen[warmup:, 0]) < 0)


def test_schedule_arguments_are_validated():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="warmup_epochs"):
        build_phase1_scheduler(opt, warmup_epochs=-1)
    with pytest.raises(ValueError, match="t0"):
        build_phase1_scheduler(opt, t0=0)
    with pytest.raises(ValueError, match="epoch"):
        phase1_lr(-1)


# ------------------------------------------------------------------------------ metrics
def test_rank_auc_matches_sklearn_with_ties_and_masks():
    from sklearn.metrics import roc_auc_score

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 50
        scores = torch.randint(0, 6, (n,), generator=gen).float()  # many ties
        if trial % 2:
            scores = torch.randn(n, generator=gen)
        labels = (torch.rand(n, generator=gen) < 0.4).float()
        present = torch.rand(n, generator=gen) < 0.8
        if labels[present].min() == labels[present].max():
            continue
        expected = roc_auc_score(labels[present].numpy(), scores[present].numpy())
        assert binary_auc(scores, labels, present) == pytest.approx(expected, abs=1e-12)


def test_auc_edge_cases():
    assert math.isnan(binary_auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))
    assert binary_auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    assert binary_auc(torch.tensor([0.9, 0.1]), torch.tensor([0.0, 1.0])) == 0.0
    assert binary_auc(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])) == 0.5


def test_rmse_and_accuracy_respect_the_mask():
    pred = torch.tensor([1.0, 2.0, 100.0])
    target = torch.tensor([0.0, 4.0, 0.0])
    present = torch.tensor([True, True, False])
    assert rmse(pred, target, present) == pytest.approx(math.sqrt((1 + 4) / 2))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    assert accuracy(logits, labels) == pytest.approx(1 / 3)
    assert accuracy(logits, labels, torch.tensor([True, False, False])) == 1.0


# ------------------------------------------------------------------------------ history
def _record(epoch, phase, adatt_phase, loss):
    return {
        "epoch": epoch,
        "phase": phase,
        "phase_epoch": epoch if phase == 1 else epoch - 3,
        "adatt_phase": adatt_phase,
        "train": {"loss": loss, "a/loss": loss},
        "val": {"loss": loss + 1.0},
        "lr": {"task": 1e-3 * (epoch + 1)} if phase == 2 else {"task": 1e-3, "shared_expert_0": 2e-3},
        "affinity": [[1.0, -0.5], [-0.5, 1.0]],
        "transfer_weights": None,
        "balancer_weights": [0.5, 0.5],
        "skipped_nan": epoch % 2,
        "skipped_oom": 1 if epoch == 4 else 0,
        "time_s": 0.25,
    }


def test_history_accessors_and_round_trip():
    phases = ["warmup", "dynamic", "frozen", "frozen", "frozen"]
    h = History(["a", "b"], [_record(e, 1 if e < 3 else 2, phases[e], 1.0 / (e + 1)) for e in range(5)])
    assert h.phase_boundaries == [3]
    assert h.spans("phase") == [(0, 3, 1), (3, 5, 2)]
    assert h.spans("adatt_phase") == [(0, 1, "warmup"), (1, 2, "dynamic"), (2, 5, "frozen")]
    assert h.series("val", "loss") == pytest.approx([2.0, 1.5, 4 / 3, 1.25, 1.2])
    assert math.isnan(h.series("train", "a/auc")[0])
    assert h.lr("shared_expert_0")[:3] == [2e-3] * 3 and all(math.isnan(v) for v in h.lr("shared_expert_0")[3:])
    assert (h.skipped_nan, h.skipped_oom) == (2, 1)
    assert torch.equal(h.matrix("affinity", 2), torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="transfer_weights"):
        h.matrix("transfer_weights")
    again = History.from_dict(h.to_dict())
    assert again.to_dict() == h.to_dict()
    assert all("time_s" not in r for r in h.to_dict(drop_timing=True)["records"])


def test_history_plots_draw_something():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtlbook.train.plots import plot_affinity, plot_losses, plot_lr

    phases = ["warmup", "dynamic", "frozen", "frozen", "frozen"]
    h = History(["a", "b"], [_record(e, 1 if e < 3 else 2, phases[e], 1.0 / (e + 1)) for e in range(5)])
    ax = plot_losses(h)
    assert len(ax.lines) >= 2  # train and val curve of task a (+ the phase marker)
    ax = plot_lr(h)
    assert ax.get_yscale() == "log" and len(ax.patches) >= 3  # adaTT spans + phase 2 hatch
    ax = plot_affinity(h, epoch=1)
    assert ax.images[0].get_array().shape == (2, 2)
    with pytest.raises(ValueError, match="no recorded values"):
        plot_losses(h, metric="auc")
    plt.close("all")
