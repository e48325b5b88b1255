"""The trainer records adaTT's effective task weights c and c times the balancer's weights."""

from __future__ import annotations

import math

import pytest
import torch

from mtlbook.adatt import AdaptiveTaskTransfer
from mtlbook.models import PLE
from mtlbook.train import Trainer, TrainerConfig
from mtlbook.train.history import History

from _tiny import NAMES, SPECS, make_dataset


def make_model(seed: int = 0) -> PLE:
    torch.manual_seed(seed)
    return PLE(5, SPECS, n_levels=2, n_shared_experts=2, n_task_experts=1, expert_hidden=(8,),
               expert_dim=6, tower_hidden=(6,))  # fmt: skip


def fit(balancing: str, adatt: bool = True, phase2: int = 1, **adatt_kwargs):
    config = TrainerConfig(phase1_epochs=4, phase2_epochs=phase2, batch_size=16, lr=5e-3, warmup_epochs=1,
                           phase2_warmup_epochs=1, progress=False, patience=None, balancing=balancing)  # fmt: skip
    kwargs = dict(warmup_epochs=1, freeze_epoch=3, grad_interval=2, transfer_lambda=0.8, max_transfer_ratio=2.0)
    kwargs.update(adatt_kwargs)
    module = AdaptiveTaskTransfer(NAMES, **kwargs) if adatt else None
    trainer = Trainer(make_model(), config, adatt=module)
    return trainer, trainer.fit(make_dataset(64))


def epoch_means(record) -> torch.Tensor:
    return torch.tensor([record["train"][f"{t}/loss"] for t in NAMES], dtype=torch.float64)


def test_equal_weights_record_matches_the_formula_on_the_recorded_matrices():
    _, history = fit("equal")
    lam, cap = 0.8, 2.0
    for record in history:
        c = torch.tensor(record["effective_weights"], dtype=torch.float64)
        if record["adatt_phase"] == "warmup" or not record["adatt_enabled"]:
            assert torch.equal(c, torch.ones(3, dtype=torch.float64))
            continue
        w = torch.tensor(record["transfer_weights"], dtype=torch.float64).fill_diagonal_(0.0)
        losses = epoch_means(record)
        open_rows = (lam * (w @ losses) < cap * losses).double()
        expected = 1 + lam * (open_rows[:, None] * w).sum(0)
        torch.testing.assert_close(c, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(record["loss_weights"], dtype=torch.float64), c)
    phases = [r["adatt_phase"] for r in history if r["phase"] == 1]
    assert phases == ["warmup", "dynamic", "dynamic", "frozen"]
    dynamic = torch.tensor(history[1]["effective_weights"])
    assert bool((dynamic > 1.0).any())  # transfer is on: some task carries more than its own loss
    assert torch.all(dynamic <= 1 + lam * 2 + 1e-6)


def test_uncertainty_weighting_records_the_product_and_the_state_reproduces_c():
    trainer, history = fit("uncertainty", phase2=0)
    last = history[-1]
    b = torch.tensor(last["balancer_weights"], dtype=torch.float64)
    c = torch.tensor(last["effective_weights"], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(last["loss_weights"], dtype=torch.float64), c * b)
    assert not torch.allclose(b, torch.full_like(b, 0.5))  # the UW weights moved away from 1/2
    # the adaTT module and the balancer are unchanged since the record: recompute c and
    # compare with autograd's Jacobian of the summed transfer loss at the same losses
    adatt = trainer.adatt
    adatt.set_epoch(last["epoch"])
    with torch.no_grad():
        weighted = trainer.balancer.weight_losses(epoch_means(last).float()).double()
    torch.testing.assert_close(adatt.effective_task_weights(weighted).double(), c, atol=1e-6, rtol=0)
    leaf = weighted.clone().requires_grad_(True)
    (jac,) = torch.autograd.grad(adatt.double().compute_transfer_loss(leaf).sum(), leaf)
    torch.testing.assert_close(jac, c, atol=1e-6, rtol=0)


def test_phase2_and_no_adatt():
    _, history = fit("uncertainty", phase2=2)
    for record in history:
        if record["phase"] == 2:
            assert record["effective_weights"] == [1.0, 1.0, 1.0]
            assert record["loss_weights"] == pytest.approx(record["balancer_weights"])
    _, plain = fit("dwa", adatt=False)
    assert all(r["effective_weights"] is None for r in plain)
    assert all(r["loss_weights"] == pytest.approx(r["balancer_weights"]) for r in plain)
    assert torch.isnan(plain.weights("effective_weights")).all()


def test_history_weights_accessor_and_round_trip():
    _, history = fit("equal")
    table = history.weights("effective_weights")
    assert table.shape == (len(history), 3)
    assert torch.equal(table[2], torch.tensor(history[2]["effective_weights"], dtype=torch.float64))
    assert torch.equal(history.matrix("loss_weights", epoch=2), table[2])
    again = History.from_dict(history.to_dict())
    assert torch.equal(again.weights("loss_weights"), history.weights("loss_weights"))
    with pytest.raises(ValueError, match="name"):
        history.weights("affinity")
    assert not math.isnan(float(table[1].sum()))
