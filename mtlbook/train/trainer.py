r"""The two-phase multi-task trainer: a flat loop that calls a loss pipeline and callbacks.

``fit`` runs phase 1 then phase 2, each a sequence of epochs, each a sequence of batches. A
batch goes through the five stages of :mod:`mtlbook.train.pipeline`, the balancer's
backward of :math:`\mathcal L / k` (``k`` = ``accumulation_steps``) and, every ``k``
batches, one AdamW step clipped to ``config.grad_clip`` (:mod:`mtlbook.train.optim`; the
schedule steps once per epoch, :mod:`mtlbook.train.schedules`). Everything else is a
callback (:mod:`mtlbook.train.callbacks`): the phase-2 freeze, adaTT's schedule with the
gate co-freeze, the gate clock, early stopping, history, checkpoints and progress bars.
Where the loop runs (one process or ``torchrun`` ranks, :mod:`mtlbook.train.strategy`) and
in which precision (:mod:`mtlbook.train.precision`) are small objects it calls.

**Two phases.** Phase 1 trains everything with adaTT active; when adaTT freezes, the gates
freeze with it. Phase 2 freezes the shared experts and the gates (left out of the
optimizer) and disables adaTT; at its start the optimizer, scheduler, GradScaler and early
stopping start afresh, and at the end of ``fit`` (also after an exception) the shared
experts, gates and adaTT get back what they had before.

**Guards** (:mod:`mtlbook.train.guards`). A batch with a non-finite loss, or a step with
non-finite gradients (without a GradScaler; with one, fp16 overflow is counted as
``amp_overflow``), is skipped with its accumulation window and counted in
``record["skipped_nan"]``; an out-of-memory error skips the batch (``skipped_oom``; in
validation the batch is split instead); ``fit`` warns if anything was skipped. A non-finite
or exploded weight at the end of an epoch raises :class:`TrainingDivergedError` before any
checkpoint is written. ``fit`` refuses data without rows or targets, and a second call
after an interrupted epoch. **Checkpoints** (:mod:`mtlbook.train.resume`) continue
bit-exactly and refuse another model or configuration.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mtlbook.balancing import build_balancer
from mtlbook.data.batch import Batch
from mtlbook.train.callbacks import Callback, EarlyStopping, check_callbacks, default_callbacks
from mtlbook.train.checkpoint import CheckpointError, atomic_save, load_file, restore_rng_state
from mtlbook.train.compiled import check_compile, forward_and_losses
from mtlbook.train.config import TrainerConfig
from mtlbook.train.evaluation import MetricSums, epoch_snapshots, evaluate_batch, reduce_metrics
from mtlbook.train.guards import (DIVERGED_WEIGHT, TrainingDivergedError, TrainingWarning, is_out_of_memory,
                                  weights_problem)  # fmt: skip
from mtlbook.train.history import History
from mtlbook.train.inputs import (as_loader, build_adatt, check_config_against_model, check_has_targets, check_model,
                                  seed_everything)  # fmt: skip
from mtlbook.train.optim import build_phase_optimizer, named_trainables
from mtlbook.train.pipeline import LossPipeline, LossTerms
from mtlbook.train.precision import Precision
from mtlbook.train.resume import CHECKPOINT_FORMAT, restore_trainer_state, trainer_state
from mtlbook.train.reweighting import loss_weight_snapshot
from mtlbook.train.strategy import make_strategy

__all__ = ["CHECKPOINT_FORMAT", "DIVERGED_WEIGHT", "EarlyStopping", "Trainer", "TrainingDivergedError",
           "TrainingWarning", "is_out_of_memory"]  # fmt: skip

class Trainer:
    """Train a multi-task model in two phases with adaTT, a loss balancer and safety guards.

    Args:
        model: an mtlbook multi-task model (``task_names``, ``task_specs``, ``forward(x) ->
            {task: output}``, ``shared_experts``, ``shared_parameters()``,
            ``gate_parameters()``, ``gate_entropy()``, ``freeze_gates()``), moved to the
            trainer's device. A model built with its own nonzero ``gate_entropy_weight``
            triggers a warning (the config's weight is used).
        config: a :class:`TrainerConfig` (default: all defaults).
        adatt: an :class:`~mtlbook.adatt.AdaptiveTaskTransfer` over the model's tasks, or
            ``None``; alternatively ``config.adatt`` holds its keyword arguments (not both).
        callbacks: extra :class:`~mtlbook.train.callbacks.Callback` objects, called after
            the default ones the config builds.

    Attributes: ``history``, ``balancer``, ``pipeline`` (:class:`~mtlbook.train.pipeline.LossPipeline`),
    ``callbacks``, ``early_stopping`` (the default :class:`~mtlbook.train.callbacks.EarlyStopping`),
    ``optimizer``/``scheduler``/``scaler`` of the current phase (``None`` before it starts),
    ``phase``, ``phase_epoch``, ``epoch``, ``step``, ``strategy``, ``precision``, ``distributed``,
    ``fast_path`` (True for an ``experts="bank"`` model, the default: its losses are computed a
    group of tasks at a time, :mod:`mtlbook.losses_grouped`, and AdamW is fused).
    """

    def __init__(self, model: nn.Module, config: TrainerConfig | None = None, adatt: nn.Module | None = None,
                 callbacks: Sequence[Callback] | None = None) -> None:  # fmt: skip
        config = TrainerConfig() if config is None else config
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
        check_model(model)
        extra = check_callbacks(callbacks)
        self.config = config
        self.task_specs = tuple(model.task_specs)
        self.task_names = tuple(model.task_names)
        check_config_against_model(config, model, self.task_specs)

        # a DistributedStrategy under torchrun (a process group of several ranks), else SingleProcess
        self.strategy = make_strategy(config.device, config.ddp_timeout_s, config.ddp_find_unused_parameters)
        self.distributed = self.strategy.context
        self.device = self.strategy.device
        self.precision = Precision(config.amp, self.device)
        self.amp_dtype = self.precision.dtype
        if self.device.type == "cuda":
            # TF32 matmuls and cuDNN autotuning: the cheap speed-ups (torch.compile: config.compile_forward).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        self.model = model.to(self.device)
        self.adatt = build_adatt(adatt, config, self.task_names, self.model, self.device)
        self.balancer = build_balancer(config.balancing, len(self.task_names), **config.balancing_kwargs).to(self.device)
        fixed = torch.tensor([float(config.task_weights.get(t, 1.0)) for t in self.task_names], device=self.device)
        losses = {s.name: config.losses[s.name] for s in self.task_specs if s.name in config.losses}
        # a model built with experts="bank" trains on the fast path all the way: its losses a
        # group of tasks at a time and AdamW's fused kernel (same arithmetic, other rounding);
        # the module form keeps the per-task losses and foreach AdamW every stored run used
        self.fast_path = getattr(model, "experts_mode", "modules") == "bank"
        self.pipeline = LossPipeline(self.task_specs, losses, config.loss_kwargs, fixed, self.balancer, self.adatt,
                                     self.model.gate_entropy, config.gate_entropy_weight,
                                     grouped=self.fast_path)  # fmt: skip
        check_compile(config.compile_forward, self.distributed is not None, self.balancer)
        # stage 1 with the forward pass: eager, or one compiled function (mtlbook.train.compiled);
        # task_losses is looked up at each call, so a replaced pipeline.task_losses is the one that runs
        stage_one = lambda outputs, batch: self.pipeline.task_losses(outputs, batch)  # noqa: E731
        self.forward_losses = forward_and_losses(stage_one, config.compile_forward)
        # a step on which adaTT measures reads the forward pass's features: always eager
        self.forward_losses_eager = forward_and_losses(stage_one, False)
        model_weight = float(getattr(model, "gate_entropy_weight", 0.0) or 0.0)
        if model_weight != 0.0 and self.is_main_process:
            warnings.warn(f"the model's own gate_entropy_weight={model_weight} is not used by Trainer; the trainer adds "
                          f"-TrainerConfig.gate_entropy_weight * model.gate_entropy() (currently "
                          f"{self.pipeline.gate_weight})", TrainingWarning, stacklevel=2)  # fmt: skip
        self.callbacks: list[Callback] = default_callbacks(config, self.adatt is not None, self.is_main_process)
        self.callbacks += extra
        self.early_stopping: EarlyStopping = next(cb for cb in self.callbacks if isinstance(cb, EarlyStopping))
        self.history = History(self.task_names)
        self.phase, self.phase_epoch, self.epoch, self.step, self.batches_seen = 1, 0, 0, 0, 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.phase2_undo: dict[str, Any] | None = None  # what phase 2 changed (see Phase2Freeze)
        self.train_loader: Iterable[Batch] | None = None
        self._group_param_names: list[dict[str, Any]] = []
        self._micro_batches = 0
        # set by load_checkpoint, consumed when fit (re)builds the phase / the loader
        self._pending_optim: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._resumed = False
        self._loader_generator: torch.Generator | None = None
        # set while an epoch runs: an interrupt leaves it set, and the weights then hold a
        # partial epoch that neither fit nor a checkpoint could continue exactly
        self._epoch_in_progress: int | None = None
        self._fit_callbacks: list[Callback] = []

    @property
    def is_main_process(self) -> bool:
        """True in the process that writes checkpoints, shows progress and warns (rank 0)."""
        return self.strategy.is_main

    @property
    def rank(self) -> int:
        return self.strategy.rank

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def checkpoint_path(self) -> Path | None:
        """``config.checkpoint_dir / "last.pt"`` (``None`` without a checkpoint folder)."""
        return None if self.config.checkpoint_dir is None else Path(self.config.checkpoint_dir) / "last.pt"

    @property
    def adatt_active(self) -> bool:
        return self.adatt is not None and bool(self.adatt.enabled)

    def named_trainables(self) -> dict[str, nn.Parameter]:
        """Every parameter the trainer could optimise, by qualified name."""
        return named_trainables(self.model, self.balancer, self.adatt)

    def emit(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every callback, the trainer's then this ``fit``'s, in order."""
        for callback in self.callbacks + self._fit_callbacks:
            getattr(callback, hook)(self, *args)

    def _start_phase(self) -> None:
        """Build optimizer, scheduler and scaler for the current phase (restoring pending state)."""
        pending, self._pending_optim = self._pending_optim, None
        built = build_phase_optimizer(self, pending)
        self.optimizer, self.scheduler, self.scaler, self._group_param_names = built

    def fit(self, train_data: Any, val_data: Any = None, resume_from: str | os.PathLike[str] | None = None,
            callbacks: Sequence[Callback] | None = None) -> History:  # fmt: skip
        """Run (or continue) both phases and return the :class:`History`.

        Args:
            train_data: a :class:`~mtlbook.data.batch.MultiTaskDataset` (batched with
                ``config.batch_size``, shuffled by a generator seeded with ``config.seed``),
                a ``DataLoader`` of :class:`~mtlbook.data.batch.Batch`, or a list of Batch.
            val_data: the same kinds, for validation metrics and early stopping (``None``:
                no validation, no early stopping, no best-weight restore).
            resume_from: a checkpoint written by this trainer's configuration; training
                continues right after its epoch (also after an explicit
                :meth:`load_checkpoint`). A finished run returns at once.
            callbacks: extra callbacks for this call only (after the trainer's own).
        """
        extra = check_callbacks(callbacks)
        if resume_from is None and self._epoch_in_progress is not None:
            raise RuntimeError(
                f"the previous fit() was interrupted in the middle of epoch {self._epoch_in_progress}: the weights hold "
                "part of that epoch, and running it again would apply those batches twice. Resume from the last "
                "checkpoint (fit(..., resume_from=path) or load_checkpoint(path)) or start a new Trainer"
            )
        self._fit_callbacks = extra  # set before a resume: they take their state from the checkpoint too
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif not self._resumed and self.epoch == 0 and self.optimizer is None and self.config.seed is not None:
            seed_everything(self.config.seed)
        cfg = self.config
        check_has_targets(train_data, "train_data", self.task_names)
        train_loader = as_loader(train_data, True, self.task_specs, self.config, self.strategy)
        val_loader = None if val_data is None else as_loader(val_data, False, self.task_specs, self.config, self.strategy)
        self._loader_generator = getattr(train_loader, "generator", None)
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng, self._loader_generator)
            self._pending_rng = None
        skipped_before = (self.history.skipped_nan, self.history.skipped_oom)
        self.train_loader = train_loader
        try:
            self.emit("on_fit_start")
            if self.phase == 1:
                self._run_phase(train_loader, val_loader)
                if cfg.phase2_epochs > 0:  # the boundary: fresh optimizer, scheduler, scaler, early stopping
                    self.phase, self.phase_epoch = 2, 0
                    self.optimizer = self.scheduler = self.scaler = None
                    self._pending_optim = None
            if self.phase == 2 and cfg.phase2_epochs > 0:
                self._run_phase(train_loader, val_loader)
        finally:
            self.emit("on_fit_end")
            self._loader_generator = self.train_loader = None
            self._fit_callbacks = []
        n_nan = self.history.skipped_nan - skipped_before[0]
        n_oom = self.history.skipped_oom - skipped_before[1]
        if (n_nan or n_oom) and self.is_main_process:
            warnings.warn(f"training skipped {n_nan} batch(es) with a non-finite loss or gradient and {n_oom} after "
                          "out-of-memory errors; weights were left untouched for them (see history records "
                          "'skipped_nan' / 'skipped_oom')", TrainingWarning, stacklevel=2)  # fmt: skip
        return self.history

    def _run_phase(self, train_loader: Iterable[Batch], val_loader: Iterable[Batch] | None) -> None:
        self.emit("on_phase_start")
        length = self.config.phase1_epochs if self.phase == 1 else self.config.phase2_epochs
        while self.phase_epoch < length and not any(cb.wants_stop(self) for cb in self.callbacks + self._fit_callbacks):
            if self.optimizer is None:
                self._start_phase()
            self._run_epoch(train_loader, val_loader)
        self.emit("on_phase_end")

    def _run_epoch(self, train_loader: Iterable[Batch], val_loader: Iterable[Batch] | None) -> dict[str, Any]:
        self.emit("on_epoch_start")
        self._epoch_in_progress = self.epoch
        for module in (self.model, self.balancer, self.adatt):
            if module is not None:
                module.train()
        assert self.optimizer is not None and self.scheduler is not None
        record: dict[str, Any] = {
            "epoch": self.epoch, "phase": self.phase, "phase_epoch": self.phase_epoch,
            "adatt_phase": None if self.adatt is None else str(self.adatt.phase), "adatt_enabled": self.adatt_active,
            "gates_frozen": bool(self.model.gates_frozen),
            "lr": {g["name"]: float(g["lr"]) for g in self.optimizer.param_groups},
        }  # fmt: skip
        self.strategy.start_epoch(self, train_loader, self.epoch)
        counters = {"skipped_nan": 0, "skipped_oom": 0, "amp_overflow": 0, "steps": 0, "batches": 0}
        grad_norms: list[float] = []
        sums = MetricSums(self.task_specs, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self._micro_batches = 0
        # One iterator is opened and dropped before the real one: the loop of earlier versions
        # did so through its progress bar, and a DataLoader draws a seed from its generator per
        # iterator, so keeping the draw keeps every stored shuffle (and result) bit-identical.
        iter(train_loader)
        for batch in train_loader:
            terms = self._train_batch(batch.to(self.device), sums, counters, grad_norms)
            self.emit("on_batch_end", batch, terms)
        if self._micro_batches > 0:  # a trailing, incomplete accumulation window
            self._optimizer_step(counters, grad_norms)

        record["train"] = reduce_metrics(sums, self.pipeline.fixed_weights, self.strategy)
        record["val"] = None if val_loader is None else self.evaluate(val_loader)
        record.update(counters)
        record["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else math.nan
        record.update(epoch_snapshots(self.balancer, self.adatt))
        fixed = self.pipeline.fixed_weights
        record.update(loss_weight_snapshot(self.adatt, self.balancer, self.task_names, record["train"], fixed))
        with warnings.catch_warnings():
            # an epoch whose steps were all skipped would trigger torch's "scheduler before
            # optimizer" warning; the schedule still advances by one epoch, as documented
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        mean_losses = torch.tensor([record["train"].get(f"{t}/loss", math.nan) for t in self.task_names],
                                   device=self.device) * fixed  # fmt: skip
        self.balancer.on_epoch_end(self.epoch, mean_losses)
        problem = weights_problem(self.model, self.balancer, self.adatt)
        if problem is not None:
            kept = "" if self.checkpoint_path is None else f"; {str(self.checkpoint_path)!r} still holds the last good state"
            raise TrainingDivergedError(f"training diverged in epoch {self.epoch} (phase {self.phase}): {problem}{kept}. "
                                        "Lower TrainerConfig.lr (or expert_lr), keep grad_clip, or check the data")
        if counters["batches"] == 0:
            self._epoch_in_progress = None  # nothing was trained: the weights are untouched
            raise ValueError("train_data yielded no batches: refusing to train on nothing")
        self.emit("on_validation", record)  # adaTT clock, gate clock, early stopping
        self.epoch += 1
        self.phase_epoch += 1
        self._epoch_in_progress = None
        self.emit("on_epoch_end", record)  # history, checkpoint, progress
        return record

    def _skip(self, counters: dict[str, int], key: str) -> None:
        """Drop the batch (and the pending accumulation window): no weight will change."""
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        self._micro_batches = 0
        self.strategy.skip()
        counters[key] += 1

    def _train_batch(self, batch: Batch, sums: MetricSums, counters: dict[str, int], grad_norms: list[float]) -> LossTerms | None:
        """Forward, the loss pipeline, backward; a step every ``accumulation_steps`` batches."""
        cfg, pipe, strategy = self.config, self.pipeline, self.strategy
        self.emit("on_batch_start", batch)
        step_index = self.batches_seen
        self.batches_seen += 1
        counters["batches"] += 1
        syncs = self._micro_batches + 1 >= cfg.accumulation_steps
        try:
            with strategy.accumulation_window(syncs):
                with self.precision.autocast():
                    measures = self.adatt is not None and pipe.transfers and self.adatt.should_measure(step_index)
                    stage_one = self.forward_losses_eager if measures else self.forward_losses
                    outputs, raw = stage_one(strategy.forward_module(self.model), batch)  # stage 1
                terms = LossTerms(raw, pipe.present(batch), raw)
                terms.weighted = pipe.balance(raw, terms.present)  # stages 2-3
                if strategy.any_rank(not bool(torch.isfinite(terms.weighted).all())):
                    self._skip(counters, "skipped_nan")
                    return None
                measure = strategy.measure(self.adatt, cfg.adatt_sync) if self.adatt is not None else None
                terms.final = pipe.transfer(terms.weighted, terms.present, batch, step_index, measure)  # stage 4
                terms.objective = pipe.objective(terms.final)  # stage 5
                if strategy.any_rank(not bool(torch.isfinite(terms.objective))):
                    self._skip(counters, "skipped_nan")
                    return None
                k = float(cfg.accumulation_steps)
                scale = None if self.scaler is None else self.scaler.scale
                self.balancer.backward(terms.objective / k, terms.weighted / k, self.model.shared_parameters(), scale=scale)
                strategy.after_backward(syncs)
        except Exception as error:  # noqa: BLE001 - only OOM is swallowed, the rest re-raised
            if not is_out_of_memory(error) or not strategy.can_recover_oom():
                raise
            outputs = raw = terms = None  # release what the failed step held
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._skip(counters, "skipped_oom")
            return None
        self.emit("on_after_backward")
        sums.add(raw, outputs, batch)
        self._micro_batches += 1
        if self._micro_batches >= cfg.accumulation_steps:
            self._optimizer_step(counters, grad_norms)
        return terms

    def _optimizer_step(self, counters: dict[str, int], grad_norms: list[float]) -> None:
        """Unscale, check and clip the gradients, then step (or skip if they are not finite)."""
        assert self.optimizer is not None
        self._micro_batches = 0
        self.strategy.sync_gradients(self)
        self.emit("on_before_optimizer_step")
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
        elif finite:
            self.optimizer.step()
        if finite:
            self.step += 1
            counters["steps"] += 1
            grad_norms.append(float(norm))
        else:
            counters["amp_overflow" if self.scaler is not None else "skipped_nan"] += 1
        self.balancer.after_optimizer_step()  # e.g. keep uncertainty log-variances in range
        self.optimizer.zero_grad(set_to_none=True)
        self.strategy.after_step(self.balancer)

    @torch.no_grad()
    def evaluate(self, data: Any) -> dict[str, float]:
        """Validation metrics over ``data`` (same kinds as :meth:`fit` accepts), in eval mode.

        Returns a flat dict: ``"loss"`` (sum of fixed-weighted task losses), and per task
        ``"<task>/loss"`` plus ``"<task>/auc"``, ``"<task>/rmse"`` or ``"<task>/accuracy"``.
        Distributed: a collective (call it on every rank); a dataset is sharded without
        padding and the metrics are those of all its rows, identical on every rank.
        """
        loader = as_loader(data, False, self.task_specs, self.config, self.strategy)
        was_training = self.model.training
        self.model.eval()
        sums = MetricSums(self.task_specs, self.device)
        try:
            for batch in loader:
                evaluate_batch(self.model, batch.to(self.device), sums, self.pipeline, self.precision, self.strategy)
        finally:
            self.model.train(was_training)
        return reduce_metrics(sums, self.pipeline.fixed_weights, self.strategy)

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue the run exactly (plain types only)."""
        return trainer_state(self)

    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path | None:
        """Write :meth:`state_dict` atomically to ``path`` (main process only); returns the path.

        Distributed: call it on every rank; rank 0 writes (the others return ``None``) and all
        ranks wait at a barrier. Refuses (leaving ``path`` untouched) when the weights are not
        finite or exploded (:class:`TrainingDivergedError`) and in the middle of an epoch,
        e.g. after an interrupted ``fit`` (``RuntimeError``): such a file could not be resumed.
        """
        problem = weights_problem(self.model, self.balancer, self.adatt)
        if problem is not None:
            raise TrainingDivergedError(f"refusing to write checkpoint {str(path)!r}: {problem}")
        if self._epoch_in_progress is not None:
            raise RuntimeError(
                f"refusing to write checkpoint {str(path)!r} in the middle of epoch {self._epoch_in_progress}: it could "
                "not be resumed exactly (checkpoints are taken at epoch boundaries; the trainer writes them itself "
                "with TrainerConfig.checkpoint_dir)"
            )
        written = atomic_save(self.state_dict(), path) if self.is_main_process else None
        self.strategy.barrier()
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
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete or malformed ({type(error).__name__}: "
                                  f"{error}); it was not written by this version of the trainer, or it is damaged") from None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; see :meth:`load_checkpoint`."""
        restore_trainer_state(self, state)
