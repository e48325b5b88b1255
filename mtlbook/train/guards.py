"""What the trainer refuses or skips: non-finite losses, exploded weights, out-of-memory errors.

A batch whose loss or gradients are not finite is skipped (no weight changes), an
out-of-memory error in training skips the batch (in validation the batch is split instead),
and at the end of every epoch :func:`weights_problem` checks the weights before any
checkpoint could be written over the last good one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DIVERGED_WEIGHT", "TrainingDivergedError", "TrainingWarning", "is_out_of_memory", "weights_problem"]

#: Largest absolute parameter value the divergence guard accepts; beyond it (or at a NaN/inf
#: in any parameter or buffer) training stops and no checkpoint is written.
DIVERGED_WEIGHT = 1e8


class TrainingWarning(UserWarning):
    """Emitted by :meth:`~mtlbook.train.Trainer.fit` when batches were skipped."""


class TrainingDivergedError(RuntimeError):
    """The weights stopped being finite or exploded; the last checkpoint was left untouched."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and for a ``RuntimeError`` saying "out of memory"."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


@torch.no_grad()
def weights_problem(model: nn.Module, balancer: nn.Module, adatt: nn.Module | None) -> str | None:
    """What is wrong with the weights (a non-finite value in a parameter or a model buffer,
    or a parameter beyond :data:`DIVERGED_WEIGHT`), or ``None`` when sane.

    The balancer's and adaTT's buffers are not checked: some hold NaN on purpose (DWA's and
    GradNorm's "not seen yet" markers)."""
    tensors: list[tuple[str, Tensor, bool]] = []
    tensors += [(f"model.{n}", p, True) for n, p in model.named_parameters()]
    tensors += [(f"model.{n}", b, False) for n, b in model.named_buffers()]
    tensors += [(f"balancer.{n}", p, True) for n, p in balancer.named_parameters()]
    if adatt is not None:
        tensors += [(f"adatt.{n}", p, True) for n, p in adatt.named_parameters()]
    for name, tensor, is_param in tensors:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if not bool(torch.isfinite(tensor).all()):
            return f"{name} holds non-finite values"
        if is_param:
            largest = float(tensor.detach().abs().max())
            if largest > DIVERGED_WEIGHT:
                return f"{name} reached |w| = {largest:.3g} > {DIVERGED_WEIGHT:.0e}"
    return None
