"""Checks that read the data, and ``torch.compile``.

A check such as "binary labels lie in [0, 1]" needs a Python ``bool`` of a tensor, which
TorchDynamo cannot put in a graph: by default it runs eagerly between two graphs
(:func:`torch.compiler.disable`, no graph-break warning). Inside
:func:`deferred_checks` (the trainer's compiled stage 1, :mod:`mtlbook.train.compiled`) a
check instead hands its failure flag, a 0-d bool tensor, to :func:`defer` and carries on;
the graph stays whole, and the caller looks at the flags once the compiled function has
returned (and, if one is set, reruns the step eagerly, where the check raises its own error).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor

__all__ = ["defer", "deferred_checks"]


class _Deferred:
    """Whether checks defer, and the flags they handed over (one object: compiled code
    guards on its attributes, not on a new list per call)."""

    def __init__(self) -> None:
        self.active = False
        self.flags: list[Tensor] = []


_STATE = _Deferred()


def defer(failed: Tensor) -> bool:
    """Inside :func:`deferred_checks`: keep ``failed`` (0-d bool) for the caller and return True
    (the check is done); elsewhere return False (the check decides now)."""
    if not _STATE.active:
        return False
    _STATE.flags.append(failed)
    return True


@contextlib.contextmanager
def deferred_checks() -> Iterator[list[Tensor]]:
    """Collect the failure flags of the checks run inside the block (the list is yielded and
    filled when the block ends)."""
    if _STATE.active:
        raise RuntimeError("deferred_checks blocks do not nest")
    _STATE.active = True
    _STATE.flags.clear()
    collected: list[Tensor] = []
    try:
        yield collected
    finally:
        _STATE.active = False
        collected.extend(_STATE.flags)
        _STATE.flags.clear()
