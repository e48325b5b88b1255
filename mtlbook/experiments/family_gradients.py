r"""Chapter 3: how two tasks' gradients on the shared experts relate (cosine, conflict over training).

:func:`task_gradients` stacks the per-task gradients on the shared parameters (via
:mod:`mtlbook.gradients`), :func:`gradient_cosine` takes the cosine of two tasks' gradients
for one batch, and :func:`track_gradient_conflict` follows it through a training run, with
a half-batch noise baseline.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from mtlbook.data.batch import Batch, MultiTaskDataset, make_loader
from mtlbook.experiments._family_checks import _check_dataset, _check_int, _check_positive, _check_task
from mtlbook.gradients import cosine_matrix, flatten_parts, gradient_parts
from mtlbook.losses import task_losses

__all__ = ["gradient_cosine", "task_gradients", "track_gradient_conflict"]


def task_gradients(losses: Tensor | Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    r"""Per-task gradients :math:`G = [g_1; \dots; g_n]`, ``[n_tasks, d]``, on ``params``.

    Row :math:`k` is :math:`\operatorname{flatten}(\partial L_k / \partial \theta)` over the
    parameters in order. Each loss is differentiated with ``retain_graph=True`` (the graph
    survives for a later ``backward``) and ``allow_unused=True`` (a parameter a loss does not
    reach contributes zeros). No ``.grad`` field is touched.
    """
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(f"losses must be a 1-D tensor [n_tasks] or a sequence of scalars, got shape {tuple(losses.shape)}")
        roots = list(losses.unbind(0))
    else:
        roots = [t.reshape(()) for t in losses]
    params = list(params)
    if not roots or not params:
        raise ValueError("task_gradients needs at least one loss and one parameter")
    return torch.stack([flatten_parts(gradient_parts(loss, params), params) for loss in roots])


def gradient_cosine(model: nn.Module, batch: Batch, task_a: str, task_b: str) -> float:
    """:math:`\\cos(g_a, g_b)` of two tasks' loss gradients on ``model.shared_parameters()`` for one batch.

    The losses are :func:`mtlbook.losses.task_losses` (the default loss of each task kind) on
    a forward pass in the model's current mode. A task whose gradient is zero has no
    direction; the cosine is then 0 (see :func:`mtlbook.adatt.cosine_matrix`).
    """
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be an mtlbook Batch, got {type(batch).__name__}")
    names = tuple(model.task_names)
    for task, name in ((task_a, "task_a"), (task_b, "task_b")):
        if task not in names:
            raise ValueError(f"{name} must be one of the model's tasks {list(names)}, got {task!r}")
    losses = task_losses(model(batch.inputs), batch, model.task_specs)
    pair = torch.stack([losses[names.index(task_a)], losses[names.index(task_b)]])
    grads = task_gradients(pair, model.shared_parameters())
    return float(cosine_matrix(grads)[0, 1])


def _half_batch_cosines(model, batch, specs, shared, ia: int, ib: int, g_a: Tensor, g_b: Tensor) -> dict:
    """Noise-baseline cosines of one step (see :func:`track_gradient_conflict`)."""
    from mtlbook.diagnose.noise import split_batch

    with torch.random.fork_rng(devices=[]):  # dropout in the extra passes must not shift training's RNG
        halves = []
        for half in split_batch(batch):
            losses = task_losses(model(half.inputs), half, specs)
            halves.append(task_gradients(torch.stack([losses[ia], losses[ib]]), shared))
    (a_1, b_1), (a_2, b_2) = halves
    e_a, e_b = a_1 - a_2, b_1 - b_2

    def cos(u: Tensor, v: Tensor) -> float:
        return float(cosine_matrix(torch.stack([u, v]))[0, 1])

    return {"self_a": cos(a_1, a_2), "self_b": cos(b_1, b_2), "null_ab": cos(g_a, e_b), "null_ba": cos(e_a, g_b)}


def track_gradient_conflict(
    model: nn.Module,
    train: MultiTaskDataset,
    task_a: str,
    task_b: str,
    *,
    epochs: int = 6,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.01,
    every: int = 1,
    seed: int = 0,
    noise_baseline: bool = False,
) -> "pd.DataFrame":
    r"""Train ``model`` on the plain sum of task losses and record, every ``every`` steps, how
    the tasks' gradients on the shared experts relate.

    A deliberately bare loop (AdamW on all parameters, equal task weights, no schedule) so
    that every measurement is taken on the very batch, and the very parameters, of the step
    that follows it. For each measured step, with :math:`G` from :func:`task_gradients` on
    ``model.shared_parameters()`` and :math:`s = \sum_j g_j` over all tasks:

    * ``cosine``: :math:`\cos(g_a, g_b)`;
    * ``norm_a``, ``norm_b``: :math:`\lVert g_a \rVert`, :math:`\lVert g_b \rVert`;
    * ``harms_a``, ``harms_b``: :math:`\langle s, g_a \rangle < 0` (resp. :math:`g_b`), i.e.
      a plain gradient step on the summed loss would raise that task's loss to first order;
    * ``loss_a``, ``loss_b``: the two task losses on the batch.

    With ``noise_baseline=True`` the batch is also cut into two disjoint halves
    (:func:`mtlbook.diagnose.noise.split_batch`), each task's gradient is taken on both,
    :math:`g^A, g^B`, and with the noise-only difference :math:`e = g^A - g^B` the step adds

    * ``self_a``, ``self_b``: :math:`\cos(g_a^A, g_a^B)`, the same task on two halves;
    * ``null_ab``, ``null_ba``: :math:`\cos(g_a, e_b)` and :math:`\cos(e_a, g_b)`, the pair's
      cosine when one task carries only its noise (the null of
      :func:`mtlbook.diagnose.noise.noise_thresholds`).

    These extra passes run under a forked RNG and never touch ``.grad``, so training and the
    other columns are exactly those of ``noise_baseline=False``.

    Returns a DataFrame with columns ``step``, ``epoch`` and the fields above.
    """
    import pandas as pd

    train = _check_dataset(train, "train")
    task_a = _check_task(train, task_a, "task_a")
    task_b = _check_task(train, task_b, "task_b")
    if tuple(model.task_names) != tuple(train.task_names):
        raise ValueError(f"the model's tasks {model.task_names} must equal the dataset's {train.task_names}")
    epochs = _check_int(epochs, "epochs", 1)
    every = _check_int(every, "every", 1)
    seed = _check_int(seed, "seed", 0)
    if not isinstance(noise_baseline, bool):
        raise TypeError(f"noise_baseline must be a bool, got {type(noise_baseline).__name__}")
    ia, ib = train.task_names.index(task_a), train.task_names.index(task_b)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_check_positive(lr, "lr"), weight_decay=weight_decay)
    shared = list(model.shared_parameters())
    model.train()
    rows, step = [], 0
    for epoch in range(epochs):
        # a fresh, seeded shuffle per epoch: the same batches whatever ran before
        for batch in make_loader(train, batch_size=_check_int(batch_size, "batch_size", 1), shuffle=True, seed=seed + epoch):
            losses = task_losses(model(batch.inputs), batch, train.task_specs)
            if step % every == 0:
                grads = task_gradients(losses, shared)
                total = grads.sum(dim=0)
                g_a, g_b = grads[ia], grads[ib]
                rows.append({
                    "step": step, "epoch": epoch,
                    "cosine": float(cosine_matrix(torch.stack([g_a, g_b]))[0, 1]),
                    "norm_a": float(g_a.norm()), "norm_b": float(g_b.norm()),
                    "harms_a": bool(total @ g_a < 0), "harms_b": bool(total @ g_b < 0),
                    "loss_a": float(losses[ia].detach()), "loss_b": float(losses[ib].detach()),
                })  # fmt: skip
                if noise_baseline:
                    rows[-1].update(_half_batch_cosines(model, batch, train.task_specs, shared, ia, ib, g_a, g_b))
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            step += 1
    return pd.DataFrame(rows)
