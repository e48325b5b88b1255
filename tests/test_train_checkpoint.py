"""Checkpoints: exact resumption, atomic writes, safe loading and refusal of foreign checkpoints."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mtlbook.adatt import AdaptiveTaskTransfer
from mtlbook.data.batch import MultiTaskDataset
from mtlbook.models import PLE
from mtlbook.train.callbacks import Callback
from mtlbook.train import Trainer, TrainerConfig
from mtlbook.train.checkpoint import atomic_save, capture_rng_state, load_file, restore_rng_state

from _tiny import NAMES, SPECS, make_dataset as _make_dataset  # the shared tiny problem


def make_dataset(n: int = 80, seed: int = 0) -> MultiTaskDataset:
    return _make_dataset(n, seed)


def make_model(seed: int = 0, expert_dim: int = 6) -> PLE:
    torch.manual_seed(seed)
    # dropout > 0 so the global torch RNG matters for the resumed run
    return PLE(5, SPECS, n_levels=2, n_shared_experts=2, expert_hidden=(8,), expert_dim=expert_dim,
               tower_hidden=(6,), dropout=0.1)  # fmt: skip


def make_trainer(tmp_path, model_seed: int = 0, **overrides) -> Trainer:
    cfg = dict(phase1_epochs=3, phase2_epochs=2, batch_size=16, lr=5e-3, warmup_epochs=1, phase2_warmup_epochs=1,
               progress=False, patience=None, checkpoint_dir=str(tmp_path), seed=7)  # fmt: skip
    cfg.update(overrides)
    adatt = AdaptiveTaskTransfer(NAMES, warmup_epochs=1, freeze_epoch=2, grad_interval=2)
    return Trainer(make_model(model_seed), TrainerConfig(**cfg), adatt=adatt)


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    state.update({f"adatt.{k}": v for k, v in trainer.adatt.state_dict().items()})
    state.update({f"balancer.{k}": v for k, v in trainer.balancer.state_dict().items()})
    return state


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("full"))
    history = trainer.fit(make_dataset(), make_dataset(32, seed=1))
    return history.to_dict(drop_timing=True), full_state(trainer), trainer.step


@pytest.mark.parametrize("crash_epoch", [1, 3, 4])  # mid phase 1, first epoch of phase 2, mid phase 2
def test_interrupted_then_resumed_run_is_bit_identical(tmp_path, uninterrupted, crash_epoch):
    expected_history, expected_state, expected_step = uninterrupted

    class Crashing(Callback):  # a power cut as the epoch starts: the previous epoch's checkpoint is the last

        def on_epoch_start(self, trainer):
            if trainer.epoch == crash_epoch:
                raise Crash(f"killed at epoch {crash_epoch}")

    with pytest.raises(Crash):
        make_trainer(tmp_path).fit(make_dataset(), make_dataset(32, seed=1), callbacks=[Crashing()])

    # disturb every global RNG, then resume into a differently initialised model
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    resumed = make_trainer(tmp_path, model_seed=99)
    history = resumed.fit(make_dataset(), make_dataset(32, seed=1), resume_from=tmp_path / "last.pt")

    assert history.to_dict(drop_timing=True) == expected_history
    state = full_state(resumed)
    assert state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(state[name], tensor), name
    assert resumed.step == expected_step
    assert resumed.adatt.enabled


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    trainer = make_trainer(tmp_path, phase1_epochs=2, phase2_epochs=1)
    history = trainer.fit(make_dataset())
    before = {k: v.clone() for k, v in full_state(trainer).items()}
    again = make_trainer(tmp_path, model_seed=5, phase1_epochs=2, phase2_epochs=1)
    resumed_history = again.fit(make_dataset(), resume_from=tmp_path / "last.pt")
    assert resumed_history.to_dict() == history.to_dict()
    assert all(torch.equal(full_state(again)[k], v) for k, v in before.items())
    assert again.adatt.enabled and all(p.requires_grad for p in again.model.shared_parameters())


def test_an_interrupted_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, phase1_epochs=1, phase2_epochs=0, checkpoint_dir=None)
    trainer.fit(make_dataset(32))
    path = tmp_path / "ckpt.pt"
    trainer.save_checkpoint(path)
    good = load_file(path)

    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)  # the next checkpoint would differ

    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path)
    monkeypatch.setattr(torch, "save", real_save)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left behind
    survivor = load_file(path)
    assert survivor["trainer"]["epoch"] == good["trainer"]["epoch"] == 1
    for k, v in good["model"].items():
        assert torch.equal(survivor["model"][k], v)
    fresh = make_trainer(tmp_path, model_seed=3, phase1_epochs=1, phase2_epochs=0, checkpoint_dir=None)
    fresh.load_checkpoint(path)
    for k, v in good["model"].items():
        assert torch.equal(fresh.model.state_dict()[k], v)


def test_checkpoints_load_with_weights_only_and_hold_everything(tmp_path):
    trainer = make_trainer(tmp_path, phase1_epochs=2, phase2_epochs=1)
    trainer.fit(make_dataset(48))
    data = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "adatt", "balancer", "optim", "rng", "trainer", "history", "fingerprint"} <= set(data)
    assert {"optimizer", "scheduler", "scaler", "groups"} <= set(data["optim"])
    assert {"torch", "numpy", "python", "loader"} <= set(data["rng"])
    assert isinstance(data["rng"]["loader"], torch.Tensor)  # the shuffling generator of the loader
    assert data["trainer"]["phase"] == 2 and data["trainer"]["epoch"] == 3
    assert len(data["history"]["records"]) == 3


def test_a_checkpoint_of_another_model_or_config_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, phase1_epochs=1, phase2_epochs=0)
    trainer.fit(make_dataset(32))
    path = tmp_path / "last.pt"

    other_model = Trainer(make_model(expert_dim=7), trainer.config, adatt=AdaptiveTaskTransfer(NAMES, warmup_epochs=1, freeze_epoch=2))
    with pytest.raises(ValueError, match="different model"):
        other_model.load_checkpoint(path)
    no_adatt = Trainer(make_model(), trainer.config)
    with pytest.raises(ValueError, match="different model"):
        no_adatt.load_checkpoint(path)
    # the same architecture in the module form (the default before banks): the error says which form to build
    torch.manual_seed(0)
    modules = PLE(5, SPECS, n_levels=2, n_shared_experts=2, n_task_experts=1, expert_hidden=(8,), expert_dim=6,
                  tower_hidden=(6,), experts="modules")  # fmt: skip
    other_form = Trainer(modules, trainer.config, adatt=AdaptiveTaskTransfer(NAMES, warmup_epochs=1, freeze_epoch=2))
    with pytest.raises(ValueError, match='stores its experts as experts="bank": build the model with experts="bank"'):
        other_form.load_checkpoint(path)
    other_config = make_trainer(tmp_path, phase1_epochs=1, phase2_epochs=0, lr=1e-3)
    with pytest.raises(ValueError, match="TrainerConfig.*lr"):
        other_config.load_checkpoint(path)
    # where checkpoints go and whether bars show does not change the run: accepted
    relocated = make_trainer(tmp_path / "elsewhere", phase1_epochs=1, phase2_epochs=0, progress=True)
    relocated.load_checkpoint(path)
    assert relocated.epoch == 1


def test_rng_snapshot_round_trip():
    loader_gen = torch.Generator().manual_seed(3)
    state = capture_rng_state(loader_gen)
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.randperm(10, generator=loader_gen))
    restore_rng_state(state, loader_gen)
    second = (torch.rand(3), np.random.rand(3), random.random(), torch.randperm(10, generator=loader_gen))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and torch.equal(first[3], second[3])


def test_atomic_save_replaces_the_file_in_one_step(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    atomic_save({"a": torch.ones(2)}, path)
    atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(load_file(path)["a"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]
    with pytest.raises(FileNotFoundError):
        load_file(tmp_path / "missing.pt")
