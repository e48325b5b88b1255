r"""Per-task gradients on shared parameters: the package's one helper for them.

For task losses :math:`L_1, \dots, L_n` (scalars, still attached to the autograd graph) and
shared parameters :math:`\theta_s` (a list of tensors, flattened and concatenated in order),

.. math::

    g_i = \operatorname{flatten}\bigl(\nabla_{\theta_s} L_i\bigr), \qquad
    G = \begin{bmatrix} g_1 \\ \vdots \\ g_n \end{bmatrix} \in \mathbb R^{n \times d}
    \quad\text{(task-major)}.

Each :math:`g_i` is taken with ``torch.autograd.grad(L_i, theta_s, retain_graph=True,
allow_unused=True)``: the graph survives, so the caller's own ``backward`` still works
afterwards, and a parameter that :math:`L_i` does not reach contributes zeros (GUIDE
section 3). This is the *loop* mode, one ``autograd.grad`` call per task: it works for any
model and any loss. A loss that is not attached to the graph at all (``requires_grad`` False)
gives a zero row, and :func:`per_task_gradients` says which tasks those were.

The pairwise cosines come from one matrix product on the row-normalised :math:`G`,

.. math::

    \hat G = G / \max(\lVert g_i \rVert_2, 10^{-8}), \qquad C = \hat G \hat G^\top ,

so a zero row (a task that does not reach :math:`\theta_s`) has cosine 0 with everything,
itself included, instead of NaN.

**Batched mode.** :func:`stacked_gradients` with ``extraction="batched"`` takes every
task's gradient in one ``autograd.grad`` call: row :math:`k` of the identity, used as the
``grad_outputs`` of the stacked losses, selects :math:`L_k`, and ``is_grads_batched=True``
lets ``vmap`` run one backward per row.

**Cut mode** (``extraction="cut"``). The task losses of a trainer are
entries of one vector (``task_losses`` stacks them, a balancer reweights the vector), so
the graph of :math:`L_k` contains every task's branch: a backward from :math:`L_k` sends an
exact zero into every other tower and through every other task's experts, and a loop of
:math:`n` such backwards costs about :math:`n` full backwards. The cut mode splits the chain
rule at the model outputs :math:`y_1, \dots, y_n`:

.. math::

    c_{k,j} = \partial L_k / \partial y_j \quad\text{(through the loss and the balancer only)},
    \qquad
    g_k = \sum_{j:\, c_{k,j} \ne 0} \bigl(\partial y_j / \partial \theta_s\bigr)^{\!\top} c_{k,j},

one small backward to the outputs, then one backward per task from its own outputs only
(:math:`c_{k,j} = 0` for :math:`j \ne k` for every loss and balancer of the package, and a
branch whose cotangent is exactly zero adds exactly zero). It is exact whenever
:math:`L_k` reaches :math:`\theta_s` only through the outputs, which is how a multi-task
model is built.

**Structured mode** (``extraction="structured"``, :func:`structured_gradients`). In a mixture
model (MMoE, CGC, PLE of one or two levels) task :math:`k`'s features :math:`F_k` feed only
task :math:`k`, so one ordinary backward of :math:`\sum_k L_k` to the features gives every
:math:`\partial L_k / \partial F_k` at once; the cotangent of a shared expert's output is then
task :math:`k`'s gate weight times it, and one backward through the shared experts alone,
batched over the tasks, gives every row of :math:`G`. Only the shared experts are
differentiated once per task, which is the least any exact method can do. That last backward
is written out (:mod:`mtlbook.expert_vjp`: a few matmuls over all tasks, no graph kept for
it) wherever the experts are affine maps and ReLUs, and is autograd's batched call elsewhere.
Where the model records no such structure, or a loss mixes tasks, it takes the cut.

All four modes give the same :math:`G` up to float rounding (tested to :math:`10^{-6}` of
the largest entry; the loop and the cut do the same arithmetic, and on some CPUs all three
agree bit for bit): only the work differs. The batched mode is adaTT's default because every
run stored with the book was made with it, and a change at the level of float rounding
changes a training run.

This is the only module that calls ``torch.autograd.grad``: adaTT's affinity (also for
gradients with respect to a layer's output, see :mod:`mtlbook.adatt.affinity`), GradNorm and
PCGrad, the diagnostics of chapter 2 and the experiments of chapter 3 all come here.
"""

from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor, nn

from mtlbook.expert_vjp import expert_vjp

__all__ = ["COSINE_FLOOR", "EXTRACTIONS", "TaskGradients", "as_parameter_list", "cosine_matrix", "cut_gradients",
           "flat_task_gradients", "gradient_parts", "per_task_gradients", "stacked_gradients", "structured_gradients",
           "MixtureLevel", "FeatureCotangents", "losses_are_task_separable"]

#: How :func:`stacked_gradients` takes the per-task gradients.
EXTRACTIONS = ("batched", "loop", "cut", "structured")

#: Norm floor of :func:`cosine_matrix` (GUIDE section 3).
COSINE_FLOOR = 1e-8


class TaskGradients(NamedTuple):
    """What :func:`per_task_gradients` returns.

    Attributes:
        gradients: ``[n_tasks, d]`` flat gradients, task-major, in the dtype asked for.
        task_names: the task order of the rows.
        detached: names of tasks whose gradient on the shared parameters is exactly zero
            because the loss does not reach them (not attached to the graph, or no shared
            parameter is used by it). Their rows are zeros.
    """

    gradients: Tensor
    task_names: tuple[str, ...]
    detached: tuple[str, ...]


def as_parameter_list(shared_parameters: nn.Module | Iterable[Tensor], name: str = "shared_parameters") -> list[Tensor]:
    """Validate shared parameters and return them as a list.

    A module contributes its parameters that require grad (frozen ones are skipped); an
    explicit iterable of tensors must hold only tensors that require grad.

    Raises:
        TypeError: not a module or an iterable of tensors.
        ValueError: empty, or a tensor that does not require grad.
    """
    if isinstance(shared_parameters, nn.Module):
        params = [p for p in shared_parameters.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{name}: the module has no parameter with requires_grad=True")
        return params
    if isinstance(shared_parameters, Tensor):
        shared_parameters = [shared_parameters]
    try:
        params = list(shared_parameters)
    except TypeError:
        raise TypeError(
            f"{name} must be an nn.Module or an iterable of tensors, got {type(shared_parameters).__name__}"
        ) from None
    if not params:
        raise ValueError(f"{name} must hold at least one tensor, got none")
    for k, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}[{k}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(
                f"{name}[{k}] (shape {list(p.shape)}) does not require grad; pass only trainable tensors, "
                f"e.g. [p for p in params if p.requires_grad]"
            )
    return params


def _named_losses(task_losses: Mapping[str, Tensor] | Sequence[Tensor], name: str) -> tuple[tuple[str, ...], list[Tensor]]:
    if isinstance(task_losses, Mapping):
        names = tuple(task_losses.keys())
        losses = list(task_losses.values())
        for key in names:
            if not isinstance(key, str):
                raise TypeError(f"{name} keys must be task names (str), got {type(key).__name__}")
    elif isinstance(task_losses, Tensor):
        if task_losses.dim() != 1:
            raise ValueError(f"{name} as a tensor must be 1-D [n_tasks], got shape {list(task_losses.shape)}")
        losses = list(task_losses.unbind(0))
        names = tuple(f"task{i}" for i in range(len(losses)))
    elif isinstance(task_losses, Sequence) and not isinstance(task_losses, (str, bytes)):
        losses = list(task_losses)
        names = tuple(f"task{i}" for i in range(len(losses)))
    else:
        raise TypeError(f"{name} must be a dict of task name -> scalar loss, or a sequence of scalar losses, "
                        f"got {type(task_losses).__name__}")
    if not losses:
        raise ValueError(f"{name} must hold at least one task loss, got none")
    for task, loss in zip(names, losses):
        if not isinstance(loss, Tensor):
            raise TypeError(f"{name}[{task!r}] must be a torch.Tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(
                f"{name}[{task!r}] must be a scalar loss (one element), got shape {list(loss.shape)}; "
                "reduce it first, e.g. with .mean()"
            )
    return names, [loss.reshape(()) for loss in losses]


def per_task_gradients(
    task_losses: Mapping[str, Tensor] | Sequence[Tensor],
    shared_parameters: nn.Module | Iterable[Tensor],
    *,
    dtype: torch.dtype = torch.float64,
) -> TaskGradients:
    """Flat per-task gradients :math:`g_i = \\nabla_{\\theta_s} L_i`, task-major ``[n_tasks, d]``.

    Args:
        task_losses: ``{task: scalar loss}`` (rows in the dict's order) or a sequence / 1-D
            tensor of scalar losses (tasks named ``task0, task1, ...``), graph attached.
        shared_parameters: the parameters :math:`\\theta_s` (a module or tensors).
        dtype: dtype of the result (float64 by default, so cosines of tiny gradients are exact
            enough to compare).

    Returns:
        :class:`TaskGradients` (gradients, task names, tasks that do not reach the
        parameters). The autograd graph is kept (``retain_graph=True``).
    """
    names, losses = _named_losses(task_losses, "task_losses")
    params = as_parameter_list(shared_parameters)
    dim = sum(p.numel() for p in params)
    device = params[0].device
    grads = torch.zeros(len(losses), dim, dtype=dtype, device=device)
    detached = []
    with torch.enable_grad():
        for i, loss in enumerate(losses):
            if not loss.requires_grad:
                detached.append(names[i])
                continue
            parts = gradient_parts(loss, params)
            if all(g is None for g in parts):
                detached.append(names[i])
                continue
            grads[i] = flatten_parts(parts, params, dtype)
    return TaskGradients(grads, names, tuple(detached))


def gradient_parts(loss: Tensor, inputs: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
    r""":math:`\partial L / \partial x` for every ``x`` in ``inputs`` (``None`` where ``L`` does
    not reach ``x``); the graph is kept and no ``.grad`` is touched."""
    return torch.autograd.grad(loss, list(inputs), retain_graph=True, allow_unused=True)


def flatten_parts(parts: Sequence[Tensor | None], params: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """One flat row from :func:`gradient_parts` (zeros where a part is ``None``), in ``dtype``."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).detach().reshape(-1).to(dtype or p.dtype)
                      for g, p in zip(parts, params)])  # fmt: skip


def flat_task_gradients(losses: Tensor | Sequence[Tensor], params: Sequence[Tensor], rows: Iterable[int] | None = None,
                        *, dtype: torch.dtype | None = torch.float32, device: torch.device | None = None) -> Tensor:  # fmt: skip
    """``[n_tasks, d]`` flat gradients of ``losses[i]`` on ``params`` for ``i`` in ``rows``
    (default: every task), one ``autograd.grad`` per task (the *loop* mode). Rows not asked
    for, and losses not attached to the graph, stay zero. ``dtype=None`` keeps the
    parameters' dtype; ``device`` defaults to the parameters'."""
    params = list(params)
    n = losses.shape[0] if isinstance(losses, Tensor) else len(losses)
    dim = sum(p.numel() for p in params)
    out_dtype = dtype or params[0].dtype
    out = torch.zeros(n, dim, dtype=out_dtype, device=device or params[0].device)
    for i in range(n) if rows is None else rows:
        if losses[i].requires_grad:
            out[i] = flatten_parts(gradient_parts(losses[i], params), params, out_dtype)
    return out


def _stack_rows(per_task: Sequence[Sequence[Tensor | None]], inputs: Sequence[Tensor]) -> list[Tensor | None]:
    """``[len(per_task), *x.shape]`` per input from one tuple of parts per task (None: unused)."""
    result: list[Tensor | None] = []
    for c, x in enumerate(inputs):
        grads = [g[c] for g in per_task]
        if all(g is None for g in grads):
            result.append(None)
        else:
            result.append(torch.stack([torch.zeros_like(x) if g is None else g for g in grads]))
    return result


def cut_gradients(roots: Sequence[Tensor], rows: Sequence[int], outputs: Sequence[Tensor],
                  inputs: Sequence[Tensor]) -> list[Tensor | None]:  # fmt: skip
    r"""Per-task gradients of ``roots[rows]`` on ``inputs``, split at ``outputs`` (the *cut* mode).

    :math:`c_{k,j} = \partial L_k / \partial y_j` for every tensor :math:`y_j` of ``outputs``
    and every task at once (one batched backward through the loss and the balancer only, a
    small graph); then, per task, one backward from the outputs whose cotangent is not
    exactly zero, with those cotangents, to ``inputs``. Equal to the loop mode when the roots
    reach ``inputs`` only through ``outputs``; a root that reaches no output is taken the loop
    way.

    Returns, for each tensor in ``inputs``, ``[len(rows), *shape]`` or ``None`` when no root
    reaches it.
    """
    outputs = [y for y in outputs if y.requires_grad]
    # every task's cotangents in one batched call (vmap over the small loss graph); a loop
    # here would run every task's loss graph once per task
    cotangents = stacked_gradients(roots, rows, outputs, "batched") if outputs else []
    per_task = []
    for r, i in enumerate(rows):
        live = [(y, c[r]) for y, c in zip(outputs, cotangents) if c is not None and bool(c[r].any())]
        if not live:  # nothing of L_i flows through the outputs: take it whole
            per_task.append(gradient_parts(roots[i], inputs))
            continue
        per_task.append(torch.autograd.grad([y for y, _ in live], list(inputs), grad_outputs=[c for _, c in live],
                                            retain_graph=True, allow_unused=True))  # fmt: skip
    return _stack_rows(per_task, inputs)


class MixtureLevel(Protocol):
    """What one mixture level of a model's latest forward pass exposes (see
    :class:`mtlbook.models.base.MixtureRecord`): its shared experts' outputs :math:`S_s`, its
    task-private features :math:`F_k` (``[K, B, d]`` or one ``[B, d_k]`` per task), each task
    gate's weights (``[K, B, m]`` or one ``[B, m_k]`` per task; column :math:`s < n_s` weighs
    :math:`S_s`), the shared gate's mixture :math:`f_s` and the shared input :math:`u_s` its
    shared experts read (``None`` where there is none, or at the input). A level may also
    carry ``shared_experts`` (the modules that computed :math:`S_s`) and ``shared_gate`` (the
    shared gate's weights), read with ``getattr``: with them the backward through the shared
    experts is written out (:mod:`mtlbook.expert_vjp`), without them it is autograd's."""

    shared_outputs: Sequence[Tensor]
    task_features: Tensor | Sequence[Tensor]
    task_gates: Tensor | Sequence[Tensor]
    shared_feature: Tensor | None
    shared_input: Tensor | None


def losses_are_task_separable(
    roots: Sequence[Tensor], rows: Sequence[int], outputs: Sequence[Tensor]
) -> bool:
    r"""Whether every :math:`L_k` (``roots[rows]``) reaches the outputs only through its own
    :math:`y_k` (``outputs[k]``): every cotangent :math:`\partial L_k / \partial y_j`,
    :math:`j \ne k`, exactly zero (one batched backward through the loss graph)."""
    if not rows or any(not y.requires_grad for y in outputs):
        return False
    cotangents = stacked_gradients(roots, rows, outputs, "batched")
    for r, k in enumerate(rows):
        for j, c in enumerate(cotangents):
            if j != k and c is not None and bool(c[r].any()):
                return False
    return True


def structured_gradients(
    roots: Sequence[Tensor],
    rows: Sequence[int],
    levels: Sequence[MixtureLevel],
    params_by_level: Sequence[Sequence[Tensor]],
    chunk_size: int | None = None,
    private: FeatureCotangents | None = None,
) -> list[list[Tensor | None]]:
    r"""Per-task gradients on the shared experts of a mixture model (the *structured* mode).

    ``levels`` are the model's mixture levels (bottom first) and ``params_by_level[l]`` the
    shared parameters of level :math:`l`. Returns, per level and parameter,
    ``[len(rows), *shape]`` (``None`` where no task reaches it). ``chunk_size`` takes the
    tasks that many at a time through the shared experts (less memory, same result).
    ``private``: the features' cotangents kept during the caller's own backward of
    :math:`\sum_k L_k` (:class:`FeatureCotangents`); then the backward to the features below
    is not run a second time.

    **Premise.** :math:`L_k` reaches the model only through its own output :math:`y_k`
    (what :func:`losses_are_task_separable` checks; the caller checks it once per loss
    function). Task :math:`k`'s features :math:`F_k^{(l)}` feed only task :math:`k`'s
    experts, gate and tower, so one ordinary backward of :math:`\sum_k L_k` to every
    :math:`F^{(l)}` yields :math:`C_k^{(l)} = \partial L_k / \partial F_k^{(l)}` for every
    task at once. Then, from the top level down, with :math:`G_k` task :math:`k`'s gate
    weights and :math:`f_s` the shared gate's mixture,

    .. math::

        \frac{\partial L_k}{\partial S_s^{(l)}} = G^{(l)}_{k,s} \odot C_k^{(l)}
        + \Bigl(\frac{\partial f_s^{(l)}}{\partial S_s^{(l)}}\Bigr)^{\!\top}
          \frac{\partial L_k}{\partial f_s^{(l)}},

    and one backward through level :math:`l`'s shared experts, batched over the :math:`K`
    tasks, gives every task's gradient on that level's shared parameters and
    :math:`\partial L_k / \partial u_s^{(l)} = \partial L_k / \partial f_s^{(l-1)}` for the
    level below. Only the shared experts are differentiated :math:`K` times; everything
    task-specific is differentiated once.

    That backward is the chain rule written out (:func:`mtlbook.expert_vjp.expert_vjp`) when
    the level recorded its expert modules and they are affine maps and ReLUs: about 0.7 of
    the time of ``autograd.grad(..., is_grads_batched=True)`` through the recorded graph at 16
    tasks (``benchmarks/expert_vjp.py``), and the tasks' :math:`[K, B, d]` cotangents exist one
    expert at a time (peak memory). Any other
    expert (dropout while training, another activation, hooks, autocast) takes autograd's
    batched call through the shared experts and shared gate. Both give the loop's rows to
    float rounding (on this package's CPU, bit for bit).
    """
    live = [roots[k] for k in rows if roots[k].requires_grad]
    if not live:
        return [[None] * len(params) for params in params_by_level]
    if private is None:  # per level [n, B, d]: dL_k / dF_k
        private_rows = _private_cotangents(sum(live), levels, rows)
    else:
        private_rows = private.rows(rows)
    # per level [n, B, m]: the gate columns of the shared experts are the first of every gate
    gates = [_rows(lv.task_gates if isinstance(lv.task_gates, Tensor)
                   else [g[:, : len(lv.shared_outputs)] for g in lv.task_gates], rows) for lv in levels]  # fmt: skip
    step = chunk_size or len(rows)
    parts = []
    for start in range(0, len(rows), step):
        chunk = slice(start, min(start + step, len(rows)))
        parts.append(_descend(levels, [p[chunk] for p in private_rows], [g[chunk] for g in gates], params_by_level))
    if len(parts) == 1:
        return parts[0]
    # glue the chunks back together along the task axis
    return [[None if pieces[0] is None else torch.cat(pieces) for pieces in zip(*level_parts)]
            for level_parts in zip(*parts)]


def _rows(per_task: Tensor | Sequence[Tensor], rows: Sequence[int]) -> Tensor:
    """Rows ``rows`` of a task-major ``[K, ...]`` tensor (no copy when they are all of it, in
    order) or of one tensor per task, as one ``[len(rows), ...]`` tensor."""
    if isinstance(per_task, Tensor):
        if list(rows) == list(range(per_task.shape[0])):
            return per_task
        return per_task.index_select(0, torch.as_tensor(list(rows), device=per_task.device))
    return torch.stack([per_task[k] for k in rows])


def _feature_tensors(levels: Sequence[MixtureLevel]) -> list[list[Tensor]]:
    """Per level, its task features as a list: one ``[K, B, d]`` tensor, or one ``[B, d_k]`` per task."""
    return [[f] if isinstance(f, Tensor) else list(f) for f in (lv.task_features for lv in levels)]


def _select_private(levels: Sequence[MixtureLevel], grads: Sequence[Tensor | None], rows: Sequence[int]) -> list[Tensor]:
    """``grads`` (one per feature tensor of :func:`_feature_tensors`, None where unreached) as
    ``[len(rows), B, d]`` per level."""
    grads = iter(grads)
    out = []
    for level, features in zip(levels, _feature_tensors(levels)):
        level_grads = [torch.zeros_like(f) if g is None else g for f, g in zip(features, grads)]
        out.append(_rows(level_grads[0] if isinstance(level.task_features, Tensor) else level_grads, rows))
    return out


def _private_cotangents(total: Tensor, levels: Sequence[MixtureLevel], rows: Sequence[int]) -> list[Tensor]:
    """``dL_k / dF_k`` per level, ``[len(rows), B, d]``, from one backward of ``total``."""
    # F_k reaches no other task's loss, so row k of d(sum_j L_j)/dF is dL_k/dF_k
    flat = [f for features in _feature_tensors(levels) for f in features]
    return _select_private(levels, torch.autograd.grad(total, flat, retain_graph=True, allow_unused=True), rows)


class FeatureCotangents:
    r"""Keeps :math:`\partial \mathcal L / \partial F^{(l)}` of every level's task features
    while the caller's own ``backward`` of :math:`\mathcal L = \sum_k L_k` runs (one tensor
    hook per feature tensor, removed by :meth:`remove`).

    :math:`F_k` reaches no other task's loss, so row :math:`k` of that cotangent is
    :math:`\partial L_k / \partial F_k`: exactly what :func:`structured_gradients` would take
    one more backward for. Kept during training's backward, the structured mode costs only its
    pass through the shared experts. Correct only when the backward is of the plain sum of the
    task losses (no transfer, balancer or regulariser terms reach the features).
    """

    def __init__(self, levels: Sequence[MixtureLevel]) -> None:
        self.levels = list(levels)
        flat = [f for features in _feature_tensors(self.levels) for f in features]
        self.grads: list[Tensor | None] = [None] * len(flat)
        self._handles = [f.register_hook(self._keeper(i)) for i, f in enumerate(flat) if f.requires_grad]

    def _keeper(self, i: int):
        def keep(grad: Tensor) -> None:
            self.grads[i] = grad  # returns None: the backward goes on with grad unchanged

        return keep

    def remove(self) -> None:
        """Remove the hooks (what was kept stays)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def rows(self, rows: Sequence[int]) -> list[Tensor]:
        r"""Per level, ``[len(rows), B, d]``: :math:`\partial L_k / \partial F_k` for ``k`` in ``rows``."""
        return _select_private(self.levels, self.grads, rows)


def _descend(
    levels: Sequence[MixtureLevel],
    private: Sequence[Tensor],
    gates: Sequence[Tensor],
    params_by_level: Sequence[Sequence[Tensor]],
) -> list[list[Tensor | None]]:
    """The top-down pass of :func:`structured_gradients` for one chunk of tasks: ``private[l]``
    and ``gates[l]`` are level ``l``'s ``[n, B, d]`` cotangents and ``[n, B, m]`` gate weights."""
    result: list[list[Tensor | None]] = [[None] * len(params) for params in params_by_level]
    from_above = None  # dL_k / df_s for the level being processed, [n, B, d]
    for l in reversed(range(len(levels))):
        level = levels[l]
        own = private[l]
        # dL_k/dS_s = G_ks C_k: the shared outputs' cotangents through the task gates
        columns = [gates[l][:, :, s, None].to(own.dtype) for s in range(len(level.shared_outputs))]
        u_s = level.shared_input
        pass_down = l > 0 and u_s is not None and u_s.requires_grad
        above = from_above if level.shared_feature is not None else None
        from_above = None
        wanted = list(params_by_level[l])
        if not (level.shared_outputs or above is not None) or not (wanted or pass_down):
            continue
        written = _written_out(level, own, columns, above, wanted, pass_down)
        if written is not None:
            result[l], from_above = written
            continue
        outs = list(level.shared_outputs)
        cotangents = [column * own for column in columns]
        if above is not None:
            outs.append(level.shared_feature)
            cotangents.append(above)
        if pass_down:
            wanted.append(u_s)
        grads = torch.autograd.grad(outs, wanted, grad_outputs=cotangents, retain_graph=True,
                                    allow_unused=True, is_grads_batched=True)
        result[l] = list(grads[: len(params_by_level[l])])
        if pass_down:
            from_above = grads[-1]
    return result


def _written_out(
    level: MixtureLevel, own: Tensor, columns: Sequence[Tensor], above: Tensor | None,
    wanted: Sequence[Tensor], pass_down: bool,
) -> tuple[list[Tensor | None], Tensor | None] | None:  # fmt: skip
    r"""One level's backward through its shared experts by :func:`mtlbook.expert_vjp.expert_vjp`
    (the chain rule written out, all tasks in a few matmuls), or None where the level is not of
    that form: then autograd differentiates the recorded graph.

    Expert :math:`s`'s cotangent is :math:`G_{k,s} \odot C_k` (``columns[s] * own``) and,
    through the shared gate :math:`f_s = \sum_i w_i \mathcal E_{s,i}`, :math:`w_s \odot
    \partial L_k / \partial f_s` (``above``; the gate reads :math:`u_s`, not the experts, and
    its parameters are not shared experts'). Returns the gradients of ``wanted`` and, with
    ``pass_down``, :math:`\partial L_k / \partial u_s`.
    """
    experts = getattr(level, "shared_experts", None)
    u_s = level.shared_input
    if experts is None or u_s is None or len(experts) != len(level.shared_outputs):
        return None
    shared_gate = getattr(level, "shared_gate", None)
    if above is not None and (shared_gate is None or pass_down):  # the gate's own path to u_s: autograd's
        return None

    def cotangent(s: int) -> Tensor:
        # one expert's [n, B, d] at a time (memory): G_ks C_k, plus w_s dL_k/df_s through the shared gate
        c = columns[s] * own
        return c if above is None else c.add_(shared_gate[:, s, None].to(c.dtype) * above)

    found: dict[int, Tensor] = {}
    input_grad: Tensor | None = None
    for s, (expert, out) in enumerate(zip(experts, level.shared_outputs)):
        vjp = expert_vjp(expert, u_s.detach(), out.detach(), cotangent(s), want_input=pass_down)
        if vjp is None:
            return None
        found.update((id(p), g) for p, g in vjp.parameters)
        if pass_down:
            input_grad = vjp.input if input_grad is None else input_grad.add_(vjp.input)
    if any(id(p) not in found for p in wanted):
        return None  # a parameter outside these experts
    return [found[id(p)] for p in wanted], input_grad


def stacked_gradients(roots: Sequence[Tensor], rows: Sequence[int], inputs: Sequence[Tensor],
                      extraction: str = "batched",
                      outputs: Sequence[Tensor] | None = None) -> list[Tensor | None]:  # fmt: skip
    """For each tensor in ``inputs``: ``[len(rows), *shape]`` gradients of ``roots[rows]``, or
    ``None`` when no root reaches it. ``extraction``: ``"batched"`` (one ``autograd.grad`` call
    with ``is_grads_batched=True``), ``"loop"`` (one call per task) or ``"cut"`` (split at the
    model ``outputs``, see :func:`cut_gradients`; without ``outputs`` it is the loop).
    ``"structured"`` needs the model's mixture levels (:func:`structured_gradients`, which
    :class:`~mtlbook.adatt.TaskAffinityComputer` tries first); here it is the cut."""
    if extraction not in EXTRACTIONS:
        raise ValueError(f"extraction must be one of {EXTRACTIONS}, got {extraction!r}")
    if extraction in ("cut", "structured") and outputs:
        return cut_gradients(roots, rows, outputs, inputs)
    if extraction in ("loop", "cut", "structured"):
        return _stack_rows([gradient_parts(roots[i], inputs) for i in rows], inputs)
    # Row k of the identity as grad_output selects loss k: vmap runs one backward per row.
    stacked = torch.stack([roots[i].float() for i in rows])
    selector = torch.eye(len(rows), dtype=stacked.dtype, device=stacked.device)
    grads = torch.autograd.grad(
        stacked, list(inputs), grad_outputs=selector, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    return list(grads)


def cosine_matrix(gradients: Tensor) -> Tensor:
    """Pairwise cosine similarity of the rows of ``gradients`` in one matmul.

    .. math::
        \\hat G = G / \\max(\\lVert g_i \\rVert_2, 10^{-8}), \\qquad C = \\hat G \\hat G^\\top

    Args:
        gradients: ``[n, d]``, one flattened gradient per row.

    Returns:
        ``[n, n]`` with ``C_ij = cos(g_i, g_j)``. A zero row has no direction: its row and
        column (diagonal included) are 0 instead of NaN, thanks to the ``1e-8`` floor.
    """
    if not isinstance(gradients, Tensor) or gradients.dim() != 2:
        raise ValueError("gradients must be a 2-D tensor [n_tasks, d]")
    norms = gradients.norm(dim=1, keepdim=True).clamp_min(1e-8)
    unit = gradients / norms
    return unit @ unit.T
