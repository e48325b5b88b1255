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


def train_adatt(extraction: str | None):
    """Two epochs of a PLE with adaTT measuring at every step (uncertainty weighting); the
    trained :class:`~mtlbook.adatt.AdaptiveTaskTransfer` (``extraction=None``: the library's
    default). The extraction tests compare modes."""
    from mtlbook.adatt import AdaptiveTaskTransfer
    from mtlbook.models import build_model
    from mtlbook.train import Trainer, TrainerConfig

    torch.manual_seed(0)
    model = build_model("ple", 5, SPECS)
    chosen = {} if extraction is None else {"extraction": extraction}
    adatt = AdaptiveTaskTransfer(NAMES, warmup_epochs=1, freeze_epoch=3, grad_interval=1, **chosen)
    config = TrainerConfig(phase1_epochs=2, phase2_epochs=0, batch_size=16, lr=5e-3, warmup_epochs=1,
                           progress=False, patience=None, balancing="uncertainty")  # fmt: skip
    Trainer(model, config, adatt=adatt).fit(make_dataset(96))
    return adatt
