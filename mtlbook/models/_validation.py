"""Argument checks shared by the model constructors (private).

Every check raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for a value
out of range; the message names the parameter and the accepted range.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from mtlbook import _checks
from mtlbook.data.batch import TaskSpec, check_task_specs


def check_int(value: object, name: str, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (bools are rejected)."""
    return _checks.check_int(value, name, minimum, wrong_type=TypeError)


def check_widths(value: object, name: str) -> tuple[int, ...]:
    """Return hidden-layer widths as a tuple of ints >= 1 (an empty tuple means no hidden layer)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of ints >= 1 (layer widths), got {value!r}")
    for width in value:
        check_int(width, f"{name} entries", 1)
    return tuple(value)


def check_per_expert_widths(value: object, n_experts: int, name: str) -> list[tuple[int, ...]]:
    """Hidden widths for each of ``n_experts`` experts.

    Accepts one width tuple shared by every expert, e.g. ``(64,)``, or one tuple per expert,
    e.g. ``[(16,), (64, 32)]`` (heterogeneous experts).
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of ints or a sequence of {n_experts} width sequences, got {value!r}")
    if len(value) > 0 and all(isinstance(v, Sequence) and not isinstance(v, (str, bytes)) for v in value):
        if len(value) != n_experts:
            raise ValueError(f"{name} gives widths for {len(value)} experts, expected one entry per expert ({n_experts})")
        return [check_widths(v, f"{name}[{i}]") for i, v in enumerate(value)]
    widths = check_widths(value, name)
    return [widths] * n_experts


def check_dropout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"dropout must be a float in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {value}")
    return float(value)


def check_finite_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_specs(task_specs: object) -> tuple[TaskSpec, ...]:
    """Validate the task list: a non-empty sequence of TaskSpec with unique names."""
    if isinstance(task_specs, TaskSpec):
        raise TypeError("task_specs must be a sequence of TaskSpec, got a single TaskSpec (wrap it in a list)")
    if isinstance(task_specs, (str, bytes, Mapping)) or not isinstance(task_specs, Sequence):
        raise TypeError(f"task_specs must be a sequence of TaskSpec, got {type(task_specs).__name__}")
    return check_task_specs(task_specs)


def check_task_expert_counts(value: object, task_names: Sequence[str]) -> tuple[int, ...]:
    """Number of task-specific experts per task, in task order.

    Accepts one int for every task or a mapping ``{task_name: int}`` that names every task.
    """
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(task_names))
        if unknown:
            raise ValueError(f"n_task_experts names unknown tasks {unknown}; tasks are {list(task_names)}")
        missing = [t for t in task_names if t not in value]
        if missing:
            raise ValueError(f"n_task_experts must give a count for every task; missing {missing}")
        return tuple(check_int(value[t], f"n_task_experts[{t!r}]", 0) for t in task_names)
    count = check_int(value, "n_task_experts", 0)
    return (count,) * len(task_names)
