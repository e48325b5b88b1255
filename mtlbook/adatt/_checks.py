"""Argument checks of the adaTT modules: task names, choices, unit-interval numbers, chunk
sizes, presence masks and a model's compiled forward pass, each refused with a message that
names the parameter or the way out."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from mtlbook._checks import check_mask


def check_task_names(task_names: Sequence[str], name: str = "task_names") -> tuple[str, ...]:
    """Return ``task_names`` as a tuple of unique non-empty strings (else ValueError/TypeError)."""
    if isinstance(task_names, str):
        raise TypeError(f"{name} must be a sequence of str, not a single str {task_names!r}")
    names = tuple(task_names)
    if not names:
        raise ValueError(f"{name} must hold at least one task name, got an empty sequence")
    for t in names:
        if not isinstance(t, str) or not t:
            raise TypeError(f"{name} must hold non-empty str, got {t!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name} must be unique, got {list(names)}")
    return names


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_unit_interval(value: Any, name: str, *, closed_right: bool = True) -> float:
    """A finite float in [0, 1] (or [0, 1) when ``closed_right`` is False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in [0, 1{']' if closed_right else ')'}, got {value!r}")
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if closed_right else ')'}, got {value!r}")
    return float(value)


def check_chunk_size(value: Any, extraction: str) -> int | None:
    """``value`` if it is ``None`` or, with ``extraction="structured"`` or ``"auto"``, an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {value!r}")
    if extraction not in ("structured", "auto"):
        raise ValueError(f'chunk_size applies to extraction="structured" (or "auto") only, '
                         f"got extraction={extraction!r}")
    return value


def as_presence(present: Tensor | Sequence[bool] | None, n_tasks: int, device: torch.device) -> Tensor:
    """Bool ``[n_tasks]`` on ``device``; ``None`` means every task is present."""
    if present is None:
        return torch.ones(n_tasks, dtype=torch.bool, device=device)
    return check_mask(torch.as_tensor(present, device=device), n_tasks)


def refuse_compiled_forward(model: Any) -> None:
    """Refuse to measure when ``model``'s last forward pass ran compiled (see
    :func:`_recorded_by_compiled_graph`); models without a mixture record pass."""
    if _recorded_by_compiled_graph(getattr(model, "mixture_levels", None) or []):
        raise ValueError("the attached model's last forward pass ran compiled (torch.compile): per-task gradients "
                         "through a compiled graph are not reliable (repeated backward passes gave zero rows); "
                         "measure on an eager forward pass (Trainer with compile_forward=True runs the steps "
                         "on which adaTT measures eagerly)")  # fmt: skip


def _recorded_by_compiled_graph(levels: Sequence[Any]) -> bool:
    """True where a level's shared-expert outputs come out of a graph compiled by ``torch.compile``
    (AOTAutograd's ``CompiledFunctionBackward``). Inside that graph the experts' ops are no
    nodes of their own: the structured pass finds no path from the recorded features to the
    parameters (zero rows), and repeated backward passes through the graph (loop, cut) gave
    zero rows from the second on here (bank form, one thread)."""
    return any(type(getattr(t, "grad_fn", None)).__name__ == "CompiledFunctionBackward"
               for level in levels for t in level.shared_outputs)  # fmt: skip
