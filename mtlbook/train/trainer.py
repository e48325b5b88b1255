r"""The two-phase multi-task trainer with adaTT, loss balancing, guards and exact resumption.

**Loss pipeline** for one batch with tasks :math:`i = 1..n` (task-major vectors ``[n]``):

.. math::

    L_i &= \text{task loss of } i \text{ on its present rows (focal, bce, huber, mse, ce, infonce)} \\
    \ell_i &= c_i L_i \qquad\text{(fixed weight, } c_i = \text{config.task\_weights)} \\
    \tilde\ell &= \text{balancer}(\ell) \qquad\text{(default: } \tfrac{\ell_i}{2\sigma_i^2} + \tfrac12\log\sigma_i^2) \\
    \hat\ell_i &= \tilde\ell_i + \min\Bigl(\lambda \textstyle\sum_{j\ne i} w_{ij}\tilde\ell_j,\
                  \rho_{\max}\operatorname{sg}(\tilde\ell_i)\Bigr) \qquad\text{(adaTT, phase 1)} \\
    \mathcal L &= \textstyle\sum_i \hat\ell_i - \lambda_H H_{gate} \qquad
                  (H_{gate} = \texttt{model.gate\_entropy()} \in [0, 1],\
                  \lambda_H = \texttt{config.gate\_entropy\_weight})

Every ``grad_interval`` batches adaTT measures task affinity from the gradients of
:math:`\tilde\ell` on the shared experts, taken from the *same* forward pass (with
``retain_graph``) just before the transfer, so the optimizer step and the measurement see
the same batch. The balancer then runs the backward of :math:`\mathcal L / k` (``k`` =
``accumulation_steps``); GradNorm and PCGrad receive :math:`\tilde\ell` as their per-task
losses and treat the transfer and gate terms as extra terms.

**Two phases.** Phase 1 (``phase1_epochs``) trains everything with adaTT active; when adaTT
reaches its frozen phase the gates freeze with it (``model.freeze_gates(True)``; their
parameters stay in the optimizer but receive no gradient, and AdamW leaves a parameter
without gradient untouched, weight decay included). Phase 2 (``phase2_epochs``) freezes the
shared experts and the gates (``requires_grad=False``, left out of the optimizer) and
disables adaTT. At the boundary the optimizer, the scheduler, the GradScaler and early
stopping start afresh. Whatever happens in phase 2 (also an exception), a ``finally`` block
re-enables adaTT and gives the shared experts and gates back the trainability they had
before phase 2.

**Optimizer.** AdamW with one named param group per shared expert (``shared_expert_{i}``,
with ``config.expert_lr`` / ``config.expert_weight_decay`` overrides), then ``gates``,
``task`` (task experts and towers), ``balancer`` and ``adatt`` (weight decay 0: shrinking a
log-variance or a transfer logit toward 0 would bias it, not regularise it). Frozen
parameters are left out and empty groups dropped. Gradients are clipped to global norm
``config.grad_clip``.

**Schedule.** Stepped once per epoch; see :mod:`mtlbook.train.schedules`.

**Guards.** A batch whose loss is not finite is skipped (gradients zeroed, so the pending
accumulation window is dropped too; no weight changes) and counted in
``record["skipped_nan"]``; so is an optimizer step whose gradients are not finite (without
a GradScaler; with one, fp16 overflow is the scaler's normal business and is only counted
as ``amp_overflow``). An out-of-memory error in the forward/backward
(``torch.OutOfMemoryError`` or a ``RuntimeError`` mentioning "out of memory") skips the
batch the same way and is counted in ``record["skipped_oom"]``. ``fit`` warns at the end
if anything was skipped. In validation an out-of-memory batch is split in halves instead
(no row may be dropped from a metric). At the end of every epoch the weights are checked:
a non-finite value or a parameter beyond ``DIVERGED_WEIGHT`` raises
:class:`TrainingDivergedError` before any checkpoint could be written over the last good
one. A non-finite monitored validation metric warns once, is marked ``monitor_nan`` in the
record and counts neither as an improvement nor toward ``patience``. ``fit`` refuses data
with no rows or no present target, and a second call after an interrupted epoch.

**Checkpoints** hold everything needed to continue bit-exactly (model with buffers,
adaTT, balancer, optimizer, scheduler, scaler, every RNG including the loader's shuffling
generator, phase, epoch, step, early stopping, history), are written atomically and are
loaded with ``torch.load(weights_only=True)``. A checkpoint of another model or another
configuration is refused.

**Multi-process.** Under ``torchrun`` (world size > 1) the trainer joins the process
group, wraps the model in ``DistributedDataParallel``, shards a dataset with a
``DistributedSampler`` (``set_epoch`` every epoch), averages the balancer's and adaTT's
gradients itself, keeps adaTT's affinity identical on every rank
(``config.adatt_sync``), reduces every metric over the ranks, and lets only rank 0
(:attr:`Trainer.is_main_process`) write checkpoints, warn and show progress; see
:mod:`mtlbook.train.distributed`. In a single process none of this runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from mtlbook.balancing import build_balancer
from mtlbook.data.batch import Batch, MultiTaskDataset, make_loader
from mtlbook.losses import LOSS_TASK_KINDS, present_tasks, task_losses
from mtlbook.train.checkpoint import (
    CheckpointError,
    atomic_save,
    capture_rng_state,
    check_fingerprint,
    load_file,
    model_fingerprint,
    restore_rng_state,
)
from mtlbook.train.config import CONFIG_FIELDS_ADDED_LATER, RESUME_MUTABLE_FIELDS, TrainerConfig
from mtlbook.train.distributed import (
    DistributedContext,
    ShardSampler,
    any_rank,
    average_gradients,
    broadcast_tensors,
    gather_objects,
    init_distributed,
    measure_affinity,
    sum_over_ranks,
)
from mtlbook.train.history import History
from mtlbook.train.reweighting import loss_weight_snapshot
from mtlbook.train.metrics import METRIC_FOR_KIND, task_metric
from mtlbook.train.schedules import build_phase1_scheduler, build_phase2_scheduler

__all__ = ["CHECKPOINT_FORMAT", "EarlyStopping", "Trainer", "TrainingDivergedError", "TrainingWarning", "is_out_of_memory"]

CHECKPOINT_FORMAT = "mtlbook.trainer/1"
_REQUIRED_MODEL_API = ("task_names", "task_specs", "shared_parameters", "shared_experts", "gate_parameters",
                       "gate_entropy", "freeze_gates")  # fmt: skip


#: adaTT hyperparameters compared when a checkpoint is resumed.
_ADATT_SETTINGS = ("transfer_lambda", "temperature", "negative_threshold", "grad_interval", "max_transfer_ratio",
                   "warmup_epochs", "freeze_epoch", "prior_blend_start", "prior_blend_end", "blocking")  # fmt: skip


class TrainingWarning(UserWarning):
    """Emitted by :meth:`Trainer.fit` when batches were skipped."""


class TrainingDivergedError(RuntimeError):
    """The weights stopped being finite or exploded; the last checkpoint was left untouched."""


#: Largest absolute parameter value the divergence guard accepts; beyond it (or at a NaN/inf
#: in any parameter or buffer) training stops and no checkpoint is written.
DIVERGED_WEIGHT = 1e8


def is_out_of_memory(error: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and for a ``RuntimeError`` saying "out of memory"."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


# ---------------------------------------------------------------------------- early stopping
class EarlyStopping:
    """Patience-based stopping on one monitored value, keeping a copy of the best weights.

    ``update(value, state)`` returns True when ``value`` improves on the best so far by more
    than ``min_delta`` (``value < best - min_delta`` in ``"min"`` mode, ``value > best +
    min_delta`` in ``"max"`` mode); a NaN never improves. After ``patience`` updates in a row
    without improvement, ``stopped`` becomes True (``patience=None``: never).
    """

    def __init__(self, mode: str = "min", patience: int | None = 5, min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience must be None or an int >= 1, got {patience!r}")
        if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self.mode, self.patience, self.min_delta = mode, patience, float(min_delta)
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
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped": self.stopped,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = int(state["bad_epochs"])
        self.stopped = bool(state["stopped"])
        self.best_state = state["best_state"]


# ---------------------------------------------------------------------------- metric sums
class _MetricSums:
    """Per-task running sums over one pass (losses weighted by present rows, raw outputs kept)."""

    def __init__(self, task_specs, device: torch.device) -> None:
        self.specs = tuple(task_specs)
        n = len(self.specs)
        self.loss_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.rows = torch.zeros(n, dtype=torch.float64, device=device)
        self.outputs: dict[str, list[Tensor]] = {s.name: [] for s in self.specs if METRIC_FOR_KIND[s.kind]}
        self.targets: dict[str, list[Tensor]] = {name: [] for name in self.outputs}
        self.present: dict[str, list[Tensor]] = {name: [] for name in self.outputs}

    def add(self, losses: Tensor, outputs: Mapping[str, Tensor], batch: Batch) -> None:
        rows = torch.stack([batch.present[s.name].sum() for s in self.specs]).to(self.rows)
        self.loss_sum += losses.detach().double() * rows
        self.rows += rows
        for name in self.outputs:
            self.outputs[name].append(outputs[name].detach().float().cpu())
            self.targets[name].append(batch.targets[name].detach().cpu())
            self.present[name].append(batch.present[name].detach().cpu())


# ---------------------------------------------------------------------------- the trainer
class Trainer:
    """Train a multi-task model in two phases with adaTT, a loss balancer and safety guards.

    Args:
        model: an mtlbook multi-task model (``task_names``, ``task_specs``, ``forward(x) ->
            {task: output}``, ``shared_experts``, ``shared_parameters()``,
            ``gate_parameters()``, ``gate_entropy()``, ``freeze_gates()``). Moved to the
            trainer's device. The gate-entropy weight comes from the config; a model built
            with its own nonzero ``gate_entropy_weight`` triggers a warning (it is unused).
        config: a :class:`TrainerConfig` (default: all defaults).
        adatt: an :class:`~mtlbook.adatt.AdaptiveTaskTransfer` over the model's tasks, or
            ``None``. Alternatively set ``config.adatt`` to its keyword arguments and the
            trainer builds it (giving both raises ``ValueError``). The trainer attaches it
            to the model and calls its ``on_epoch_end`` after every phase-1 epoch.

    Attributes:
        history: the :class:`~mtlbook.train.history.History` (also returned by :meth:`fit`).
        balancer: the loss balancer built from ``config.balancing``.
        optimizer, scheduler, scaler: those of the current phase (``None`` before it starts;
            ``scaler`` is ``None`` unless fp16 autocast is used).
        phase, phase_epoch, epoch, step: current phase (1 or 2), epochs finished in it,
            epochs finished in total, optimizer steps taken.
        distributed: the :class:`~mtlbook.train.distributed.DistributedContext` of a
            multi-process run (``None`` in a single process). ``config.batch_size`` is then
            the batch of *one* rank; the global batch is ``world_size`` times larger.
    """

    def __init__(self, model: nn.Module, config: TrainerConfig | None = None, adatt: nn.Module | None = None) -> None:
        config = TrainerConfig() if config is None else config
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        missing = [name for name in _REQUIRED_MODEL_API if not hasattr(model, name)]
        if missing:
            raise TypeError(f"model lacks the multi-task interface: missing {missing}")
        self.config = config
        self.task_specs = tuple(model.task_specs)
        self.task_names = tuple(model.task_names)
        self._check_config_against_model(model)

        # None unless torchrun (or the caller) set up a process group of several ranks
        self.distributed: DistributedContext | None = init_distributed(device=config.device, timeout_s=config.ddp_timeout_s)
        self.device = self._resolve_device()
        self.amp_dtype = self._resolve_amp()
        if self.device.type == "cuda":
            # TF32 matmuls and cuDNN autotuning: the cheap speed-ups (no torch.compile).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        self.model = model.to(self.device)
        if adatt is not None and config.adatt is not None:
            raise ValueError("pass adatt or set config.adatt, not both")
        if config.adatt is not None:
            from mtlbook.adatt import AdaptiveTaskTransfer

            adatt = AdaptiveTaskTransfer(self.task_names, **dict(config.adatt))
        if adatt is not None:
            if not isinstance(adatt, nn.Module):
                raise TypeError(f"adatt must be an nn.Module (AdaptiveTaskTransfer), got {type(adatt).__name__}")
            if tuple(getattr(adatt, "task_names", ())) != self.task_names:
                raise ValueError(
                    f"adatt.task_names {tuple(getattr(adatt, 'task_names', ()))} must equal the model's {self.task_names}"
                )
            adatt = adatt.to(self.device)
            adatt.attach(self.model)
        self.adatt = adatt
        self.balancer = build_balancer(config.balancing, len(self.task_names), **dict(config.balancing_kwargs)).to(
            self.device
        )
        self._fixed_weights = torch.tensor(
            [float(config.task_weights.get(t, 1.0)) for t in self.task_names], device=self.device
        )
        self._loss_names = {s.name: config.losses[s.name] for s in self.task_specs if s.name in config.losses}
        self._loss_kwargs = {t: dict(kw) for t, kw in config.loss_kwargs.items()}
        self._gate_weight = float(config.gate_entropy_weight)
        model_weight = float(getattr(model, "gate_entropy_weight", 0.0) or 0.0)
        if model_weight != 0.0 and self.is_main_process:
            warnings.warn(
                f"the model's own gate_entropy_weight={model_weight} is not used by Trainer; the trainer adds "
                f"-TrainerConfig.gate_entropy_weight * model.gate_entropy() (currently {self._gate_weight})",
                TrainingWarning,
                stacklevel=2,
            )

        self.history = History(self.task_names)
        self.phase = 1
        self.phase_epoch = 0
        self.epoch = 0
        self.step = 0
        self.batches_seen = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.early_stopping = EarlyStopping(config.resolved_mode, config.patience, config.min_delta)
        self._group_param_names: list[dict[str, Any]] = []
        self._micro_batches = 0
        # Set by load_checkpoint, consumed when fit (re)builds the phase / the loader.
        self._pending_optim: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._resumed = False
        # What phase 2 changed, so it can be undone (and resumed).
        self._phase2_undo: dict[str, Any] | None = None
        self._loader_generator: torch.Generator | None = None
        # DistributedDataParallel wrapper of the model, rebuilt whenever trainability changes
        self._ddp: nn.Module | None = None
        self._ddp_signature: tuple[bool, ...] | None = None
        self._grads_unsynced = False  # a no_sync backward left local gradients in .grad
        self._warned_monitor = False  # a non-finite validation metric was reported
        # set while an epoch runs: an interrupt leaves it set, and the weights then hold a
        # partial epoch that neither fit nor a checkpoint could continue exactly
        self._epoch_in_progress: int | None = None

    # ------------------------------------------------------------------ setup helpers
    def _resolve_device(self) -> torch.device:
        requested = self.config.device
        if self.distributed is not None and self.distributed.backend == "nccl":
            # one GPU per rank: cuda:LOCAL_RANK, whatever "cuda" index was configured
            if requested is not None and not requested.startswith("cuda"):
                raise ValueError(f"TrainerConfig.device={requested!r} does not fit the nccl backend (CUDA only)")
            return torch.device("cuda", self.distributed.local_rank)
        if requested:
            device = torch.device(requested)
            if device.type == "cuda":
                if not torch.cuda.is_available():
                    raise ValueError(f"TrainerConfig.device={requested!r} needs CUDA, which this machine does not have; use 'cpu'")
                if device.index is not None and device.index >= torch.cuda.device_count():
                    raise ValueError(
                        f"TrainerConfig.device={requested!r} does not exist: this machine has "
                        f"{torch.cuda.device_count()} CUDA device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}"
                    )
            elif device.type == "mps" and not torch.backends.mps.is_available():
                raise ValueError(f"TrainerConfig.device={requested!r} needs Apple MPS, which is not available; use 'cpu'")
            elif device.type not in ("cpu", "cuda", "mps"):
                raise ValueError(f"TrainerConfig.device={requested!r} is not supported: use 'cpu', 'cuda[:i]' or 'mps'")
            return device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    def _check_config_against_model(self, model: nn.Module) -> None:
        cfg, names = self.config, set(self.task_names)
        kinds = {s.name: s.kind for s in self.task_specs}
        for field_name in ("losses", "loss_kwargs", "task_weights"):
            unknown = sorted(set(getattr(cfg, field_name)) - names)
            if unknown:
                raise ValueError(f"TrainerConfig.{field_name} names unknown tasks {unknown}; tasks: {list(self.task_names)}")
        for task, loss in cfg.losses.items():
            if kinds[task] not in LOSS_TASK_KINDS[loss]:
                raise ValueError(
                    f"TrainerConfig.losses[{task!r}] = {loss!r} does not fit a {kinds[task]} task"
                )
        n_experts = len(model.shared_experts)
        for field_name in ("expert_lr", "expert_weight_decay"):
            bad = sorted(i for i in getattr(cfg, field_name) if i >= n_experts)
            if bad:
                raise ValueError(
                    f"TrainerConfig.{field_name} overrides shared experts {bad}, but the model has "
                    f"{n_experts} shared experts (valid indices 0..{n_experts - 1})"
                )

    def _resolve_amp(self) -> torch.dtype | None:
        amp = self.config.amp
        if amp == "auto":
            return torch.float16 if self.device.type == "cuda" else None
        if amp == "off":
            return None
        if amp == "fp16":
            if self.device.type != "cuda":
                raise ValueError(f"TrainerConfig.amp='fp16' needs a CUDA device, got device {self.device}; use 'bf16' or 'off'")
            return torch.float16
        return torch.bfloat16

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def is_main_process(self) -> bool:
        """True in the process that writes checkpoints, shows progress and warns (rank 0)."""
        return self.distributed is None or self.distributed.is_main

    @property
    def rank(self) -> int:
        return 0 if self.distributed is None else self.distributed.rank

    @property
    def world_size(self) -> int:
        return 1 if self.distributed is None else self.distributed.world_size

    @property
    def checkpoint_path(self) -> Path | None:
        """``config.checkpoint_dir / "last.pt"`` (``None`` without a checkpoint folder)."""
        return None if self.config.checkpoint_dir is None else Path(self.config.checkpoint_dir) / "last.pt"

    @property
    def adatt_active(self) -> bool:
        return self.adatt is not None and bool(self.adatt.enabled)

    def _named_trainables(self) -> dict[str, nn.Parameter]:
        """Every parameter the trainer could optimise, by qualified name."""
        named = {f"model.{n}": p for n, p in self.model.named_parameters()}
        named.update({f"balancer.{n}": p for n, p in self.balancer.named_parameters()})
        if self.adatt is not None:
            named.update({f"adatt.{n}": p for n, p in self.adatt.named_parameters()})
        return named

    def _default_groups(self) -> list[dict[str, Any]]:
        """Named AdamW groups for the current trainability (see module doc); empty ones dropped."""
        cfg = self.config
        name_of = {id(p): n for n, p in self._named_trainables().items()}
        taken: set[int] = set()

        def pick(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
            out = []
            for p in params:
                if p.requires_grad and id(p) not in taken:
                    taken.add(id(p))
                    out.append(p)
            return out

        groups: list[dict[str, Any]] = []
        for i, expert in enumerate(self.model.shared_experts):
            groups.append(
                {
                    "name": f"shared_expert_{i}",
                    "params": pick(expert.parameters()),
                    "lr": cfg.expert_lr.get(i, cfg.lr),
                    "weight_decay": cfg.expert_weight_decay.get(i, cfg.weight_decay),
                }
            )
        rest = [
            ("shared", self.model.shared_parameters(), cfg.weight_decay),  # shared params outside any expert
            ("gates", self.model.gate_parameters(), cfg.weight_decay),
            ("task", self.model.parameters(), cfg.weight_decay),  # whatever is left: task experts, towers
            ("balancer", self.balancer.parameters(), 0.0),
        ]
        if self.adatt_active:
            rest.append(("adatt", self.adatt.parameters(), 0.0))
        for name, params, decay in rest:
            groups.append({"name": name, "params": pick(params), "lr": cfg.lr, "weight_decay": decay})
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g["param_names"] = [name_of[id(p)] for p in g["params"]]
        return groups

    def _groups_from_names(self, groups_by_name: list[dict[str, Any]]) -> list[dict[str, Any]]:
        named = self._named_trainables()
        groups = []
        for g in groups_by_name:
            unknown = [n for n in g["param_names"] if n not in named]
            if unknown:
                raise ValueError(f"checkpoint optimizer refers to unknown parameters {unknown[:5]}")
            params = [named[n] for n in g["param_names"]]
            groups.append({"name": g["name"], "params": params, "param_names": list(g["param_names"])})
        return groups

    def _start_phase(self) -> None:
        """Build optimizer, scheduler and scaler for the current phase (restoring pending state)."""
        cfg = self.config
        pending, self._pending_optim = self._pending_optim, None
        if pending is not None and pending.get("groups"):
            groups = self._groups_from_names(pending["groups"])
        else:
            pending = None
            groups = self._default_groups()
        if not groups:
            raise ValueError(f"nothing to train in phase {self.phase}: every parameter is frozen")
        self._group_param_names = [{"name": g["name"], "param_names": g.pop("param_names")} for g in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
        if self.phase == 1:
            self.scheduler = build_phase1_scheduler(
                self.optimizer, cfg.warmup_epochs, cfg.warmup_start_factor, cfg.cosine_t0, cfg.cosine_t_mult, cfg.min_lr
            )
        else:
            self.scheduler = build_phase2_scheduler(
                self.optimizer, cfg.phase2_epochs, cfg.phase2_warmup_epochs, cfg.warmup_start_factor, cfg.min_lr
            )
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if pending is not None:
            self.optimizer.load_state_dict(pending["optimizer"])
            self.scheduler.load_state_dict(pending["scheduler"])
            if self.scaler is not None and pending.get("scaler"):
                self.scaler.load_state_dict(pending["scaler"])
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.adatt_gate_cofreeze:  # False: an ablation that leaves the gates training
            self._sync_gate_cofreeze()

    def _sync_gate_cofreeze(self) -> None:
        """Freeze the gates once adaTT is in its frozen phase (the co-freeze contract)."""
        if self.adatt is not None and self.adatt.phase == "frozen" and not bool(self.model.gates_frozen):
            self.model.freeze_gates(True)

    def _enter_phase2(self) -> None:
        """Freeze shared experts and gates, disable adaTT; remember how to undo it."""
        if self._phase2_undo is None:
            shared = {id(p) for p in self.model.shared_parameters()}
            self._phase2_undo = {
                "unfreeze": [
                    f"model.{n}" for n, p in self.model.named_parameters() if id(p) in shared and p.requires_grad
                ],
                "gates_frozen": bool(self.model.gates_frozen),
                "adatt_enabled": None if self.adatt is None else bool(self.adatt.enabled),
            }
        for p in self.model.shared_parameters():
            p.requires_grad_(False)
        self.model.freeze_gates(True)
        if self.adatt is not None:
            self.adatt.disable()

    def _leave_phase2(self) -> None:
        """Undo :meth:`_enter_phase2` (called from a ``finally``: must not raise on partial state)."""
        undo, self._phase2_undo = self._phase2_undo, None
        if undo is None:
            return
        named = self._named_trainables()
        for name in undo["unfreeze"]:
            if name in named:
                named[name].requires_grad_(True)
        self.model.freeze_gates(bool(undo["gates_frozen"]))
        if self.adatt is not None and undo["adatt_enabled"]:
            self.adatt.enable()

    # ------------------------------------------------------------------ data
    def _as_loader(self, data: Any, train: bool) -> Iterable[Batch]:
        cfg = self.config
        if isinstance(data, MultiTaskDataset):
            if tuple(data.task_names) != self.task_names:
                raise ValueError(f"dataset tasks {data.task_names} must equal the model's {self.task_names}")
            ours = [(s.name, s.kind, s.n_classes) for s in self.task_specs]
            theirs = [(s.name, s.kind, s.n_classes) for s in data.task_specs]
            if ours != theirs:
                raise ValueError(
                    f"dataset task_specs {theirs} must match the model's {ours} (name, kind, number of classes)"
                )
            batch_size = cfg.batch_size if train else (cfg.eval_batch_size or cfg.batch_size)
            if self.distributed is not None:
                return self._distributed_loader(data, batch_size, train)
            return make_loader(data, batch_size=batch_size, shuffle=train, seed=cfg.seed or 0)
        if isinstance(data, DataLoader):
            return data
        try:
            iterator = iter(data)
        except TypeError:
            raise TypeError(
                f"data must be a MultiTaskDataset, a DataLoader or a re-iterable of Batch, got {type(data).__name__}"
            ) from None
        if iterator is data:
            raise TypeError("data must be re-iterable (a list of Batch, a DataLoader...), not a one-shot iterator")
        return data

    def _distributed_loader(self, data: MultiTaskDataset, batch_size: int, train: bool) -> DataLoader:
        """This rank's shard: a shuffling ``DistributedSampler`` (even shards) for training,
        a padding-free :class:`ShardSampler` for evaluation."""
        assert self.distributed is not None
        rank, world = self.distributed.rank, self.distributed.world_size
        if train:
            seed = self.config.seed or 0
            sampler: Any = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        else:
            sampler = ShardSampler(len(data), rank, world)
        return make_loader(data, batch_size=batch_size, shuffle=False, sampler=sampler)

    # ------------------------------------------------------------------ distributed helpers
    def _ensure_ddp(self) -> None:
        """(Re)wrap the model in DDP when the set of trainable parameters changed.

        DDP registers the parameters that require a gradient when it is built; freezing
        (phase 2, gate co-freeze) or unfreezing afterwards would leave it waiting for
        gradients that never come, so the wrapper is rebuilt at such a boundary. Building
        it broadcasts rank 0's parameters and buffers; the balancer's and adaTT's state is
        broadcast alongside, so every rank starts the stretch from identical state.
        """
        if self.distributed is None:
            return
        signature = tuple(bool(p.requires_grad) for p in self.model.parameters())
        if signature == self._ddp_signature:
            return
        from torch.nn.parallel import DistributedDataParallel

        self._ddp = None  # drop the old reducer before the new one registers its hooks
        if any(signature):
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(
                self.model, device_ids=device_ids, find_unused_parameters=self.config.ddp_find_unused_parameters
            )
        self._ddp_signature = signature
        extra_state = list(self.balancer.parameters()) + list(self.balancer.buffers())
        if self.adatt is not None:
            extra_state += list(self.adatt.parameters()) + list(self.adatt.buffers())
        broadcast_tensors(extra_state, self.distributed)

    def _forward_module(self) -> nn.Module:
        return self._ddp if self._ddp is not None else self.model

    def _sync_gradients(self) -> None:
        """Average over ranks what DDP did not: balancer and adaTT gradients, PCGrad's
        rewritten shared gradients, and anything left local by a ``no_sync`` window."""
        assert self.distributed is not None
        params = [p for p in self.balancer.parameters() if p.requires_grad]
        if self.adatt is not None:
            params += [p for p in self.adatt.parameters() if p.requires_grad]
        if self._ddp is None or self._grads_unsynced:
            params += [p for p in self.model.parameters() if p.requires_grad]
        elif self.balancer.rewrites_shared_gradients:
            # e.g. PCGrad overwrites the shared gradients after DDP's backward with local surgery
            params += [p for p in self.model.shared_parameters() if p.requires_grad]
        average_gradients(params, self.distributed)
        self._grads_unsynced = False

    def _measure_affinity(self, weighted: Tensor, present: Tensor, batch: Batch) -> None:
        assert self.adatt is not None
        if self.distributed is None:
            self.adatt.measure(weighted, present)
            return
        rows = torch.stack([batch.present[t].sum() for t in self.task_names]).to(weighted.device)
        measure_affinity(self.adatt, weighted, rows, self.distributed, self.config.adatt_sync)

    # ------------------------------------------------------------------ fit
    def fit(self, train_data: Any, val_data: Any = None, resume_from: str | os.PathLike[str] | None = None) -> History:
        """Run (or continue) both phases and return the :class:`History`.

        Args:
            train_data: a :class:`~mtlbook.data.batch.MultiTaskDataset` (batched with
                ``config.batch_size``, shuffled by a generator seeded with ``config.seed``),
                a ``DataLoader`` of :class:`~mtlbook.data.batch.Batch`, or a list of Batch.
            val_data: the same kinds, for validation metrics and early stopping (``None``:
                no validation, no early stopping, no best-weight restore).
            resume_from: a checkpoint written by this trainer's configuration; training
                continues right after its epoch. ``fit`` also continues after an explicit
                :meth:`load_checkpoint`. A finished run returns at once.
        """
        if resume_from is None and self._epoch_in_progress is not None:
            raise RuntimeError(
                f"the previous fit() was interrupted in the middle of epoch {self._epoch_in_progress}: the weights hold "
                "part of that epoch, and running it again would apply those batches twice. Resume from the last "
                "checkpoint (fit(..., resume_from=path) or load_checkpoint(path)) or start a new Trainer"
            )
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif not self._resumed and self.epoch == 0 and self.optimizer is None and self.config.seed is not None:
            _seed_everything(self.config.seed)
        cfg = self.config
        self._check_has_targets(train_data, "train_data")
        train_loader = self._as_loader(train_data, train=True)
        val_loader = None if val_data is None else self._as_loader(val_data, train=False)
        self._loader_generator = getattr(train_loader, "generator", None)
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng, self._loader_generator)
            self._pending_rng = None
        skipped_before = (self.history.skipped_nan, self.history.skipped_oom)
        show = cfg.progress and self.is_main_process
        bar = tqdm(total=cfg.total_epochs, initial=self.epoch, desc="epochs", disable=not show, dynamic_ncols=True)
        try:
            if self.phase == 1:
                self._run_phase(train_loader, val_loader, bar)
                self._finish_phase()
                if cfg.phase2_epochs > 0:
                    # the boundary: fresh optimizer, scheduler, scaler and early stopping
                    self.phase, self.phase_epoch = 2, 0
                    self.optimizer = self.scheduler = self.scaler = None
                    self._pending_optim = None
                    self.early_stopping.reset()
            if self.phase == 2 and cfg.phase2_epochs > 0:
                try:
                    self._enter_phase2()
                    self._run_phase(train_loader, val_loader, bar)
                    self._finish_phase()
                finally:
                    self._leave_phase2()
        finally:
            bar.close()
            self._loader_generator = None
        n_nan = self.history.skipped_nan - skipped_before[0]
        n_oom = self.history.skipped_oom - skipped_before[1]
        if (n_nan or n_oom) and self.is_main_process:
            warnings.warn(
                f"training skipped {n_nan} batch(es) with a non-finite loss or gradient and {n_oom} after "
                "out-of-memory errors; weights were left untouched for them (see history records "
                "'skipped_nan' / 'skipped_oom')",
                TrainingWarning,
                stacklevel=2,
            )
        return self.history

    def _check_has_targets(self, data: Any, name: str) -> None:
        """Refuse data with no rows or without a single present target (cheap cases only:
        a dataset, a DataLoader over one, a list of Batch; other iterables are checked
        after their first epoch)."""
        dataset = data.dataset if isinstance(data, DataLoader) else data
        if isinstance(dataset, MultiTaskDataset):
            if len(dataset) == 0:
                raise ValueError(f"{name} is empty (0 rows): refusing to train on nothing")
            if not any(bool(dataset.present[t].any()) for t in self.task_names if t in dataset.present):
                raise ValueError(f"{name} has no present target for any task: refusing to train on nothing")
        elif isinstance(data, (list, tuple)):
            if not data:
                raise ValueError(f"{name} is empty (no batches): refusing to train on nothing")
            for batch in data:
                if not isinstance(batch, Batch):
                    raise TypeError(f"{name} must hold Batch objects, got {type(batch).__name__}")
            if not any(bool(m.any()) for batch in data for t, m in batch.present.items() if t in self.task_names):
                raise ValueError(f"{name} has no present target for any task: refusing to train on nothing")

    def _phase_length(self) -> int:
        return self.config.phase1_epochs if self.phase == 1 else self.config.phase2_epochs

    def _run_phase(self, train_loader: Iterable[Batch], val_loader: Iterable[Batch] | None, bar: Any) -> None:
        while self.phase_epoch < self._phase_length() and not self.early_stopping.stopped:
            if self.optimizer is None:
                self._start_phase()
            record = self._run_epoch(train_loader, val_loader)
            bar.update(1)
            bar.set_postfix(phase=self.phase, loss=f"{record['train']['loss']:.4g}")

    def _finish_phase(self) -> None:
        """Load the phase's best weights if asked (keeping the current gate-freeze flag).

        ``last.pt``, if the phase's last epoch wrote it, is then rewritten so it holds the
        weights ``fit`` returns (resuming from it restores the same best weights again: the
        step is idempotent).
        """
        best = self.early_stopping.best_state
        if self.config.restore_best and best is not None:
            frozen = bool(self.model.gates_frozen)
            self.model.load_state_dict(best)
            self.model.freeze_gates(frozen)
            if self.checkpoint_path is not None and self.epoch % self.config.checkpoint_every == 0:
                self.save_checkpoint(self.checkpoint_path)  # replaces the one of the phase's last epoch

    # ------------------------------------------------------------------ one epoch
    def _run_epoch(self, train_loader: Iterable[Batch], val_loader: Iterable[Batch] | None) -> dict[str, Any]:
        started = time.perf_counter()
        cfg = self.config
        self._epoch_in_progress = self.epoch
        self.model.train()
        self.balancer.train()
        if self.adatt is not None:
            self.adatt.train()
        assert self.optimizer is not None and self.scheduler is not None
        record: dict[str, Any] = {
            "epoch": self.epoch,
            "phase": self.phase,
            "phase_epoch": self.phase_epoch,
            "adatt_phase": None if self.adatt is None else str(self.adatt.phase),
            "adatt_enabled": self.adatt_active,
            "gates_frozen": bool(self.model.gates_frozen),
            "lr": {g["name"]: float(g["lr"]) for g in self.optimizer.param_groups},
        }
        if self.distributed is not None:
            self._ensure_ddp()
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)  # a new shuffle every epoch, the same on every rank
        counters = {"skipped_nan": 0, "skipped_oom": 0, "amp_overflow": 0, "steps": 0, "batches": 0}
        grad_norms: list[float] = []
        sums = _MetricSums(self.task_specs, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self._micro_batches = 0
        total = len(train_loader) if hasattr(train_loader, "__len__") else None
        show = cfg.progress and self.is_main_process
        for batch in tqdm(train_loader, total=total, desc=f"epoch {self.epoch}", leave=False, disable=not show):
            self._train_batch(batch, sums, counters, grad_norms)
        if self._micro_batches > 0:  # a trailing, incomplete accumulation window
            self._optimizer_step(counters, grad_norms)

        record["train"] = self._reduce_metrics(sums)
        record["val"] = None if val_loader is None else self.evaluate(val_loader)
        record.update(counters)
        record["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else math.nan
        record.update(self._snapshots())
        record.update(loss_weight_snapshot(self.adatt, self.balancer, self.task_names, record["train"], self._fixed_weights))

        # end-of-epoch hooks: schedule, balancer, adaTT (phase 1 only), gate co-freeze
        with warnings.catch_warnings():
            # an epoch whose steps were all skipped would trigger torch's "scheduler before
            # optimizer" warning; the schedule still advances by one epoch, as documented
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        mean_losses = torch.tensor(
            [record["train"].get(f"{t}/loss", math.nan) for t in self.task_names], device=self.device
        ) * self._fixed_weights
        self.balancer.on_epoch_end(self.epoch, mean_losses)
        if self.adatt is not None and self.phase == 1:
            self.adatt.on_epoch_end(self.epoch)
            if cfg.adatt_gate_cofreeze:
                self._sync_gate_cofreeze()
        if self.phase == 1 and cfg.gate_freeze_epoch is not None and self.epoch + 1 >= cfg.gate_freeze_epoch:
            self.model.freeze_gates(True)  # the gate clock: frozen from phase-1 epoch gate_freeze_epoch on

        # early stopping on validation data only
        record["best"], record["stopped_early"], record["monitor_nan"] = False, False, False
        if record["val"] is not None:
            if cfg.monitor not in record["val"]:
                raise ValueError(
                    f"TrainerConfig.monitor={cfg.monitor!r} is not a validation metric; available: {sorted(record['val'])}"
                )
            value = float(record["val"][cfg.monitor])
            if math.isfinite(value):
                state = self.model.state_dict() if cfg.restore_best else None
                record["best"] = self.early_stopping.update(value, self.epoch, state)
            else:
                # neither an improvement nor a bad epoch: recorded, warned about, not counted
                record["monitor_nan"] = True
                self._warn_monitor_not_finite(value)
            record["stopped_early"] = self.early_stopping.stopped

        record["time_s"] = time.perf_counter() - started
        problem = self._weights_problem()
        if problem is not None:
            kept = "" if self.checkpoint_path is None else f"; {str(self.checkpoint_path)!r} still holds the last good state"
            raise TrainingDivergedError(
                f"training diverged in epoch {self.epoch} (phase {self.phase}): {problem}{kept}. "
                "Lower TrainerConfig.lr (or expert_lr), keep grad_clip, or check the data"
            )
        if counters["batches"] == 0:
            self._epoch_in_progress = None  # nothing was trained: the weights are untouched
            raise ValueError("train_data yielded no batches: refusing to train on nothing")
        self.history.append(record)
        self.epoch += 1
        self.phase_epoch += 1
        self._epoch_in_progress = None
        if self.checkpoint_path is not None and self.epoch % cfg.checkpoint_every == 0:
            self.save_checkpoint(self.checkpoint_path)
        return record

    @torch.no_grad()
    def _weights_problem(self) -> str | None:
        """What is wrong with the weights (a non-finite value in a parameter or a model
        buffer, or a parameter beyond :data:`DIVERGED_WEIGHT`), or ``None`` when sane.

        The balancer's and adaTT's buffers are not checked: some hold NaN on purpose
        (DWA's and GradNorm's "not seen yet" markers)."""
        tensors: list[tuple[str, Tensor, bool]] = []
        tensors += [(f"model.{n}", p, True) for n, p in self.model.named_parameters()]
        tensors += [(f"model.{n}", b, False) for n, b in self.model.named_buffers()]
        tensors += [(f"balancer.{n}", p, True) for n, p in self.balancer.named_parameters()]
        if self.adatt is not None:
            tensors += [(f"adatt.{n}", p, True) for n, p in self.adatt.named_parameters()]
        for name, tensor, is_param in tensors:
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            if not bool(torch.isfinite(tensor).all()):
                return f"{name} holds non-finite values"
            if is_param:
                largest = float(tensor.detach().abs().max())
                if largest > DIVERGED_WEIGHT:
                    return f"{name} reached |w| = {largest:.3g} > {DIVERGED_WEIGHT:.0e}"
        return None

    def _warn_monitor_not_finite(self, value: float) -> None:
        """Warn (once per trainer) that the monitored validation metric is not finite."""
        if self._warned_monitor or not self.is_main_process:
            return
        self._warned_monitor = True
        warnings.warn(
            f"validation metric {self.config.monitor!r} = {value} in epoch {self.epoch} (empty validation data, a NaN "
            "target, or an AUC on a single class?); such epochs count neither as an improvement nor toward "
            "patience and are marked 'monitor_nan' in the history",
            TrainingWarning,
            stacklevel=3,
        )

    @torch.no_grad()
    def _snapshots(self) -> dict[str, Any]:
        """Balancer weights and adaTT matrices at the end of the epoch (small: n and n x n)."""
        out: dict[str, Any] = {"balancer_weights": [float(v) for v in self.balancer.weights().flatten().tolist()]}
        if self.adatt is None:
            out["affinity"] = out["transfer_weights"] = None
        else:
            out["affinity"] = self.adatt.affinity.double().tolist()
            out["transfer_weights"] = self.adatt.transfer_weights(None).detach().double().tolist()
        return out

    # ------------------------------------------------------------------ one batch
    def _skip(self, counters: dict[str, int], key: str) -> None:
        """Drop the batch (and the pending accumulation window): no weight will change."""
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        self._micro_batches = 0
        self._grads_unsynced = False
        counters[key] += 1

    def _train_batch(self, batch: Batch, sums: _MetricSums, counters: dict[str, int], grad_norms: list[float]) -> None:
        cfg = self.config
        batch = batch.to(self.device)
        step_index = self.batches_seen
        self.batches_seen += 1
        counters["batches"] += 1
        # DDP: only the last micro-batch of an accumulation window all-reduces gradients
        syncs = self._micro_batches + 1 >= cfg.accumulation_steps
        window = self._ddp.no_sync() if self._ddp is not None and not syncs else contextlib.nullcontext()
        try:
            with window:
                with self._autocast():
                    outputs = self._forward_module()(batch.inputs)
                    raw = task_losses(outputs, batch, self.task_specs, self._loss_names, self._loss_kwargs, None)
                present = present_tasks(batch, self.task_names)
                fixed = raw.float() * self._fixed_weights  # stage 2: fixed weights c_i
                weighted = self.balancer.weight_losses(fixed, present)  # stage 3: balancer
                # any_rank: a batch skipped on one rank is skipped on all (collectives stay paired)
                if any_rank(not bool(torch.isfinite(weighted).all()), self.distributed):
                    self._skip(counters, "skipped_nan")
                    return
                final = weighted
                if self.adatt_active:  # stage 4: measure on this very forward pass, then transfer
                    if self.adatt.should_measure(step_index):
                        self._measure_affinity(weighted, present, batch)
                    final = self.adatt.compute_transfer_loss(weighted, present=present)
                objective = final.sum()
                if self._gate_weight != 0.0:  # stage 5: gate-entropy regulariser -lambda_H * H_gate
                    objective = objective - self._gate_weight * self.model.gate_entropy().float()
                if any_rank(not bool(torch.isfinite(objective)), self.distributed):
                    self._skip(counters, "skipped_nan")
                    return
                k = float(cfg.accumulation_steps)
                self.balancer.backward(
                    objective / k,
                    weighted / k,
                    self.model.shared_parameters(),
                    scale=None if self.scaler is None else self.scaler.scale,
                )
                if self._ddp is not None:
                    self._grads_unsynced = not syncs
        except Exception as error:  # noqa: BLE001 - only OOM is swallowed, the rest re-raised
            # under DDP the other ranks are already inside collectives: no recovery possible
            if not is_out_of_memory(error) or self.distributed is not None:
                raise
            outputs = raw = None  # release what the failed step held
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._skip(counters, "skipped_oom")
            return
        sums.add(raw, outputs, batch)
        self._micro_batches += 1
        if self._micro_batches >= cfg.accumulation_steps:
            self._optimizer_step(counters, grad_norms)

    def _optimizer_step(self, counters: dict[str, int], grad_norms: list[float]) -> None:
        """Unscale, check and clip the gradients, then step (or skip if they are not finite)."""
        assert self.optimizer is not None
        self._micro_batches = 0
        if self.distributed is not None:
            self._sync_gradients()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if not params:
            norm = torch.zeros(())
        elif self.config.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        finite = bool(torch.isfinite(norm))
        if self.scaler is not None:
            # the scaler skips the step itself when it found inf/NaN and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if not finite:
                counters["amp_overflow"] += 1
            else:
                self.step += 1
                counters["steps"] += 1
                grad_norms.append(float(norm))
        elif not finite:
            counters["skipped_nan"] += 1
        else:
            self.optimizer.step()
            self.step += 1
            counters["steps"] += 1
            grad_norms.append(float(norm))
        self.balancer.after_optimizer_step()  # e.g. keep uncertainty log-variances in range
        self.optimizer.zero_grad(set_to_none=True)
        if self.distributed is not None and any(True for _ in self.balancer.buffers()):
            # e.g. GradNorm updates its weights from local gradient norms: rank 0's copy wins
            broadcast_tensors(list(self.balancer.buffers()), self.distributed)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data: Any) -> dict[str, float]:
        """Validation metrics over ``data`` (same kinds as :meth:`fit` accepts), in eval mode.

        Returns a flat dict: ``"loss"`` (sum of fixed-weighted task losses), and per task
        ``"<task>/loss"`` plus ``"<task>/auc"``, ``"<task>/rmse"`` or ``"<task>/accuracy"``.
        Distributed: a collective (call it on every rank); a dataset is sharded without
        padding and the metrics are those of all its rows, identical on every rank.
        """
        loader = self._as_loader(data, train=False)
        was_training = self.model.training
        self.model.eval()
        sums = _MetricSums(self.task_specs, self.device)
        try:
            for batch in loader:
                self._evaluate_batch(batch.to(self.device), sums)
        finally:
            self.model.train(was_training)
        return self._reduce_metrics(sums)

    def _evaluate_batch(self, batch: Batch, sums: _MetricSums) -> None:
        """Add one batch to ``sums``; after an out-of-memory error, retry it in two halves.

        Validation must not skip rows (the metrics would silently change), so a batch that
        does not fit is split until it does; a single row that still does not fit, or any
        OOM under DDP (the other ranks wait in collectives), re-raises.
        """
        try:
            with self._autocast():
                outputs = self.model(batch.inputs)
                raw = task_losses(outputs, batch, self.task_specs, self._loss_names, self._loss_kwargs, None)
        except Exception as error:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not is_out_of_memory(error) or self.distributed is not None or len(batch) <= 1:
                raise
            outputs = raw = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(batch) // 2
            for part in (slice(0, half), slice(half, len(batch))):
                self._evaluate_batch(_slice_batch(batch, part), sums)
            return
        sums.add(raw.float(), outputs, batch)

    def _reduce_metrics(self, sums: _MetricSums) -> dict[str, float]:
        """Turn one pass's sums into the flat metric dict, reduced over every rank.

        Distributed: loss sums and row counts are all-reduced; the raw outputs, targets and
        masks behind AUC / RMSE / accuracy are gathered from every rank, so the metrics are
        those of all rows together (a collective: every rank must call it).
        """
        metrics: dict[str, float] = {}
        loss_sum, rows = sums.loss_sum, sums.rows
        if self.distributed is not None:
            loss_sum, rows = sum_over_ranks(torch.stack([loss_sum, rows]), self.distributed).unbind(0)
            sums = self._gather_metric_rows(sums)
        rows = rows.cpu()
        mean = (loss_sum.cpu() / rows.clamp(min=1)).tolist()
        total, any_rows = 0.0, False
        for i, spec in enumerate(self.task_specs):
            if rows[i] > 0:
                metrics[f"{spec.name}/loss"] = float(mean[i])
                total += float(self._fixed_weights[i]) * float(mean[i])
                any_rows = True
            else:
                metrics[f"{spec.name}/loss"] = math.nan
            if spec.name in sums.outputs:
                key = f"{spec.name}/{METRIC_FOR_KIND[spec.kind]}"
                if sums.outputs[spec.name]:
                    metrics[key] = float(
                        task_metric(
                            spec,
                            torch.cat(sums.outputs[spec.name]),
                            torch.cat(sums.targets[spec.name]),
                            torch.cat(sums.present[spec.name]),
                        )
                    )
                else:
                    metrics[key] = math.nan
        metrics["loss"] = total if any_rows else math.nan
        return metrics

    def _gather_metric_rows(self, sums: _MetricSums) -> _MetricSums:
        """A copy of ``sums`` whose outputs/targets/masks hold every rank's rows."""
        assert self.distributed is not None
        local = {
            name: (torch.cat(sums.outputs[name]), torch.cat(sums.targets[name]), torch.cat(sums.present[name]))
            if sums.outputs[name]
            else None
            for name in sums.outputs
        }
        gathered = _MetricSums(self.task_specs, torch.device("cpu"))
        for rank_rows in gather_objects(local, self.distributed):
            for name, triple in rank_rows.items():
                if triple is not None:
                    gathered.outputs[name].append(triple[0])
                    gathered.targets[name].append(triple[1])
                    gathered.present[name].append(triple[2])
        return gathered

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "tensors": model_fingerprint(("model", self.model), ("adatt", self.adatt), ("balancer", self.balancer)),
            "config": self.config.to_dict(),
            "settings": self._settings(),
        }

    def _settings(self) -> dict[str, Any]:
        """What shapes do not show but a resumed run must share: the tasks (kind and number
        of classes), the model's dropout rates and adaTT's hyperparameters (also when adaTT
        was passed as an object rather than through ``config.adatt``)."""
        settings: dict[str, Any] = {
            "tasks": [[s.name, s.kind, s.n_classes] for s in self.task_specs],
            "dropout": [float(m.p) for m in self.model.modules() if isinstance(m, nn.Dropout)],
        }
        if self.adatt is not None:
            settings["adatt"] = {
                name: getattr(self.adatt, name)
                for name in _ADATT_SETTINGS
                if isinstance(getattr(self.adatt, name, None), (int, float, str, bool))
            }
        return settings

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue the run exactly (plain types only)."""
        if self.optimizer is not None:
            optim = {
                "groups": [dict(g) for g in self._group_param_names],
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            }
        else:
            optim = self._pending_optim
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self._fingerprint(),
            "model": self.model.state_dict(),
            "adatt": None if self.adatt is None else self.adatt.state_dict(),
            "balancer": self.balancer.state_dict(),
            "optim": optim,
            # outside fit, a loaded-but-not-yet-used RNG snapshot (loader included) is kept as is
            "rng": (
                self._pending_rng
                if self._pending_rng is not None and self._loader_generator is None
                else capture_rng_state(self._loader_generator)
            ),
            "trainer": {
                "phase": self.phase,
                "phase_epoch": self.phase_epoch,
                "epoch": self.epoch,
                "step": self.step,
                "batches_seen": self.batches_seen,
                "early_stopping": self.early_stopping.state_dict(),
                "phase2_undo": self._phase2_undo,
            },
            "history": self.history.to_dict(),
        }

    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path | None:
        """Write :meth:`state_dict` atomically to ``path`` (main process only); returns the path.

        Distributed: call it on every rank. Rank 0 writes (the others return ``None``) and
        all ranks wait at a barrier, so the file is complete before any rank goes on (and
        may, for instance, resume from it).

        Refuses (and leaves ``path`` untouched) when the weights are not finite or exploded
        (:class:`TrainingDivergedError`) and in the middle of an epoch, e.g. after an
        interrupted ``fit`` (``RuntimeError``): such a file could not be resumed exactly.
        """
        problem = self._weights_problem()
        if problem is not None:
            raise TrainingDivergedError(f"refusing to write checkpoint {str(path)!r}: {problem}")
        if self._epoch_in_progress is not None:
            raise RuntimeError(
                f"refusing to write checkpoint {str(path)!r} in the middle of epoch {self._epoch_in_progress}: it could "
                "not be resumed exactly (checkpoints are taken at epoch boundaries; the trainer writes them itself "
                "with TrainerConfig.checkpoint_dir)"
            )
        written = atomic_save(self.state_dict(), path) if self.is_main_process else None
        if self.distributed is not None:
            self.distributed.barrier()
        return written

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` for this model and config.

        Raises ``ValueError`` when the checkpoint comes from a different model (parameter or
        buffer names/shapes differ) or a different configuration (any field except
        ``progress``, ``checkpoint_dir``, ``checkpoint_every`` and ``device``).
        """
        state = load_file(path, map_location=self.device)
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, IndexError, AttributeError) as error:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is incomplete or malformed ({type(error).__name__}: {error}); "
                "it was not written by this version of the trainer, or it is damaged"
            ) from None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; see :meth:`load_checkpoint`."""
        if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not an mtlbook trainer checkpoint (expected format {CHECKPOINT_FORMAT!r})")
        stored = dict(state["fingerprint"])
        # a checkpoint written before a config field existed implies that field's old default
        stored["config"] = {**CONFIG_FIELDS_ADDED_LATER, **dict(stored.get("config", {}))}
        check_fingerprint(stored, self._fingerprint(), ignore=RESUME_MUTABLE_FIELDS)
        self.model.load_state_dict(state["model"])
        if self.adatt is not None:
            self.adatt.load_state_dict(state["adatt"])
        self.balancer.load_state_dict(state["balancer"])
        trainer = state["trainer"]
        self.phase = int(trainer["phase"])
        self.phase_epoch = int(trainer["phase_epoch"])
        self.epoch = int(trainer["epoch"])
        self.step = int(trainer["step"])
        self.batches_seen = int(trainer["batches_seen"])
        self.early_stopping.load_state_dict(trainer["early_stopping"])
        self._phase2_undo = trainer["phase2_undo"]
        self.history = History.from_dict(state["history"])
        # The optimizer is rebuilt (same groups, by name) when fit continues the phase.
        self.optimizer = self.scheduler = self.scaler = None
        self._pending_optim = state["optim"]
        self._pending_rng = state["rng"]
        restore_rng_state(state["rng"])
        self._resumed = True
        self._epoch_in_progress = None


def _slice_batch(batch: Batch, rows: slice) -> Batch:
    """Rows ``rows`` of ``batch`` (views, no copy)."""
    return Batch(
        batch.inputs[rows],
        {k: v[rows] for k, v in batch.targets.items()},
        {k: v[rows] for k, v in batch.present.items()},
    )


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
