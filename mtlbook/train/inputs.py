"""What ``Trainer`` accepts: config fields that must fit the model, and the training data.

``fit`` takes a :class:`~mtlbook.data.batch.MultiTaskDataset` (batched with
``config.batch_size``, shuffled by a generator seeded with ``config.seed``), a ``DataLoader``
of :class:`~mtlbook.data.batch.Batch`, or a re-iterable of Batch (a list, a generator-backed
object); data with no rows or no present target is refused.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mtlbook.data.batch import Batch, MultiTaskDataset, TaskSpec
from mtlbook.losses import LOSS_TASK_KINDS

__all__ = ["as_loader", "build_adatt", "check_config_against_model", "check_has_targets", "check_model", "seed_everything"]

#: What a model must offer to be trained (see CONTRIBUTING.md, "Tensor layouts").
REQUIRED_MODEL_API = ("task_names", "task_specs", "shared_parameters", "shared_experts", "gate_parameters",
                      "gate_entropy", "freeze_gates")  # fmt: skip


def check_model(model: Any) -> None:
    """Refuse anything that is not an ``nn.Module`` with the multi-task interface."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    missing = [name for name in REQUIRED_MODEL_API if not hasattr(model, name)]
    if missing:
        raise TypeError(f"model lacks the multi-task interface: missing {missing}")



def as_loader(data: Any, train: bool, task_specs: Sequence[TaskSpec], config: Any, strategy: Any) -> Iterable[Batch]:
    """``data`` as an iterable of Batch: a dataset is batched (and sharded) by ``strategy``,
    a DataLoader or a re-iterable of Batch is used as is."""
    cfg = config
    task_names = tuple(s.name for s in task_specs)
    if isinstance(data, MultiTaskDataset):
        if tuple(data.task_names) != task_names:
            raise ValueError(f"dataset tasks {data.task_names} must equal the model's {task_names}")
        ours = [(s.name, s.kind, s.n_classes) for s in task_specs]
        theirs = [(s.name, s.kind, s.n_classes) for s in data.task_specs]
        if ours != theirs:
            raise ValueError(f"dataset task_specs {theirs} must match the model's {ours} (name, kind, number of classes)")
        batch_size = cfg.batch_size if train else (cfg.eval_batch_size or cfg.batch_size)
        return strategy.loader(data, batch_size, train, cfg.seed or 0)
    if isinstance(data, DataLoader):
        return data
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(
            f"data must be a MultiTaskDataset, a DataLoader or a re-iterable of Batch, got {type(data).__name__}"
        ) from None
    if iterator is data:
        raise TypeError("data must be re-iterable (a list of Batch, a DataLoader...), not a one-shot iterator")
    return data


def check_config_against_model(cfg: Any, model: nn.Module, specs: Sequence[Any]) -> None:
    """Config fields that name tasks or experts must fit the model."""
    names = [s.name for s in specs]
    kinds = {s.name: s.kind for s in specs}
    for field_name in ("losses", "loss_kwargs", "task_weights"):
        unknown = sorted(set(getattr(cfg, field_name)) - set(names))
        if unknown:
            raise ValueError(f"TrainerConfig.{field_name} names unknown tasks {unknown}; tasks: {names}")
    for task, loss in cfg.losses.items():
        if kinds[task] not in LOSS_TASK_KINDS[loss]:
            raise ValueError(f"TrainerConfig.losses[{task!r}] = {loss!r} does not fit a {kinds[task]} task")
    n_experts = len(model.shared_experts)
    for field_name in ("expert_lr", "expert_weight_decay"):
        bad = sorted(i for i in getattr(cfg, field_name) if i >= n_experts)
        if bad:
            raise ValueError(
                f"TrainerConfig.{field_name} overrides shared experts {bad}, but the model has "
                f"{n_experts} shared experts (valid indices 0..{n_experts - 1})"
            )


def check_has_targets(data: Any, name: str, task_names: Sequence[str]) -> None:
    """Refuse data with no rows or without a single present target (cheap cases only: a
    dataset, a DataLoader over one, a list of Batch; other iterables are checked after
    their first epoch)."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(dataset, MultiTaskDataset):
        if len(dataset) == 0:
            raise ValueError(f"{name} is empty (0 rows): refusing to train on nothing")
        if not any(bool(dataset.present[t].any()) for t in task_names if t in dataset.present):
            raise ValueError(f"{name} has no present target for any task: refusing to train on nothing")
    elif isinstance(data, (list, tuple)):
        if not data:
            raise ValueError(f"{name} is empty (no batches): refusing to train on nothing")
        for batch in data:
            if not isinstance(batch, Batch):
                raise TypeError(f"{name} must hold Batch objects, got {type(batch).__name__}")
        if not any(bool(m.any()) for batch in data for t, m in batch.present.items() if t in task_names):
            raise ValueError(f"{name} has no present target for any task: refusing to train on nothing")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_adatt(adatt: nn.Module | None, config: Any, task_names: tuple[str, ...], model: nn.Module,
                device: torch.device) -> nn.Module | None:  # fmt: skip
    """The ``adatt`` object, or one built from ``config.adatt`` (not both), checked against
    the model's tasks, moved to ``device`` and attached to ``model``."""
    if adatt is not None and config.adatt is not None:
        raise ValueError("pass adatt or set config.adatt, not both")
    if config.adatt is not None:
        from mtlbook.adatt import AdaptiveTaskTransfer

        adatt = AdaptiveTaskTransfer(task_names, **dict(config.adatt))
    if adatt is None:
        return None
    if not isinstance(adatt, nn.Module):
        raise TypeError(f"adatt must be an nn.Module (AdaptiveTaskTransfer), got {type(adatt).__name__}")
    if tuple(getattr(adatt, "task_names", ())) != task_names:
        raise ValueError(f"adatt.task_names {tuple(getattr(adatt, 'task_names', ()))} must equal the model's {task_names}")
    adatt = adatt.to(device)
    adatt.attach(model)
    return adatt
