"""The tiny three-task problem the trainer tests share (binary, regression, 3-class).

Task ``value`` has a missing target in about a fifth of the rows, so every trainer test also
exercises the presence masks.
"""

from __future__ import annotations

import torch

from mtlbook.data.batch import MultiTaskDataset, TaskSpec

SPECS = (TaskSpec("click", "binary"), TaskSpec("value", "regression"), TaskSpec("kind", "multiclass", 3))
NAMES = tuple(s.name for s in SPECS)


def make_dataset(n: int = 96, seed: int = 0, missing: bool = True) -> MultiTaskDataset:
    """``n`` rows of 5 features; targets depend on the first three features plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    targets = {
        "click": (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).float(),
        "value": x[:, 1] - x[:, 0] + 0.1 * torch.randn(n, generator=g),
        "kind": torch.bucketize(x[:, 2].contiguous(), torch.tensor([-0.5, 0.5])),
    }
    present = {"value": torch.rand(n, generator=g) > 0.2} if missing else None
    return MultiTaskDataset(x, targets, SPECS, present)
