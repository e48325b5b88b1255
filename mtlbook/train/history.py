"""What a training run leaves behind: one plain record per epoch.

A :class:`History` is a list of per-epoch records made only of ``dict``/``list``/``str``/
``int``/``float``/``bool``/``None``, so it round-trips through :meth:`History.to_dict`, JSON
and a ``torch.load(weights_only=True)`` checkpoint unchanged. Each record holds:

``epoch``, ``phase``, ``phase_epoch``
    the global 0-based epoch, the trainer phase (1 = shared pretraining, 2 = task
    finetuning) and the 0-based epoch inside that phase.
``adatt_phase``, ``adatt_enabled``, ``gates_frozen``
    adaTT's own schedule phase during the epoch (``"warmup"``/``"dynamic"``/``"frozen"``,
    ``None`` without adaTT), whether it was active, and whether the gates were frozen.
``train``, ``val``
    flat metric dicts: ``"loss"`` (sum over tasks of the fixed-weighted loss) and
    ``"<task>/loss"`` plus ``"<task>/auc"`` (binary), ``"<task>/rmse"`` (regression) or
    ``"<task>/accuracy"`` (multiclass). Train values are running values over the epoch;
    ``val`` is ``None`` when no validation data was given.
``lr``
    ``{param group name: learning rate used during the epoch}``.
``balancer_weights``, ``affinity``, ``transfer_weights``
    the balancer's per-task weights ``[n]`` and adaTT's affinity and transfer matrices
    ``[n][n]`` at the end of the epoch (task-major, row i receives from column j).
``effective_weights``, ``loss_weights``
    adaTT's effective task weights :math:`c_j` ``[n]`` at the end of the epoch, evaluated at
    the epoch-mean losses (``None`` without adaTT; all 1 in warmup and phase 2), and
    :math:`c_j b_j` with the balancer's weights :math:`b_j`: the multiplier of each task's
    gradient on the shared parameters (:mod:`mtlbook.train.reweighting`, appendix A.5).
``skipped_nan``, ``skipped_oom``, ``steps``, ``batches``
    batches skipped for a non-finite loss/gradient and for out-of-memory errors, optimizer
    steps taken, batches seen.
``best``, ``stopped_early``, ``monitor_nan``
    whether the epoch set a new best monitored value in its phase, whether early
    stopping ended the phase after it, and whether the monitored validation metric was
    not finite (such an epoch counts neither as an improvement nor toward patience; the
    trainer warns the first time).
``time_s``
    wall-clock seconds of the epoch (the only field that differs between identical runs).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["History", "TIMING_KEYS", "VECTOR_KEYS"]

#: Record fields that measure time and so differ between otherwise identical runs.
TIMING_KEYS: tuple[str, ...] = ("time_s",)

#: Per-task ``[n]`` record fields.
VECTOR_KEYS: tuple[str, ...] = ("balancer_weights", "effective_weights", "loss_weights")


class History:
    """Per-epoch training records with accessors for curves, phases and matrices.

    Args:
        task_names: the tasks, in order.
        records: existing records (e.g. from :meth:`from_dict`); copied.
    """

    def __init__(self, task_names: Sequence[str], records: Sequence[Mapping[str, Any]] = ()) -> None:
        names = list(task_names)
        if not names or not all(isinstance(t, str) for t in names):
            raise ValueError(f"task_names must be a non-empty sequence of str, got {task_names!r}")
        self.task_names: list[str] = names
        self.records: list[dict[str, Any]] = [copy.deepcopy(dict(r)) for r in records]

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]

    def __repr__(self) -> str:
        phases = sorted({r["phase"] for r in self.records})
        return f"History(tasks={self.task_names}, epochs={len(self)}, phases={phases})"

    def append(self, record: Mapping[str, Any]) -> None:
        """Add one epoch record (deep-copied so later changes to ``record`` do not leak in)."""
        self.records.append(copy.deepcopy(dict(record)))

    # ------------------------------------------------------------------ curves
    @property
    def epochs(self) -> list[int]:
        """Global epoch index of every record."""
        return [int(r["epoch"]) for r in self.records]

    def series(self, split: str, key: str = "loss") -> list[float]:
        """One value per epoch, e.g. ``series("val", "ctr/auc")``; NaN where it is missing."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        out = []
        for r in self.records:
            values = r.get(split) or {}
            value = values.get(key)
            out.append(math.nan if value is None else float(value))
        return out

    def keys(self, split: str = "train") -> list[str]:
        """Metric keys recorded for ``split`` (union over epochs, in first-seen order)."""
        seen: dict[str, None] = {}
        for r in self.records:
            for k in r.get(split) or {}:
                seen.setdefault(k, None)
        return list(seen)

    @property
    def group_names(self) -> list[str]:
        """Param group names in first-seen order (phase 2 drops the frozen ones)."""
        seen: dict[str, None] = {}
        for r in self.records:
            for k in r.get("lr", {}):
                seen.setdefault(k, None)
        return list(seen)

    def lr(self, group: str) -> list[float]:
        """Learning rate of ``group`` per epoch; NaN in epochs where the group was not optimised."""
        return [float(r.get("lr", {}).get(group, math.nan)) for r in self.records]

    # ------------------------------------------------------------------ phases and counters
    @property
    def phases(self) -> list[int]:
        """Trainer phase (1 or 2) of every epoch."""
        return [int(r["phase"]) for r in self.records]

    @property
    def adatt_phases(self) -> list[str | None]:
        """adaTT schedule phase of every epoch (``None`` without adaTT)."""
        return [r.get("adatt_phase") for r in self.records]

    @property
    def phase_boundaries(self) -> list[int]:
        """Global epochs where the trainer phase changes (the first epoch of the new phase)."""
        p = self.phases
        return [self.records[i]["epoch"] for i in range(1, len(p)) if p[i] != p[i - 1]]

    def spans(self, key: str = "phase") -> list[tuple[int, int, Any]]:
        """Runs of equal ``key`` values as ``(first_epoch, last_epoch + 1, value)``."""
        out: list[tuple[int, int, Any]] = []
        for r in self.records:
            value, e = r.get(key), int(r["epoch"])
            if out and out[-1][2] == value and out[-1][1] == e:
                out[-1] = (out[-1][0], e + 1, value)
            else:
                out.append((e, e + 1, value))
        return out

    @property
    def skipped_nan(self) -> int:
        """Batches skipped over the run for a non-finite loss or gradient."""
        return sum(int(r.get("skipped_nan", 0)) for r in self.records)

    @property
    def skipped_oom(self) -> int:
        """Batches skipped over the run after an out-of-memory error."""
        return sum(int(r.get("skipped_oom", 0)) for r in self.records)

    @property
    def wall_time(self) -> float:
        """Total seconds spent in recorded epochs."""
        return float(sum(r.get("time_s", 0.0) for r in self.records))

    def best_epoch(self, phase: int | None = None) -> int | None:
        """Last epoch flagged ``best`` (within ``phase`` if given); ``None`` if none was."""
        best = [r["epoch"] for r in self.records if r.get("best") and (phase is None or r["phase"] == phase)]
        return best[-1] if best else None

    # ------------------------------------------------------------------ matrices
    def _record_at(self, epoch: int) -> dict[str, Any]:
        if not self.records:
            raise ValueError("the history is empty")
        if epoch < 0:
            return self.records[epoch]
        for r in self.records:
            if r["epoch"] == epoch:
                return r
        raise ValueError(f"epoch must be one of the recorded epochs {self.epochs} (or negative), got {epoch}")

    def matrix(self, name: str, epoch: int = -1) -> Tensor:
        """``"affinity"``, ``"transfer_weights"`` ``[n, n]`` or one of :data:`VECTOR_KEYS` ``[n]`` at ``epoch``."""
        if name not in ("affinity", "transfer_weights") + VECTOR_KEYS:
            raise ValueError(f"name must be 'affinity', 'transfer_weights' or one of {VECTOR_KEYS}, got {name!r}")
        value = self._record_at(epoch).get(name)
        if value is None:
            raise ValueError(f"no {name} was recorded at epoch {epoch} (run without adaTT/balancer weights?)")
        return torch.tensor(value, dtype=torch.float64)

    def weights(self, name: str = "loss_weights") -> Tensor:
        """One of :data:`VECTOR_KEYS` over training, ``[epochs, n]``; NaN rows where not recorded."""
        if name not in VECTOR_KEYS:
            raise ValueError(f"name must be one of {VECTOR_KEYS}, got {name!r}")
        n = len(self.task_names)
        rows = [r.get(name) or [math.nan] * n for r in self.records]
        return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), n)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self, drop_timing: bool = False) -> dict[str, Any]:
        """Plain-Python copy; ``drop_timing`` removes :data:`TIMING_KEYS` (to compare runs)."""
        records = copy.deepcopy(self.records)
        if drop_timing:
            for r in records:
                for k in TIMING_KEYS:
                    r.pop(k, None)
        return {"task_names": list(self.task_names), "records": records}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "History":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, Mapping) or "task_names" not in data or "records" not in data:
            raise ValueError("data must be a dict with 'task_names' and 'records' (from History.to_dict)")
        return cls(data["task_names"], data["records"])
