"""Bad input at the public boundary: every case must raise the right exception type with a
message that names the offending parameter (and so tells the caller what to fix).

One table, parametrised: toy, data, models, adatt, losses, balancing, train, diagnostics.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pytest
import torch

import mtlbook.toy as toy
from mtlbook import diagnostics as dg
from mtlbook.adatt import AdaptiveTaskTransfer, TaskAffinityComputer, build_group_prior
from mtlbook.balancing import DWA, GradNorm, PCGrad, UncertaintyBalancer, build_balancer
from mtlbook.data import load_census_income, load_cmapss, make_loader, make_mmoe_synthetic, make_suite_regime, make_task_suite
from mtlbook.data.batch import Batch, MultiTaskDataset, TaskSpec
from mtlbook.data.cmapss_health import cap_rul, class_balance, health_state, split_units, window_features
from mtlbook.losses import (
    UncertaintyWeighting,
    bce_with_logits_loss,
    cross_entropy_loss,
    focal_loss,
    huber_loss,
    info_nce_loss,
    mse_loss,
)
from mtlbook.models import MMoE, PLE, SharedBottom, build_model
from mtlbook.train import EarlyStopping, Trainer, TrainerConfig

from _tiny import NAMES, SPECS, make_dataset

NAN, INF = math.nan, math.inf


def tiny_model() -> PLE:
    torch.manual_seed(0)
    return PLE(5, SPECS, n_levels=1, n_shared_experts=1, expert_hidden=(4,), expert_dim=4, tower_hidden=(4,))


def cfg(**kw: Any) -> TrainerConfig:
    return TrainerConfig(**kw)


def fit_with(**kw: Any) -> None:
    base = dict(phase1_epochs=1, phase2_epochs=0, batch_size=16, progress=False)
    base.update(kw)
    Trainer(tiny_model(), TrainerConfig(**base)).fit(make_dataset(16))


def batch_with(**kw: Any) -> Batch:
    base: dict[str, Any] = dict(inputs=torch.zeros(2, 5), targets={"click": torch.zeros(2)})
    base.update(kw)
    return Batch(**base)


Case = tuple[str, Callable[[], Any], type | tuple[type, ...], str]

CASES: list[Case] = [
    # ------------------------------------------------------------------ toy
    ("toy.fixed_point rho=0", lambda: toy.fixed_point(0.0), ValueError, "rho"),
    ("toy.fixed_point rho=nan", lambda: toy.fixed_point(NAN), ValueError, "rho"),
    ("toy.fixed_point rho=str", lambda: toy.fixed_point("2"), (TypeError, ValueError), "rho"),
    ("toy.stable_lr rho=-1", lambda: toy.stable_lr(-1.0), ValueError, "rho"),
    ("toy.stable_lr momentum=1", lambda: toy.stable_lr(2.0, momentum=1.0), ValueError, "momentum"),
    ("toy.stable_lr momentum=-0.1", lambda: toy.stable_lr(2.0, momentum=-0.1), ValueError, "momentum"),
    ("toy.simulate optimizer", lambda: toy.simulate(2.0, optimizer="rmsprop"), ValueError, "optimizer"),
    ("toy.simulate lr=0", lambda: toy.simulate(2.0, lr=0.0), ValueError, "lr"),
    ("toy.simulate lr=inf", lambda: toy.simulate(2.0, lr=INF), ValueError, "lr"),
    ("toy.simulate n_steps=0", lambda: toy.simulate(2.0, n_steps=0), ValueError, "n_steps"),
    ("toy.simulate n_steps=float", lambda: toy.simulate(2.0, n_steps=2.5), (TypeError, ValueError), "n_steps"),
    ("toy.simulate theta0=nan", lambda: toy.simulate(2.0, theta0=NAN), ValueError, "theta0"),
    ("toy.simulate rho=0", lambda: toy.simulate(0.0), ValueError, "rho"),
    ("toy.simulate unknown kwarg", lambda: toy.simulate(2.0, optimizer="sgd", beta=0.5), (TypeError, ValueError), "beta"),
    ("toy.simulate_grid rhos empty", lambda: toy.simulate_grid([]), ValueError, "rhos"),
    ("toy.simulate_grid rhos nan", lambda: toy.simulate_grid([1.0, NAN]), ValueError, "rhos"),
    ("toy.simulate_torch lr=-1", lambda: toy.simulate_torch(2.0, lr=-1.0), ValueError, "lr"),
    ("toy.ToyModel theta0=inf", lambda: toy.ToyModel(theta0=INF), ValueError, "theta0"),
    # ------------------------------------------------------------------ data
    ("TaskSpec kind", lambda: TaskSpec("a", "ordinal"), ValueError, "kind"),
    ("TaskSpec name empty", lambda: TaskSpec("", "binary"), ValueError, "name"),
    ("TaskSpec n_classes=1", lambda: TaskSpec("a", "multiclass", 1), ValueError, "n_classes"),
    ("Batch inputs not a tensor", lambda: batch_with(inputs=[[0.0] * 5] * 2), TypeError, "inputs"),
    ("Batch targets not a dict", lambda: batch_with(targets=[torch.zeros(2)]), TypeError, "targets"),
    ("Batch target not a tensor", lambda: batch_with(targets={"click": [0.0, 1.0]}), TypeError, "targets"),
    ("Batch target rows", lambda: batch_with(targets={"click": torch.zeros(3)}), ValueError, "targets"),
    ("Batch present not bool", lambda: batch_with(present={"click": torch.ones(2)}), TypeError, "present"),
    ("Batch present rows", lambda: batch_with(present={"click": torch.ones(3, dtype=torch.bool)}), ValueError, "present"),
    ("Batch present unknown task", lambda: batch_with(present={"other": torch.ones(2, dtype=torch.bool)}), ValueError, "present"),
    ("MultiTaskDataset inputs 1-D", lambda: MultiTaskDataset(torch.zeros(4), {}, SPECS), ValueError, "inputs"),
    ("MultiTaskDataset missing task", lambda: MultiTaskDataset(torch.zeros(4, 5), {"click": torch.zeros(4)}, SPECS), ValueError, "targets"),
    ("MultiTaskDataset rows", lambda: MultiTaskDataset(torch.zeros(4, 5), {"click": torch.zeros(3), "value": torch.zeros(4), "kind": torch.zeros(4, dtype=torch.long)}, SPECS), ValueError, "targets"),
    ("MultiTaskDataset binary label 2", lambda: MultiTaskDataset(torch.zeros(2, 5), {"click": torch.tensor([0.0, 2.0]), "value": torch.zeros(2), "kind": torch.zeros(2, dtype=torch.long)}, SPECS), ValueError, "click"),
    ("MultiTaskDataset class 3 of 3", lambda: MultiTaskDataset(torch.zeros(2, 5), {"click": torch.zeros(2), "value": torch.zeros(2), "kind": torch.tensor([0, 3])}, SPECS), ValueError, "kind"),
    ("MultiTaskDataset float classes", lambda: MultiTaskDataset(torch.zeros(2, 5), {"click": torch.zeros(2), "value": torch.zeros(2), "kind": torch.zeros(2)}, SPECS), TypeError, "kind"),
    ("MultiTaskDataset task_specs empty", lambda: MultiTaskDataset(torch.zeros(2, 5), {}, []), ValueError, "task_specs"),
    ("make_loader batch_size=0", lambda: make_loader(make_dataset(8), batch_size=0), ValueError, "batch_size"),
    ("make_loader batch_size=float", lambda: make_loader(make_dataset(8), batch_size=2.0), (TypeError, ValueError), "batch_size"),
    ("make_loader dataset", lambda: make_loader([1, 2, 3]), TypeError, "dataset"),
    ("make_mmoe_synthetic n=0", lambda: make_mmoe_synthetic(0, 0.5), ValueError, r"\bn\b"),
    ("make_mmoe_synthetic correlation=2", lambda: make_mmoe_synthetic(10, 2.0), ValueError, "correlation"),
    ("make_mmoe_synthetic correlation=nan", lambda: make_mmoe_synthetic(10, NAN), ValueError, "correlation"),
    ("make_mmoe_synthetic dim=0", lambda: make_mmoe_synthetic(10, 0.5, dim=0), ValueError, "dim"),
    ("make_mmoe_synthetic noise_std<0", lambda: make_mmoe_synthetic(10, 0.5, noise_std=-1.0), ValueError, "noise_std"),
    ("make_task_suite n_tasks=1", lambda: make_task_suite(10, n_tasks=1), ValueError, "n_tasks"),
    ("make_task_suite n_groups=0", lambda: make_task_suite(10, n_groups=0), ValueError, "n_groups"),
    ("make_task_suite missing_rate=1", lambda: make_task_suite(10, missing_rate=1.0), ValueError, "missing_rate"),
    ("make_task_suite loss_scale_ratio=0", lambda: make_task_suite(10, loss_scale_ratio=0.0), ValueError, "loss_scale_ratio"),
    ("make_task_suite kinds", lambda: make_task_suite(10, kinds="weird"), ValueError, "kinds"),
    ("make_task_suite noise_std=nan", lambda: make_task_suite(10, noise_std=NAN), ValueError, "noise_std"),
    ("load_census_income fractions words", lambda: load_census_income(fractions=("a", "b", "c")), TypeError, "fractions"),
    ("load_census_income fractions sum", lambda: load_census_income(fractions=(0.5, 0.5, 0.5)), ValueError, "fractions"),
    ("load_cmapss subset", lambda: load_cmapss("FD009"), ValueError, "subset"),
    ("load_cmapss rul_cap=0", lambda: load_cmapss(rul_cap=0), ValueError, "rul_cap"),
    ("make_suite_regime regime", lambda: make_suite_regime("nope", 10), ValueError, "regime"),
    ("cap_rul cap=0", lambda: cap_rul([1, 2], cap=0), ValueError, "cap"),
    ("cap_rul negative rul", lambda: cap_rul([-1, 2]), ValueError, "rul"),
    ("health_state thresholds order", lambda: health_state([1, 2], thresholds=(80, 30)), ValueError, "thresholds"),
    ("class_balance n_classes=0", lambda: class_balance(np.array([0, 0]), n_classes=0), ValueError, "n_classes"),
    ("class_balance label out of range", lambda: class_balance(np.array([0, 5]), n_classes=3), ValueError, "labels"),
    ("split_units val_fraction=1", lambda: split_units([1, 2, 3], val_fraction=1.0), ValueError, "val_fraction"),
    ("split_units val_fraction=0", lambda: split_units([1, 2, 3], val_fraction=0.0), ValueError, "val_fraction"),
    ("window_features window=0", lambda: window_features(np.array([1, 1]), np.array([1, 2]), np.zeros((2, 3)), window=0), ValueError, "window"),
    # ------------------------------------------------------------------ models
    ("PLE n_features=0", lambda: PLE(0, SPECS), ValueError, "n_features"),
    ("PLE n_features=float", lambda: PLE(5.0, SPECS), (TypeError, ValueError), "n_features"),
    ("PLE task_specs empty", lambda: PLE(5, []), ValueError, "task_specs"),
    ("PLE task_specs wrong type", lambda: PLE(5, ["click"]), TypeError, "task_specs"),
    ("PLE n_levels=0", lambda: PLE(5, SPECS, n_levels=0), ValueError, "n_levels"),
    ("PLE n_shared_experts=-1", lambda: PLE(5, SPECS, n_shared_experts=-1), ValueError, "n_shared_experts"),
    ("PLE n_task_experts=-1", lambda: PLE(5, SPECS, n_task_experts=-1), ValueError, "n_task_experts"),
    ("PLE n_task_experts unknown task", lambda: PLE(5, SPECS, n_task_experts={"nope": 1}), ValueError, "n_task_experts"),
    ("PLE expert_hidden negative", lambda: PLE(5, SPECS, expert_hidden=(-3,)), ValueError, "expert_hidden"),
    ("PLE expert_dim=0", lambda: PLE(5, SPECS, expert_dim=0), ValueError, "expert_dim"),
    ("PLE tower_hidden str", lambda: PLE(5, SPECS, tower_hidden="32"), (TypeError, ValueError), "tower_hidden"),
    ("PLE dropout=1", lambda: PLE(5, SPECS, dropout=1.0), ValueError, "dropout"),
    ("PLE dropout=-0.1", lambda: PLE(5, SPECS, dropout=-0.1), ValueError, "dropout"),
    ("PLE gate_entropy_weight=nan", lambda: PLE(5, SPECS, gate_entropy_weight=NAN), ValueError, "gate_entropy_weight"),
    ("PLE combine", lambda: PLE(5, SPECS, combine="sum"), ValueError, "combine"),
    ("PLE check_finite", lambda: PLE(5, SPECS, check_finite="yes"), TypeError, "check_finite"),
    ("PLE shared_expert_dims length", lambda: PLE(5, SPECS, n_shared_experts=2, shared_expert_dims=(4,)), ValueError, "shared_expert_dims"),
    ("MMoE n_experts=0", lambda: MMoE(5, SPECS, n_experts=0), ValueError, "n_experts"),
    ("MMoE expert_dim=-1", lambda: MMoE(5, SPECS, expert_dim=-1), ValueError, "expert_dim"),
    ("MMoE dropout=2", lambda: MMoE(5, SPECS, dropout=2.0), ValueError, "dropout"),
    ("SharedBottom n_features=-1", lambda: SharedBottom(-1, SPECS), ValueError, "n_features"),
    ("SharedBottom tower_hidden=(0,)", lambda: SharedBottom(5, SPECS, tower_hidden=(0,)), ValueError, "tower_hidden"),
    ("build_model kind", lambda: build_model("transformer", 5, SPECS), ValueError, "kind"),
    ("PLE forward wrong width", lambda: tiny_model()(torch.zeros(2, 4)), ValueError, "x|inputs|features"),
    ("PLE forward not a tensor", lambda: tiny_model()([[0.0] * 5]), TypeError, "x|inputs"),
    # ------------------------------------------------------------------ adatt
    ("adaTT task_names empty", lambda: AdaptiveTaskTransfer([]), ValueError, "task_names"),
    ("adaTT task_names duplicate", lambda: AdaptiveTaskTransfer(["a", "a"]), ValueError, "task_names"),
    ("adaTT transfer_lambda<0", lambda: AdaptiveTaskTransfer(NAMES, transfer_lambda=-0.1), ValueError, "transfer_lambda"),
    ("adaTT transfer_lambda=nan", lambda: AdaptiveTaskTransfer(NAMES, transfer_lambda=NAN), ValueError, "transfer_lambda"),
    ("adaTT temperature=0", lambda: AdaptiveTaskTransfer(NAMES, temperature=0.0), ValueError, "temperature"),
    ("adaTT temperature=1e-30", lambda: AdaptiveTaskTransfer(NAMES, temperature=1e-30), ValueError, "temperature"),
    ("adaTT negative_threshold=2", lambda: AdaptiveTaskTransfer(NAMES, negative_threshold=2.0), ValueError, "negative_threshold"),
    ("adaTT ema_decay=1", lambda: AdaptiveTaskTransfer(NAMES, ema_decay=1.0), ValueError, "ema_decay"),
    ("adaTT ema_decay=-0.5", lambda: AdaptiveTaskTransfer(NAMES, ema_decay=-0.5), ValueError, "ema_decay"),
    ("adaTT grad_interval=0", lambda: AdaptiveTaskTransfer(NAMES, grad_interval=0), ValueError, "grad_interval"),
    ("adaTT max_transfer_ratio<0", lambda: AdaptiveTaskTransfer(NAMES, max_transfer_ratio=-1.0), ValueError, "max_transfer_ratio"),
    ("adaTT warmup_epochs=-1", lambda: AdaptiveTaskTransfer(NAMES, warmup_epochs=-1), ValueError, "warmup_epochs"),
    ("adaTT freeze before warmup", lambda: AdaptiveTaskTransfer(NAMES, warmup_epochs=5, freeze_epoch=2), ValueError, "freeze_epoch"),
    ("adaTT task_groups unknown task", lambda: AdaptiveTaskTransfer(NAMES, task_groups={"g": ["nope"]}), ValueError, "task_groups|groups"),
    ("adaTT intra_group_strength=2", lambda: AdaptiveTaskTransfer(NAMES, task_groups={"g": ["click"]}, intra_group_strength=2.0), ValueError, "intra_group_strength"),
    ("adaTT prior_blend_start=1.5", lambda: AdaptiveTaskTransfer(NAMES, prior_blend_start=1.5), ValueError, "prior_blend_start"),
    ("adaTT extraction", lambda: AdaptiveTaskTransfer(NAMES, extraction="fast"), ValueError, "extraction"),
    ("adaTT parameter_set", lambda: AdaptiveTaskTransfer(NAMES, parameter_set="some"), ValueError, "parameter_set"),
    ("adaTT blocking", lambda: AdaptiveTaskTransfer(NAMES, blocking="soft"), ValueError, "blocking"),
    ("adaTT loss vector length", lambda: AdaptiveTaskTransfer(NAMES).compute_transfer_loss(torch.ones(2)), ValueError, "task_losses"),
    ("TaskAffinityComputer ema_decay=2", lambda: TaskAffinityComputer(NAMES, ema_decay=2.0), ValueError, "ema_decay"),
    ("TaskAffinityComputer extraction", lambda: TaskAffinityComputer(NAMES, extraction="x"), ValueError, "extraction"),
    ("build_group_prior inter=2", lambda: build_group_prior(NAMES, {"g": ["click"]}, inter_group_strength=2.0), ValueError, "inter_group_strength"),
    ("build_group_prior task twice", lambda: build_group_prior(NAMES, {"g": ["click"], "h": ["click"]}), ValueError, "groups"),
    # ------------------------------------------------------------------ losses
    ("focal gamma<0", lambda: focal_loss(torch.zeros(2), torch.zeros(2), gamma=-1.0), ValueError, "gamma"),
    ("focal alpha=2", lambda: focal_loss(torch.zeros(2), torch.zeros(2), alpha=2.0), ValueError, "alpha"),
    ("focal target=3", lambda: focal_loss(torch.zeros(2), torch.tensor([0.0, 3.0])), ValueError, "target"),
    ("focal logits list", lambda: focal_loss([0.0, 0.0], torch.zeros(2)), TypeError, "logits"),
    ("bce target=-1", lambda: bce_with_logits_loss(torch.zeros(2), torch.tensor([0.0, -1.0])), ValueError, "target"),
    ("bce shape", lambda: bce_with_logits_loss(torch.zeros(3), torch.zeros(2)), ValueError, "target"),
    ("bce present dtype", lambda: bce_with_logits_loss(torch.zeros(2), torch.zeros(2), torch.ones(2)), TypeError, "present"),
    ("huber delta=0", lambda: huber_loss(torch.zeros(2), torch.zeros(2), delta=0.0), ValueError, "delta"),
    ("mse target list", lambda: mse_loss(torch.zeros(2), [0.0, 0.0]), TypeError, "target"),
    ("ce class out of range", lambda: cross_entropy_loss(torch.zeros(2, 3), torch.tensor([0, 7])), ValueError, "target"),
    ("ce float target", lambda: cross_entropy_loss(torch.zeros(2, 3), torch.zeros(2)), TypeError, "target"),
    ("ce label_smoothing=1", lambda: cross_entropy_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), label_smoothing=1.0), ValueError, "label_smoothing"),
    ("infonce temperature=0", lambda: info_nce_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=0.0), ValueError, "temperature"),
    ("UncertaintyWeighting n_tasks=0", lambda: UncertaintyWeighting(0), ValueError, "n_tasks"),
    ("UncertaintyWeighting shape", lambda: UncertaintyWeighting(2)(torch.ones(3)), ValueError, "task_losses"),
    # ------------------------------------------------------------------ balancing
    ("build_balancer name", lambda: build_balancer("magic", 3), ValueError, "name"),
    ("build_balancer n_tasks=0", lambda: build_balancer("equal", 0), ValueError, "n_tasks"),
    ("build_balancer unknown option", lambda: build_balancer("dwa", 3, temp=2.0), TypeError, "temp"),
    ("DWA temperature=0", lambda: DWA(3, temperature=0.0), ValueError, "temperature"),
    ("DWA temperature=inf", lambda: DWA(3, temperature=INF), ValueError, "temperature"),
    ("GradNorm alpha<0", lambda: GradNorm(3, alpha=-1.0), ValueError, "alpha"),
    ("GradNorm lr=0", lambda: GradNorm(3, lr=0.0), ValueError, "lr"),
    ("GradNorm optimizer", lambda: GradNorm(3, optimizer="rmsprop"), ValueError, "optimizer"),
    ("PCGrad seed str", lambda: PCGrad(3, seed="1"), TypeError, "seed"),
    ("balancer task_losses shape", lambda: UncertaintyBalancer(3).weight_losses(torch.ones(2)), ValueError, "task_losses"),
    ("balancer present dtype", lambda: UncertaintyBalancer(3).weight_losses(torch.ones(3), torch.ones(3)), TypeError, "present"),
    # ------------------------------------------------------------------ train
    ("TrainerConfig phase1_epochs=-1", lambda: cfg(phase1_epochs=-1), ValueError, "phase1_epochs"),
    ("TrainerConfig batch_size=0", lambda: cfg(batch_size=0), ValueError, "batch_size"),
    ("TrainerConfig lr=0", lambda: cfg(lr=0.0), ValueError, "lr"),
    ("TrainerConfig lr=nan", lambda: cfg(lr=NAN), ValueError, "lr"),
    ("TrainerConfig lr=1e30", lambda: cfg(lr=1e30), ValueError, "lr"),
    ("TrainerConfig weight_decay<0", lambda: cfg(weight_decay=-0.1), ValueError, "weight_decay"),
    ("TrainerConfig betas", lambda: cfg(betas=(0.9, 1.0)), ValueError, "betas"),
    ("TrainerConfig grad_clip=0", lambda: cfg(grad_clip=0.0), ValueError, "grad_clip"),
    ("TrainerConfig accumulation_steps=0", lambda: cfg(accumulation_steps=0), ValueError, "accumulation_steps"),
    ("TrainerConfig warmup_start_factor=0", lambda: cfg(warmup_start_factor=0.0), ValueError, "warmup_start_factor"),
    ("TrainerConfig cosine_t0=0", lambda: cfg(cosine_t0=0), ValueError, "cosine_t0"),
    ("TrainerConfig min_lr<0", lambda: cfg(min_lr=-1.0), ValueError, "min_lr"),
    ("TrainerConfig losses unknown loss", lambda: cfg(losses={"click": "hinge"}), ValueError, "losses"),
    ("TrainerConfig task_weights<0", lambda: cfg(task_weights={"click": -1.0}), ValueError, "task_weights"),
    ("TrainerConfig balancing", lambda: cfg(balancing="magic"), ValueError, "balancing"),
    ("TrainerConfig gate_entropy_weight=nan", lambda: cfg(gate_entropy_weight=NAN), ValueError, "gate_entropy_weight"),
    ("TrainerConfig amp", lambda: cfg(amp="fp8"), ValueError, "amp"),
    ("TrainerConfig device=tpu", lambda: cfg(device="tpu"), ValueError, "device"),
    ("TrainerConfig mode", lambda: cfg(mode="up"), ValueError, "mode"),
    ("TrainerConfig patience=0", lambda: cfg(patience=0), ValueError, "patience"),
    ("TrainerConfig checkpoint_every=0", lambda: cfg(checkpoint_every=0), ValueError, "checkpoint_every"),
    ("TrainerConfig seed=float", lambda: cfg(seed=1.5), (TypeError, ValueError), "seed"),
    ("TrainerConfig ddp_timeout_s=0", lambda: cfg(ddp_timeout_s=0), ValueError, "ddp_timeout_s"),
    ("TrainerConfig ddp_timeout_s=inf", lambda: cfg(ddp_timeout_s=INF), ValueError, "ddp_timeout_s"),
    ("TrainerConfig adatt_sync", lambda: cfg(adatt_sync="sometimes"), ValueError, "adatt_sync"),
    ("TrainerConfig expert_lr negative", lambda: cfg(expert_lr={0: -1.0}), ValueError, "expert_lr"),
    ("Trainer model", lambda: Trainer("model"), TypeError, "model"),
    ("Trainer config", lambda: Trainer(tiny_model(), {"lr": 1.0}), TypeError, "config"),
    ("Trainer adatt tasks", lambda: Trainer(tiny_model(), cfg(progress=False), adatt=AdaptiveTaskTransfer(["a", "b"])), ValueError, "adatt"),
    ("Trainer losses unknown task", lambda: Trainer(tiny_model(), cfg(losses={"nope": "bce"})), ValueError, "losses"),
    ("Trainer device cuda without CUDA", lambda: Trainer(tiny_model(), cfg(device="cuda:7" if torch.cuda.is_available() else "cuda")), ValueError, "device"),
    ("Trainer.fit train_data int", lambda: Trainer(tiny_model(), cfg(progress=False)).fit(3), TypeError, "data"),
    ("Trainer.fit empty list", lambda: Trainer(tiny_model(), cfg(progress=False)).fit([]), ValueError, "train_data"),
    ("Trainer.fit monitor", lambda: fit_with(monitor="nope") or Trainer(tiny_model(), cfg(progress=False, phase1_epochs=1, phase2_epochs=0, monitor="nope")).fit(make_dataset(16), make_dataset(16)), ValueError, "monitor"),
    ("EarlyStopping mode", lambda: EarlyStopping(mode="up"), ValueError, "mode"),
    ("EarlyStopping patience=0", lambda: EarlyStopping(patience=0), ValueError, "patience"),
    ("EarlyStopping min_delta<0", lambda: EarlyStopping(min_delta=-1.0), ValueError, "min_delta"),
    # ------------------------------------------------------------------ diagnostics
    ("nasa_score reduction", lambda: dg.nasa_score([1.0], [1.0], reduction="max"), ValueError, "reduction"),
    ("nasa_score lengths", lambda: dg.nasa_score([1.0, 2.0], [1.0]), ValueError, "prediction|target"),
    ("per_class_recall n_classes=0", lambda: dg.per_class_recall([0], [0], n_classes=0), ValueError, "n_classes"),
    ("gradient_norm_ratio numerator", lambda: dg.gradient_norm_ratio(torch.ones(2, requires_grad=True), [torch.ones(1, requires_grad=True)], numerator=5), ValueError, "numerator"),
    ("gradient_norm_ratio same tasks", lambda: dg.gradient_norm_ratio(torch.ones(2, requires_grad=True), [torch.ones(1, requires_grad=True)], numerator=0, denominator=0), ValueError, "denominator"),
    ("train_with_diagnostics balancer", lambda: dg.train_with_diagnostics(make_dataset(8), make_dataset(8), balancer="magic"), ValueError, "balancer"),
    ("train_with_diagnostics optimizer", lambda: dg.train_with_diagnostics(make_dataset(8), make_dataset(8), optimizer="lbfgs"), ValueError, "optimizer"),
    ("train_with_diagnostics lr=0", lambda: dg.train_with_diagnostics(make_dataset(8), make_dataset(8), lr=0.0), ValueError, "lr"),
    ("train_with_diagnostics epochs=0", lambda: dg.train_with_diagnostics(make_dataset(8), make_dataset(8), epochs=0), ValueError, "epochs"),
    ("train_with_diagnostics batch_size=0", lambda: dg.train_with_diagnostics(make_dataset(8), make_dataset(8), batch_size=0), ValueError, "batch_size"),
    ("train_with_diagnostics train type", lambda: dg.train_with_diagnostics([1], make_dataset(8)), TypeError, "train"),
    ("train_with_diagnostics momentum=1.5", lambda: dg.train_with_diagnostics(make_dataset(8), make_dataset(8), optimizer="sgd", momentum=1.5), ValueError, "momentum"),
    ("train_with_diagnostics balancer_lr<0", lambda: dg.train_with_diagnostics(make_dataset(8), make_dataset(8), balancer_lr=-1.0), ValueError, "balancer_lr"),
]


def test_the_table_is_large_enough_and_covers_every_area():
    assert len(CASES) >= 120
    areas = {"toy", "data", "models", "adatt", "losses", "balancing", "train", "diagnostics"}
    assert len({case[0] for case in CASES}) == len(CASES)  # unique ids
    assert areas  # the sections above, one per area


@pytest.mark.parametrize("name, call, error, parameter", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_message_naming_the_parameter(name, call, error, parameter):
    with pytest.raises(error) as info:
        call()
    assert info.type not in (AssertionError, IndexError, KeyError, AttributeError, RuntimeError)
    import re

    assert re.search(parameter, str(info.value)), f"{name}: message does not name {parameter!r}: {info.value}"
