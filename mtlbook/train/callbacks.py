"""Callbacks: everything the training loop does besides the loss, the backward and the step.

The loop in :class:`~mtlbook.train.Trainer` is flat (``fit`` -> phases -> epochs ->
batches) and calls each callback's hooks at fixed points, in list order:

=============================  ==============================================================
hook                           when
=============================  ==============================================================
``on_fit_start``               ``fit`` begins (after a resume was loaded)
``on_phase_start``             a phase (1 or 2) begins or resumes, before its optimizer exists
``on_epoch_start``             the phase's optimizer is built, before the first batch
``on_batch_start``             before the forward pass of a batch
``on_after_backward``          after the backward of a (micro-)batch
``on_before_optimizer_step``   gradients complete, before they are clipped and applied
``on_batch_end``               after a batch (``terms`` is ``None`` when it was skipped)
``on_validation``              the epoch's record (train and validation metrics) is complete;
                               the epoch is not yet counted: judge it here
``on_epoch_end``               the epoch is counted (``trainer.epoch`` advanced)
``on_phase_end``               the phase ran all its epochs or stopped early
``on_fit_end``                 ``fit`` ends, also after an exception (a ``finally``)
``on_save_checkpoint``         add this callback's state to the checkpoint dict
``on_load_checkpoint``         take it back from a loaded checkpoint dict
=============================  ==============================================================

A callback asks the loop to end the phase by returning True from :meth:`Callback.wants_stop`.
The config builds the default list (:func:`default_callbacks`): phase-2 freeze, adaTT
schedule with the gate co-freeze, the gate clock, early stopping, history, checkpointing and
progress bars; ``Trainer(..., callbacks=[...])`` and ``fit(..., callbacks=[...])`` append to it.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from torch import Tensor
from tqdm.auto import tqdm

from mtlbook.train.guards import TrainingWarning

if TYPE_CHECKING:  # pragma: no cover
    from mtlbook.data.batch import Batch
    from mtlbook.train.pipeline import LossTerms
    from mtlbook.train.trainer import Trainer

__all__ = [
    "AdaTTSchedule",
    "Callback",
    "Checkpointing",
    "EarlyStopping",
    "GateFreezeClock",
    "HistoryRecorder",
    "HOOKS",
    "Phase2Freeze",
    "ProgressBar",
    "default_callbacks",
]

#: Every hook, in the order a one-epoch, one-batch phase calls them.
HOOKS = ("on_fit_start", "on_phase_start", "on_epoch_start", "on_batch_start", "on_after_backward",
         "on_before_optimizer_step", "on_batch_end", "on_validation", "on_epoch_end", "on_phase_end",
         "on_fit_end", "on_save_checkpoint", "on_load_checkpoint")  # fmt: skip


class Callback:
    """Base class: every hook does nothing. Override the ones you need."""

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_fit_end(self, trainer: Trainer) -> None: ...
    def on_phase_start(self, trainer: Trainer) -> None: ...
    def on_phase_end(self, trainer: Trainer) -> None: ...
    def on_epoch_start(self, trainer: Trainer) -> None: ...
    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None: ...
    def on_batch_start(self, trainer: Trainer, batch: Batch) -> None: ...
    def on_batch_end(self, trainer: Trainer, batch: Batch, terms: LossTerms | None) -> None: ...
    def on_after_backward(self, trainer: Trainer) -> None: ...
    def on_before_optimizer_step(self, trainer: Trainer) -> None: ...
    def on_validation(self, trainer: Trainer, record: dict[str, Any]) -> None: ...
    def on_save_checkpoint(self, trainer: Trainer, state: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, trainer: Trainer, state: Mapping[str, Any]) -> None: ...

    def wants_stop(self, trainer: Trainer) -> bool:
        """True ends the current phase after this epoch (early stopping)."""
        return False


# ---------------------------------------------------------------------------- phase 2
class Phase2Freeze(Callback):
    """Phase 2 trains the task side only: shared experts and gates frozen (left out of the
    optimizer), adaTT disabled. Whatever happens in phase 2 (also an exception), ``fit``'s
    end gives back the trainability they had before. The undo record lives in checkpoints
    (``trainer.phase2_undo``) so a run resumed inside phase 2 can undo it too."""

    def on_phase_start(self, trainer: Trainer) -> None:
        if trainer.phase != 2:
            return
        model = trainer.model
        if trainer.phase2_undo is None:
            shared = {id(p) for p in model.shared_parameters()}
            trainer.phase2_undo = {
                "unfreeze": [f"model.{n}" for n, p in model.named_parameters() if id(p) in shared and p.requires_grad],
                "gates_frozen": bool(model.gates_frozen),
                "adatt_enabled": None if trainer.adatt is None else bool(trainer.adatt.enabled),
            }
        for p in model.shared_parameters():
            p.requires_grad_(False)
        model.freeze_gates(True)
        if trainer.adatt is not None:
            trainer.adatt.disable()

    def on_fit_end(self, trainer: Trainer) -> None:
        """Undo :meth:`on_phase_start` (runs in a ``finally``: must not raise on partial state)."""
        undo, trainer.phase2_undo = trainer.phase2_undo, None
        if undo is None:
            return
        named = trainer.named_trainables()
        for name in undo["unfreeze"]:
            if name in named:
                named[name].requires_grad_(True)
        trainer.model.freeze_gates(bool(undo["gates_frozen"]))
        if trainer.adatt is not None and undo["adatt_enabled"]:
            trainer.adatt.enable()

    def on_save_checkpoint(self, trainer: Trainer, state: dict[str, Any]) -> None:
        state["trainer"]["phase2_undo"] = trainer.phase2_undo

    def on_load_checkpoint(self, trainer: Trainer, state: Mapping[str, Any]) -> None:
        trainer.phase2_undo = state["trainer"]["phase2_undo"]


# ---------------------------------------------------------------------------- adaTT and gates
class AdaTTSchedule(Callback):
    """adaTT's epoch clock (warmup -> dynamic -> frozen) in phase 1, and the co-freeze
    contract: once adaTT is frozen, the gates freeze with it (``cofreeze=False`` is an
    ablation that leaves them training)."""

    def __init__(self, cofreeze: bool = True) -> None:
        self.cofreeze = bool(cofreeze)

    def _sync(self, trainer: Trainer) -> None:
        adatt = trainer.adatt
        if self.cofreeze and adatt is not None and adatt.phase == "frozen" and not bool(trainer.model.gates_frozen):
            trainer.model.freeze_gates(True)

    def on_epoch_start(self, trainer: Trainer) -> None:
        self._sync(trainer)  # a resumed run, or a new phase, keeps the contract

    def on_validation(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.adatt is not None and trainer.phase == 1:
            trainer.adatt.on_epoch_end(record["epoch"])
            self._sync(trainer)


class GateFreezeClock(Callback):
    """The gate clock: gates frozen from phase-1 epoch ``freeze_epoch`` on (0-based count of
    finished epochs), independently of adaTT."""

    def __init__(self, freeze_epoch: int) -> None:
        self.freeze_epoch = int(freeze_epoch)

    def on_validation(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.phase == 1 and record["epoch"] + 1 >= self.freeze_epoch:
            trainer.model.freeze_gates(True)


# ---------------------------------------------------------------------------- early stopping
class EarlyStopping(Callback):
    """Patience-based stopping on one monitored value, keeping a copy of the best weights.

    ``update(value, epoch, state)`` returns True when ``value`` improves on the best so far
    by more than ``min_delta`` (``value < best - min_delta`` in ``"min"`` mode, ``value >
    best + min_delta`` in ``"max"`` mode); a NaN never improves. After ``patience`` updates
    in a row without improvement, ``stopped`` becomes True (``patience=None``: never).

    As a callback it watches ``monitor`` in the validation metrics (none without validation
    data): a non-finite value warns once, is marked ``monitor_nan`` and counts neither as an
    improvement nor toward ``patience``. At the end of a phase it loads the phase's best
    weights when ``restore_best`` (keeping the current gate-freeze flag); phase 2 starts
    afresh.
    """

    def __init__(self, mode: str = "min", patience: int | None = 5, min_delta: float = 0.0, *,
                 monitor: str = "loss", restore_best: bool = True) -> None:  # fmt: skip
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience must be None or an int >= 1, got {patience!r}")
        if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self.mode, self.patience, self.min_delta = mode, patience, float(min_delta)
        self.monitor, self.restore_best = monitor, bool(restore_best)
        self._warned = False
        self.reset()

    def reset(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.stopped = False
        self.best_state: dict[str, Tensor] | None = None

    def is_improvement(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, epoch: int, state: Mapping[str, Tensor] | None = None) -> bool:
        improved = self.is_improvement(value)
        if improved:
            self.best, self.best_epoch, self.bad_epochs = float(value), int(epoch), 0
            if state is not None:
                self.best_state = {k: v.detach().clone() for k, v in state.items()}
        else:
            self.bad_epochs += 1
            if self.patience is not None and self.bad_epochs >= self.patience:
                self.stopped = True
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "stopped": self.stopped, "best_state": self.best_state}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = int(state["bad_epochs"])
        self.stopped = bool(state["stopped"])
        self.best_state = state["best_state"]

    # -- hooks
    def wants_stop(self, trainer: Trainer) -> bool:
        return self.stopped

    def on_phase_start(self, trainer: Trainer) -> None:
        if trainer.phase == 2 and trainer.phase_epoch == 0 and trainer.optimizer is None:
            self.reset()  # the phase boundary: early stopping starts afresh

    def on_validation(self, trainer: Trainer, record: dict[str, Any]) -> None:
        record["best"], record["stopped_early"], record["monitor_nan"] = False, False, False
        val = record["val"]
        if val is None:
            return
        if self.monitor not in val:
            raise ValueError(f"TrainerConfig.monitor={self.monitor!r} is not a validation metric; available: {sorted(val)}")
        value = float(val[self.monitor])
        if math.isfinite(value):
            state = trainer.model.state_dict() if self.restore_best else None
            record["best"] = self.update(value, record["epoch"], state)
        else:
            # neither an improvement nor a bad epoch: recorded, warned about, not counted
            record["monitor_nan"] = True
            if not self._warned and trainer.is_main_process:
                self._warned = True
                warnings.warn(
                    f"validation metric {self.monitor!r} = {value} in epoch {record['epoch']} (empty validation data, "
                    "a NaN target, or an AUC on a single class?); such epochs count neither as an improvement nor "
                    "toward patience and are marked 'monitor_nan' in the history",
                    TrainingWarning,
                    stacklevel=2,
                )
        record["stopped_early"] = self.stopped

    def on_phase_end(self, trainer: Trainer) -> None:
        if self.restore_best and self.best_state is not None:
            frozen = bool(trainer.model.gates_frozen)
            trainer.model.load_state_dict(self.best_state)
            trainer.model.freeze_gates(frozen)

    def on_save_checkpoint(self, trainer: Trainer, state: dict[str, Any]) -> None:
        state["trainer"]["early_stopping"] = self.state_dict()

    def on_load_checkpoint(self, trainer: Trainer, state: Mapping[str, Any]) -> None:
        self.load_state_dict(state["trainer"]["early_stopping"])


# ---------------------------------------------------------------------------- bookkeeping
class HistoryRecorder(Callback):
    """Times each epoch and appends its record to ``trainer.history``."""

    def __init__(self) -> None:
        self._started = time.perf_counter()

    def on_epoch_start(self, trainer: Trainer) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        record["time_s"] = time.perf_counter() - self._started
        trainer.history.append(record)


class Checkpointing(Callback):
    """Writes ``last.pt`` every ``every`` epochs (atomically, main process only). When a
    phase ends on restored best weights, ``last.pt`` of its last epoch is rewritten so it
    holds the weights ``fit`` returns (resuming from it restores them again: idempotent)."""

    def __init__(self, path: Any, every: int = 1) -> None:
        self.path, self.every = path, int(every)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.epoch % self.every == 0:
            trainer.save_checkpoint(self.path)

    def on_phase_end(self, trainer: Trainer) -> None:
        stopping = trainer.early_stopping
        if stopping.restore_best and stopping.best_state is not None and trainer.epoch % self.every == 0:
            trainer.save_checkpoint(self.path)  # replaces the one of the phase's last epoch


class ProgressBar(Callback):
    """tqdm bars: one over all epochs, one over the batches of the running epoch."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.epoch_bar: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=trainer.config.total_epochs, initial=trainer.epoch, desc="epochs", dynamic_ncols=True)

    def on_epoch_start(self, trainer: Trainer) -> None:
        total = len(trainer.train_loader) if hasattr(trainer.train_loader, "__len__") else None
        self.epoch_bar = tqdm(total=total, desc=f"epoch {trainer.epoch}", leave=False)

    def on_batch_end(self, trainer: Trainer, batch: Batch, terms: LossTerms | None) -> None:
        if self.epoch_bar is not None:
            self.epoch_bar.update(1)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.epoch_bar is not None:
            self.epoch_bar.close()
            self.epoch_bar = None
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(phase=record["phase"], loss=f"{record['train']['loss']:.4g}")

    def on_fit_end(self, trainer: Trainer) -> None:
        for bar in (self.epoch_bar, self.bar):
            if bar is not None:
                bar.close()
        self.bar = self.epoch_bar = None


def default_callbacks(config: Any, has_adatt: bool, is_main: bool) -> list[Callback]:
    """The callbacks ``config`` asks for, in the order the loop calls them."""
    callbacks: list[Callback] = [Phase2Freeze()]
    if has_adatt:
        callbacks.append(AdaTTSchedule(cofreeze=config.adatt_gate_cofreeze))
    if config.gate_freeze_epoch is not None:
        callbacks.append(GateFreezeClock(config.gate_freeze_epoch))
    callbacks.append(EarlyStopping(config.resolved_mode, config.patience, config.min_delta,
                                   monitor=config.monitor, restore_best=config.restore_best))  # fmt: skip
    callbacks.append(HistoryRecorder())
    if config.checkpoint_dir is not None:
        from pathlib import Path

        callbacks.append(Checkpointing(Path(config.checkpoint_dir) / "last.pt", config.checkpoint_every))
    if config.progress and is_main:
        callbacks.append(ProgressBar())
    return callbacks


def check_callbacks(callbacks: Sequence[Any] | None, name: str = "callbacks") -> list[Callback]:
    """``callbacks`` as a list of :class:`Callback` (``None``: empty)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"{name} must be a list of Callback objects, got {type(callbacks).__name__}")
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"{name} must be a list of Callback objects, got an item of type {type(cb).__name__}")
    return list(callbacks)
