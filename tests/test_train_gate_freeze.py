"""The trainer's two gate-freeze switches: the gate clock and turning the adaTT co-freeze off."""

from __future__ import annotations

import pytest
import torch

from mtlbook.adatt import AdaptiveTaskTransfer
from mtlbook.models import PLE
from mtlbook.train import Trainer, TrainerConfig

from _tiny import NAMES, SPECS, make_dataset


def _model() -> PLE:
    torch.manual_seed(0)
    return PLE(5, SPECS, n_levels=1, n_shared_experts=2, n_task_experts=1, expert_hidden=(8,), expert_dim=6,
               tower_hidden=(6,))  # fmt: skip


def _config(**overrides) -> TrainerConfig:
    base = dict(phase1_epochs=4, phase2_epochs=0, batch_size=16, lr=5e-3, warmup_epochs=1, progress=False,
                patience=None)  # fmt: skip
    return TrainerConfig(**{**base, **overrides})


def _adatt() -> AdaptiveTaskTransfer:
    return AdaptiveTaskTransfer(NAMES, warmup_epochs=1, freeze_epoch=2, grad_interval=2)


def _gates(model: PLE) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.gate_parameters()]


def test_gate_clock_freezes_the_gates_without_adatt():
    model = _model()
    history = Trainer(model, _config(gate_freeze_epoch=2)).fit(make_dataset())
    assert [r["gates_frozen"] for r in history] == [False, False, True, True]
    assert bool(model.gates_frozen)
    # without the clock, PLE + UW never freezes its gates in phase 1
    plain = Trainer(_model(), _config()).fit(make_dataset())
    assert [r["gates_frozen"] for r in plain] == [False] * 4


def test_gate_clock_matches_the_cofreeze_timing():
    with_adatt = Trainer(_model(), _config(), adatt=_adatt()).fit(make_dataset())
    clock = Trainer(_model(), _config(gate_freeze_epoch=2)).fit(make_dataset())
    assert [r["gates_frozen"] for r in with_adatt] == [r["gates_frozen"] for r in clock]


def test_cofreeze_can_be_switched_off():
    model = _model()
    trainer = Trainer(model, _config(adatt_gate_cofreeze=False), adatt=_adatt())
    before = _gates(model)
    history = trainer.fit(make_dataset())
    assert history.adatt_phases == ["warmup", "dynamic", "frozen", "frozen"]
    assert [r["gates_frozen"] for r in history] == [False] * 4
    assert any(not torch.equal(a, b) for a, b in zip(before, _gates(model)))  # the gates kept training


def test_gate_freeze_settings_are_validated():
    with pytest.raises(ValueError, match="gate_freeze_epoch"):
        _config(gate_freeze_epoch=0)
    with pytest.raises(ValueError, match="gate_freeze_epoch"):
        _config(gate_freeze_epoch=1.5)
    with pytest.raises(ValueError, match="adatt_gate_cofreeze"):
        _config(adatt_gate_cofreeze="no")
