r"""Stage 1 compiled: the forward pass and the task losses as one function compiled by ``torch.compile``.

A training step of the package's models in eager PyTorch is a few hundred small ops, each
launched on its own; on a CPU thread the launches cost more than the arithmetic (chapter 3,
``mtlbook/tables/plain_step.csv``: the eager step of the bank form stays above
``fixed cost + FLOP floor`` whatever is done to the ops one by one). ``torch.compile``
(TorchDynamo captures the Python code as a graph, Inductor fuses its elementwise ops into
generated C++ loops, AOTAutograd writes the matching backward) makes fewer, bigger ops of

.. math::

    (x, \text{batch}) \mapsto (\text{outputs}, L),

the part of a step between the inputs and the per-task losses :math:`L = [L_1, \dots, L_n]`
(task-major ``[n_tasks]``), and the backward through it. Everything after the losses
(balancer, the objective, the optimizer) stays eager: a handful of ops on ``[n_tasks]``
vectors and the fused AdamW kernel.

**One graph.** The checks that read the data (finite inputs, binary labels in ``[0, 1]``,
class indices in range) need a Python ``bool`` of a tensor, which would split the function
into one graph per stretch between checks. Here they hand their flags over instead
(:mod:`mtlbook._data_checks`), so stage 1 of the package's models is one graph; when a flag
is set, or a generated kernel's own bounds check fires first, the step runs again eagerly,
where the check raises its usual ``ValueError`` naming the bad value.

The same arithmetic, other rounding: a compiled step's losses and gradients agree with the
eager step's to float rounding (``tests/test_train_compiled.py``: one step's to 1e-5, the
weights after a short run to 1e-4), not bit for bit, so a run with
``compile_forward=True`` does not reproduce a stored eager run exactly. The first step pays
for the compilation (seconds to tens of seconds on a CPU, ``compile_s`` in
``mtlbook/tables/plain_step.csv``; Inductor needs a C++ compiler there), and so
does a batch of a new size (the last, shorter batch of an epoch): it is worth it for long
runs of one model, not for a chapter's one-minute demo. Inductor keeps the compiled code in
an on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) that did not tell apart processes started with
different CPU settings: code cached by a plain shell failed ("tuple args required") in one
started with ``ATEN_CPU_CAPABILITY=avx2`` (as ``scripts/reproducible_env.sh`` sets it). Give
each setting a cache folder of its own (the test suite uses a fresh one per run).

**With adaTT** the steps on which adaTT measures run the eager function: its measurement
hooks the features of the forward pass and back-propagates from them through the shared
experts alone, which a compiled graph does not expose as eager tensors. The other steps (nine
in ten at the default ``grad_interval=10``; all of them once adaTT has frozen) run compiled.

**One backward.** Several backward passes through one compiled graph (``retain_graph``) are
not reliable: with torch 2.13 on the CPU, the bank form and one thread, the second and later
ones returned zero gradients. So :func:`check_compile` refuses a balancer that takes per-task
gradients through the forward pass (GradNorm, PCGrad and the other gradient combiners), and
:class:`~mtlbook.adatt.TaskAffinityComputer` refuses to measure on a compiled forward pass.
Not under ``torchrun`` either (the DDP-wrapped model has not been tested compiled). Each is
refused with an error that names the setting.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from mtlbook._data_checks import deferred_checks
from mtlbook.balancer_base import LossBalancer
from mtlbook.data.batch import Batch

__all__ = ["ForwardLosses", "check_compile", "forward_and_losses"]

#: ``(model, batch) -> (outputs, raw task losses [n_tasks])``
ForwardLosses = Callable[[nn.Module, Batch], "tuple[Any, Tensor]"]


def check_compile(compile_forward: bool, distributed: bool, balancer: nn.Module | None = None) -> None:
    """Refuse what :func:`forward_and_losses` does not support (see the module docstring)."""
    if not compile_forward:
        return
    if distributed:
        raise ValueError("TrainerConfig.compile_forward=True is for a single process; under torchrun (several "
                         "ranks) use compile_forward=False")  # fmt: skip
    if balancer is not None and type(balancer).backward is not LossBalancer.backward:
        raise ValueError(f"TrainerConfig.compile_forward=True needs a balancer whose backward is one plain backward "
                         f"(equal, uncertainty, dwa, random); {type(balancer).__name__} takes per-task gradients "
                         f"through the forward pass, which a compiled graph does not give reliably; use "
                         f"compile_forward=False")  # fmt: skip


def forward_and_losses(task_losses: Callable[[Any, Batch], Tensor], compile_forward: bool) -> ForwardLosses:
    """``(model, batch) -> (model(batch.inputs), task_losses(outputs, batch))``, compiled or eager.

    Args:
        task_losses: stage 1 of the loss pipeline, ``(outputs, batch) -> [n_tasks]``.
        compile_forward: wrap the function in ``torch.compile`` (default backend, Inductor).
            Shapes are first compiled static; a second batch size recompiles once with
            dynamic shapes (``dynamic=None``, torch's default).
    """

    def run(model: nn.Module, batch: Batch) -> tuple[Any, Tensor]:
        outputs = model(batch.inputs)
        return outputs, task_losses(outputs, batch)

    if not compile_forward:
        return run
    compiled = torch.compile(run)

    def run_compiled(model: nn.Module, batch: Batch) -> tuple[Any, Tensor]:
        # the data checks (finite inputs, labels in range) hand their flags over instead of
        # splitting the graph; if one is set, the eager step raises that check's own error
        try:
            with deferred_checks() as failed:
                result = compiled(model, batch)
        except RuntimeError:
            # a generated kernel's own bounds check (a class index out of range) fires before
            # the flags are read: the eager step names the bad value, else the error stands
            run(model, batch)
            raise
        if any(bool(flag) for flag in failed):
            return run(model, batch)
        return result

    return run_compiled
