"""Faults a hostile but fair user can cause, one test per defect of issue 12.

NaN validation metrics, binary labels outside [0, 1], class indices out of range,
divergent weights, empty data, restore_best against last.pt, damaged checkpoints and the
temporary files of killed writes.
"""

from __future__ import annotations

import os
import pickle
import time
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from mtlbook.data.batch import MultiTaskDataset
from mtlbook.losses import bce_with_logits_loss, cross_entropy_loss, focal_loss
from mtlbook.models import PLE
from mtlbook.train.callbacks import Callback
from mtlbook.train import CheckpointError, Trainer, TrainerConfig, TrainingDivergedError, TrainingWarning
from mtlbook.train.checkpoint import atomic_save, clean_stale_temporaries, load_file

from _tiny import SPECS, make_dataset


def make_model(seed: int = 0) -> PLE:
    torch.manual_seed(seed)
    return PLE(5, SPECS, n_levels=1, n_shared_experts=2, expert_hidden=(8,), expert_dim=6, tower_hidden=(6,))


def make_config(**overrides) -> TrainerConfig:
    base = dict(phase1_epochs=3, phase2_epochs=0, batch_size=16, lr=5e-3, warmup_epochs=1, progress=False,
                patience=None, seed=0)  # fmt: skip
    base.update(overrides)
    return TrainerConfig(**base)


# ------------------------------------------------------------------ defect 3: NaN metric
def test_a_nan_validation_metric_warns_once_is_recorded_and_does_not_stop_the_phase():
    val = make_dataset(32, seed=1)
    val.targets["click"] = torch.zeros(32)  # AUC on a single class: NaN
    trainer = Trainer(make_model(), make_config(monitor="click/auc", patience=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(make_dataset(64), val)
    relevant = [w for w in caught if issubclass(w.category, TrainingWarning) and "click/auc" in str(w.message)]
    assert len(relevant) == 1  # once, not every epoch
    assert len(history) == 3  # patience=1 used to end the phase after the first NaN epoch
    assert all(r["monitor_nan"] and not r["best"] and not r["stopped_early"] for r in history)
    assert trainer.early_stopping.bad_epochs == 0


def test_a_finite_metric_is_marked_as_such():
    history = Trainer(make_model(), make_config(phase1_epochs=1)).fit(make_dataset(32), make_dataset(16, seed=1))
    assert history[-1]["monitor_nan"] is False and history[-1]["best"] is True


# ------------------------------------------------------------------ defect 4: labels out of range
@pytest.mark.parametrize("loss", [bce_with_logits_loss, focal_loss])
@pytest.mark.parametrize("label", [-1.0, 3.0, float("inf")])
def test_binary_losses_refuse_labels_outside_the_unit_interval(loss, label):
    target = torch.tensor([0.0, 1.0, label])
    with pytest.raises(ValueError, match=r"target.*\[0, 1\]"):
        loss(torch.zeros(3), target)
    # the same label on an absent row is a placeholder and is ignored
    assert torch.isfinite(loss(torch.zeros(3), target, torch.tensor([True, True, False])))


def test_cross_entropy_refuses_a_class_index_out_of_range():
    with pytest.raises(ValueError, match=r"target.*\[0, 3\)"):
        cross_entropy_loss(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"target.*\[0, 3\)"):
        cross_entropy_loss(torch.zeros(2, 3), torch.tensor([-2, 0]))
    assert torch.isfinite(cross_entropy_loss(torch.zeros(2, 3), torch.tensor([-1, 0]), torch.tensor([False, True])))


def test_a_dataset_refuses_binary_labels_and_class_indices_out_of_range():
    good = make_dataset(8)
    bad_click = dict(good.targets, click=torch.full((8,), 2.0))
    with pytest.raises(ValueError, match=r"targets\['click'\].*\[0, 1\]"):
        MultiTaskDataset(good.inputs, bad_click, SPECS)
    bad_kind = dict(good.targets, kind=torch.full((8,), 3))
    with pytest.raises(ValueError, match=r"targets\['kind'\].*\[0, 3\)"):
        MultiTaskDataset(good.inputs, bad_kind, SPECS)
    float_kind = dict(good.targets, kind=torch.zeros(8))
    with pytest.raises(TypeError, match=r"targets\['kind'\]"):
        MultiTaskDataset(good.inputs, float_kind, SPECS)
    # absent rows may hold any placeholder
    present = {"click": torch.zeros(8, dtype=torch.bool)}
    MultiTaskDataset(good.inputs, bad_click, SPECS, present)


# ------------------------------------------------------------------ defect 5: divergence
def test_divergent_weights_stop_training_and_never_replace_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(make_model(), make_config(checkpoint_dir=str(tmp_path)))

    class Exploding(Callback):
        def on_batch_end(self, trainer, batch, terms):
            if trainer.epoch == 1:
                with torch.no_grad():
                    for p in trainer.model.parameters():
                        p.mul_(1e25)  # what an absurd learning rate did in the issue

    with pytest.raises(TrainingDivergedError, match="diverged in epoch 1.*last good state"):
        trainer.fit(make_dataset(64), callbacks=[Exploding()])
    kept = load_file(tmp_path / "last.pt")
    assert kept["trainer"]["epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) and float(v.abs().max()) < 1e3 for v in kept["model"].values() if v.is_floating_point())
    with pytest.raises(TrainingDivergedError, match="refusing to write"):
        trainer.save_checkpoint(tmp_path / "last.pt")
    assert load_file(tmp_path / "last.pt")["trainer"]["epoch"] == 1


def test_a_nan_weight_is_never_checkpointed(tmp_path):
    trainer = Trainer(make_model(), make_config(phase1_epochs=1))
    trainer.fit(make_dataset(32))
    trainer.save_checkpoint(tmp_path / "x.pt")
    with torch.no_grad():
        next(trainer.model.parameters())[0].fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        trainer.save_checkpoint(tmp_path / "x.pt")
    assert all(bool(torch.isfinite(v).all()) for v in load_file(tmp_path / "x.pt")["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------ defect 9: nothing to train on
def test_fit_refuses_empty_data_and_data_without_targets():
    trainer = Trainer(make_model(), make_config(phase1_epochs=1))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match="train_data is empty"):
        trainer.fit([])
    empty = make_dataset(8).subset(torch.arange(0))
    with pytest.raises(ValueError, match="train_data is empty"):
        trainer.fit(empty)
    data = make_dataset(32)
    no_targets = MultiTaskDataset(data.inputs, data.targets, SPECS, {t: torch.zeros(32, dtype=torch.bool) for t in data.task_names})
    with pytest.raises(ValueError, match="no present target"):
        trainer.fit(no_targets)
    with pytest.raises(ValueError, match="no present target"):
        trainer.fit(DataLoader(no_targets, batch_size=8, collate_fn=no_targets.collate))
    with pytest.raises(ValueError, match="no present target"):
        trainer.fit([no_targets.full_batch()])
    with pytest.raises(ValueError, match="yielded no batches"):
        trainer.fit(DataLoader(data, batch_size=8, collate_fn=data.collate, sampler=[]))
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


# ------------------------------------------------------------------ defect 10: restore_best
def test_last_checkpoint_of_a_finished_run_holds_the_weights_fit_returned(tmp_path):
    cfg = make_config(phase1_epochs=3, phase2_epochs=2, phase2_warmup_epochs=0, monitor="loss", mode="max",
                      restore_best=True, checkpoint_dir=str(tmp_path))  # fmt: skip
    trainer = Trainer(make_model(), cfg)
    history = trainer.fit(make_dataset(64), make_dataset(32, seed=1))
    assert [r["best"] for r in history][-1] is False  # the last epoch is not the best: a restore happened
    stored = load_file(tmp_path / "last.pt")["model"]
    weights = {k: v for k, v in trainer.model.state_dict().items() if v.is_floating_point()}  # not the freeze flags
    for name, value in weights.items():
        assert torch.equal(stored[name], value), name
    again = Trainer(make_model(5), cfg)
    again.fit(make_dataset(64), make_dataset(32, seed=1), resume_from=tmp_path / "last.pt")
    for name, value in weights.items():
        assert torch.equal(again.model.state_dict()[name], value), name


# ------------------------------------------------------------------ defect 12: damaged checkpoints
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    trainer = Trainer(make_model(), make_config(phase1_epochs=1, checkpoint_dir=str(folder)))
    trainer.fit(make_dataset(32))
    return (folder / "last.pt").read_bytes()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "damage",
    ["truncated", "empty", "garbage", "pickle_payload", "not_a_dict", "missing_entry", "directory"],
)
def test_a_damaged_checkpoint_raises_one_checkpoint_error_naming_the_file(tmp_path, good_checkpoint, damage):
    path = tmp_path / "last.pt"
    if damage == "truncated":
        path.write_bytes(good_checkpoint[: len(good_checkpoint) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "pickle_payload":
        with open(path, "wb") as handle:
            pickle.dump({"model": _Payload()}, handle)
    elif damage == "not_a_dict":
        torch.save([torch.zeros(2)], path)
    elif damage == "missing_entry":
        state = torch.load(_write(tmp_path / "good.pt", good_checkpoint), weights_only=True)
        del state["trainer"]
        torch.save(state, path)
    elif damage == "directory":
        path.mkdir()
        (path / "data.pkl").write_bytes(b"x")
    trainer = Trainer(make_model(), make_config(phase1_epochs=1))
    with pytest.raises(CheckpointError, match="last.pt") as info:
        trainer.load_checkpoint(path)
    assert isinstance(info.value, ValueError)
    assert "weights_only=False" not in str(info.value)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_missing_checkpoint_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_file(tmp_path / "nope.pt")


def test_temporary_files_of_killed_writes_are_cleaned_on_the_next_save(tmp_path):
    target = tmp_path / "last.pt"
    dead = tmp_path / ".last.pt.999999999.abc123.tmp"  # no such process
    old = tmp_path / ".last.pt.legacyname.tmp"  # an old-style name, an hour old
    live = tmp_path / f".last.pt.{os.getppid()}.xyz.tmp"  # a live writer: left alone
    other = tmp_path / ".other.pt.999999999.abc.tmp"  # another file's temporary: left alone
    for p in (dead, old, live, other):
        p.write_bytes(b"partial")
    an_hour_ago = time.time() - 7200
    os.utime(old, (an_hour_ago, an_hour_ago))
    atomic_save({"a": torch.ones(1)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])
    assert clean_stale_temporaries(target) == []


# ------------------------------------------------------------------ defect 6: interrupted fit
class Interrupt(Exception):
    pass


def test_fit_after_an_interrupt_mid_epoch_is_refused_and_so_is_a_mid_epoch_checkpoint(tmp_path):
    trainer = Trainer(make_model(), make_config(checkpoint_dir=str(tmp_path)))
    calls = []

    class Interrupted(Callback):
        def on_batch_start(self, trainer, batch):
            calls.append(1)
            if trainer.epoch == 1 and len(calls) == 6:  # the second batch of epoch 1 (4 batches per epoch)
                raise Interrupt("Ctrl-C")

    with pytest.raises(Interrupt):
        trainer.fit(make_dataset(64), callbacks=[Interrupted()])
    steps = trainer.step
    with pytest.raises(RuntimeError, match="interrupted in the middle of epoch 1"):
        trainer.fit(make_dataset(64))
    with pytest.raises(RuntimeError, match="middle of epoch 1"):
        trainer.save_checkpoint(tmp_path / "mid.pt")
    assert trainer.step == steps and not (tmp_path / "mid.pt").exists()
    # the way out: resume from the last checkpoint, which ends exactly like an uninterrupted run
    trainer.fit(make_dataset(64), resume_from=tmp_path / "last.pt")
    reference = Trainer(make_model(), make_config())
    reference.fit(make_dataset(64))
    assert trainer.step == reference.step == 12
    for name, value in reference.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value), name


# ------------------------------------------------------------------ defect 7: OOM in validation
def test_out_of_memory_in_validation_splits_the_batch_instead_of_crashing(monkeypatch):
    trainer = Trainer(make_model(), make_config(phase1_epochs=1))
    trainer.fit(make_dataset(32))
    val = make_dataset(40, seed=2)
    expected = Trainer(make_model(), make_config(phase1_epochs=1, eval_batch_size=8))
    expected.model.load_state_dict(trainer.model.state_dict())
    reference = expected.evaluate(val)  # batches of 8: fit in "memory"

    forward = type(trainer.model).forward

    def limited(self, x):
        if not self.training and x.shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, x)

    monkeypatch.setattr(type(trainer.model), "forward", limited)
    result = trainer.evaluate(val)  # eval batch 16 > 8: split, not crashed, no row lost
    assert result.keys() == reference.keys()
    for key, value in reference.items():
        assert result[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


# ------------------------------------------------------------------ defect 8: resume settings
def test_resume_compares_adatt_settings_dropout_and_task_kinds(tmp_path):
    from mtlbook.adatt import AdaptiveTaskTransfer
    from mtlbook.data.batch import TaskSpec

    cfg = make_config(phase1_epochs=1, checkpoint_dir=str(tmp_path))
    Trainer(make_model(), cfg, adatt=AdaptiveTaskTransfer(SPECS_NAMES, temperature=1.0)).fit(make_dataset(32))
    other_t = Trainer(make_model(), cfg, adatt=AdaptiveTaskTransfer(SPECS_NAMES, temperature=0.5))
    with pytest.raises(ValueError, match="temperature"):
        other_t.load_checkpoint(tmp_path / "last.pt")
    other_freeze = Trainer(make_model(), cfg, adatt=AdaptiveTaskTransfer(SPECS_NAMES, freeze_epoch=4))
    with pytest.raises(ValueError, match="freeze_epoch"):
        other_freeze.load_checkpoint(tmp_path / "last.pt")
    torch.manual_seed(0)
    dropped = PLE(5, SPECS, n_levels=1, n_shared_experts=2, expert_hidden=(8,), expert_dim=6, tower_hidden=(6,), dropout=0.3)
    with pytest.raises(ValueError, match="dropout"):
        Trainer(dropped, cfg, adatt=AdaptiveTaskTransfer(SPECS_NAMES)).load_checkpoint(tmp_path / "last.pt")
    Trainer(make_model(), cfg, adatt=AdaptiveTaskTransfer(SPECS_NAMES)).load_checkpoint(tmp_path / "last.pt")  # same: fine

    # data whose task has the model's name but another kind is refused
    data = make_dataset(16)
    specs = (SPECS[0], TaskSpec("value", "binary"), SPECS[2])
    relabeled = MultiTaskDataset(data.inputs, {**data.targets, "value": torch.zeros(16)}, specs)
    with pytest.raises(ValueError, match="task_specs"):
        Trainer(make_model(), make_config(phase1_epochs=1)).fit(relabeled)


SPECS_NAMES = tuple(s.name for s in SPECS)
