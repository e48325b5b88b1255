"""Training: the two-phase PLE + adaTT trainer, its loss pipeline, callbacks, config, schedules,
checkpoints and history (ch. 7).

Typical use::

    from mtlbook.train import Trainer, TrainerConfig

    config = TrainerConfig(phase1_epochs=15, phase2_epochs=8, adatt={"warmup_epochs": 2, "freeze_epoch": 10})
    trainer = Trainer(model, config)
    history = trainer.fit(train_dataset, val_dataset)

Plots of a :class:`History` live in :mod:`mtlbook.train.plots` (imported on demand, so
matplotlib is not loaded by ``import mtlbook.train``).
"""

from mtlbook.train.callbacks import Callback
from mtlbook.train.checkpoint import CheckpointError, atomic_save, load_file
from mtlbook.train.config import AMP_MODES, BALANCER_NAMES, TrainerConfig
from mtlbook.train.history import History
from mtlbook.train.metrics import accuracy, binary_auc, rmse
from mtlbook.train.schedules import build_phase1_scheduler, build_phase2_scheduler, phase1_lr, phase2_lr
from mtlbook.train.trainer import EarlyStopping, Trainer, TrainingDivergedError, TrainingWarning

__all__ = [
    "AMP_MODES",
    "BALANCER_NAMES",
    "Callback",
    "CheckpointError",
    "EarlyStopping",
    "History",
    "Trainer",
    "TrainerConfig",
    "TrainingDivergedError",
    "TrainingWarning",
    "accuracy",
    "atomic_save",
    "binary_auc",
    "build_phase1_scheduler",
    "build_phase2_scheduler",
    "load_file",
    "phase1_lr",
    "phase2_lr",
    "rmse",
]
