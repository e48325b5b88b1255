"""The one batch format every model, loss and trainer in mtlbook uses.

Layout (stated once, kept everywhere):

* ``inputs``: ``[batch, n_features]`` float32.
* ``targets[name]``: ``[batch]`` (float for binary/regression, long for multiclass and
  contrastive ids) or ``[batch, k]`` where a task needs more.
* ``present[name]``: ``[batch]`` bool; ``False`` marks a row whose target for that task is
  missing. The target value in such a row is a placeholder and must never reach a loss.

Tasks are ordered as in ``task_names``; anything stacked per task is task-major
(``[n_tasks, ...]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

TASK_KINDS = ("binary", "regression", "multiclass", "contrastive")


@dataclass(frozen=True)
class TaskSpec:
    """What a task predicts.

    Args:
        name: unique task name (the key in every per-task dict).
        kind: one of ``"binary"``, ``"regression"``, ``"multiclass"``, ``"contrastive"``.
        n_classes: number of classes for ``"multiclass"`` (>= 2); embedding width for
            ``"contrastive"``; must be ``None`` for the other kinds.
    """

    name: str
    kind: str
    n_classes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TaskSpec.name must be a non-empty string, got {self.name!r}")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"TaskSpec.kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.kind in ("multiclass", "contrastive"):
            if not isinstance(self.n_classes, int) or self.n_classes < 2:
                raise ValueError(
                    f"TaskSpec.n_classes must be an int >= 2 for kind {self.kind!r} "
                    f"(task {self.name!r}), got {self.n_classes!r}"
                )
        elif self.n_classes is not None:
            raise ValueError(
                f"TaskSpec.n_classes must be None for kind {self.kind!r} (task {self.name!r}), "
                f"got {self.n_classes!r}"
            )

    @property
    def output_dim(self) -> int:
        """Width of the tower output: 1 for binary/regression, else ``n_classes``."""
        return 1 if self.n_classes is None else self.n_classes


def check_task_specs(task_specs: Sequence[TaskSpec]) -> tuple[TaskSpec, ...]:
    """Validate a task list (non-empty, TaskSpec items, unique names) and return it as a tuple."""
    specs = tuple(task_specs)
    if not specs:
        raise ValueError("task_specs must contain at least one TaskSpec, got an empty sequence")
    for s in specs:
        if not isinstance(s, TaskSpec):
            raise TypeError(f"task_specs must hold TaskSpec objects, got {type(s).__name__}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"task_specs names must be unique, got {names}")
    return specs


@dataclass
class Batch:
    """A multi-task mini-batch: inputs, per-task targets and per-task presence masks."""

    inputs: Tensor
    targets: dict[str, Tensor]
    present: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, Tensor) or self.inputs.dim() < 1:
            raise TypeError(f"inputs must be a torch.Tensor [batch, ...], got {type(self.inputs).__name__}")
        if not isinstance(self.targets, Mapping):
            raise TypeError(f"targets must be a dict {{task name: tensor}}, got {type(self.targets).__name__}")
        if not isinstance(self.present, Mapping):
            raise TypeError(f"present must be a dict {{task name: bool tensor}}, got {type(self.present).__name__}")
        self.targets, self.present = dict(self.targets), dict(self.present)
        n = self.inputs.shape[0]
        for name, t in self.targets.items():
            if not isinstance(t, Tensor) or t.dim() < 1:
                raise TypeError(f"targets[{name!r}] must be a torch.Tensor [batch, ...], got {type(t).__name__}")
            if t.shape[0] != n:
                raise ValueError(
                    f"targets[{name!r}] has {t.shape[0]} rows but inputs have {n}"
                )
        for name, mask in self.present.items():
            if name not in self.targets:
                raise ValueError(f"present[{name!r}] names a task without targets; tasks: {sorted(self.targets)}")
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"present[{name!r}] must be a bool tensor [batch], got {getattr(mask, 'dtype', type(mask).__name__)}")
            if mask.shape != (n,):
                raise ValueError(f"present[{name!r}] must have shape [{n}], got {list(mask.shape)}")
        for name, t in self.targets.items():
            if name not in self.present:
                self.present[name] = torch.ones(n, dtype=torch.bool, device=t.device)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """Return a copy with every tensor on ``device``."""
        return Batch(
            self.inputs.to(device, non_blocking=non_blocking),
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.targets.items()},
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.present.items()},
        )

    def present_tasks(self, task_names: Sequence[str]) -> Tensor:
        """Bool ``[n_tasks]``: True where the task has at least one target in this batch."""
        return torch.tensor(
            [bool(self.present[t].any()) if t in self.present else False for t in task_names],
            dtype=torch.bool,
        )


def _check_target_values(spec: TaskSpec, target: Tensor, present: Tensor) -> None:
    """Refuse targets the task's loss cannot take, on present rows only (NaN is left to the
    trainer's NaN guard): binary labels outside ``[0, 1]``, class indices outside
    ``[0, n_classes)`` or of a non-integer dtype."""
    if not isinstance(target, Tensor):
        raise TypeError(f"targets[{spec.name!r}] must be a torch.Tensor, got {type(target).__name__}")
    rows = target[present] if present.dim() == 1 and target.dim() >= 1 else target
    if spec.kind == "binary":
        bad = (rows < 0) | (rows > 1)
        if bool(bad.any()):
            raise ValueError(
                f"targets[{spec.name!r}] (binary) must hold labels in [0, 1] on present rows, got {float(rows[bad][0])}"
            )
    elif spec.kind == "multiclass":
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise TypeError(f"targets[{spec.name!r}] (multiclass) must hold integer class indices, got dtype {rows.dtype}")
        bad = (rows < 0) | (rows >= int(spec.n_classes))
        if bool(bad.any()):
            raise ValueError(
                f"targets[{spec.name!r}] (multiclass) must hold class indices in [0, {spec.n_classes}) on "
                f"present rows, got {int(rows[bad][0])}"
            )


class MultiTaskDataset(Dataset):
    """Tensors for a multi-task problem; indexing returns a row index, collated into a Batch.

    Args:
        inputs: ``[n, n_features]`` features.
        targets: per-task targets, each with ``n`` rows.
        task_specs: the tasks, in order.
        present: optional per-task bool masks ``[n]`` (default: all present).
        extras: optional per-row tensors kept alongside (e.g. ``cluster_id``, ``engine_id``).
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Mapping[str, Tensor],
        task_specs: Sequence[TaskSpec],
        present: Mapping[str, Tensor] | None = None,
        extras: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.task_specs = check_task_specs(task_specs)
        self.task_names = tuple(s.name for s in self.task_specs)
        if not isinstance(inputs, Tensor) or inputs.dim() != 2:
            raise ValueError("inputs must be a 2-D tensor [n, n_features]")
        self.inputs = inputs.float()
        n = inputs.shape[0]
        missing = [t for t in self.task_names if t not in targets]
        if missing:
            raise ValueError(f"targets is missing tasks {missing}")
        self.targets = {t: targets[t] for t in self.task_names}
        present = dict(present or {})
        self.present = {
            t: (present[t].bool() if t in present else torch.ones(n, dtype=torch.bool))
            for t in self.task_names
        }
        for t in self.task_names:
            if self.targets[t].shape[0] != n or self.present[t].shape[0] != n:
                raise ValueError(f"task {t!r}: targets/present must have {n} rows")
        for spec in self.task_specs:
            _check_target_values(spec, self.targets[spec.name], self.present[spec.name])
        self.extras = dict(extras or {})

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index: int) -> int:
        return index

    @property
    def n_features(self) -> int:
        return int(self.inputs.shape[1])

    def subset(self, index: Tensor) -> "MultiTaskDataset":
        """Rows ``index`` as a new dataset (same tasks)."""
        return MultiTaskDataset(
            self.inputs[index],
            {t: v[index] for t, v in self.targets.items()},
            self.task_specs,
            {t: v[index] for t, v in self.present.items()},
            {k: v[index] for k, v in self.extras.items()},
        )

    def collate(self, indices: Sequence[int]) -> Batch:
        """Gather rows into a :class:`Batch` (used as the DataLoader ``collate_fn``)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return Batch(
            self.inputs[idx],
            {t: v[idx] for t, v in self.targets.items()},
            {t: v[idx] for t, v in self.present.items()},
        )

    def full_batch(self) -> Batch:
        """The whole dataset as one Batch."""
        return Batch(self.inputs, dict(self.targets), dict(self.present))


def make_loader(
    dataset: MultiTaskDataset,
    batch_size: int = 256,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    sampler=None,
) -> DataLoader:
    """A deterministic DataLoader that yields :class:`Batch` objects.

    Shuffling uses its own ``torch.Generator`` seeded with ``seed`` so that runs repeat.
    """
    if not isinstance(dataset, MultiTaskDataset):
        raise TypeError(f"dataset must be a MultiTaskDataset, got {type(dataset).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=dataset.collate,
        generator=generator if sampler is None else None,
    )


def iterate_batches(dataset: MultiTaskDataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
    """Convenience iterator over Batches of ``dataset``."""
    yield from make_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed)
