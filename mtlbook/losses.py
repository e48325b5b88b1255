"""Per-task losses that respect missing targets, and uncertainty weighting (chapter 7).

Every loss here has the signature ``loss(output, target, present=None, **options)`` and
returns a scalar: the mean of a per-row loss over the rows whose target is present.

* ``present`` is a bool ``[batch]`` mask (``None`` means every row is present). A row with
  ``present[k] == False`` carries a placeholder target (possibly NaN); it is replaced by a
  harmless constant with :func:`torch.where` before any arithmetic, and the per-row loss is
  masked out again afterwards, so neither the value nor the gradient can be poisoned.
* A batch with no present row returns ``0`` that is still attached to the autograd graph,
  so ``loss.backward()`` works and every gradient it produces is zero (never NaN).
* When targets have trailing dimensions (``[batch, k]``), the per-row loss is the mean over
  them, so the result equals the element mean over the present rows.

The stacked per-task losses produced by :func:`task_losses` are task-major ``[n_tasks]`` in
the order of ``task_specs``; :class:`UncertaintyWeighting` then rescales them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlbook._checks import check_registration
from mtlbook._loss_rows import (
    _autocast_off,
    _check_class_indices,
    _check_float,
    _check_present,
    _check_tensor,
    _check_unit_interval,
    _checked_rows,
    _float_target,
    _masked_row_mean,
    _sanitise,
)
from mtlbook.data.batch import TASK_KINDS, Batch, TaskSpec, check_task_specs

__all__ = [
    "LOSSES",
    "LOSS_TASK_KINDS",
    "register_loss",
    "DEFAULT_LOSS_FOR_KIND",
    "UncertaintyWeighting",
    "bce_with_logits_loss",
    "cross_entropy_loss",
    "default_loss_for",
    "focal_loss",
    "huber_loss",
    "info_nce_loss",
    "mse_loss",
    "present_tasks",
    "resolve_task_losses",
    "task_losses",
]


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------


def focal_loss(
    logits: Tensor,
    target: Tensor,
    present: Tensor | None = None,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
) -> Tensor:
    r"""Binary focal loss :cite:`lin2017focal`, computed in float32 even under autocast.

    With :math:`p = \sigma(x)` and a target :math:`y \in [0, 1]`,

    .. math::
        p_t = y p + (1 - y)(1 - p), \qquad \alpha_t = y\alpha + (1 - y)(1 - \alpha),

        \mathrm{FL}(x, y) = -\alpha_t (1 - p_t)^{\gamma}
            \bigl[y \log p + (1 - y)\log(1 - p)\bigr].

    At :math:`\gamma = 0` this is the :math:`\alpha_t`-weighted binary cross-entropy; a larger
    :math:`\gamma` shrinks the loss of rows that are already well classified.

    Stability: :math:`\log p` and :math:`\log(1-p)` come from ``logsigmoid``, and the
    modulating factor is evaluated as :math:`\exp(\gamma \log(1 - p_t))` with
    :math:`\log(1-p_t)` built from ``logsigmoid`` too, so no ``0 ** gamma`` and no
    ``log(0)`` appears for any finite logit. The inputs are cast to float32 and autocast is
    switched off inside: in float16 the product of a tiny modulating factor and the
    cross-entropy underflows.

    Args:
        logits: raw scores ``[batch]`` (or ``[batch, 1]``, or ``[batch, k]`` with matching target).
        target: labels in ``[0, 1]`` with the shape of ``logits``.
        present: bool ``[batch]``; rows marked False are ignored.
        gamma: focusing parameter, a finite number ``>= 0``.
        alpha: weight of the positive class in ``[0, 1]``; ``None`` disables class weighting
            (:math:`\alpha_t = 1`).

    Returns:
        float32 scalar: the mean over present rows.
    """
    logits, mask = _checked_rows(logits, target, present, "logits")
    gamma = _check_float(gamma, "gamma", 0.0)
    if alpha is not None:
        alpha = _check_float(alpha, "alpha", 0.0, 1.0)
    with _autocast_off(logits.device):
        x, y = _sanitise(logits.float(), _float_target(target).float(), mask)
        _check_unit_interval(y)
        log_p = F.logsigmoid(x)
        log_not_p = F.logsigmoid(-x)
        cross_entropy = -(y * log_p + (1.0 - y) * log_not_p)
        # log(1 - p_t) = log(y (1-p) + (1-y) p), assembled in log space; log(0) = -inf is a
        # harmless input to logaddexp and only ever appears for a hard 0/1 label.
        log_one_minus_pt = torch.logaddexp(torch.log(y) + log_not_p, torch.log1p(-y) + log_p)
        modulating = torch.exp(gamma * log_one_minus_pt)
        per_element = modulating * cross_entropy
        if alpha is not None:
            per_element = (y * alpha + (1.0 - y) * (1.0 - alpha)) * per_element
        return _masked_row_mean(per_element, mask)


def bce_with_logits_loss(logits: Tensor, target: Tensor, present: Tensor | None = None) -> Tensor:
    r"""Binary cross-entropy on logits, :math:`-[y\log\sigma(x) + (1-y)\log(1-\sigma(x))]`.

    Args:
        logits: raw scores ``[batch]`` (or ``[batch, 1]``).
        target: labels in ``[0, 1]``, same shape as ``logits``.
        present: bool ``[batch]``; rows marked False are ignored.
    """
    logits, mask = _checked_rows(logits, target, present, "logits")
    x, y = _sanitise(logits, _float_target(target).to(logits.dtype), mask)
    _check_unit_interval(y)
    per_element = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    return _masked_row_mean(per_element, mask)


def huber_loss(output: Tensor, target: Tensor, present: Tensor | None = None, delta: float = 1.0) -> Tensor:
    r"""Huber loss: quadratic near the target, linear beyond ``delta`` (robust to outliers).

    .. math::
        \ell(e) = \begin{cases} \tfrac12 e^2 & |e| \le \delta \\
                   \delta(|e| - \tfrac12\delta) & |e| > \delta \end{cases},\qquad e = \hat y - y.

    Args:
        output: predictions ``[batch]`` (or ``[batch, 1]``).
        target: real targets, same shape.
        present: bool ``[batch]``; rows marked False are ignored.
        delta: switch point, a finite number ``> 0``.
    """
    output, mask = _checked_rows(output, target, present, "output")
    delta = _check_float(delta, "delta", 0.0, low_inclusive=False)
    out, tgt = _sanitise(output, _float_target(target).to(output.dtype), mask)
    return _masked_row_mean(F.huber_loss(out, tgt, reduction="none", delta=delta), mask)


def mse_loss(output: Tensor, target: Tensor, present: Tensor | None = None) -> Tensor:
    r"""Mean squared error :math:`(\hat y - y)^2` over present rows.

    Args:
        output: predictions ``[batch]`` (or ``[batch, 1]``).
        target: real targets, same shape.
        present: bool ``[batch]``; rows marked False are ignored.
    """
    output, mask = _checked_rows(output, target, present, "output")
    out, tgt = _sanitise(output, _float_target(target).to(output.dtype), mask)
    return _masked_row_mean(F.mse_loss(out, tgt, reduction="none"), mask)


def cross_entropy_loss(
    logits: Tensor, target: Tensor, present: Tensor | None = None, label_smoothing: float = 0.0
) -> Tensor:
    r"""Multiclass cross-entropy :math:`-\log \mathrm{softmax}(x)_y` over present rows.

    Args:
        logits: raw scores ``[batch, n_classes]``.
        target: class indices ``[batch]`` (integer dtype) in ``[0, n_classes)``; placeholders
            of missing rows may be anything (e.g. ``-1``).
        present: bool ``[batch]``; rows marked False are ignored.
        label_smoothing: in ``[0, 1)``, as in :func:`torch.nn.functional.cross_entropy`.
    """
    _check_tensor(logits, "logits")
    _check_tensor(target, "target")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, n_classes], got shape {list(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must be [batch] = [{logits.shape[0]}], got shape {list(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    label_smoothing = _check_float(label_smoothing, "label_smoothing", 0.0, 1.0)
    if label_smoothing >= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    mask = _check_present(present, logits.shape[0], logits.device)
    x, y = _sanitise(logits, target.long(), mask, fill_target=0)
    n_classes = logits.shape[1]
    _check_class_indices(y, n_classes)
    per_row = F.cross_entropy(x, y, reduction="none", label_smoothing=label_smoothing)
    return _masked_row_mean(per_row, mask)


def info_nce_loss(
    embeddings: Tensor, target: Tensor, present: Tensor | None = None, temperature: float = 0.1
) -> Tensor:
    r"""InfoNCE with label-defined positives :cite:`oord2018representation,khosla2020supervised`.

    Rows that share a target id are positives of each other; every other present row is a
    negative. With :math:`z_k = e_k / \lVert e_k \rVert` and :math:`s_{ik} = z_i^\top z_k / T`,
    anchor :math:`i` with positive set :math:`P(i)` (excluding :math:`i`) has

    .. math::
        \ell_i = -\frac{1}{|P(i)|} \sum_{p \in P(i)}
            \log \frac{\exp s_{ip}}{\sum_{k \ne i} \exp s_{ik}},

    which is the original InfoNCE when :math:`|P(i)| = 1`; with several positives it is the
    supervised-contrastive average. Anchors without a positive are left out of the mean.
    Computed in float32 with autocast off (the exponentials at ``T = 0.1`` are large).

    Args:
        embeddings: ``[batch, dim]`` (not necessarily normalised).
        target: integer ids ``[batch]``.
        present: bool ``[batch]``; missing rows are neither anchors nor negatives.
        temperature: a finite number ``> 0``.

    Returns:
        float32 scalar; 0 (graph-connected) when no present anchor has a positive.
    """
    _check_tensor(embeddings, "embeddings")
    _check_tensor(target, "target")
    temperature = _check_float(temperature, "temperature", 0.0, low_inclusive=False)
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [batch, dim], got shape {list(embeddings.shape)}")
    if target.dim() != 1 or target.shape[0] != embeddings.shape[0]:
        raise ValueError(f"target must be [batch] = [{embeddings.shape[0]}], got shape {list(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer ids, got dtype {target.dtype}")
    mask = _check_present(present, embeddings.shape[0], embeddings.device)
    with _autocast_off(embeddings.device):
        emb = embeddings.float()
        ids = target.to(embeddings.device)
        if mask is not None:
            # Selecting rows drops missing ones from anchors and negatives alike.
            emb, ids = emb[mask], ids[mask]
        n = emb.shape[0]
        z = F.normalize(emb, dim=1)
        scores = (z @ z.T) / temperature
        self_pair = torch.eye(n, dtype=torch.bool, device=emb.device)
        # A very negative finite fill (not -inf) keeps a lone row (n = 1) free of inf - inf.
        scores = scores.masked_fill(self_pair, torch.finfo(scores.dtype).min)
        log_prob = scores - torch.logsumexp(scores, dim=1, keepdim=True)
        positive = (ids[:, None] == ids[None, :]) & ~self_pair
        n_positive = positive.sum(dim=1)
        # torch.where keeps the self terms out of the sum and out of the gradient.
        pos_log_prob = torch.where(positive, log_prob, torch.zeros((), device=emb.device)).sum(dim=1)
        per_anchor = -pos_log_prob / n_positive.clamp(min=1)
        has_positive = n_positive > 0
        per_anchor = torch.where(has_positive, per_anchor, torch.zeros((), device=emb.device))
        # Even with no anchor (or no row) the reduction runs over tensors built from emb, so
        # the zero it returns stays attached to the graph.
        return per_anchor.sum() / has_positive.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------
# registry and the per-task loss vector
# ---------------------------------------------------------------------------------------

#: Loss name -> function ``(output, target, present, **kwargs) -> scalar``.
LOSSES: dict[str, Callable[..., Tensor]] = {
    "focal": focal_loss,
    "bce": bce_with_logits_loss,
    "huber": huber_loss,
    "mse": mse_loss,
    "ce": cross_entropy_loss,
    "infonce": info_nce_loss,
}

#: Which task kinds each loss accepts (a mismatch is almost always a configuration bug).
LOSS_TASK_KINDS: dict[str, tuple[str, ...]] = {
    "focal": ("binary",),
    "bce": ("binary",),
    "huber": ("regression",),
    "mse": ("regression",),
    "ce": ("multiclass",),
    "infonce": ("contrastive",),
}

#: The loss a task kind gets when no name is configured.
DEFAULT_LOSS_FOR_KIND: dict[str, str] = {
    "binary": "bce",
    "regression": "mse",
    "multiclass": "ce",
    "contrastive": "infonce",
}


def register_loss(name: str, loss: Callable[..., Tensor], task_kinds: Sequence[str]) -> None:
    """Add ``loss`` (``(output, target, present, **kwargs) -> scalar``) to :data:`LOSSES` under
    ``name``, for the task kinds in ``task_kinds``; ``TrainerConfig.losses`` then accepts it."""
    check_registration(name, LOSSES, "loss", loss)
    kinds = tuple(task_kinds) if isinstance(task_kinds, (list, tuple)) else ()
    if not kinds or any(k not in DEFAULT_LOSS_FOR_KIND for k in kinds):
        raise ValueError(f"task_kinds must be a non-empty list of {sorted(DEFAULT_LOSS_FOR_KIND)}, got {task_kinds!r}")
    LOSSES[name] = loss
    LOSS_TASK_KINDS[name] = kinds


def default_loss_for(kind: str) -> str:
    """Name of the default loss of a task kind: binary->bce, regression->mse, multiclass->ce,
    contrastive->infonce."""
    if kind not in DEFAULT_LOSS_FOR_KIND:
        raise ValueError(f"kind must be one of {TASK_KINDS}, got {kind!r}")
    return DEFAULT_LOSS_FOR_KIND[kind]


def _check_task_keys(mapping: Mapping[str, Any] | None, names: Sequence[str], param: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{param} must be a dict keyed by task name, got {type(mapping).__name__}")
    unknown = [k for k in mapping if k not in names]
    if unknown:
        raise ValueError(f"{param} has unknown task names {unknown}; valid task names: {list(names)}")
    return dict(mapping)


def present_tasks(batch: Batch, task_specs: Sequence[TaskSpec] | Sequence[str]) -> Tensor:
    """Bool ``[n_tasks]``: True where the task has at least one present row in ``batch``.

    ``task_specs`` may be TaskSpecs or plain task names; the result lives on the device of
    the batch's masks, so it can go straight into :class:`UncertaintyWeighting`.
    """
    names = [s.name if isinstance(s, TaskSpec) else s for s in task_specs]
    if not names:
        raise ValueError("task_specs must name at least one task, got an empty sequence")
    flags = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"task_specs must hold TaskSpec objects or str names, got {type(name).__name__}")
        mask = batch.present.get(name)
        if mask is None:
            if name not in batch.targets:
                raise ValueError(f"batch has no targets for task {name!r}; it has {sorted(batch.targets)}")
            mask = torch.ones(len(batch), dtype=torch.bool, device=batch.inputs.device)
        flags.append(mask.any())
    return torch.stack(flags)


def task_losses(
    outputs: Mapping[str, Tensor],
    batch: Batch,
    task_specs: Sequence[TaskSpec],
    loss_names: Mapping[str, str] | None = None,
    loss_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    fixed_weights: Mapping[str, float] | None = None,
) -> Tensor:
    r"""The task-major vector :math:`[c_1 L_1, \dots, c_n L_n]` for one batch.

    :math:`L_i` is the configured loss of task :math:`i` on its present rows (default from
    :func:`default_loss_for`) and :math:`c_i` its fixed weight (default 1). This is the first
    two stages of the loss pipeline; uncertainty weighting or a balancer comes next.

    Args:
        outputs: model outputs keyed by task name (raw logits / values / embeddings).
        batch: the :class:`~mtlbook.data.batch.Batch` holding targets and presence masks.
        task_specs: the tasks, in order.
        loss_names: optional ``{task: loss name}`` with names from :data:`LOSSES`.
        loss_kwargs: optional ``{task: {option: value}}`` passed to that task's loss
            (e.g. ``{"cvr": {"alpha": 0.2}}``).
        fixed_weights: optional ``{task: weight}``, each a finite number ``>= 0``.

    Returns:
        float32 ``[n_tasks]``; a task with no present row contributes a graph-connected 0.
    """
    losses = []
    for task in resolve_task_losses(outputs, batch, task_specs, loss_names, loss_kwargs, fixed_weights):
        loss = LOSSES[task.loss_name](task.output, task.target, task.present, **task.kwargs)
        losses.append(loss.float() * task.weight)
    return torch.stack(losses)


class ResolvedTaskLoss(NamedTuple):
    """One task's loss, checked and looked up: what :func:`task_losses` computes for it."""

    name: str
    loss_name: str
    kwargs: Mapping[str, Any]
    weight: float
    output: Tensor
    target: Tensor
    present: Tensor | None


def resolve_task_losses(
    outputs: Mapping[str, Tensor],
    batch: Batch,
    task_specs: Sequence[TaskSpec],
    loss_names: Mapping[str, str] | None = None,
    loss_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    fixed_weights: Mapping[str, float] | None = None,
) -> list[ResolvedTaskLoss]:
    """The arguments of :func:`task_losses`, checked, as one entry per task in ``task_specs`` order.

    Every configuration error is raised here, naming the parameter, before any loss is computed.
    """
    specs = check_task_specs(task_specs)
    names = [s.name for s in specs]
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be an mtlbook.data.batch.Batch, got {type(batch).__name__}")
    if not isinstance(outputs, Mapping):
        raise TypeError(f"outputs must be a dict keyed by task name, got {type(outputs).__name__}")
    chosen = _check_task_keys(loss_names, names, "loss_names")
    options = _check_task_keys(loss_kwargs, names, "loss_kwargs")
    weights = _check_task_keys(fixed_weights, names, "fixed_weights")

    resolved = []
    for spec in specs:
        if spec.name not in outputs:
            raise ValueError(f"outputs has no entry for task {spec.name!r}; it has {sorted(outputs)}")
        if spec.name not in batch.targets:
            raise ValueError(f"batch has no targets for task {spec.name!r}; it has {sorted(batch.targets)}")
        loss_name = chosen.get(spec.name, default_loss_for(spec.kind))
        if loss_name not in LOSSES:
            raise ValueError(
                f"loss_names[{spec.name!r}] must be one of {sorted(LOSSES)}, got {loss_name!r}"
            )
        if spec.kind not in LOSS_TASK_KINDS[loss_name]:
            valid = sorted(k for k, kinds in LOSS_TASK_KINDS.items() if spec.kind in kinds)
            raise ValueError(
                f"loss_names[{spec.name!r}] = {loss_name!r} does not fit a {spec.kind} task; "
                f"use one of {valid}"
            )
        kwargs = options.get(spec.name, {})
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"loss_kwargs[{spec.name!r}] must be a dict, got {type(kwargs).__name__}")
        weight = _check_float(weights.get(spec.name, 1.0), f"fixed_weights[{spec.name!r}]", 0.0)
        resolved.append(ResolvedTaskLoss(spec.name, loss_name, kwargs, weight, outputs[spec.name],
                                         batch.targets[spec.name], batch.present.get(spec.name)))  # fmt: skip
    return resolved


# ---------------------------------------------------------------------------------------
# uncertainty weighting
# ---------------------------------------------------------------------------------------


class UncertaintyWeighting(nn.Module):
    r"""Homoscedastic-uncertainty task weighting :cite:`kendall2018multi`.

    Each task :math:`i` gets a learnable :math:`s_i = \log\sigma_i^2` (``log_var``, init 0,
    so every task starts with weight 1/2) and its loss becomes

    .. math::
        L_i' = \frac{L_i}{2\sigma_i^2} + \frac12 \log\sigma_i^2, \qquad
        \sigma_i^2 = \exp(s_i), \qquad s_i \in [-4, 4].

    The first term down-weights noisy tasks; the second stops :math:`\sigma_i` from growing
    without bound just to silence a loss. Minimising over :math:`s_i` alone gives
    :math:`\sigma_i^2 = L_i`, so the weight tracks the inverse loss scale.

    **The range** ``[-4, 4]`` (:attr:`LOG_VAR_RANGE`, so the precision
    :math:`e^{-s_i}` stays in :math:`[e^{-4}, e^4] \approx [0.018, 54.6]`) is kept by
    :meth:`project_`, which clamps the parameter in place and must be called after every
    optimizer step (the :class:`~mtlbook.train.Trainer` does; the
    :class:`~mtlbook.balancing.UncertaintyBalancer` also projects before each use). The forward pass is the plain
    formula, so the gradient never vanishes: a task whose loss sat below :math:`e^{-4}` for
    a while and then rises pulls :math:`s_i` back up at once (a clamp inside the forward
    pass would leave a parameter that overshot the bound with zero gradient for good).

    Tasks marked absent contribute exactly 0 and no gradient reaches their ``log_var``
    (otherwise the regulariser alone would drag :math:`s_i` down on batches without data).
    """

    LOG_VAR_RANGE = (-4.0, 4.0)

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be an int >= 1, got {n_tasks!r}")
        self.n_tasks = n_tasks
        self.log_var = nn.Parameter(torch.zeros(n_tasks))

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp ``log_var`` in place to :attr:`LOG_VAR_RANGE` (call after each optimizer step)."""
        self.log_var.clamp_(*self.LOG_VAR_RANGE)

    def forward(self, task_losses: Tensor, present: Tensor | None = None) -> Tensor:
        """Weighted losses ``[n_tasks]`` (sum them for the objective).

        Args:
            task_losses: ``[n_tasks]`` per-task losses.
            present: optional bool ``[n_tasks]``; False marks a task absent from the batch.
        """
        _check_tensor(task_losses, "task_losses")
        if task_losses.shape != (self.n_tasks,):
            raise ValueError(f"task_losses must have shape [{self.n_tasks}], got {list(task_losses.shape)}")
        log_var = self.log_var
        precision = torch.exp(-log_var)
        losses = task_losses.to(precision.dtype)
        if present is None:
            return 0.5 * precision * losses + 0.5 * log_var
        present = _check_present(present, self.n_tasks, losses.device)
        zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
        # Zero the loss before the product: a non-finite absent loss times a zero gradient
        # would still put NaN into log_var.grad.
        safe = torch.where(present, losses, zero)
        return torch.where(present, 0.5 * precision * safe + 0.5 * log_var, zero)

    @torch.no_grad()
    def weights(self) -> Tensor:
        """Effective multiplier of each task loss, ``exp(-log_var) / 2`` (detached, for logs)."""
        return 0.5 * torch.exp(-self.log_var.detach()).clone()

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}"
