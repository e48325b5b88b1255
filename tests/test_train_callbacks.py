"""The training loop's extension points: callbacks see their hooks in order, and the loss
pipeline's stages compose to the objective the trainer backpropagates."""

from __future__ import annotations

import pytest
import torch

from mtlbook.adatt import AdaptiveTaskTransfer
from mtlbook.models import PLE
from mtlbook.train import Trainer, TrainerConfig
from mtlbook.train.callbacks import HOOKS, Callback, EarlyStopping, Phase2Freeze

from _tiny import NAMES, SPECS, make_dataset


def make_model() -> PLE:
    torch.manual_seed(0)
    return PLE(5, SPECS, n_levels=1, n_shared_experts=2, expert_hidden=(8,), expert_dim=6, tower_hidden=(6,))


def config(**overrides) -> TrainerConfig:
    cfg = dict(phase1_epochs=2, phase2_epochs=1, batch_size=32, lr=5e-3, warmup_epochs=1, phase2_warmup_epochs=1,
               progress=False, patience=None, seed=3)  # fmt: skip
    cfg.update(overrides)
    return TrainerConfig(**cfg)


def test_a_callback_defined_here_sees_every_hook_in_order(tmp_path):
    calls: list[tuple[str, int, int]] = []

    class Recorder(Callback):
        pass

    def recording(name):
        def hook(self, trainer, *args):
            calls.append((name, trainer.phase, trainer.epoch))

        return hook

    for name in HOOKS:
        setattr(Recorder, name, recording(name))
    trainer = Trainer(make_model(), config(checkpoint_dir=str(tmp_path)))
    trainer.fit(make_dataset(64), make_dataset(32, seed=1), callbacks=[Recorder()])
    names = [c[0] for c in calls]
    assert names[0] == "on_fit_start" and names[-1] == "on_fit_end"
    assert names.count("on_phase_start") == names.count("on_phase_end") == 2
    assert names.count("on_epoch_start") == names.count("on_epoch_end") == names.count("on_validation") == 3
    # 64 rows in batches of 32: two batches, two steps per epoch
    assert names.count("on_batch_start") == names.count("on_batch_end") == names.count("on_after_backward") == 6
    assert names.count("on_before_optimizer_step") == 6
    first_epoch = names[names.index("on_epoch_start"):names.index("on_epoch_end") + 1]
    assert first_epoch == ["on_epoch_start", "on_batch_start", "on_after_backward", "on_before_optimizer_step",
                           "on_batch_end", "on_batch_start", "on_after_backward", "on_before_optimizer_step",
                           "on_batch_end", "on_validation", "on_save_checkpoint", "on_epoch_end"]  # fmt: skip
    # the epoch is counted between on_validation and on_epoch_end
    validation = [c for c in calls if c[0] == "on_validation"]
    ends = [c for c in calls if c[0] == "on_epoch_end"]
    assert [c[2] for c in validation] == [0, 1, 2] and [c[2] for c in ends] == [1, 2, 3]
    assert [c[1] for c in calls if c[0] == "on_phase_start"] == [1, 2]
    # resuming hands the callbacks their state back
    calls.clear()
    Trainer(make_model(), config(checkpoint_dir=str(tmp_path))).fit(
        make_dataset(64), resume_from=tmp_path / "last.pt", callbacks=[Recorder()])
    assert "on_load_checkpoint" in [c[0] for c in calls]


def test_callbacks_must_be_callback_objects():
    with pytest.raises(TypeError, match="callbacks must be a list of Callback"):
        Trainer(make_model(), config(), callbacks=[object()])
    with pytest.raises(TypeError, match="callbacks must be a list of Callback"):
        Trainer(make_model(), config()).fit(make_dataset(32), callbacks=Callback())


def test_the_config_builds_the_default_callbacks():
    trainer = Trainer(make_model(), config(), adatt=AdaptiveTaskTransfer(NAMES))
    kinds = [type(cb).__name__ for cb in trainer.callbacks]
    assert kinds == ["Phase2Freeze", "AdaTTSchedule", "EarlyStopping", "HistoryRecorder"]
    assert isinstance(trainer.callbacks[0], Phase2Freeze) and trainer.early_stopping is trainer.callbacks[2]
    assert isinstance(trainer.early_stopping, EarlyStopping)


def test_a_callback_can_stop_a_phase():
    class StopAtOnce(Callback):
        def wants_stop(self, trainer):
            return trainer.phase == 1 and trainer.phase_epoch >= 1

    history = Trainer(make_model(), config(phase1_epochs=4)).fit(make_dataset(64), callbacks=[StopAtOnce()])
    assert [r["phase"] for r in history] == [1, 2]


def test_the_pipeline_stages_compose_to_the_trainers_objective():
    trainer = Trainer(make_model(), config(gate_entropy_weight=0.1), adatt=AdaptiveTaskTransfer(NAMES))
    batch = make_dataset(32).collate(range(32))
    outputs = trainer.model(batch.inputs)
    terms = trainer.pipeline(outputs, batch, step=1)  # step 1: not a measuring step
    raw = trainer.pipeline.task_losses(outputs, batch)
    torch.testing.assert_close(terms.raw, raw)
    weighted = trainer.balancer.weight_losses(raw.float() * trainer.pipeline.fixed_weights, terms.present)
    torch.testing.assert_close(terms.weighted, weighted)
    final = trainer.adatt.compute_transfer_loss(weighted, present=terms.present)
    torch.testing.assert_close(terms.final, final)
    expected = final.sum() - 0.1 * trainer.model.gate_entropy().float()
    torch.testing.assert_close(terms.objective, expected)
    assert float(terms.objective.detach()) != float(final.sum().detach())  # the gate term is really there
