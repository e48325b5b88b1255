r"""One measurement: per-task gradients of one batch, and what :class:`Recorder` keeps of them.

Per batch :math:`B` with task losses :math:`L_i(B)` and shared parameters :math:`\theta_s`:

* gradient norms :math:`\lVert g_i \rVert_2` with :math:`g_i = \nabla_{\theta_s} L_i(B)`;
* the cosine matrix :math:`C_{ij} = \cos(g_i, g_j)` (:func:`mtlbook.gradients.cosine_matrix`);
* optionally the noise cosine :math:`n_i(B)` of every task on two halves of the batch
  (:mod:`mtlbook.diagnose.noise`);
* the affinity of chapter 5, :math:`A_t = \beta A_{t-1} + (1-\beta) C_t` with
  :math:`\beta = 0.9`, first observation taken as is, clamped to :math:`[-1, 1]`, pairs with a
  task whose gradient is zero on this batch left unchanged
  (:class:`mtlbook.adatt.TaskAffinityComputer`, the same code the trainer uses).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from mtlbook.adatt.affinity import TaskAffinityComputer
from mtlbook.gradients import cosine_matrix, per_task_gradients

__all__ = ["Measurement", "Recorder", "check_losses", "half_gradients", "measure", "nonfinite_tasks"]


class Measurement(NamedTuple):
    """One batch: ``losses`` ``[n]``, ``norms`` ``[n]``, ``cosines`` ``[n, n]``, the noise
    cosines ``noise`` ``[n]`` (same task, two halves) and ``null`` ``[n, n]``
    (:math:`\\cos(g_i, g_j^A - g_j^B)`, see :mod:`mtlbook.diagnose.noise`), NaN when not measured
    or when a gradient is zero, and the float64 ``gradients``."""

    losses: np.ndarray
    norms: np.ndarray
    cosines: np.ndarray
    noise: np.ndarray
    null: np.ndarray
    gradients: Tensor


def check_losses(
    losses: Any,
    where: str,
    task_names: Sequence[str] | None = None,
    *,
    allow_sequence: bool = False,
) -> dict[str, Tensor]:
    """Validate one set of task losses; return ``{task: 0-d tensor}`` in ``task_names`` order.

    Raises ``TypeError`` / ``ValueError`` naming ``where`` (e.g. ``"task_losses(batch 3)"``) for
    a wrong container, a key that is not a str, a non-scalar loss, a different set of tasks than
    ``task_names``, or no task at all.
    """
    if isinstance(losses, Mapping):
        items = dict(losses)
    elif allow_sequence and task_names is not None and isinstance(losses, (Sequence, Tensor)) and not isinstance(losses, str):
        values = list(losses.unbind(0)) if isinstance(losses, Tensor) and losses.dim() == 1 else list(losses)
        if len(values) != len(task_names):
            raise ValueError(f"{where} must hold one loss per task ({len(task_names)}: {list(task_names)}), got {len(values)}")
        items = dict(zip(task_names, values))
    else:
        accepted = "a dict {task name: scalar loss}" + (" or a sequence in task_names order" if allow_sequence else "")
        raise TypeError(f"{where} must return {accepted}, got {type(losses).__name__}")
    if not items:
        raise ValueError(f"{where} returned no task loss; it must return at least one")
    for key, loss in items.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: task names must be str, got {key!r}")
        if not isinstance(loss, Tensor):
            raise TypeError(f"{where}[{key!r}] must be a torch.Tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(
                f"{where}[{key!r}] must be a scalar loss (one element), got shape {list(loss.shape)}; reduce it, e.g. .mean()"
            )
    if task_names is not None and set(items) != set(task_names):
        raise ValueError(f"{where} returned tasks {sorted(items)}, expected the same tasks as before: {sorted(task_names)}")
    order = tuple(task_names) if task_names is not None else tuple(items)
    return {name: items[name].reshape(()) for name in order}


def nonfinite_tasks(losses: Mapping[str, Tensor]) -> dict[str, float]:
    """``{task: value}`` of the losses that are NaN or infinite."""
    bad = {}
    for name, loss in losses.items():
        value = float(loss.detach())
        if not math.isfinite(value):
            bad[name] = value
    return bad


def _cos_rows(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of every row of ``a`` with every row of ``b`` ``[n, n]``; NaN where a row is zero."""
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a @ b.T) / (na[:, None] * nb[None, :]).clamp_min(1e-300)
    cos[(na == 0)[:, None] | (nb == 0)[None, :]] = math.nan
    return cos


def half_gradients(
    task_losses: Callable[[Any], Any],
    batch: Any,
    params: list[Tensor],
    split: Callable[[Any], tuple[Any, Any]],
    names: tuple[str, ...],
    where: str,
) -> tuple[Tensor, Tensor]:
    """Per-task gradients ``[n, d]`` on the two halves ``split(batch)`` (checked like full batches)."""
    halves = split(batch)
    if not isinstance(halves, (tuple, list)) or len(halves) != 2:
        raise TypeError(f"split must return a pair (half_a, half_b), got {type(halves).__name__}")
    grads = []
    for label, half in zip(("first", "second"), halves):
        losses = check_losses(task_losses(half), f"task_losses({where}, {label} half)", names)
        bad = nonfinite_tasks(losses)
        if bad:
            raise ValueError(f"task_losses({where}, {label} half) gave non-finite losses {bad}; diagnose needs finite losses")
        grads.append(per_task_gradients(losses, params).gradients)
    return grads[0], grads[1]


def measure(
    losses: Mapping[str, Tensor],
    params: list[Tensor],
    *,
    halves: Callable[[], tuple[Tensor, Tensor]] | None = None,
) -> Measurement:
    """Norms, cosines and, when ``halves`` (a callable returning the two halves' gradients)
    is given, the noise and null cosines of one batch."""
    grads = per_task_gradients(losses, params).gradients
    n = len(losses)
    norms = grads.norm(dim=1)
    values = np.array([float(v.detach()) for v in losses.values()])
    noise, null = np.full(n, math.nan), np.full((n, n), math.nan)
    if halves is not None:
        grad_a, grad_b = halves()
        noise = torch.diagonal(_cos_rows(grad_a, grad_b)).cpu().numpy().copy()
        null = _cos_rows(grads, grad_a - grad_b).cpu().numpy()
    return Measurement(values, norms.cpu().numpy(), cosine_matrix(grads).cpu().numpy(), noise, null, grads)


class Recorder:
    """Collects measurements and the affinity EMA; :meth:`arrays` hands them to a report."""

    def __init__(self, task_names: tuple[str, ...], ema_decay: float) -> None:
        self.task_names = task_names
        self.affinity = TaskAffinityComputer(task_names, ema_decay=ema_decay)
        self.losses: list[np.ndarray] = []
        self.norms: list[np.ndarray] = []
        self.cosines: list[np.ndarray] = []
        self.noise: list[np.ndarray] = []
        self.null: list[np.ndarray] = []
        self.affinities: list[np.ndarray] = []
        self.steps: list[int] = []

    def add(self, m: Measurement, step: int) -> None:
        self.losses.append(m.losses)
        self.norms.append(m.norms)
        self.cosines.append(m.cosines)
        self.noise.append(m.noise)
        self.null.append(m.null)
        with torch.no_grad():
            affinity = self.affinity.update(m.gradients.cpu())
        self.affinities.append(affinity.detach().double().cpu().numpy().copy())
        self.steps.append(int(step))

    def __len__(self) -> int:
        return len(self.steps)

    def arrays(self) -> dict[str, np.ndarray]:
        n = len(self.task_names)
        if not self.steps:
            empty = np.zeros((0, n))
            return {"losses": empty, "grad_norms": empty, "cosines": np.zeros((0, n, n)), "noise_cosines": empty,
                    "null_cosines": np.zeros((0, n, n)), "affinity_history": np.zeros((0, n, n)), "steps": np.zeros(0, dtype=np.int64)}
        return {
            "losses": np.stack(self.losses),
            "grad_norms": np.stack(self.norms),
            "cosines": np.stack(self.cosines),
            "noise_cosines": np.stack(self.noise),
            "null_cosines": np.stack(self.null),
            "affinity_history": np.stack(self.affinities),
            "steps": np.asarray(self.steps, dtype=np.int64),
        }
