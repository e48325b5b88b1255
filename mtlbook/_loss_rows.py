"""Row-wise checks and masking shared by the per-task losses (:mod:`mtlbook.losses`) and
their grouped form (:mod:`mtlbook.losses_grouped`).

A ``[batch]`` presence mask marks the rows whose target exists; missing rows are replaced by
constants before any arithmetic (:func:`_sanitise`) and left out of the mean
(:func:`_masked_row_mean`), so a placeholder target never reaches a value or a gradient.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor

from mtlbook._checks import check_mask
from mtlbook._data_checks import defer


def _check_tensor(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_present(present: Tensor | None, n_rows: int, device: torch.device) -> Tensor | None:
    """Validate a row mask and move it next to the data (``None`` passes through)."""
    if present is None:
        return None
    _check_tensor(present, "present")
    return check_mask(present, n_rows, per="row").to(device)


def _as_row_mask(mask: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``[batch]`` mask so it broadcasts against ``like`` (``[batch, ...]``)."""
    return mask.reshape(mask.shape[0], *([1] * (like.dim() - 1)))


def _match_shapes(output: Tensor, target: Tensor) -> Tensor:
    """Accept a ``[batch, 1]`` output for a ``[batch]`` target; otherwise shapes must agree."""
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        output = output.squeeze(-1)
    if output.shape != target.shape:
        raise ValueError(
            f"output and target must have the same shape [batch, ...], got {list(output.shape)} "
            f"and {list(target.shape)}"
        )
    if output.dim() == 0:
        raise ValueError("output and target need a batch dimension, got 0-d tensors")
    return output


def _checked_rows(output: Tensor, target: Tensor, present: Tensor | None, name: str) -> tuple[Tensor, Tensor | None]:
    """The checks every row-wise loss starts with: ``output`` (called ``name``) and ``target``
    are tensors of matching shape; returns ``output`` (a ``[batch, 1]`` one squeezed) and the mask."""
    _check_tensor(output, name)
    _check_tensor(target, "target")
    output = _match_shapes(output, target)
    return output, _check_present(present, output.shape[0], output.device)


def _masked_row_mean(per_element: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over present rows of the per-row mean; 0 (graph-connected) when nothing is present."""
    per_row = per_element.reshape(per_element.shape[0], -1).mean(dim=1) if per_element.dim() > 1 else per_element
    if mask is None:
        count = per_row.shape[0]
        return per_row.sum() / max(count, 1)
    per_row = torch.where(mask, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    return per_row.sum() / mask.sum().clamp(min=1).to(per_row.dtype)


def _sanitise(output: Tensor, target: Tensor, mask: Tensor | None, fill_target: float | int = 0) -> tuple[Tensor, Tensor]:
    """Replace missing rows by constants so placeholders never enter the loss math.

    The output is replaced as well: its gradient for missing rows is then exactly zero even
    if the model produced something non-finite there.
    """
    if mask is None:
        return output, target
    row_out = _as_row_mask(mask, output)
    row_tgt = _as_row_mask(mask, target)
    safe_output = torch.where(row_out, output, torch.zeros((), dtype=output.dtype, device=output.device))
    safe_target = torch.where(row_tgt, target, torch.full((), fill_target, dtype=target.dtype, device=target.device))
    return safe_output, safe_target


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check_float(value: Any, name: str, low: float, high: float = math.inf, low_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok_low = value >= low if low_inclusive else value > low
    if not (math.isfinite(value) and ok_low and value <= high):
        bracket = "[" if low_inclusive else "("
        upper = "inf)" if math.isinf(high) else f"{high}]"
        raise ValueError(f"{name} must be a finite number in {bracket}{low}, {upper}, got {value}")
    return value


# The two checks below read the data (a Python bool of a tensor): under the trainer's compiled
# stage 1 they hand their flag over (mtlbook._data_checks) instead of splitting the graph.
def _check_unit_interval(y: Tensor, name: str = "target") -> None:
    """Refuse binary labels outside ``[0, 1]`` (NaN passes: the trainer's NaN guard skips it).

    Outside ``[0, 1]`` cross-entropy is unbounded below (a label of 3 drives it to -1e3)
    and the focal factor takes the log of a negative number.
    """
    bad = (y < 0) | (y > 1)
    failed = bad.any()
    if not defer(failed):
        _raise_outside_unit_interval(y, bad, failed, name)


@torch.compiler.disable  # outside a compiled stage 1: eagerly, between graphs, without a warning
def _raise_outside_unit_interval(y: Tensor, bad: Tensor, failed: Tensor, name: str) -> None:
    if bool(failed):
        value = float(y[bad][0])
        raise ValueError(f"{name} of a binary loss must hold labels in [0, 1] on present rows, got {value}")


def _check_class_indices(y: Tensor, n_classes: int) -> None:
    """Refuse class indices outside ``[0, n_classes)`` (on present rows: absent ones are filled with 0)."""
    out_of_range = (y < 0) | (y >= n_classes)
    failed = out_of_range.any()
    if not defer(failed):
        _raise_out_of_range(y, out_of_range, failed, n_classes)


@torch.compiler.disable
def _raise_out_of_range(y: Tensor, out_of_range: Tensor, failed: Tensor, n_classes: int) -> None:
    if bool(failed):
        raise ValueError(
            f"target must hold class indices in [0, {n_classes}) on present rows, got {int(y[out_of_range][0])}"
        )


def _float_target(target: Tensor, name: str = "target") -> Tensor:
    if target.is_complex():
        raise TypeError(f"{name} must be a real tensor, got dtype {target.dtype}")
    return target
