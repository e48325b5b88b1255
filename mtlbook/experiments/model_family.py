r"""Chapter 3 experiments: Shared-Bottom, MMoE and PLE side by side.

What the chapter measures, and the helper that measures it:

* **How related are two tasks?** :func:`label_correlation` (Pearson correlation of two
  tasks' targets) and :func:`correlation_curve` (that correlation against the weight cosine
  :math:`p` of the MMoE generator, :func:`mtlbook.data.make_mmoe_synthetic`).
* **Which model predicts better?** :func:`build_family_model` builds the three models with
  comparable parameter counts (:func:`family_kwargs`), :func:`train_model` trains one with
  the package's :class:`~mtlbook.train.Trainer` (one phase, equal task weights, no adaTT),
  :func:`evaluate_tasks` scores it (MSE for regression, AUC for binary tasks),
  :func:`compare_models` does all of it for a list of models plus single-task baselines, and
  :func:`run_correlation_study` repeats the comparison over correlations and seeds.
* **What do the gates do?** :func:`gate_utilisation`: the batch mean of every gate's
  softmax weights, :math:`\bar g_k = \frac1B \sum_b g_k(x_b)`, one row per (gate, expert);
  :func:`gate_distance`: how differently two gates use the experts.
* **Do the tasks still fight over the shared experts?** :func:`task_gradients`,
  :func:`gradient_cosine` and :func:`track_gradient_conflict`: with
  :math:`g_k = \partial L_k / \partial \theta_s` on the shared experts' parameters
  :math:`\theta_s` (``model.shared_parameters()``),

  .. math::

      \cos(g_a, g_b) = \frac{g_a^\top g_b}{\lVert g_a \rVert\,\lVert g_b \rVert}, \qquad
      \text{the summed step harms task } k \iff
      \Bigl\langle \textstyle\sum_j g_j,\; g_k \Bigr\rangle < 0 .

  The second quantity is the first-order change of :math:`L_k` under a plain gradient step
  :math:`\theta_s \leftarrow \theta_s - \eta \sum_j g_j`:
  :math:`\Delta L_k \approx -\eta \langle \sum_j g_j, g_k \rangle`. For two tasks,
  :math:`\langle g_a + g_b, g_b \rangle < 0 \iff \cos(g_a, g_b) < -\lVert g_b \rVert /
  \lVert g_a \rVert`: a conflicting direction only hurts task :math:`b` when task
  :math:`a`'s gradient is large enough to outweigh :math:`b`'s own.

Figures: :func:`draw_architectures` (block diagrams of the three models) and
:func:`plot_gate_utilisation` (a gate-by-expert heatmap).

pandas and matplotlib are imported inside the functions that need them.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mtlbook.data.batch import MultiTaskDataset, TaskSpec
from mtlbook.data.synthetic import make_mmoe_synthetic
from mtlbook.experiments._family_checks import _check_dataset, _check_int, _check_kinds, _check_positive, _check_task
from mtlbook.models import build_model
from mtlbook.train.metrics import binary_auc

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd

__all__ = [
    "FAMILY",
    "MODEL_LABELS",
    "TEST_METRIC_FOR_KIND",
    "build_family_model",
    "compare_models",
    "correlation_curve",
    "count_parameters",
    "draw_architectures",
    "evaluate_tasks",
    "family_kwargs",
    "gate_distance",
    "gate_utilisation",
    "gradient_cosine",
    "label_correlation",
    "plot_gate_utilisation",
    "predict",
    "run_correlation_study",
    "single_task_view",
    "split_rows",
    "task_gradients",
    "track_gradient_conflict",
    "train_model",
]

#: The multi-task models compared in chapter 3, in the order the chapter introduces them.
FAMILY: tuple[str, ...] = ("shared_bottom", "mmoe", "ple")
#: Display names; ``"single_task"`` is one Shared-Bottom network per task (no sharing).
MODEL_LABELS: dict[str, str] = {
    "single_task": "Single-task",
    "shared_bottom": "Shared-Bottom",
    "mmoe": "MMoE",
    "ple": "PLE",
}
#: Chapter 3's test metric of each task kind (names of :data:`mtlbook.train.metrics.METRICS`;
#: the trainer validates regression with ``rmse``, chapter 3 reports ``mse``).
TEST_METRIC_FOR_KIND: dict[str, str] = {"regression": "mse", "binary": "auc", "multiclass": "accuracy"}


# --------------------------------------------------------------------------- models
def family_kwargs(kind: str, width: int = 16) -> dict[str, Any]:
    r"""Constructor arguments that give the three models comparable parameter counts.

    With :math:`w` = ``width`` (every expert's output width) and input width :math:`d`:

    * ``"shared_bottom"``: one bottom MLP :math:`d \to 4.5w \to w` (the widest hidden layer,
      standing in for the pool of experts the other two models have);
    * ``"mmoe"``: 4 experts :math:`d \to w \to w` and one 4-way gate per task;
    * ``"ple"``: 2 extraction levels, each with 1 shared expert and 1 expert per task
      (:math:`d \to w \to w` in level 0, :math:`w \to w \to w` in level 1);

    and towers :math:`w \to w/2 \to 1` everywhere. The counts are dominated by the first
    layers (about :math:`4.5 w d`, :math:`4 w d + 8d` and :math:`3 w d + 7d`); PLE's second
    level makes up for its fewer first-level experts when :math:`d` is small. For
    :math:`w = 16` they agree to within 25% for :math:`100 \le d \le 500`, with PLE the
    smallest at large :math:`d` (which, if anything, works against it); the chapter prints
    them.

    Args:
        kind: one of :data:`FAMILY`.
        width: expert output width :math:`w` (int >= 2).
    """
    width = _check_int(width, "width", 2)
    towers = (max(width // 2, 1),)
    if kind == "shared_bottom":
        return {"expert_hidden": (int(round(4.5 * width)),), "expert_dim": width, "tower_hidden": towers}
    if kind == "mmoe":
        return {"n_experts": 4, "expert_hidden": (width,), "expert_dim": width, "tower_hidden": towers}
    if kind == "ple":
        return {
            "n_levels": 2,
            "n_shared_experts": 1,
            "n_task_experts": 1,
            "expert_hidden": (width,),
            "expert_dim": width,
            "tower_hidden": towers,
        }
    raise ValueError(f"kind must be one of {FAMILY}, got {kind!r}")


def build_family_model(
    kind: str, n_features: int, task_specs: Sequence[TaskSpec], *, width: int = 16, seed: int = 0
) -> nn.Module:
    """A model of :data:`FAMILY` with :func:`family_kwargs`, initialised from ``torch.manual_seed(seed)``.

    Built in the module form (``experts="modules"``), the one chapter 3 teaches and the stored
    census tables were trained with, so that a cell rerun gives back its rows.
    """
    kwargs = family_kwargs(kind, width)
    torch.manual_seed(_check_int(seed, "seed", 0))
    return build_model(kind, n_features, task_specs, experts="modules", **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (trainable or not)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return int(sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- data
def label_correlation(dataset: MultiTaskDataset, task_a: str, task_b: str) -> float:
    r"""Pearson correlation of two tasks' targets over the rows where both are present.

    .. math::
        r = \frac{\sum_k (y_{a,k} - \bar y_a)(y_{b,k} - \bar y_b)}
                 {\sqrt{\sum_k (y_{a,k} - \bar y_a)^2 \sum_k (y_{b,k} - \bar y_b)^2}}

    computed in float64. Both tasks must have one value per row (binary or regression
    targets); NaN when fewer than two rows are shared or a target is constant.
    """
    dataset = _check_dataset(dataset, "dataset")
    task_a = _check_task(dataset, task_a, "task_a")
    task_b = _check_task(dataset, task_b, "task_b")
    both = dataset.present[task_a] & dataset.present[task_b]
    y_a = dataset.targets[task_a][both].double()
    y_b = dataset.targets[task_b][both].double()
    if y_a.dim() != 1 or y_b.dim() != 1:
        raise ValueError("label_correlation needs one target value per row for both tasks")
    if y_a.numel() < 2:
        return math.nan
    d_a, d_b = y_a - y_a.mean(), y_b - y_b.mean()
    denominator = float(torch.sqrt((d_a * d_a).sum() * (d_b * d_b).sum()))
    if denominator == 0.0:
        return math.nan
    return float((d_a * d_b).sum()) / denominator


def correlation_curve(
    correlations: Sequence[float], n: int = 20_000, *, seed: int = 0, dim: int = 100
) -> "pd.DataFrame":
    """Measured label correlation of :func:`make_mmoe_synthetic` for each weight cosine ``p``.

    Returns a DataFrame with columns ``p`` and ``label_correlation`` (one row per ``p``).
    """
    import pandas as pd

    values = [float(p) for p in correlations]
    if not values:
        raise ValueError("correlations must hold at least one value in [-1, 1]")
    rows = []
    for p in values:
        dataset = make_mmoe_synthetic(n, p, dim=dim, seed=seed)
        rows.append({"p": p, "label_correlation": label_correlation(dataset, "y1", "y2")})
    return pd.DataFrame(rows)


def split_rows(dataset: MultiTaskDataset, n_train: int, n_val: int) -> tuple[MultiTaskDataset, ...]:
    """The first ``n_train`` rows, the next ``n_val`` rows and the rest (train, val, test).

    Rows of the synthetic generators are i.i.d., so a contiguous cut is a random split.
    """
    dataset = _check_dataset(dataset, "dataset")
    n_train = _check_int(n_train, "n_train", 1)
    n_val = _check_int(n_val, "n_val", 1)
    if n_train + n_val >= len(dataset):
        raise ValueError(
            f"n_train + n_val must be < len(dataset) = {len(dataset)} so the test split has rows, "
            f"got {n_train} + {n_val}"
        )
    rows = torch.arange(len(dataset))
    return (
        dataset.subset(rows[:n_train]),
        dataset.subset(rows[n_train : n_train + n_val]),
        dataset.subset(rows[n_train + n_val :]),
    )


def single_task_view(dataset: MultiTaskDataset, task: str) -> MultiTaskDataset:
    """The same rows and inputs with only ``task``'s target (for single-task baselines)."""
    dataset = _check_dataset(dataset, "dataset")
    task = _check_task(dataset, task, "task")
    spec = dataset.task_specs[dataset.task_names.index(task)]
    return MultiTaskDataset(
        dataset.inputs, {task: dataset.targets[task]}, (spec,), {task: dataset.present[task]}, dataset.extras
    )


# --------------------------------------------------------------------------- training and scoring
def train_model(
    model: nn.Module,
    train: MultiTaskDataset,
    val: MultiTaskDataset | None = None,
    *,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 128,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str = "cpu",
):
    """Train ``model`` with the package trainer in its plainest setting; returns the History.

    One phase of ``epochs`` epochs (``phase2_epochs=0``), AdamW, the plain sum of task losses
    (``balancing="equal"``), no adaTT, no progress bars. The learning rate warms up for one
    epoch from ``0.1 * lr`` and then follows one cosine decay over the remaining epochs. With
    ``val``, the weights of the epoch with the lowest validation loss are restored at the end
    (model selection on validation data only; the test split is never seen).
    """
    from mtlbook.train import Trainer, TrainerConfig

    _check_dataset(train, "train")
    if val is not None:
        _check_dataset(val, "val")
    epochs = _check_int(epochs, "epochs", 1)
    warmup = 1 if epochs > 1 else 0
    config = TrainerConfig(
        phase1_epochs=epochs,
        phase2_epochs=0,
        batch_size=_check_int(batch_size, "batch_size", 1),
        eval_batch_size=4096,
        lr=_check_positive(lr, "lr"),
        weight_decay=weight_decay,
        warmup_epochs=warmup,
        cosine_t0=max(epochs - warmup, 1),
        cosine_t_mult=1,
        balancing="equal",
        adatt=None,
        amp="off",
        device=device,
        patience=None,
        restore_best=val is not None,
        seed=_check_int(seed, "seed", 0),
        progress=False,
    )
    return Trainer(model, config).fit(train, val)


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor, batch_size: int = 8192) -> dict[str, Tensor]:
    """Raw outputs ``{task: [n] or [n, k]}`` of ``model`` in eval mode (mode restored after)."""
    if not isinstance(inputs, Tensor) or inputs.dim() != 2:
        raise ValueError("inputs must be a 2-D tensor [n, n_features]")
    batch_size = _check_int(batch_size, "batch_size", 1)
    was_training = model.training
    model.eval()
    try:
        chunks = [model(inputs[i : i + batch_size]) for i in range(0, inputs.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}


def evaluate_tasks(model: nn.Module, dataset: MultiTaskDataset) -> dict[str, float]:
    r"""The test metric of each of ``dataset``'s tasks (see :data:`TEST_METRIC_FOR_KIND`).

    * regression: mean squared error :math:`\frac1n\sum_k (\hat y_k - y_k)^2`;
    * binary: ROC AUC of the logits (:func:`mtlbook.train.metrics.binary_auc`: the share of
      (positive, negative) pairs ranked correctly, ties counting one half);
    * multiclass: accuracy of the arg-max class.

    Only rows whose target is present count. Returns ``{task: value}``.
    """
    dataset = _check_dataset(dataset, "dataset")
    outputs = predict(model, dataset.inputs)
    scores: dict[str, float] = {}
    for spec in dataset.task_specs:
        if spec.kind not in TEST_METRIC_FOR_KIND:
            raise ValueError(f"evaluate_tasks supports task kinds {tuple(TEST_METRIC_FOR_KIND)}, got {spec.kind!r}")
        present = dataset.present[spec.name]
        output = outputs[spec.name][present].double()
        target = dataset.targets[spec.name][present]
        if spec.kind == "regression":
            scores[spec.name] = float(((output - target.double()) ** 2).mean()) if target.numel() else math.nan
        elif spec.kind == "binary":
            scores[spec.name] = binary_auc(output, target)
        else:
            scores[spec.name] = float((output.argmax(dim=1) == target.long()).double().mean())
    return scores


def compare_models(
    train: MultiTaskDataset,
    val: MultiTaskDataset,
    test: MultiTaskDataset,
    kinds: Sequence[str] = ("single_task",) + FAMILY,
    *,
    width: int = 16,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> tuple["pd.DataFrame", dict[str, nn.Module]]:
    """Train each model kind on ``train`` (selecting on ``val``) and score it on ``test``.

    ``"single_task"`` trains one Shared-Bottom network per task on that task alone
    (:func:`single_task_view`), with the Shared-Bottom sizes of :func:`family_kwargs`.
    Every model starts from ``seed`` and sees the same batches in the same order.

    Returns:
        ``(table, models)``: a long DataFrame with one row per (model, task) and columns
        ``model``, ``task``, ``metric``, ``value``, ``n_params`` (of the network that made the
        prediction), ``seconds`` (its training time); and the trained models keyed by kind
        (``"single_task/<task>"`` for the baselines).
    """
    import pandas as pd

    for name, data in (("train", train), ("val", val), ("test", test)):
        _check_dataset(data, name)
    kinds = _check_kinds(kinds, ("single_task",) + FAMILY)
    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {}
    fit = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed}
    for kind in kinds:
        if kind == "single_task":
            jobs = [(f"single_task/{t}", "shared_bottom", single_task_view(train, t), single_task_view(val, t),
                     single_task_view(test, t)) for t in train.task_names]  # fmt: skip
        else:
            jobs = [(kind, kind, train, val, test)]
        for key, architecture, tr, va, te in jobs:
            model = build_family_model(architecture, tr.n_features, tr.task_specs, width=width, seed=seed)
            started = time.perf_counter()
            train_model(model, tr, va, **fit)
            seconds = time.perf_counter() - started
            models[key] = model
            test_scores = evaluate_tasks(model, te)
            for spec in te.task_specs:
                value = test_scores[spec.name]
                rows.append({
                    "model": kind, "task": spec.name, "metric": TEST_METRIC_FOR_KIND[spec.kind], "value": value,
                    "n_params": count_parameters(model), "seconds": seconds,
                })  # fmt: skip
    return pd.DataFrame(rows), models


def run_correlation_study(
    correlations: Sequence[float],
    seeds: Sequence[int],
    kinds: Sequence[str] = FAMILY,
    *,
    n_train: int = 4000,
    n_val: int = 1000,
    n_test: int = 2000,
    dim: int = 100,
    width: int = 16,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 128,
) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """The MMoE paper's synthetic study: each model at each correlation ``p`` and seed.

    For every ``(p, seed)`` one dataset of ``n_train + n_val + n_test`` rows is drawn with
    ``make_mmoe_synthetic(..., correlation=p, seed=seed)`` and cut by :func:`split_rows`.
    For a fixed seed the inputs are the same at every ``p`` (only :math:`w_2` changes), so
    the correlations are compared on paired data. The seed also initialises the models.

    Returns:
        ``(scores, gates)``: ``scores`` has one row per (p, seed, model, task) with columns
        ``correlation``, ``seed``, ``model``, ``task``, ``mse`` (test), ``n_params``;
        ``gates`` has the validation-set :func:`gate_utilisation` of every gated model, with
        ``correlation``, ``seed`` and ``model`` columns added.
    """
    import pandas as pd

    ps = [float(p) for p in correlations]
    if not ps or any(not (-1.0 <= p <= 1.0) for p in ps):
        raise ValueError(f"correlations must be a non-empty sequence of numbers in [-1, 1], got {correlations!r}")
    seed_list = [_check_int(s, "seeds entries", 0) for s in seeds]
    if not seed_list:
        raise ValueError("seeds must hold at least one int >= 0")
    kinds = _check_kinds(kinds, ("single_task",) + FAMILY)
    n_test = _check_int(n_test, "n_test", 1)
    score_frames, gate_frames = [], []
    for seed in seed_list:
        for p in ps:
            data = make_mmoe_synthetic(n_train + n_val + n_test, p, dim=dim, seed=seed)
            train, val, test = split_rows(data, n_train, n_val)
            table, models = compare_models(
                train, val, test, kinds, width=width, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed
            )
            table = table.rename(columns={"value": "mse"}).drop(columns=["metric", "seconds"])
            table.insert(0, "seed", seed)
            table.insert(0, "correlation", p)
            score_frames.append(table)
            for kind, model in models.items():
                usage = gate_utilisation(model, val.inputs)
                if len(usage):
                    usage.insert(0, "model", kind)
                    usage.insert(0, "seed", seed)
                    usage.insert(0, "correlation", p)
                    gate_frames.append(usage)
    scores = pd.concat(score_frames, ignore_index=True)
    gates = pd.concat(gate_frames, ignore_index=True) if gate_frames else pd.DataFrame(
        columns=["correlation", "seed", "model", "gate", "expert", "weight"]
    )
    return scores, gates


# --------------------------------------------------------------------------- gates
def gate_utilisation(model: nn.Module, inputs: Tensor) -> "pd.DataFrame":
    r"""Mean gate weight per expert for every gate of ``model`` on ``inputs``.

    Runs one forward pass in eval mode (no gradient) and averages each gate's weights over
    the rows, :math:`\bar g_{G,i} = \frac1B \sum_b g_G(x_b)_i`. Each gate's means sum to 1.

    Returns:
        a DataFrame with columns ``gate`` (``"level{l}/{task}"`` or ``"level{l}/shared"``),
        ``expert`` (the labels of ``model.gate_expert_names``) and ``weight``; empty (with
        those columns) for a model without gates, such as Shared-Bottom.
    """
    import pandas as pd

    if not isinstance(inputs, Tensor) or inputs.dim() != 2 or inputs.shape[0] < 1:
        raise ValueError("inputs must be a 2-D tensor [n >= 1, n_features]")
    if not hasattr(model, "gate_weights"):
        raise TypeError(f"model must be an mtlbook multi-task model with gate_weights, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)
        weights = model.gate_weights
    finally:
        model.train(was_training)
    names = getattr(model, "gate_expert_names", {})
    rows = []
    for gate, w in weights.items():
        means = w.double().mean(dim=0)
        labels = names.get(gate, tuple(f"expert[{i}]" for i in range(means.numel())))
        rows.extend({"gate": gate, "expert": label, "weight": float(m)} for label, m in zip(labels, means))
    return pd.DataFrame(rows, columns=["gate", "expert", "weight"])


def gate_distance(table: "pd.DataFrame", gate_a: str, gate_b: str) -> float:
    r"""Total-variation distance between two gates' mean weights in a :func:`gate_utilisation` table.

    .. math:: d(a, b) = \tfrac12 \sum_i \lvert \bar g_{a,i} - \bar g_{b,i} \rvert \in [0, 1],

    where an expert that one gate cannot see counts as weight 0 for it. 0 means the two gates
    use the experts in the same proportions on average; 1 means they share no expert at all
    (for example two PLE task gates without shared experts).
    """
    if not {"gate", "expert", "weight"} <= set(getattr(table, "columns", ())):
        raise ValueError("table must be a DataFrame with columns gate, expert, weight (see gate_utilisation)")
    weights = {}
    for name, gate in (("gate_a", gate_a), ("gate_b", gate_b)):
        rows = table[table["gate"] == gate]
        if not len(rows):
            raise ValueError(f"{name} must be one of the table's gates {sorted(set(table['gate']))}, got {gate!r}")
        weights[name] = rows.groupby("expert")["weight"].sum()
    difference = weights["gate_a"].sub(weights["gate_b"], fill_value=0.0)
    return float(0.5 * difference.abs().sum())


# the gradient experiments and the figures live in their own modules; re-exported here
from mtlbook.experiments.family_gradients import gradient_cosine, task_gradients, track_gradient_conflict  # noqa: E402
from mtlbook.experiments.family_plots import draw_architectures, plot_gate_utilisation  # noqa: E402
