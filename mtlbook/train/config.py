"""Every knob of the trainer in one validated dataclass (chapter 7).

The defaults restate the trainer design of GUIDE section 4: two phases (15 epochs of
shared pretraining, then 8 of task finetuning), AdamW at ``lr = 5e-4`` with weight decay
0.01, gradient clipping at norm 5, a 5-epoch linear warmup from ``0.1 * lr`` into cosine
annealing with warm restarts (``T_0 = 10``, ``T_mult = 2``), a 2-epoch warmup into plain
cosine in phase 2, and uncertainty weighting as the loss balancer.

A :class:`TrainerConfig` only holds plain Python values (numbers, strings, dicts, tuples),
so :meth:`TrainerConfig.to_dict` can be stored inside a checkpoint and compared when a run
is resumed. Checks that need the model (does expert 3 exist? is ``"ctr"`` a task?) run
when a :class:`~mtlbook.train.trainer.Trainer` is built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, KeysView, Mapping

import torch

from mtlbook._checks import fail
from mtlbook.balancing import BALANCERS
from mtlbook.losses import LOSSES

__all__ = [
    "ADATT_SYNC_MODES",
    "AMP_MODES",
    "BALANCER_NAMES",
    "EARLY_STOPPING_MODES",
    "TrainerConfig",
]

#: Loss balancers the trainer can build: a live view of the names in
#: :data:`mtlbook.balancing.BALANCERS` (see :func:`mtlbook.balancing.register_balancer`).
BALANCER_NAMES: KeysView[str] = BALANCERS.keys()
#: ``"auto"`` = fp16 with a GradScaler on CUDA, full float32 on CPU.
AMP_MODES: tuple[str, ...] = ("auto", "off", "bf16", "fp16")
#: ``"auto"`` = ``"max"`` for AUC and accuracy monitors, ``"min"`` for losses and RMSE.
EARLY_STOPPING_MODES: tuple[str, ...] = ("auto", "min", "max")
#: How adaTT's affinity is made identical on every rank of a distributed run (see
#: :mod:`mtlbook.train.distributed`): ``"exact"`` all-reduces the per-task gradients,
#: ``"cheap"`` all-reduces each rank's cosine matrix.
ADATT_SYNC_MODES: tuple[str, ...] = ("exact", "cheap")

# Fields that may change between an interrupted run and its resumption: they steer where
# and how loudly a run reports, not what it computes.
RESUME_MUTABLE_FIELDS: frozenset[str] = frozenset(
    {"progress", "checkpoint_dir", "checkpoint_every", "device", "ddp_find_unused_parameters", "ddp_timeout_s",
     "compile_forward"}
)
#: Fields added after checkpoints already existed, with the value an older checkpoint implies.
CONFIG_FIELDS_ADDED_LATER: dict[str, Any] = {"adatt_sync": "exact", "ddp_find_unused_parameters": False,
                                             "ddp_timeout_s": 1800.0, "adatt_gate_cofreeze": True,
                                             "gate_freeze_epoch": None, "compile_forward": False}


def _fail(field_name: str, expected: str, value: Any) -> None:
    fail(f"TrainerConfig.{field_name}", expected, value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(value: Any, field_name: str, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        _fail(field_name, f"an int >= {minimum}", value)


def _check_positive(value: Any, field_name: str) -> None:
    if not _is_number(value) or value <= 0:
        _fail(field_name, "a finite number > 0", value)


#: Largest accepted learning rate: AdamW moves a weight by about lr per step, so beyond it
#: the weights leave any sensible range within a few steps (and overflow soon after).
MAX_LR = 10.0


def _check_rate(value: Any, field_name: str) -> None:
    if not _is_number(value) or not 0 < value <= MAX_LR:
        _fail(field_name, f"a finite number in (0, {MAX_LR:g}]", value)


def _check_non_negative(value: Any, field_name: str) -> None:
    if not _is_number(value) or value < 0:
        _fail(field_name, "a finite number >= 0", value)


def _check_task_dict(value: Any, field_name: str) -> None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        _fail(field_name, "a dict keyed by task name (non-empty str)", value)


def _check_expert_dict(value: Any, field_name: str, positive: bool) -> None:
    if not isinstance(value, Mapping):
        _fail(field_name, "a dict {shared expert index (int >= 0): value}", value)
    for index, v in value.items():
        if not _is_int(index) or index < 0:
            _fail(field_name, "a dict keyed by shared expert index (int >= 0)", value)
        if not _is_number(v) or v < 0 or (positive and (v == 0 or v > MAX_LR)):
            _fail(f"{field_name}[{index}]", f"a finite number in (0, {MAX_LR:g}]" if positive else "a finite number >= 0", v)


@dataclass
class TrainerConfig:
    r"""Configuration of :class:`~mtlbook.train.trainer.Trainer`; invalid values raise ``ValueError``.


    **Phases**

    ``phase1_epochs``
        shared pretraining epochs; everything trains and adaTT is active.
    ``phase2_epochs``
        task finetuning epochs; shared experts and gates are frozen, adaTT is
        disabled. ``0`` skips the phase.

    **Data** (used when ``fit`` receives a :class:`~mtlbook.data.batch.MultiTaskDataset`)

    ``batch_size``
        training batch size.
    ``eval_batch_size``
        validation batch size (``None``: same as ``batch_size``).

    **Optimizer (AdamW)**

    ``lr``, ``weight_decay``, ``betas``
        AdamW hyperparameters for every group.
    ``expert_lr``
        ``{shared expert index: lr}`` overrides for that expert's param group.
    ``expert_weight_decay``
        ``{shared expert index: weight decay}`` overrides.
    ``grad_clip``
        max global gradient norm (``None`` disables clipping).
    ``accumulation_steps``
        micro-batches per optimizer step (each loss is divided by it).

    **Schedule** (stepped once per epoch; see :mod:`mtlbook.train.schedules`)

    ``warmup_epochs``
        phase-1 linear warmup length.
    ``warmup_start_factor``
        the warmup starts at ``warmup_start_factor * lr`` (both phases).
    ``cosine_t0``, ``cosine_t_mult``
        the warm-restart cosine after the phase-1 warmup.
    ``phase2_warmup_epochs``
        phase-2 linear warmup length, followed by plain cosine.
    ``min_lr``
        the floor of every cosine (``eta_min``).

    **Loss pipeline (per-task loss -> fixed weight -> balancer -> adaTT -> gate entropy)**

    ``losses``
        ``{task: loss name}`` from :data:`mtlbook.losses.LOSSES`; unnamed tasks use
        the default for their kind (binary: bce, regression: mse, multiclass: ce,
        contrastive: infonce).
    ``loss_kwargs``
        ``{task: {option: value}}`` passed to that task's loss, e.g.
        ``{"ctr": {"gamma": 2.0, "alpha": 0.25}}``.
    ``task_weights``
        ``{task: fixed weight c_i}`` (default 1).
    ``balancing``
        loss balancer name, any name registered in :data:`mtlbook.balancing.BALANCERS`.
    ``balancing_kwargs``
        extra keyword arguments for the balancer.
    ``gate_entropy_weight``
        :math:`\lambda_H` of the regulariser :math:`-\lambda_H H_{gate}`
        added to the objective, with :math:`H_{gate} \in [0, 1]` the mean normalised gate
        entropy (``model.gate_entropy()``). A positive value rewards gates that spread
        over their experts (against expert collapse), a negative one rewards peaked
        gates, ``0`` switches it off. The sources give no value; 0.01 keeps the term two
        orders of magnitude below a typical task loss.
    ``adatt``
        keyword arguments for :class:`~mtlbook.adatt.AdaptiveTaskTransfer` when the
        trainer should build one itself (``None``: no adaTT unless an instance is passed).
    ``adatt_gate_cofreeze``
        freeze the CGC gates when adaTT enters its frozen phase (the co-freeze contract,
        default ``True``); ``False`` leaves the gates training through phase 1 (an
        ablation: chapter 8's ``adatt_no_cofreeze``).
    ``gate_freeze_epoch``
        freeze the gates from this phase-1 epoch on (0-based, ``>= 1``), with or without
        adaTT; ``None`` (default): only the co-freeze freezes them in phase 1. Set to adaTT's
        ``freeze_epoch`` it reproduces the co-freeze without adaTT (chapter 8's ``ple_uw_freeze``).

    **Precision and device**

    ``amp``
        ``"auto"`` (fp16 + GradScaler on CUDA, off on CPU), ``"off"``, ``"bf16"``
        (autocast to bfloat16, no scaler; CPU or CUDA) or ``"fp16"`` (CUDA only).
    ``device``
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when available.
    ``compile_forward``
        run the forward pass and the task losses as one function compiled by
        ``torch.compile`` (:mod:`mtlbook.train.compiled`; default ``False``): fewer, fused ops, the same
        arithmetic to float rounding; the first step (and a new batch size) compiles. With
        adaTT, the steps on which it measures run eagerly; not under ``torchrun``.

    **Early stopping (on validation data only; never on test data)**

    ``monitor``
        ``"loss"`` (the sum of fixed-weighted validation losses) or
        ``"<task>/<metric>"`` with metric ``loss``, ``auc``, ``rmse`` or ``accuracy``.
    ``mode``
        ``"min"``, ``"max"`` or ``"auto"``.
    ``patience``
        epochs without improvement before the phase stops (``None``: never stop).
    ``min_delta``
        an improvement must beat the best value by more than this.
    ``restore_best``
        at the end of each phase, load the model weights of its best epoch. Only the
        model is rewound: the balancer and adaTT keep their latest state (rewinding adaTT
        would also rewind its epoch counter and phase schedule).

    **Checkpoints and reporting**

    ``checkpoint_dir``
        folder for ``last.pt`` (``None``: no automatic checkpoints).
    ``checkpoint_every``
        write a checkpoint every this many epochs.
    ``seed``
        seeds torch, numpy and ``random`` when a fresh ``fit`` starts (``None``: leave
        the global RNGs alone); also seeds the loader ``fit`` builds from a dataset.
    ``progress``
        show tqdm progress bars.

    **Distributed runs** (``torchrun``; ignored in a single process, see :mod:`mtlbook.train.distributed`)

    ``adatt_sync``
        ``"exact"`` (all-reduce the per-task gradients ``[n_tasks, d]`` before
        the cosine: the affinity of the global batch) or ``"cheap"`` (all-reduce the
        per-rank cosine matrices ``[n_tasks, n_tasks]``: an average of local affinities).
    ``ddp_find_unused_parameters``
        passed to ``DistributedDataParallel``. Leave it False
        for mtlbook models (every trainable parameter gets a gradient, also from a task
        without targets in the batch); set it for a custom model whose forward skips
        trainable parameters on some batches.
    ``ddp_timeout_s``
        how long a collective may wait for the other ranks before the run fails (seconds,
        default 1800, torch's own default); lower it to learn of a dead rank sooner.
    """

    phase1_epochs: int = 15
    phase2_epochs: int = 8
    batch_size: int = 256
    eval_batch_size: int | None = None
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    expert_lr: dict[int, float] = field(default_factory=dict)
    expert_weight_decay: dict[int, float] = field(default_factory=dict)
    grad_clip: float | None = 5.0
    accumulation_steps: int = 1
    warmup_epochs: int = 5
    warmup_start_factor: float = 0.1
    cosine_t0: int = 10
    cosine_t_mult: int = 2
    phase2_warmup_epochs: int = 2
    min_lr: float = 0.0
    losses: dict[str, str] = field(default_factory=dict)
    loss_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_weights: dict[str, float] = field(default_factory=dict)
    balancing: str = "uncertainty"
    balancing_kwargs: dict[str, Any] = field(default_factory=dict)
    gate_entropy_weight: float = 0.01
    adatt: dict[str, Any] | None = None
    adatt_gate_cofreeze: bool = True
    gate_freeze_epoch: int | None = None
    amp: str = "auto"
    device: str | None = None
    compile_forward: bool = False
    monitor: str = "loss"
    mode: str = "auto"
    patience: int | None = 5
    min_delta: float = 0.0
    restore_best: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    seed: int | None = 0
    progress: bool = True
    adatt_sync: str = "exact"
    ddp_find_unused_parameters: bool = False
    ddp_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        _check_int(self.phase1_epochs, "phase1_epochs", 0)
        _check_int(self.phase2_epochs, "phase2_epochs", 0)
        _check_int(self.batch_size, "batch_size", 1)
        if self.eval_batch_size is not None:
            _check_int(self.eval_batch_size, "eval_batch_size", 1)
        _check_rate(self.lr, "lr")
        _check_non_negative(self.weight_decay, "weight_decay")
        betas = self.betas
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)
        ):
            _fail("betas", "two numbers in [0, 1)", betas)
        self.betas = (float(betas[0]), float(betas[1]))
        _check_expert_dict(self.expert_lr, "expert_lr", positive=True)
        _check_expert_dict(self.expert_weight_decay, "expert_weight_decay", positive=False)
        if self.grad_clip is not None:
            _check_positive(self.grad_clip, "grad_clip")
        _check_int(self.accumulation_steps, "accumulation_steps", 1)
        _check_int(self.warmup_epochs, "warmup_epochs", 0)
        if not _is_number(self.warmup_start_factor) or not 0.0 < self.warmup_start_factor <= 1.0:
            _fail("warmup_start_factor", "a number in (0, 1]", self.warmup_start_factor)
        _check_int(self.cosine_t0, "cosine_t0", 1)
        _check_int(self.cosine_t_mult, "cosine_t_mult", 1)
        _check_int(self.phase2_warmup_epochs, "phase2_warmup_epochs", 0)
        _check_non_negative(self.min_lr, "min_lr")
        if self.min_lr >= self.lr:
            _fail("min_lr", f"a number in [0, lr = {self.lr})", self.min_lr)

        _check_task_dict(self.losses, "losses")
        for task, name in self.losses.items():
            if name not in LOSSES:
                _fail(f"losses[{task!r}]", f"one of {sorted(LOSSES)}", name)
        _check_task_dict(self.loss_kwargs, "loss_kwargs")
        for task, kwargs in self.loss_kwargs.items():
            if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
                _fail(f"loss_kwargs[{task!r}]", "a dict of keyword arguments", kwargs)
        _check_task_dict(self.task_weights, "task_weights")
        for task, w in self.task_weights.items():
            _check_non_negative(w, f"task_weights[{task!r}]")
        if not isinstance(self.balancing, str) or self.balancing not in BALANCERS:
            _fail("balancing", f"a registered balancer name, one of {sorted(BALANCERS)}", self.balancing)
        if not isinstance(self.balancing_kwargs, Mapping) or not all(isinstance(k, str) for k in self.balancing_kwargs):
            _fail("balancing_kwargs", "a dict of keyword arguments", self.balancing_kwargs)
        if not _is_number(self.gate_entropy_weight):
            _fail("gate_entropy_weight", "a finite number", self.gate_entropy_weight)
        if self.adatt is not None and (
            not isinstance(self.adatt, Mapping) or not all(isinstance(k, str) for k in self.adatt)
        ):
            _fail("adatt", "None or a dict of AdaptiveTaskTransfer keyword arguments", self.adatt)

        if self.amp not in AMP_MODES:
            _fail("amp", f"one of {AMP_MODES}", self.amp)
        if self.device is not None and (not isinstance(self.device, str) or not self.device):
            _fail("device", "None or a device string such as 'cpu' or 'cuda'", self.device)
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                _fail("device", "None or a device string torch knows, such as 'cpu', 'cuda', 'cuda:1' or 'mps'", self.device)
        if self.amp == "fp16" and self.device is not None and self.device.startswith("cpu"):
            _fail("amp", "'off', 'bf16' or 'auto' on a CPU device (fp16 autocast needs CUDA)", self.amp)

        if not isinstance(self.monitor, str) or not self.monitor:
            _fail("monitor", "'loss' or '<task>/<metric>'", self.monitor)
        if self.monitor != "loss":
            task, _, metric = self.monitor.rpartition("/")
            if not task or metric not in ("loss", "auc", "rmse", "accuracy"):
                _fail("monitor", "'loss' or '<task>/<metric>' with metric in loss, auc, rmse, accuracy", self.monitor)
        if self.mode not in EARLY_STOPPING_MODES:
            _fail("mode", f"one of {EARLY_STOPPING_MODES}", self.mode)
        if self.patience is not None:
            _check_int(self.patience, "patience", 1)
        _check_non_negative(self.min_delta, "min_delta")
        if not isinstance(self.restore_best, bool):
            _fail("restore_best", "a bool", self.restore_best)
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            self.checkpoint_dir = _path_str(self.checkpoint_dir)
        _check_int(self.checkpoint_every, "checkpoint_every", 1)
        if self.seed is not None:
            _check_int(self.seed, "seed", 0)
        if not isinstance(self.progress, bool):
            _fail("progress", "a bool", self.progress)
        if not isinstance(self.compile_forward, bool):
            _fail("compile_forward", "a bool", self.compile_forward)
        if not isinstance(self.adatt_gate_cofreeze, bool):
            _fail("adatt_gate_cofreeze", "a bool", self.adatt_gate_cofreeze)
        if self.gate_freeze_epoch is not None:
            _check_int(self.gate_freeze_epoch, "gate_freeze_epoch", 1)
        if self.adatt_sync not in ADATT_SYNC_MODES:
            _fail("adatt_sync", f"one of {ADATT_SYNC_MODES}", self.adatt_sync)
        if not isinstance(self.ddp_find_unused_parameters, bool):
            _fail("ddp_find_unused_parameters", "a bool", self.ddp_find_unused_parameters)
        if not _is_number(self.ddp_timeout_s) or self.ddp_timeout_s <= 0:
            _fail("ddp_timeout_s", "a finite number of seconds > 0", self.ddp_timeout_s)

    # ------------------------------------------------------------------ derived values
    @property
    def total_epochs(self) -> int:
        """``phase1_epochs + phase2_epochs``."""
        return self.phase1_epochs + self.phase2_epochs

    @property
    def resolved_mode(self) -> str:
        """``"min"`` or ``"max"``: the early-stopping direction after resolving ``"auto"``."""
        if self.mode != "auto":
            return self.mode
        return "max" if self.monitor.endswith(("/auc", "/accuracy")) else "min"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python copy (dicts, lists, numbers, strings): safe for ``weights_only`` loads."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainerConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"TrainerConfig.from_dict got unknown fields {unknown}")
        kwargs = dict(data)
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        for key in ("expert_lr", "expert_weight_decay"):
            if key in kwargs:
                kwargs[key] = {int(k): v for k, v in kwargs[key].items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "TrainerConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _path_str(value: Any) -> str:
    import os

    try:
        return os.fspath(value)
    except TypeError:
        _fail("checkpoint_dir", "None or a path", value)
        raise  # unreachable: _fail raises


def _plain(value: Any) -> Any:
    """Recursively turn tuples into lists and copy dicts, so equality ignores container type."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
