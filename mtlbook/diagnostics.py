r"""Measuring what a shared trunk does for each task (chapter 2).

**Per-task gradient norms and their ratio.** For task losses :math:`L_1, \dots, L_n` and the
shared (trunk) parameters :math:`\theta_s`, the per-task gradients on the trunk are
:math:`g_i = \nabla_{\theta_s} L_i` (all trunk tensors flattened into one vector), and the
imbalance between tasks :math:`a` and :math:`b` is

.. math::

    \rho = \frac{\lVert g_a \rVert_2}{\lVert g_b \rVert_2} .

The summed objective sends :math:`\sum_i g_i` to the trunk, so :math:`\rho \gg 1` means task
:math:`b`'s share of every update is a rounding error next to task :math:`a`'s (chapter 1's toy
is the one-parameter version of this). :func:`gradient_norm_ratio` takes each :math:`g_i`
with ``torch.autograd.grad(..., retain_graph=True)``, leaving the graph for the real backward.

With a loss weighting :math:`L_i' = w_i L_i + c_i` (equal weights, fixed weights, uncertainty
weighting, GradNorm, DWA) the trunk receives :math:`w_i g_i`, so the *effective* ratio is
:math:`\rho\, w_a / w_b`. :func:`train_with_diagnostics` records both on every batch.

**Task metrics.** RMSE and the asymmetric C-MAPSS score :cite:`saxena2008damage` for the
regression, with :math:`d = \hat y - y`,

.. math::

    s = \sum_k \begin{cases} e^{-d_k/13} - 1 & d_k < 0 \\ e^{d_k/10} - 1 & d_k \ge 0, \end{cases}

which punishes late predictions (predicted life longer than the true one, :math:`d > 0`)
harder than early ones; accuracy and per-class recall for the health state.

**Linear probe** :cite:`alain2016understanding`. Freeze the trunk, take its output
:math:`z(x)` as fixed features and fit a multinomial logistic regression on them. The probe's
held-out accuracy says how much of the class structure is *linearly* present in the shared
representation, independently of how well the task's own tower used it.

**Projection.** :func:`pca_projection` gives the principal-component coordinates of the
shared features for a 2-D picture, and :func:`class_separation` the share of their variance
that lies between the classes (the correlation ratio :math:`\eta^2`).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mtlbook._checks import check_int, check_number
from mtlbook.balancing import build_balancer
from mtlbook.data.batch import MultiTaskDataset, make_loader
from mtlbook.gradients import flat_task_gradients
from mtlbook.losses import task_losses as compute_task_losses
from mtlbook.models import SharedBottom
from mtlbook.train.metrics import rmse as metric_rmse

__all__ = [
    "DiagnosticRun",
    "GradientNormRatio",
    "ProbeResult",
    "RUN_BALANCERS",
    "class_separation",
    "evaluate",
    "gradient_norm_ratio",
    "linear_probe",
    "nasa_score",
    "pca_projection",
    "per_class_recall",
    "rmse",
    "shared_features",
    "task_gradient_norms",
    "task_gradients",
    "train_with_diagnostics",
]

#: Balancers the training loop accepts: those whose weighted loss is ``w_i * L_i + c_i``.
RUN_BALANCERS = ("equal", "uncertainty", "gradnorm", "dwa")


# --------------------------------------------------------------------------- gradients


class GradientNormRatio(NamedTuple):
    """One batch's per-task gradients on the shared parameters, summarised.

    Attributes:
        norms: float64 ``[n_tasks]``, :math:`\\lVert g_i \\rVert_2`.
        rho: :math:`\\lVert g_a \\rVert / \\lVert g_b \\rVert`.
        cosine: :math:`\\cos(g_a, g_b)`; negative means the two tasks pull the trunk in
            conflicting directions (``nan`` if either gradient is zero).
    """

    norms: Tensor
    rho: float
    cosine: float


def _check_losses_and_params(task_losses: Tensor, shared_parameters: Sequence[Tensor]) -> list[Tensor]:
    if not isinstance(task_losses, Tensor):
        raise TypeError(f"task_losses must be a torch.Tensor [n_tasks], got {type(task_losses).__name__}")
    if task_losses.dim() != 1 or task_losses.shape[0] < 1:
        raise ValueError(f"task_losses must be 1-D [n_tasks] with n_tasks >= 1, got shape {list(task_losses.shape)}")
    params = [p for p in shared_parameters]
    if not params:
        raise ValueError("shared_parameters must hold at least one tensor, got none")
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"shared_parameters must hold tensors, got {type(p).__name__}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("shared_parameters must hold at least one tensor with requires_grad=True")
    return params


def task_gradients(task_losses: Tensor, shared_parameters: Sequence[Tensor]) -> Tensor:
    """Task-major flat gradients :math:`g_i = \\nabla_{\\theta_s} L_i`, float64 ``[n_tasks, d]``.

    Each loss is differentiated separately with ``retain_graph=True`` so the caller can still
    run ``backward`` on the same graph. Trunk tensors a loss does not reach count as zero, and
    so does a loss that is not attached to the graph.
    """
    params = _check_losses_and_params(task_losses, shared_parameters)
    return flat_task_gradients(task_losses, params, dtype=torch.float64, device=torch.device("cpu"))


def task_gradient_norms(task_losses: Tensor, shared_parameters: Sequence[Tensor]) -> Tensor:
    """:math:`\\lVert \\nabla_{\\theta_s} L_i \\rVert_2` for every task, float64 ``[n_tasks]`` (see :func:`task_gradients`)."""
    return task_gradients(task_losses, shared_parameters).norm(dim=1)


def _ratio(top: float, bottom: float) -> float:
    if bottom > 0:
        return top / bottom
    return math.inf if top > 0 else math.nan


def gradient_norm_ratio(
    task_losses: Tensor,
    shared_parameters: Sequence[Tensor],
    numerator: int = 0,
    denominator: int = 1,
) -> GradientNormRatio:
    """Per-task gradient norms on the shared parameters and :math:`\\rho = \\lVert g_a\\rVert / \\lVert g_b\\rVert`.

    Args:
        task_losses: ``[n_tasks]`` losses of one batch, still attached to the graph.
        shared_parameters: the trunk, e.g. ``model.shared_parameters()``.
        numerator, denominator: task indices :math:`a` and :math:`b` (default 0 and 1,
            i.e. ``rul`` over ``health`` in chapter 2).

    Returns:
        :class:`GradientNormRatio`; ``rho`` is ``inf`` when :math:`g_b = 0 \\ne g_a` and
        ``nan`` when both are zero.
    """
    grads = task_gradients(task_losses, shared_parameters)
    n = grads.shape[0]
    for value, name in ((numerator, "numerator"), (denominator, "denominator")):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise ValueError(f"{name} must be a task index in 0..{n - 1}, got {value!r}")
    if numerator == denominator:
        raise ValueError(f"numerator and denominator must be different tasks, got {numerator} twice")
    norms = grads.norm(dim=1)
    top, bottom = float(norms[numerator]), float(norms[denominator])
    dot = float(grads[numerator] @ grads[denominator])
    cosine = dot / (top * bottom) if top > 0 and bottom > 0 else math.nan
    return GradientNormRatio(norms, _ratio(top, bottom), cosine)


# --------------------------------------------------------------------------- task metrics


def _as_float_array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must hold finite numbers")
    return array


def _pair(prediction: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    pred, true = _as_float_array(prediction, "prediction"), _as_float_array(target, "target")
    if pred.shape != true.shape:
        raise ValueError(f"prediction and target must have the same length, got {pred.size} and {true.size}")
    if pred.size == 0:
        raise ValueError("prediction and target must not be empty")
    return pred, true


def nasa_score(prediction: Any, target: Any, reduction: str = "sum") -> float:
    """The C-MAPSS scoring function with :math:`d = \\hat y - y` (late predictions cost more).

    ``exp(-d/13) - 1`` for :math:`d < 0`, ``exp(d/10) - 1`` for :math:`d \\ge 0`; summed
    (``reduction="sum"``, the usual figure over the test engines) or averaged (``"mean"``,
    comparable across sets of different size). Lower is better; 0 is perfect. The score
    overflows to ``inf`` for errors beyond about 7,000 cycles (a diverged model).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    pred, true = _pair(prediction, target)
    d = pred - true
    with np.errstate(over="ignore"):  # a prediction thousands of cycles late scores inf, honestly
        per_row = np.where(d < 0, np.expm1(-d / 13.0), np.expm1(d / 10.0))
    return float(per_row.sum() if reduction == "sum" else per_row.mean())


def rmse(prediction: Any, target: Any) -> float:
    """Root mean squared error :math:`\\sqrt{\\tfrac1n\\sum_i (\\hat y_i - y_i)^2}` of arrays or tensors.

    The checks of this module (finite, same length, not empty), then the trainer's metric
    :func:`mtlbook.train.metrics.rmse`: one formula for the chapters and the trainer.
    """
    pred, true = _pair(prediction, target)
    return metric_rmse(torch.from_numpy(pred), torch.from_numpy(true))


def per_class_recall(prediction: Any, target: Any, n_classes: int) -> np.ndarray:
    """Recall of each class, ``[n_classes]``: the share of its rows predicted as it (``nan`` if absent)."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    pred, true = _pair(prediction, target)
    for values, name in ((pred, "prediction"), (true, "target")):
        if np.any(values != np.round(values)) or values.min() < 0 or values.max() >= n_classes:
            raise ValueError(f"{name} must hold class indices in 0..{n_classes - 1}")
    recall = np.full(n_classes, np.nan)
    for k in range(n_classes):
        rows = true == k
        if rows.any():
            recall[k] = float(np.mean(pred[rows] == k))
    return recall


@torch.no_grad()
def evaluate(model: nn.Module, dataset: MultiTaskDataset, regression: str = "rul", classification: str = "health") -> dict[str, Any]:
    """Metrics of ``model`` on the whole ``dataset`` (eval mode, no gradients).

    Returns:
        ``{"rmse", "nasa_mean", "nasa_sum", "accuracy", "recall"}`` where ``recall`` is the
        per-class recall array of the classification task; all ``nan`` when the model's
        outputs are not finite (a diverged run).
    """
    if not isinstance(dataset, MultiTaskDataset):
        raise TypeError(f"dataset must be a MultiTaskDataset, got {type(dataset).__name__}")
    spec = {s.name: s for s in dataset.task_specs}
    if regression not in spec or classification not in spec:
        raise ValueError(f"dataset must have tasks {regression!r} and {classification!r}, has {list(spec)}")
    was_training = model.training
    model.eval()
    outputs = model(dataset.inputs)
    model.train(was_training)
    y, y_hat = dataset.targets[regression], outputs[regression]
    n_classes = spec[classification].n_classes
    if not (bool(torch.isfinite(y_hat).all()) and bool(torch.isfinite(outputs[classification]).all())):
        # a diverged model: report it as such rather than fail
        nan = math.nan
        return {"rmse": nan, "nasa_mean": nan, "nasa_sum": nan, "accuracy": nan, "recall": np.full(n_classes, nan)}
    labels, predicted = dataset.targets[classification], outputs[classification].argmax(dim=1)
    return {
        "rmse": rmse(y_hat, y),
        "nasa_mean": nasa_score(y_hat, y, "mean"),
        "nasa_sum": nasa_score(y_hat, y, "sum"),
        "accuracy": float((predicted == labels).double().mean()),
        "recall": per_class_recall(predicted, labels, n_classes),
    }


# --------------------------------------------------------------------------- training loop


@dataclass
class DiagnosticRun:
    """What :func:`train_with_diagnostics` recorded.

    Attributes:
        batches: per-batch arrays, each ``[n_batches]``: ``epoch``, ``loss_<task>``,
            ``norm_<task>`` (raw :math:`\\lVert g_i \\rVert`), ``weight_<task>`` (the balancer's
            times the fixed weight), ``rho`` (raw), ``rho_effective`` (weighted) and
            ``cosine`` (between the two tasks' trunk gradients).
        epochs: per-epoch validation metrics (from :func:`evaluate`); entry 0 is before training.
        model: the trained model; ``balancer``: the balancer after training.
        config: the arguments of the run; ``seconds``: wall time of the training loop.
        diverged_at: index of the first batch whose loss was not finite (training stopped
            there; that batch is not recorded), else ``None``.
    """

    batches: dict[str, np.ndarray]
    epochs: list[dict[str, Any]]
    model: nn.Module
    balancer: nn.Module
    config: dict[str, Any]
    seconds: float = 0.0
    task_names: tuple[str, ...] = field(default=())
    diverged_at: int | None = None

    @property
    def n_batches(self) -> int:
        return int(self.batches["rho"].shape[0])

    def rho_quantiles(self, q: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95), effective: bool = False) -> np.ndarray:
        """Quantiles of the per-batch ratio over the whole run (finite values only)."""
        values = self.batches["rho_effective" if effective else "rho"]
        return np.quantile(values[np.isfinite(values)], q)

    def batch_frame(self):
        """The per-batch record as a pandas DataFrame (one row per batch)."""
        import pandas as pd

        return pd.DataFrame(self.batches)

    def epoch_frame(self, class_names: Sequence[str] | None = None):
        """The per-epoch validation metrics as a DataFrame, one recall column per class."""
        import pandas as pd

        rows = []
        for epoch, metrics in enumerate(self.epochs):
            row = {"epoch": epoch, **{k: v for k, v in metrics.items() if k != "recall"}}
            names = class_names or [str(k) for k in range(len(metrics["recall"]))]
            row.update({f"recall_{name}": r for name, r in zip(names, metrics["recall"])})
            rows.append(row)
        return pd.DataFrame(rows).set_index("epoch")


def _check_positive_int(value: Any, name: str) -> int:
    return check_int(value, name, 1)


def _check_rate(value: Any, name: str) -> float:
    return check_number(value, name, 0, open_low=True)


def _check_run_arguments(train: Any, val: Any, arguments: dict[str, Any]) -> torch.Tensor:
    """Validate :func:`train_with_diagnostics`' arguments; return the fixed weights ``[n_tasks]``."""
    if not isinstance(train, MultiTaskDataset) or not isinstance(val, MultiTaskDataset):
        raise TypeError("train and val must be MultiTaskDataset objects")
    if train.task_specs != val.task_specs:
        raise ValueError("train and val must have the same task_specs")
    if arguments["balancer"] not in RUN_BALANCERS:
        raise ValueError(f"balancer must be one of {RUN_BALANCERS}, got {arguments['balancer']!r}")
    if arguments["optimizer"] not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {arguments['optimizer']!r}")
    _check_rate(arguments["lr"], "lr")
    if arguments["balancer_lr"] is not None:
        _check_rate(arguments["balancer_lr"], "balancer_lr")
    momentum = arguments["momentum"]
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    _check_positive_int(arguments["epochs"], "epochs")
    _check_positive_int(arguments["batch_size"], "batch_size")
    seed = arguments["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if arguments["num_threads"] is not None:
        _check_positive_int(arguments["num_threads"], "num_threads")
    n = len(train.task_names)
    pair = arguments["ratio_tasks"]
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(i, int) and 0 <= i < n for i in pair) and pair[0] != pair[1]):
        raise ValueError(f"ratio_tasks must be two different task indices in 0..{n - 1}, got {pair!r}")
    if arguments["model"] is not None and arguments["model_kwargs"]:
        raise ValueError("pass model_kwargs only when model is None")
    fixed = dict(arguments["fixed_weights"] or {})
    unknown = [k for k in fixed if k not in train.task_names]
    if unknown:
        raise ValueError(f"fixed_weights has unknown tasks {unknown}; tasks are {list(train.task_names)}")
    for name, value in fixed.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"fixed_weights[{name!r}] must be a finite number >= 0, got {value!r}")
    return torch.tensor([float(fixed.get(t, 1.0)) for t in train.task_names])


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run a block with ``num_threads`` torch threads and restore the previous count."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_with_diagnostics(
    train: MultiTaskDataset,
    val: MultiTaskDataset,
    *,
    balancer: str = "equal",
    optimizer: str = "adam",
    lr: float = 1e-3,
    momentum: float = 0.9,
    epochs: int = 10,
    batch_size: int = 128,
    seed: int = 0,
    fixed_weights: Mapping[str, float] | None = None,
    model: nn.Module | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    balancer_kwargs: Mapping[str, Any] | None = None,
    balancer_lr: float | None = None,
    ratio_tasks: tuple[int, int] = (0, 1),
    num_threads: int | None = 1,
) -> DiagnosticRun:
    """Train a shared-trunk model and record the gradient-norm ratio on every batch.

    Per batch: per-task losses :math:`L_i` (defaults of :mod:`mtlbook.losses`: MSE for
    regression, cross-entropy for multiclass), times optional fixed weights :math:`c_i`; the
    per-task trunk gradient norms :math:`\\lVert \\nabla_{\\theta_s} L_i \\rVert` and
    :math:`\\rho`; then the balancer's weighting, backward and an optimizer step. After every
    epoch the model is evaluated on ``val``. A non-finite loss stops the run
    (``diverged_at``).

    Args:
        train, val: datasets with the same tasks (a regression ``rul`` and a multiclass
            ``health`` task for :func:`evaluate`).
        balancer: one of :data:`RUN_BALANCERS`.
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum`` in [0, 1)).
        lr: learning rate (> 0).
        epochs, batch_size: training length and mini-batch size (ints >= 1).
        seed: seeds the model initialisation and the batch order.
        fixed_weights: optional ``{task: c_i >= 0}`` multiplying the raw losses (a fixed
            loss weighting, e.g. ``{"health": 100.0}``).
        model: a model exposing ``shared_parameters()``; default a :class:`SharedBottom`
            (``model_kwargs`` go to its constructor: default trunk 64 -> 32, towers 32, module form).
        balancer_kwargs: options for the balancer.
        balancer_lr: learning rate of the balancer's own parameters (uncertainty
            weighting's :math:`\\log\\sigma_i^2`); default ``lr``.
        ratio_tasks: task indices :math:`(a, b)` of :math:`\\rho` (default ``(0, 1)``).
        num_threads: torch intra-op threads during the run (restored afterwards; ``None``
            leaves them). The model is tiny, so one thread is faster than several
            contending for a busy CPU; results repeat exactly for a fixed thread count.

    Returns:
        :class:`DiagnosticRun`.
    """
    fixed = _check_run_arguments(train, val, dict(locals()))
    names, (a, b) = train.task_names, ratio_tasks
    with _torch_threads(num_threads):
        torch.manual_seed(seed)
        if model is None:
            # the module form, which the stored horizon table (benchmarks/ch2_horizon.py) was made with
            options = {"expert_hidden": (64,), "expert_dim": 32, "tower_hidden": (32,), "experts": "modules",
                       **dict(model_kwargs or {})}  # fmt: skip
            model = SharedBottom(train.n_features, train.task_specs, **options)
        weighting = build_balancer(balancer, len(names), **dict(balancer_kwargs or {}))
        groups = [{"params": list(model.parameters())}]
        if list(weighting.parameters()):
            groups.append({"params": list(weighting.parameters()), "lr": balancer_lr or lr})
        opt = torch.optim.Adam(groups, lr=lr) if optimizer == "adam" else torch.optim.SGD(groups, lr=lr, momentum=momentum)
        loader = make_loader(train, batch_size=batch_size, shuffle=True, seed=seed)
        shared = list(model.shared_parameters())

        record: dict[str, list[float]] = {"epoch": [], "rho": [], "rho_effective": [], "cosine": []}
        for n in names:
            record.update({f"loss_{n}": [], f"norm_{n}": [], f"weight_{n}": []})
        history, diverged_at = [evaluate(model, val)], None
        start = time.perf_counter()
        for epoch in range(1, epochs + 1):
            model.train()
            epoch_losses, n_seen = torch.zeros(len(names)), 0
            for batch in loader:
                raw = compute_task_losses(model(batch.inputs), batch, train.task_specs)
                if not bool(torch.isfinite(raw).all()):
                    diverged_at = len(record["rho"])
                    break
                measured = gradient_norm_ratio(raw, shared, a, b)  # before the backward
                weights = fixed * weighting.weights().detach().float()  # the w_i this step uses
                weighted = weighting.weight_losses(raw * fixed)
                opt.zero_grad(set_to_none=True)
                weighting.backward(weighted.sum(), weighted, shared)
                opt.step()

                effective = measured.norms * weights.double()
                record["epoch"].append(epoch)
                record["rho"].append(measured.rho)
                record["cosine"].append(measured.cosine)
                record["rho_effective"].append(_ratio(float(effective[a]), float(effective[b])))
                for i, n in enumerate(names):
                    record[f"loss_{n}"].append(float(raw[i].detach()))
                    record[f"norm_{n}"].append(float(measured.norms[i]))
                    record[f"weight_{n}"].append(float(weights[i]))
                epoch_losses += raw.detach() * len(batch)
                n_seen += len(batch)
            if diverged_at is None:
                weighting.on_epoch_end(epoch - 1, epoch_losses / max(n_seen, 1))
            history.append(evaluate(model, val))
            if diverged_at is not None:
                break
        seconds = time.perf_counter() - start
    config = {
        "balancer": balancer, "optimizer": optimizer, "lr": lr, "momentum": momentum, "epochs": epochs,
        "batch_size": batch_size, "seed": seed, "fixed_weights": dict(fixed_weights or {}), "balancer_lr": balancer_lr,
    }
    return DiagnosticRun(
        batches={k: np.asarray(v, dtype=np.float64) for k, v in record.items()},
        epochs=history,
        model=model,
        balancer=weighting,
        config=config,
        seconds=seconds,
        task_names=names,
        diverged_at=diverged_at,
    )


# --------------------------------------------------------------------------- representations


@torch.no_grad()
def shared_features(model: nn.Module, inputs: Tensor) -> np.ndarray:
    """The trunk's output for ``inputs`` (all last-level shared experts concatenated), float64 ``[n, d]``."""
    if not isinstance(inputs, Tensor) or inputs.dim() != 2:
        raise ValueError("inputs must be a 2-D tensor [n, n_features]")
    was_training = model.training
    model.eval()
    model(inputs)
    outputs = list(model.shared_outputs)
    model.train(was_training)
    if not outputs:
        raise ValueError("model recorded no shared_outputs in its forward pass")
    return torch.cat([o.detach() for o in outputs], dim=1).double().numpy()


@dataclass
class ProbeResult:
    """Held-out performance of a linear probe.

    Attributes:
        accuracy: share of test rows classified correctly.
        recall: per-class recall ``[n_classes]``.
        majority_rate: accuracy of always predicting the most common training class (the
            chance level that matters with imbalanced classes).
        n_iter: iterations the solver used (< ``max_iter`` means it converged).
    """

    accuracy: float
    recall: np.ndarray
    majority_rate: float
    n_iter: int


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    n_classes: int | None = None,
    C: float = 1.0,
    max_iter: int = 2000,
    n_threads: int | None = 1,
) -> ProbeResult:
    """Fit a multinomial logistic regression on frozen features; score it on held-out rows.

    Features are standardised with the training rows' statistics first (so one ``C`` suits
    any trunk, and lbfgs converges within ``max_iter``). ``n_threads`` caps the BLAS threads
    during the fit (``None``: leave them): for a problem this small one thread is the fastest
    on a busy machine, and it makes the result independent of the machine's core count.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x_train = np.asarray(train_features, dtype=np.float64)
    x_test = np.asarray(test_features, dtype=np.float64)
    y_train = np.asarray(train_labels).reshape(-1).astype(np.int64)
    y_test = np.asarray(test_labels).reshape(-1).astype(np.int64)
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError("train_features and test_features must be [n, d] with the same d")
    if x_train.shape[0] != y_train.size or x_test.shape[0] != y_test.size:
        raise ValueError("each feature matrix needs one label per row")
    if np.unique(y_train).size < 2:
        raise ValueError("train_labels must contain at least two classes")
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not (math.isfinite(C) and C > 0):
        raise ValueError(f"C must be a finite number > 0, got {C!r}")
    max_iter = _check_positive_int(max_iter, "max_iter")
    if n_threads is not None:
        n_threads = _check_positive_int(n_threads, "n_threads")
    if n_classes is None:
        n_classes = int(max(y_train.max(), y_test.max()) + 1)
    mean = x_train.mean(axis=0)
    std = np.maximum(x_train.std(axis=0), 1e-12)
    probe = LogisticRegression(C=C, max_iter=max_iter)
    with threadpool_limits(n_threads):
        probe.fit((x_train - mean) / std, y_train)
        predicted = probe.predict((x_test - mean) / std)
    majority = np.bincount(y_train).argmax()
    return ProbeResult(
        accuracy=float(np.mean(predicted == y_test)),
        recall=per_class_recall(predicted, y_test, n_classes),
        majority_rate=float(np.mean(y_test == majority)),
        n_iter=int(np.max(probe.n_iter_)),
    )


# the geometry of a feature space has its own module; re-exported here
from mtlbook.representation import class_separation, pca_projection  # noqa: E402
