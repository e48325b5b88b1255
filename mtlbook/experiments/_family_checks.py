"""Argument checks shared by the chapter-3 experiment modules (model_family and its parts)."""

from __future__ import annotations

from typing import Any, Sequence

from mtlbook._checks import check_int, check_number
from mtlbook.data.batch import MultiTaskDataset

def _check_int(value: Any, name: str, low: int) -> int:
    return check_int(value, name, low, wrong_type=TypeError)


def _check_positive(value: Any, name: str) -> float:
    return check_number(value, name, 0, open_low=True, wrong_type=TypeError)


def _check_dataset(dataset: Any, name: str) -> MultiTaskDataset:
    if not isinstance(dataset, MultiTaskDataset):
        raise TypeError(f"{name} must be an mtlbook MultiTaskDataset, got {type(dataset).__name__}")
    return dataset


def _check_task(dataset: MultiTaskDataset, task: Any, name: str) -> str:
    if task not in dataset.task_names:
        raise ValueError(f"{name} must be one of the dataset's tasks {list(dataset.task_names)}, got {task!r}")
    return task


def _check_kinds(kinds: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in allowed]
    if not kinds or bad:
        raise ValueError(f"kinds must be a non-empty sequence drawn from {tuple(allowed)}, got {kinds!r}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must not repeat a model, got {kinds!r}")
    return kinds
