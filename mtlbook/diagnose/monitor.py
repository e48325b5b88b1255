r"""``mtlbook.GradientMonitor``: the diagnosis inside the caller's own training loop.

One call per training step with that step's per-task losses (graph attached, *before* the
loss's ``backward``); every ``every``-th call it measures the same quantities as
:func:`mtlbook.diagnose` (norms, cosines, affinity EMA, optionally the noise baseline) and
leaves the graph for the caller's ``backward`` (``retain_graph=True``; no ``.grad`` is
touched). :meth:`GradientMonitor.report` turns the measurements so far into a
:class:`~mtlbook.diagnose.report.DiagnosisReport` whose ``steps`` are the training steps,
with an extra *drift* finding (the ratio early against late in training).

A training step must never die for a measurement: a step whose losses are not finite is not
measured and is counted in ``report().skipped``.

**Distributed runs** (``torch.distributed``, DDP): each process measures the gradients of its
*own* local batch, which ``torch.autograd.grad`` computes before any all-reduce (DDP
synchronises ``.grad`` during ``backward``, which this monitor does not run). Every rank can
keep a monitor; the numbers differ between ranks only through their batches. Report from rank
0 (``if dist.get_rank() == 0: print(monitor.report().findings())``). The norms then describe a
batch of the per-process size, so their noise is that of the local batch, not of the global one.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlbook.diagnose.core import check_settings
from mtlbook.diagnose.measure import Recorder, check_losses, half_gradients, measure, nonfinite_tasks
from mtlbook.diagnose.noise import split_batch
from mtlbook.diagnose.report import DiagnosisReport
from mtlbook.gradients import as_parameter_list

__all__ = ["GradientMonitor"]


class GradientMonitor:
    """Per-task gradient measurements on the shared parameters, taken during training.

    Args:
        shared_parameters: a module or tensors (see :func:`mtlbook.diagnose`).
        task_names: the tasks, in the order of the report (a non-empty sequence of distinct str).
        every: measure every ``every``-th call of :meth:`step` (int >= 1), starting with the first.
        task_losses: optional ``task_losses(batch) -> {task: loss}``; with it, :meth:`step`
            also measures the noise baseline on two halves of the ``batch`` it is given.
        split: how to halve a batch (default :func:`~mtlbook.diagnose.noise.split_batch`).
        alpha, imbalance_threshold, blocking_threshold, transfer_lambda, ema_decay: as in
            :func:`mtlbook.diagnose`.

    Example::

        monitor = mtlbook.GradientMonitor(model.trunk, ["rul", "health"], every=20)
        for batch in loader:
            losses = {"rul": ..., "health": ...}
            monitor.step(losses)
            sum(losses.values()).backward(); opt.step(); opt.zero_grad()
        print(*monitor.report().findings(), sep="\\n")
    """

    def __init__(
        self,
        shared_parameters: nn.Module | Iterable[Tensor],
        task_names: Sequence[str],
        every: int = 10,
        *,
        task_losses: Callable[[Any], Mapping[str, Tensor]] | None = None,
        split: Callable[[Any], tuple[Any, Any]] | None = None,
        alpha: float = 0.05, imbalance_threshold: float = 10.0, blocking_threshold: float = -0.1,
        transfer_lambda: float = 0.1, ema_decay: float = 0.9,  # the findings' settings (check_settings)
    ) -> None:
        self.params = as_parameter_list(shared_parameters)
        if isinstance(task_names, str) or not isinstance(task_names, Sequence) or not task_names:
            raise ValueError(f"task_names must be a non-empty sequence of str, got {task_names!r}")
        if not all(isinstance(t, str) for t in task_names) or len(set(task_names)) != len(task_names):
            raise ValueError(f"task_names must be distinct str, got {list(task_names)}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if task_losses is not None and not callable(task_losses):
            raise TypeError(f"task_losses must be a callable batch -> dict of losses or None, got {type(task_losses).__name__}")
        if split is not None and not callable(split):
            raise TypeError(f"split must be a callable batch -> (half_a, half_b) or None, got {type(split).__name__}")
        self.task_names = tuple(task_names)
        self.every = every
        self.task_losses = task_losses
        self.split = split if split is not None else split_batch
        self.settings = check_settings(alpha, imbalance_threshold, blocking_threshold, transfer_lambda, ema_decay)
        self.reset()

    def reset(self) -> None:
        """Forget every measurement and restart the step count."""
        self.n_steps = 0
        self.skipped: dict[str, int] = {}
        self._recorder = Recorder(self.task_names, self.settings["ema_decay"])

    @property
    def n_measurements(self) -> int:
        return len(self._recorder)

    def step(self, task_losses: Mapping[str, Tensor] | Sequence[Tensor], batch: Any = None) -> bool:
        """Count one training step; measure it if it is due. Returns True when it measured.

        Args:
            task_losses: ``{task: scalar loss}`` (or a sequence in ``task_names`` order) of
                this step, graph attached. Call before ``backward``.
            batch: this step's batch, needed only when the monitor has ``task_losses`` (for
                the noise baseline).
        """
        step = self.n_steps
        self.n_steps += 1
        if step % self.every:
            return False
        losses = check_losses(task_losses, "task_losses", self.task_names, allow_sequence=True)
        if nonfinite_tasks(losses):
            reason = "a task loss was not finite"
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
            return False
        halves = None
        if self.task_losses is not None:
            if batch is None:
                raise ValueError("batch is required by step() when the monitor has task_losses (noise baseline)")

            def halves():
                return half_gradients(self.task_losses, batch, self.params, self.split, self.task_names, f"step {step}")
        with torch.enable_grad():
            self._recorder.add(measure(losses, self.params, halves=halves), step)
        return True

    __call__ = step

    def report(self) -> DiagnosisReport:
        """The measurements so far as a :class:`DiagnosisReport` (``source="monitor"``)."""
        settings = {k: v for k, v in self.settings.items() if k != "ema_decay"}
        return DiagnosisReport(task_names=self.task_names, **self._recorder.arrays(), **settings,
                               skipped=dict(self.skipped), source="monitor")
