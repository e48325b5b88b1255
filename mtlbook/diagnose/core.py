r"""``mtlbook.diagnose``: measure a multi-task model's gradients on its shared parameters.

Works on any PyTorch model: the caller supplies a function that turns a batch into one
scalar loss per task, an iterable of batches, and the shared parameters. Nothing is trained
and no ``.grad`` is touched: every gradient is taken with ``torch.autograd.grad``
(:func:`mtlbook.gradients.per_task_gradients`). What is measured per batch and how the noise
baseline works: :mod:`mtlbook.diagnose.measure` and :mod:`mtlbook.diagnose.noise`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from mtlbook.diagnose.measure import Recorder, check_losses, half_gradients, measure, nonfinite_tasks
from mtlbook.diagnose.noise import split_batch
from mtlbook.diagnose.report import DiagnosisReport
from mtlbook.gradients import as_parameter_list

__all__ = ["diagnose", "check_settings"]


def check_settings(alpha: Any, imbalance_threshold: Any, blocking_threshold: Any, transfer_lambda: Any,
                   ema_decay: Any) -> dict[str, float]:
    """Validate the report settings shared by :func:`diagnose` and :class:`GradientMonitor`."""
    def number(value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)

    alpha = number(alpha, "alpha")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
    imbalance_threshold = number(imbalance_threshold, "imbalance_threshold")
    if imbalance_threshold <= 1:
        raise ValueError(f"imbalance_threshold must be > 1, got {imbalance_threshold!r}")
    blocking_threshold = number(blocking_threshold, "blocking_threshold")
    if not -1 <= blocking_threshold <= 1:
        raise ValueError(f"blocking_threshold must be in [-1, 1], got {blocking_threshold!r}")
    transfer_lambda = number(transfer_lambda, "transfer_lambda")
    if transfer_lambda < 0:
        raise ValueError(f"transfer_lambda must be >= 0, got {transfer_lambda!r}")
    ema_decay = number(ema_decay, "ema_decay")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
    return {"alpha": alpha, "imbalance_threshold": imbalance_threshold, "blocking_threshold": blocking_threshold,
            "transfer_lambda": transfer_lambda, "ema_decay": ema_decay}


def diagnose(
    task_losses: Callable[[Any], Mapping[str, Tensor]],
    batches: Iterable[Any],
    shared_parameters: nn.Module | Iterable[Tensor],
    *,
    n_batches: int | None = None,
    noise_baseline: bool = True,
    split: Callable[[Any], tuple[Any, Any]] | None = None,
    alpha: float = 0.05, imbalance_threshold: float = 10.0, blocking_threshold: float = -0.1,
    transfer_lambda: float = 0.1, ema_decay: float = 0.9,  # the findings' settings (check_settings)
) -> DiagnosisReport:
    """Measure per-task gradients on the shared parameters at the model's current weights.

    Args:
        task_losses: ``task_losses(batch) -> {task: scalar loss}``, the losses of one batch
            with their graph attached (the same tasks, in any order, on every batch).
        batches: any iterable of what ``task_losses`` accepts (a ``DataLoader``, a list).
        shared_parameters: the parameters the tasks share: a module (its parameters that
            require grad) or tensors (each must require grad).
        n_batches: measure at most this many batches (int >= 1; ``None``: all of them, so
            pass a finite iterable).
        noise_baseline: also measure every task on two halves of each batch (two more
            forward passes per batch) for the noise threshold of :mod:`mtlbook.diagnose.noise`.
        split: ``split(batch) -> (half_a, half_b)``; default :func:`split_batch` (even and odd
            rows of every tensor in tensors, dicts, tuples, lists and dataclasses).
        alpha: share of pure-noise batches the noise threshold lets through, in (0, 0.5).
        imbalance_threshold: median norm ratio (> 1) from which an imbalance is reported.
        blocking_threshold: adaTT's :math:`\\tau` in [-1, 1] for the blocking finding.
        transfer_lambda: adaTT's :math:`\\lambda \\ge 0` for the transfer finding.
        ema_decay: :math:`\\beta` of the affinity EMA, in [0, 1) (chapter 5: 0.9).

    Returns:
        :class:`DiagnosisReport` with ``grad_norms`` ``[n_batches, n_tasks]``, ``cosines``
        ``[n_batches, n_tasks, n_tasks]``, ``task_names``, ``summary()``, ``plot()`` and
        ``findings()``.

    Raises:
        TypeError / ValueError naming the argument: ``task_losses`` not callable or returning
        something other than a dict of scalar tensors, or a non-finite loss (the batch index
        is named); ``batches`` not iterable or empty; ``shared_parameters`` empty or holding
        a tensor that does not require grad; a bad setting. A task whose loss does not reach
        the shared parameters is not an error: it is reported (``detached_tasks``, findings).
    """
    if not callable(task_losses):
        raise TypeError(f"task_losses must be a callable batch -> dict of scalar losses, got {type(task_losses).__name__}")
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}") from None
    if n_batches is not None:
        if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
            raise ValueError(f"n_batches must be an int >= 1 or None, got {n_batches!r}")
        iterator = itertools.islice(iterator, n_batches)
    params = as_parameter_list(shared_parameters)
    settings = check_settings(alpha, imbalance_threshold, blocking_threshold, transfer_lambda, ema_decay)
    if split is not None and not callable(split):
        raise TypeError(f"split must be a callable batch -> (half_a, half_b) or None, got {type(split).__name__}")
    splitter = split if split is not None else split_batch

    recorder: Recorder | None = None
    names: tuple[str, ...] | None = None
    with torch.enable_grad():
        for k, batch in enumerate(iterator):
            where = f"task_losses(batch {k})"
            losses = check_losses(task_losses(batch), where, names)
            bad = nonfinite_tasks(losses)
            if bad:
                raise ValueError(f"{where} gave non-finite losses {bad}; diagnose measures at finite losses only: "
                                 f"check this batch and the model's outputs")
            if names is None:
                names = tuple(losses)
                recorder = Recorder(names, settings["ema_decay"])
            halves = None
            if noise_baseline:
                def halves(batch=batch, where=f"batch {k}"):
                    return half_gradients(task_losses, batch, params, splitter, names, where)
            recorder.add(measure(losses, params, halves=halves), k)
    if recorder is None:
        raise ValueError("batches yielded no batch; pass at least one (and n_batches >= 1)")
    settings.pop("ema_decay")
    return DiagnosisReport(task_names=names, **recorder.arrays(), **settings, source="diagnose")
