"""What a trainer checkpoint holds, and how a trainer is put back into that state.

A checkpoint holds everything needed to continue bit-exactly: the model with its buffers,
adaTT, the balancer, the optimizer, scheduler and scaler (rebuilt by parameter name when
``fit`` continues the phase), every RNG including the loader's shuffling generator, phase,
epoch, step, the callbacks' state (``on_save_checkpoint``) and the history. Its fingerprint
(tensor names and shapes, the config, the tasks, dropout rates, adaTT's hyperparameters)
must match the resuming trainer's.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from mtlbook.train.checkpoint import capture_rng_state, check_fingerprint, model_fingerprint, restore_rng_state
from mtlbook.train.config import CONFIG_FIELDS_ADDED_LATER, RESUME_MUTABLE_FIELDS
from mtlbook.train.history import History

__all__ = ["CHECKPOINT_FORMAT", "fingerprint", "restore_trainer_state", "trainer_state"]

CHECKPOINT_FORMAT = "mtlbook.trainer/1"
#: adaTT hyperparameters compared when a checkpoint is resumed.
ADATT_SETTINGS = ("transfer_lambda", "temperature", "negative_threshold", "grad_interval", "max_transfer_ratio",
                  "warmup_epochs", "freeze_epoch", "prior_blend_start", "prior_blend_end", "blocking")  # fmt: skip


def fingerprint(trainer: Any) -> dict[str, Any]:
    """What a resumed run must share: tensor names and shapes, the config, the tasks
    (kind, classes), the model's dropout rates and adaTT's hyperparameters."""
    settings: dict[str, Any] = {
        "tasks": [[s.name, s.kind, s.n_classes] for s in trainer.task_specs],
        "dropout": [float(m.p) for m in trainer.model.modules() if isinstance(m, nn.Dropout)],
    }
    if trainer.adatt is not None:
        settings["adatt"] = {name: getattr(trainer.adatt, name) for name in ADATT_SETTINGS
                             if isinstance(getattr(trainer.adatt, name, None), (int, float, str, bool))}  # fmt: skip
    return {
        "tensors": model_fingerprint(("model", trainer.model), ("adatt", trainer.adatt), ("balancer", trainer.balancer)),
        "config": trainer.config.to_dict(),
        "settings": settings,
    }


def trainer_state(trainer: Any) -> dict[str, Any]:
    """Everything :func:`restore_trainer_state` needs to continue the run exactly (plain types only)."""
    optim = trainer._pending_optim
    if trainer.optimizer is not None:
        optim = {
            "groups": [dict(g) for g in trainer._group_param_names],
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        }
    # outside fit, a loaded-but-not-yet-used RNG snapshot (loader included) is kept as is
    keep_rng = trainer._pending_rng is not None and trainer._loader_generator is None
    state = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint(trainer),
        "model": trainer.model.state_dict(),
        "adatt": None if trainer.adatt is None else trainer.adatt.state_dict(),
        "balancer": trainer.balancer.state_dict(),
        "optim": optim,
        "rng": trainer._pending_rng if keep_rng else capture_rng_state(trainer._loader_generator),
        "trainer": {"phase": trainer.phase, "phase_epoch": trainer.phase_epoch, "epoch": trainer.epoch,
                    "step": trainer.step, "batches_seen": trainer.batches_seen},  # fmt: skip
    }
    trainer.emit("on_save_checkpoint", state)
    state["history"] = trainer.history.to_dict()
    return state


def restore_trainer_state(trainer: Any, state: Mapping[str, Any]) -> None:
    """Inverse of :func:`trainer_state`: a checkpoint of another model or configuration is refused."""
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not an mtlbook trainer checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    stored = dict(state["fingerprint"])
    # a checkpoint written before a config field existed implies that field's old default
    stored["config"] = {**CONFIG_FIELDS_ADDED_LATER, **dict(stored.get("config", {}))}
    check_fingerprint(stored, fingerprint(trainer), ignore=RESUME_MUTABLE_FIELDS)
    trainer.model.load_state_dict(state["model"])
    if trainer.adatt is not None:
        trainer.adatt.load_state_dict(state["adatt"])
    trainer.balancer.load_state_dict(state["balancer"])
    counters = state["trainer"]
    trainer.phase, trainer.phase_epoch, trainer.epoch = int(counters["phase"]), int(counters["phase_epoch"]), int(counters["epoch"])
    trainer.step, trainer.batches_seen = int(counters["step"]), int(counters["batches_seen"])
    trainer.emit("on_load_checkpoint", state)
    trainer.history = History.from_dict(state["history"])
    # the optimizer is rebuilt (same groups, by name) when fit continues the phase
    trainer.optimizer = trainer.scheduler = trainer.scaler = None
    trainer._pending_optim = state["optim"]
    trainer._pending_rng = state["rng"]
    restore_rng_state(state["rng"])
    trainer._resumed = True
    trainer._epoch_in_progress = None
