r"""The per-task loss vector, computed a group of tasks at a time (the bank form's loss path).

:func:`~mtlbook.losses.task_losses` calls each task's loss on its own: about fifteen small
kernels per task forward (checks, masking, the loss, the masked mean) and as many backward,
so at 16 tasks the losses launch more kernels than the model. Tasks that share a row-wise
loss (same name and options, outputs and targets of one shape) need the same arithmetic on
tensors of the same shape. Stacked task-major, outputs :math:`X \in \mathbb{R}^{K \times B
\times \dots}`, targets :math:`Y` and presence masks :math:`M \in \{0, 1\}^{K \times B}`, the
group's losses are

.. math::

    L_k = \frac{\sum_b M_{kb}\, \bar\ell(X_{kb}, Y_{kb})}{\max\big(1, \sum_b M_{kb}\big)},
    \qquad k = 1..K,

with :math:`\bar\ell` the per-row loss (the mean over trailing target dimensions), each
operation one kernel over the :math:`K` tasks. Missing rows are replaced by constants before
any arithmetic, as in the per-task losses, so a placeholder target (NaN, ``-1``) never reaches
a value or a gradient. The result is :math:`[c_1 L_1, \dots, c_n L_n]` in task order, the
vector :func:`~mtlbook.losses.task_losses` returns.

**Which losses.** ``bce``, ``mse``, ``huber`` and ``ce`` (the defaults of the binary, regression
and multiclass kinds, and Huber) are computed by group. ``focal``, ``infonce`` (which
compares rows with each other) and losses added with
:func:`~mtlbook.losses.register_loss` are computed task by task, by the very function
:func:`~mtlbook.losses.task_losses` calls, and so is any task alone in its group.

**Same numbers?** Each element goes through the same formula, but a kernel may round an
element differently depending on where it falls in a vectorised loop, so the values agree
with :func:`~mtlbook.losses.task_losses` to float rounding (``tests/test_losses_grouped.py``
checks values and gradients to 1e-6), not always bit for bit. That is why the trainer uses
this path for models built with ``experts="bank"`` only (whose matmuls round differently
anyway) and leaves the module form, with which every stored result of the book was made, on
:func:`~mtlbook.losses.task_losses`.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlbook._loss_rows import (
    _check_class_indices,
    _check_float,
    _check_present,
    _check_tensor,
    _check_unit_interval,
    _float_target,
    _match_shapes,
)
from mtlbook.data.batch import Batch, TaskSpec
from mtlbook.losses import LOSSES, ResolvedTaskLoss, resolve_task_losses

__all__ = ["GROUPED_LOSSES", "grouped_task_losses"]


# --------------------------------------------------------------------------- helpers
def _row_mask(mask: Tensor, like: Tensor) -> Tensor:
    """``[K, B]`` mask reshaped to broadcast against ``like`` (``[K, B, ...]``)."""
    return mask.reshape(*mask.shape, *([1] * (like.dim() - 2)))


def _sanitise(x: Tensor, y: Tensor, mask: Tensor | None, fill_target: float | int = 0) -> tuple[Tensor, Tensor]:
    """Missing rows replaced by constants (output 0, target ``fill_target``) before any arithmetic."""
    if mask is None:
        return x, y
    safe_x = torch.where(_row_mask(mask, x), x, torch.zeros((), dtype=x.dtype, device=x.device))
    safe_y = torch.where(_row_mask(mask, y), y, torch.full((), fill_target, dtype=y.dtype, device=y.device))
    return safe_x, safe_y


def _masked_row_means(per_element: Tensor, mask: Tensor | None) -> Tensor:
    """``[K]``: for each task the mean over present rows of the per-row mean; 0 when none is present."""
    n_tasks, n_rows = per_element.shape[:2]
    per_row = per_element.reshape(n_tasks, n_rows, -1).mean(dim=2) if per_element.dim() > 2 else per_element
    if mask is None:
        return per_row.sum(dim=1) / max(n_rows, 1)
    per_row = torch.where(mask, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    return per_row.sum(dim=1) / mask.sum(dim=1).clamp(min=1).to(per_row.dtype)


def _stack_rows(tasks: Sequence[ResolvedTaskLoss], name: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """Outputs ``[K, B, ...]`` (a ``[B, 1]`` output squeezed, as the per-task losses do), targets, masks."""
    outputs, masks = [], []
    for task in tasks:
        _check_tensor(task.output, name)
        _check_tensor(task.target, "target")
        output = _match_shapes(task.output, task.target)
        outputs.append(output)
        masks.append(_check_present(task.present, output.shape[0], output.device))
    mask = None if masks[0] is None else torch.stack(masks)  # a group has all masks or none
    return torch.stack(outputs), torch.stack([task.target for task in tasks]), mask


# --------------------------------------------------------------------------- the grouped losses
def _bce(tasks: Sequence[ResolvedTaskLoss]) -> Tensor:
    x, y, mask = _stack_rows(tasks, "logits")
    x, y = _sanitise(x, _float_target(y).to(x.dtype), mask)
    _check_unit_interval(y)
    return _masked_row_means(F.binary_cross_entropy_with_logits(x, y, reduction="none"), mask)


def _mse(tasks: Sequence[ResolvedTaskLoss]) -> Tensor:
    x, y, mask = _stack_rows(tasks, "output")
    x, y = _sanitise(x, _float_target(y).to(x.dtype), mask)
    return _masked_row_means(F.mse_loss(x, y, reduction="none"), mask)


def _huber(tasks: Sequence[ResolvedTaskLoss]) -> Tensor:
    delta = _check_float(tasks[0].kwargs.get("delta", 1.0), "delta", 0.0, low_inclusive=False)
    x, y, mask = _stack_rows(tasks, "output")
    x, y = _sanitise(x, _float_target(y).to(x.dtype), mask)
    return _masked_row_means(F.huber_loss(x, y, reduction="none", delta=delta), mask)


def _cross_entropy(tasks: Sequence[ResolvedTaskLoss]) -> Tensor:
    label_smoothing = _check_float(tasks[0].kwargs.get("label_smoothing", 0.0), "label_smoothing", 0.0, 1.0)
    if label_smoothing >= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    masks = []
    for task in tasks:  # the checks of cross_entropy_loss, task by task
        logits, target = _check_tensor(task.output, "logits"), _check_tensor(task.target, "target")
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, n_classes], got shape {list(logits.shape)}")
        if target.dim() != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(f"target must be [batch] = [{logits.shape[0]}], got shape {list(target.shape)}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
        masks.append(_check_present(task.present, logits.shape[0], logits.device))
    mask = None if masks[0] is None else torch.stack(masks)
    x = torch.stack([task.output for task in tasks])  # [K, B, C]
    x, y = _sanitise(x, torch.stack([task.target for task in tasks]).long(), mask, fill_target=0)
    n_tasks, n_rows, n_classes = x.shape
    _check_class_indices(y, n_classes)
    per_row = F.cross_entropy(x.reshape(n_tasks * n_rows, n_classes), y.reshape(-1), reduction="none",
                              label_smoothing=label_smoothing)  # fmt: skip
    return _masked_row_means(per_row.reshape(n_tasks, n_rows), mask)


#: Loss name -> the function computing a group of its tasks: ``(tasks) -> [K]`` unweighted losses.
GROUPED_LOSSES: dict[str, Callable[[Sequence[ResolvedTaskLoss]], Tensor]] = {
    "bce": _bce,
    "mse": _mse,
    "huber": _huber,
    "ce": _cross_entropy,
}


def _group_key(task: ResolvedTaskLoss) -> Hashable:
    """Tasks with equal keys are computed together; ``None``: computed on its own."""
    if task.loss_name not in GROUPED_LOSSES or not isinstance(task.output, Tensor) or not isinstance(task.target, Tensor):
        return None
    try:
        options = tuple(sorted(task.kwargs.items()))
        hash(options)
    except TypeError:  # unhashable option values: let the per-task loss judge them
        return None
    shape = tuple(task.output.shape)
    if len(shape) == task.target.dim() + 1 and shape[-1] == 1:  # a [batch, 1] head is squeezed (_match_shapes)
        shape = shape[:-1]
    return (task.loss_name, options, shape, task.output.dtype, task.output.device,
            tuple(task.target.shape), task.target.dtype, task.present is None)  # fmt: skip


def grouped_task_losses(
    outputs: Mapping[str, Tensor],
    batch: Batch,
    task_specs: Sequence[TaskSpec],
    loss_names: Mapping[str, str] | None = None,
    loss_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    fixed_weights: Mapping[str, float] | None = None,
) -> Tensor:
    r""":func:`~mtlbook.losses.task_losses` with tasks of one row-wise loss and shape computed together.

    Same arguments, same checks and error messages, same result :math:`[c_1 L_1, \dots, c_n L_n]`
    (float32 ``[n_tasks]``, task order) to float rounding; see the module docstring.
    """
    tasks = resolve_task_losses(outputs, batch, task_specs, loss_names, loss_kwargs, fixed_weights)
    groups: dict[Hashable, list[int]] = {}
    singles: list[int] = []
    for i, task in enumerate(tasks):
        key = _group_key(task)
        if key is None:
            singles.append(i)
        else:
            groups.setdefault(key, []).append(i)
    pieces: list[Tensor] = []  # unweighted losses, in the order of `order`
    order: list[int] = []
    for idx in groups.values():
        if len(idx) == 1:
            singles.append(idx[0])
            continue
        members = [tasks[i] for i in idx]
        pieces.append(GROUPED_LOSSES[members[0].loss_name](members).float())
        order.extend(idx)
    for i in sorted(singles):
        task = tasks[i]
        pieces.append(LOSSES[task.loss_name](task.output, task.target, task.present, **task.kwargs).float().reshape(1))
        order.append(i)
    losses = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    if order != list(range(len(tasks))):  # back to task order: one gather, not n selects
        position = torch.empty(len(order), dtype=torch.long)
        position[torch.as_tensor(order)] = torch.arange(len(order))
        losses = losses.index_select(0, position.to(losses.device))
    weights = [task.weight for task in tasks]
    if any(w != 1.0 for w in weights):
        losses = losses * torch.tensor(weights, dtype=losses.dtype, device=losses.device)
    return losses
