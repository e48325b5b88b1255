r"""Synthetic multi-task data whose task relations are known by construction.

Two generators:

* :func:`make_mmoe_synthetic`: the two-regression-task generator of the MMoE paper
  :cite:`ma2018modeling`, where one number, the cosine :math:`p` between the two tasks' weight
  vectors, sets how related the tasks are;
* :func:`make_task_suite`: 2-64 (typically 8-16) tasks of mixed kinds in known groups, with
  anti-correlated groups, unequal target scales, missing targets and cluster ids on request,
  returned together with the intended task-by-task correlation matrix.

Both draw everything from ``numpy.random.default_rng`` streams derived from ``seed``, so equal
arguments give bit-identical datasets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mtlbook._checks import check_int
from mtlbook.data.batch import MultiTaskDataset, TaskSpec

__all__ = [
    "MMOE_ALPHAS",
    "MMOE_BETAS",
    "MMOE_NOISE_STD",
    "MMOE_SCALE",
    "MMoESyntheticTruth",
    "SUITE_REGIMES",
    "TaskSuiteTruth",
    "make_mmoe_synthetic",
    "make_suite_regime",
    "make_task_suite",
]


# --------------------------------------------------------------------------- validation


def _check_int(value, name: str, low: int, high: int | None = None) -> int:
    return check_int(value, name, low, high, wrong_type=TypeError)


def _check_float(value, name: str, low: float, high: float | None = None, *, open_low: bool = False,
                 open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    below = value <= low if open_low else value < low
    above = high is not None and (value >= high if open_high else value > high)
    if not math.isfinite(value) or below or above:
        left = "(" if open_low else "["
        right = ")" if open_high else "]"
        accepted = f"in {left}{low}, {high}{right}" if high is not None else (f"> {low}" if open_low else f">= {low}")
        raise ValueError(f"{name} must be a finite number {accepted}, got {value}")
    return value


def _streams(seed: int, n_streams: int) -> list[np.random.Generator]:
    """Independent generators from one seed: parameters never shift when ``n`` changes."""
    seed = _check_int(seed, "seed", 0)
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n_streams)]


# --------------------------------------------------------------------------- MMoE generator

#: :math:`c`, the norm of both weight vectors: :math:`w_i^\top x \sim N(0, c^2)`.
MMOE_SCALE = 2.0
#: :math:`\alpha_k`, the sinusoid frequencies (10 values evenly spaced in [0.5, 1]).
MMOE_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.linspace(0.5, 1.0, 10))
#: :math:`\beta_k`, the sinusoid phases (all 0: keeps every label an odd function of its score).
MMOE_BETAS: tuple[float, ...] = (0.0,) * 10
#: Standard deviation of the label noise :math:`\epsilon`.
MMOE_NOISE_STD = 0.1


@dataclass(frozen=True)
class MMoESyntheticTruth:
    """Ground truth of :func:`make_mmoe_synthetic` (also at ``dataset.truth``).

    Attributes:
        w1, w2: the weight vectors ``[dim]``; ``cos(w1, w2) = correlation``, ``|w_i| = scale``.
        correlation: the requested cosine :math:`p`.
        scale, alphas, betas, noise_std: the constants used (see the generator's docstring).
    """

    w1: Tensor
    w2: Tensor
    correlation: float
    scale: float
    alphas: Tensor
    betas: Tensor
    noise_std: float


def _mmoe_label(score: np.ndarray, alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """:math:`s + \\sum_k \\sin(\\alpha_k s + \\beta_k)` for a score vector ``s``."""
    return score + np.sin(score[:, None] * alphas[None, :] + betas[None, :]).sum(axis=1)


def make_mmoe_synthetic(
    n: int,
    correlation: float,
    *,
    dim: int = 100,
    seed: int = 0,
    scale: float = MMOE_SCALE,
    alphas: Sequence[float] | None = None,
    betas: Sequence[float] | None = None,
    noise_std: float = MMOE_NOISE_STD,
) -> MultiTaskDataset:
    r"""Two regression tasks whose relatedness is one number, after the MMoE paper.

    Construction (:cite:`ma2018modeling`): draw two orthonormal vectors
    :math:`u_1, u_2 \in \mathbb{R}^d`, set

    .. math::
        w_1 = c\,u_1, \qquad w_2 = c\,\bigl(p\,u_1 + \sqrt{1-p^2}\,u_2\bigr),

    so that :math:`\cos(w_1, w_2) = p`, draw :math:`x \sim N(0, I_d)` and label

    .. math::
        y_i = w_i^\top x + \sum_{k=1}^{m} \sin\bigl(\alpha_k\, w_i^\top x + \beta_k\bigr) + \epsilon_i,
        \qquad \epsilon_i \sim N(0, \sigma^2).

    The paper leaves the constants open. The defaults here are :math:`c = 2`, :math:`m = 10`,
    :math:`\alpha_k` evenly spaced in :math:`[0.5, 1]`, :math:`\beta_k = 0`,
    :math:`\sigma = 0.1`, :math:`d = 100`, chosen for three reasons:

    * **Monotone over the whole range.** With :math:`\beta_k = 0` each label is an odd
      function :math:`f` of its score :math:`s_i = w_i^\top x`, and :math:`(s_1, s_2)` is a
      Gaussian pair with correlation :math:`p`. Expanding :math:`f` in Hermite polynomials
      (odd degrees only), :math:`\operatorname{corr}(f(s_1), f(s_2)) = \sum_{n\ \mathrm{odd}}
      a_n^2 p^n / \sum_{n\ \mathrm{odd}} a_n^2`: an odd, strictly increasing function of
      :math:`p` with value 0 at :math:`p = 0` and :math:`\pm 1` at :math:`p = \pm 1`
      (up to the tiny noise). Random phases would add even terms and break this for
      :math:`p < 0`.
    * **Visibly non-linear.** The sinusoids carry most of the label variance (label standard
      deviation about 8 against :math:`c = 2` for the linear part), so the label correlation
      sits well below :math:`p` in the middle of the range (about 0.17, 0.36, 0.62, 0.83 at
      :math:`p` = 0.25, 0.5, 0.75, 0.9): relatedness that a linear look at the labels
      understates, which is the situation gated mixtures are meant for.
    * **Seed-stable.** Fixed :math:`\alpha, \beta` (rather than random ones) make the curve
      label-correlation-versus-:math:`p` the same for every seed up to sampling error; only
      the directions :math:`u_1, u_2`, the inputs and the noise depend on ``seed``.

    The directions come from one random stream and the inputs and noise from another, so a
    fixed ``seed`` gives the same :math:`u_1, u_2` and the same :math:`x` for every ``p``:
    datasets at different correlations differ only in :math:`w_2`.

    Args:
        n: number of rows (>= 1).
        correlation: :math:`p \in [-1, 1]`, the cosine between the weight vectors.
        dim: input dimension :math:`d` (>= 2).
        seed: seed (int >= 0).
        scale: :math:`c > 0`.
        alphas, betas: the sinusoid constants (equal length :math:`m \ge 0`; default above).
        noise_std: :math:`\sigma \ge 0`.

    Returns:
        A :class:`MultiTaskDataset` with inputs ``[n, dim]`` and regression tasks ``"y1"``,
        ``"y2"``; ``dataset.truth`` is a :class:`MMoESyntheticTruth` and
        ``dataset.extras["clean_y1"]``, ``["clean_y2"]`` hold the noise-free labels (per row, so
        they survive :meth:`MultiTaskDataset.subset`; ``truth`` does not).
    """
    n = _check_int(n, "n", 1)
    p = _check_float(correlation, "correlation", -1.0, 1.0)
    dim = _check_int(dim, "dim", 2)
    c = _check_float(scale, "scale", 0.0, open_low=True)
    sigma = _check_float(noise_std, "noise_std", 0.0)
    alpha = np.asarray(MMOE_ALPHAS if alphas is None else alphas, dtype=np.float64).reshape(-1)
    beta = np.asarray(MMOE_BETAS if betas is None else betas, dtype=np.float64).reshape(-1)
    if alpha.shape != beta.shape:
        raise ValueError(f"alphas and betas must have the same length, got {alpha.size} and {beta.size}")
    if not (np.isfinite(alpha).all() and np.isfinite(beta).all()):
        raise ValueError("alphas and betas must be finite numbers")

    param_rng, data_rng = _streams(seed, 2)
    basis, _ = np.linalg.qr(param_rng.standard_normal((dim, 2)))
    u1, u2 = basis[:, 0], basis[:, 1]
    w1 = c * u1
    w2 = c * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)

    x = data_rng.standard_normal((n, dim))
    noise = data_rng.standard_normal((n, 2)) * sigma
    clean = np.stack([_mmoe_label(x @ w1, alpha, beta), _mmoe_label(x @ w2, alpha, beta)], axis=1)
    y = clean + noise

    as_float = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    dataset = MultiTaskDataset(
        as_float(x),
        {"y1": as_float(y[:, 0]), "y2": as_float(y[:, 1])},
        (TaskSpec("y1", "regression"), TaskSpec("y2", "regression")),
        extras={"clean_y1": as_float(clean[:, 0]), "clean_y2": as_float(clean[:, 1])},
    )
    dataset.truth = MMoESyntheticTruth(
        w1=as_float(w1), w2=as_float(w2), correlation=p, scale=c,
        alphas=as_float(alpha), betas=as_float(beta), noise_std=sigma,
    )
    return dataset


# --------------------------------------------------------------------------- task suite

_KIND_TAG = {"regression": "reg", "binary": "bin", "multiclass": "cls"}
_MIXED_CYCLE = ("regression", "binary", "multiclass")

#: Two ready-made settings of :func:`make_task_suite` (use :func:`make_suite_regime`).
#: ``"conflict"``: group pairs point in opposite directions and regression targets have standard
#: deviation 30 against unit-scale classification targets. ``"benign"``: every group has its
#: own direction and every target has unit scale.
SUITE_REGIMES: dict[str, dict[str, object]] = {
    "conflict": {"anti_correlated": True, "loss_scale_ratio": 30.0},
    "benign": {"anti_correlated": False, "loss_scale_ratio": 1.0},
}


@dataclass(frozen=True)
class TaskSuiteTruth:
    """What :func:`make_task_suite` built, for checking what a model or an affinity measure finds.

    Attributes:
        task_names: the tasks, in dataset order.
        task_specs: the matching :class:`TaskSpec` objects.
        groups: ``{group name: task names}`` (the format ``build_group_prior`` takes).
        group_of: ``{task name: group name}``.
        anti_correlated_groups: pairs of groups whose directions are opposite.
        correlation: ``[n_tasks, n_tasks]`` float32, the cosine between the tasks' latent
            directions = the correlation of their noise-free scores (1 on the diagonal):
            :math:`a^2` within a group, :math:`-a^2` across an anti-correlated pair, 0 otherwise.
        relation: ``[n_tasks, n_tasks]`` int64 signs: +1 same group (and the diagonal), -1
            anti-correlated groups, 0 unrelated.
        loss_scales: ``[n_tasks]`` float32, the target scale of each task: ``loss_scale_ratio``
            for regression tasks (their target standard deviation), 1 for the others.
        directions: ``[n_tasks, dim]`` float32 unit latent directions :math:`d_t`.
        missing_rate: fraction of rows without a target, per task.
        n_clusters: number of cluster ids in ``extras["cluster_id"]`` (0 without clusters).
    """

    task_names: tuple[str, ...]
    task_specs: tuple[TaskSpec, ...]
    groups: dict[str, tuple[str, ...]]
    group_of: dict[str, str]
    anti_correlated_groups: tuple[tuple[str, str], ...]
    correlation: Tensor
    relation: Tensor
    loss_scales: Tensor
    directions: Tensor
    missing_rate: float
    n_clusters: int


def _resolve_kinds(kinds, group_sizes: list[int], n_tasks: int) -> list[str]:
    if isinstance(kinds, str):
        if kinds == "mixed":
            # Position inside the group cycles regression, binary, multiclass: every group of
            # two or more tasks mixes a large-scale regression with a classification task.
            return [_MIXED_CYCLE[j % 3] for size in group_sizes for j in range(size)]
        if kinds in _KIND_TAG:
            return [kinds] * n_tasks
        raise ValueError(f"kinds must be 'mixed', one of {tuple(_KIND_TAG)}, or a sequence of those, got {kinds!r}")
    resolved = list(kinds)
    if len(resolved) != n_tasks or any(k not in _KIND_TAG for k in resolved):
        raise ValueError(
            f"kinds as a sequence must hold n_tasks={n_tasks} entries from {tuple(_KIND_TAG)}, got {resolved!r}"
        )
    return resolved


def make_task_suite(
    n: int,
    n_tasks: int = 8,
    n_groups: int = 3,
    *,
    dim: int = 32,
    seed: int = 0,
    anti_correlated: bool = True,
    loss_scale_ratio: float = 30.0,
    missing_rate: float = 0.0,
    with_clusters: bool = False,
    n_clusters: int = 4,
    cluster_effect: float = 0.0,
    kinds: str | Sequence[str] = "mixed",
    n_classes: int = 3,
    group_strength: float = 0.8,
    noise_std: float = 0.3,
) -> tuple[MultiTaskDataset, TaskSuiteTruth]:
    r"""Many tasks of mixed kinds in known groups, some of them pulling against each other.

    **Latent structure.** Tasks are split into ``n_groups`` contiguous, near-equal groups
    ``g0, g1, ...``. Every group has a unit direction :math:`v_g`; with ``anti_correlated``
    the groups are paired (``g0``-``g1``, ``g2``-``g3``, ...) and the second of a pair gets
    :math:`-v` of the first, otherwise all group directions are orthogonal. Task :math:`t` in
    group :math:`g` has the unit direction

    .. math:: d_t = a\,v_g + \sqrt{1 - a^2}\,e_t,

    with :math:`e_t` orthogonal to everything else and :math:`a` = ``group_strength``. With
    :math:`x \sim N(0, I_{dim})` the score :math:`s_t = d_t^\top x` is standard normal and
    :math:`\operatorname{corr}(s_t, s_{t'}) = d_t^\top d_{t'}`: :math:`a^2` inside a group,
    :math:`-a^2` across an anti-correlated pair, 0 otherwise. That matrix is
    ``truth.correlation``; ``truth.relation`` holds its signs.

    **Labels** from the noisy score :math:`z_t = (s_t + \sigma\,\epsilon_t) / \sqrt{1 + \sigma^2}`
    (standard normal, :math:`\sigma` = ``noise_std``):

    * regression: :math:`y = r\,z_t` with :math:`r` = ``loss_scale_ratio`` (target standard
      deviation :math:`r`);
    * binary: :math:`y = [z_t > 0]` (float, half positives);
    * multiclass: :math:`y = k` when :math:`z_t` falls in the :math:`k`-th of ``n_classes``
      equal-probability bins (long; the classes are ordered, so signs carry over).

    **Loss-scale imbalance.** At a predict-zero start an MSE task with target scale :math:`r`
    has loss :math:`\approx r^2` and output gradient :math:`2(\hat y - y)` of size
    :math:`\approx 2r`, while a BCE gradient :math:`\sigma(\ell) - y` is at most 1 in size:
    the gradient-norm ratio between regression and classification tasks starts of order
    :math:`r` (``truth.loss_scales``).

    **Missing targets.** For each task independently, exactly ``round(missing_rate * n)``
    rows chosen at random get ``present = False`` (their target is a 0 placeholder).

    **Clusters.** With ``with_clusters``, ``extras["cluster_id"]`` (long ``[n]``) is the index
    of the largest of ``n_clusters`` projections of :math:`x` on directions orthogonal to all
    task directions: equal-sized in expectation and independent of every score. With
    ``cluster_effect`` :math:`= b > 0` each (cluster, task) pair also adds an offset
    :math:`b\,\delta_{k,t}`, :math:`\delta \sim N(0, 1)`, to the score, so per-cluster heads
    have something to learn; ``truth.correlation`` then describes the within-cluster structure.

    Two regimes are one call away (:data:`SUITE_REGIMES`, :func:`make_suite_regime`):
    ``"conflict"`` (anti-correlated pairs, ``loss_scale_ratio=30``; the defaults) and
    ``"benign"`` (no anti-correlation, ``loss_scale_ratio=1``).

    Args:
        n: rows (>= 1).
        n_tasks: tasks (2-64; the book uses 8-16).
        n_groups: groups (1 to ``n_tasks``; >= 2 when ``anti_correlated``).
        dim: input width; must be at least the number of orthogonal directions needed
            (group axes + ``n_tasks`` + ``n_clusters`` when ``with_clusters``).
        seed: seed (int >= 0).
        anti_correlated: pair up groups with opposite directions.
        loss_scale_ratio: regression target standard deviation :math:`r > 0` (classification
            targets have unit scale).
        missing_rate: fraction of rows without target, per task, in [0, 1).
        with_clusters, n_clusters, cluster_effect: cluster ids (``n_clusters`` >= 2) and the
            optional cluster offset :math:`b \ge 0`.
        kinds: ``"mixed"`` (position in group cycles regression, binary, multiclass), a single
            kind for all, or a sequence of ``n_tasks`` kinds.
        n_classes: classes of the multiclass tasks (>= 2).
        group_strength: :math:`a \in [0, 1]`.
        noise_std: :math:`\sigma \ge 0`.

    Returns:
        ``(dataset, truth)``: a :class:`MultiTaskDataset` with inputs ``[n, dim]`` and tasks
        named ``t{i}_{reg|bin|cls}``, and a :class:`TaskSuiteTruth`.
    """
    n = _check_int(n, "n", 1)
    n_tasks = _check_int(n_tasks, "n_tasks", 2, 64)
    n_groups = _check_int(n_groups, "n_groups", 1, n_tasks)
    dim = _check_int(dim, "dim", 2)
    ratio = _check_float(loss_scale_ratio, "loss_scale_ratio", 0.0, open_low=True)
    missing = _check_float(missing_rate, "missing_rate", 0.0, 1.0, open_high=True)
    strength = _check_float(group_strength, "group_strength", 0.0, 1.0)
    sigma = _check_float(noise_std, "noise_std", 0.0)
    n_classes = _check_int(n_classes, "n_classes", 2)
    effect = _check_float(cluster_effect, "cluster_effect", 0.0)
    if not isinstance(anti_correlated, bool) or not isinstance(with_clusters, bool):
        raise TypeError("anti_correlated and with_clusters must be bools")
    if anti_correlated and n_groups < 2:
        raise ValueError(f"anti_correlated=True needs n_groups >= 2 (groups are paired), got n_groups={n_groups}")
    n_clusters = _check_int(n_clusters, "n_clusters", 2) if with_clusters else 0

    members = [list(block) for block in np.array_split(np.arange(n_tasks), n_groups)]
    task_kinds = _resolve_kinds(kinds, [len(m) for m in members], n_tasks)
    names = tuple(f"t{t}_{_KIND_TAG[k]}" for t, k in enumerate(task_kinds))
    group_names = tuple(f"g{g}" for g in range(n_groups))

    # Group axis and sign: paired groups share one axis with opposite signs.
    group_axis, group_sign = [], []
    for g in range(n_groups):
        if anti_correlated and g % 2 == 1:
            group_axis.append(group_axis[g - 1])
            group_sign.append(-1.0)
        else:
            group_axis.append(len(set(group_axis)))
            group_sign.append(1.0)
    n_group_axes = len(set(group_axis))
    n_axes = n_group_axes + n_tasks + n_clusters
    if dim < n_axes:
        raise ValueError(
            f"dim must be >= {n_axes} (group axes {n_group_axes} + n_tasks {n_tasks} + clusters {n_clusters}), got {dim}"
        )

    param_rng, data_rng, missing_rng = _streams(seed, 3)
    basis, _ = np.linalg.qr(param_rng.standard_normal((dim, n_axes)))
    basis = basis.T  # [n_axes, dim], orthonormal rows
    cluster_offsets = param_rng.standard_normal((max(n_clusters, 1), n_tasks))

    task_group = np.empty(n_tasks, dtype=np.int64)
    for g, block in enumerate(members):
        task_group[block] = g
    directions = np.stack([
        strength * group_sign[task_group[t]] * basis[group_axis[task_group[t]]]
        + math.sqrt(1.0 - strength**2) * basis[n_group_axes + t]
        for t in range(n_tasks)
    ])
    correlation = directions @ directions.T
    correlation[np.abs(correlation) < 1e-12] = 0.0  # exact zeros for orthogonal pairs, not +-1e-17
    np.fill_diagonal(correlation, 1.0)
    relation = np.zeros((n_tasks, n_tasks), dtype=np.int64)
    for i in range(n_tasks):
        for j in range(n_tasks):
            gi, gj = task_group[i], task_group[j]
            if gi == gj:
                relation[i, j] = 1
            elif group_axis[gi] == group_axis[gj]:
                relation[i, j] = -1

    x = data_rng.standard_normal((n, dim))
    scores = x @ directions.T + sigma * data_rng.standard_normal((n, n_tasks))
    extras: dict[str, Tensor] = {}
    if with_clusters:
        cluster_id = np.argmax(x @ basis[n_group_axes + n_tasks:].T, axis=1)
        extras["cluster_id"] = torch.from_numpy(cluster_id.astype(np.int64))
        scores = scores + effect * cluster_offsets[cluster_id]
    z = scores / math.sqrt(1.0 + sigma**2)

    cuts = np.array([NormalDist().inv_cdf(k / n_classes) for k in range(1, n_classes)])
    targets: dict[str, Tensor] = {}
    present: dict[str, Tensor] = {}
    specs = []
    n_missing = int(round(missing * n))
    for t, (name, kind) in enumerate(zip(names, task_kinds)):
        if kind == "regression":
            value = torch.from_numpy((ratio * z[:, t]).astype(np.float32))
            specs.append(TaskSpec(name, kind))
        elif kind == "binary":
            value = torch.from_numpy((z[:, t] > 0).astype(np.float32))
            specs.append(TaskSpec(name, kind))
        else:
            value = torch.from_numpy(np.searchsorted(cuts, z[:, t]).astype(np.int64))
            specs.append(TaskSpec(name, kind, n_classes))
        mask = np.ones(n, dtype=bool)
        mask[missing_rng.permutation(n)[:n_missing]] = False
        value[torch.from_numpy(~mask)] = 0  # placeholder; present=False keeps it out of losses
        targets[name] = value
        present[name] = torch.from_numpy(mask)

    dataset = MultiTaskDataset(torch.from_numpy(x.astype(np.float32)), targets, specs, present, extras)
    groups = {group_names[g]: tuple(names[t] for t in block) for g, block in enumerate(members)}
    anti_pairs = tuple(
        (group_names[g - 1], group_names[g]) for g in range(n_groups) if anti_correlated and g % 2 == 1
    )
    truth = TaskSuiteTruth(
        task_names=names,
        task_specs=tuple(specs),
        groups=groups,
        group_of={names[t]: group_names[task_group[t]] for t in range(n_tasks)},
        anti_correlated_groups=anti_pairs,
        correlation=torch.from_numpy(correlation.astype(np.float32)),
        relation=torch.from_numpy(relation),
        loss_scales=torch.tensor([ratio if k == "regression" else 1.0 for k in task_kinds], dtype=torch.float32),
        directions=torch.from_numpy(directions.astype(np.float32)),
        missing_rate=missing,
        n_clusters=n_clusters,
    )
    return dataset, truth


def make_suite_regime(regime: str, n: int, *, seed: int = 0, **overrides) -> tuple[MultiTaskDataset, TaskSuiteTruth]:
    """:func:`make_task_suite` in one of the :data:`SUITE_REGIMES` (``"conflict"``, ``"benign"``).

    ``overrides`` are passed on to :func:`make_task_suite` and win over the regime's settings.
    """
    if regime not in SUITE_REGIMES:
        raise ValueError(f"regime must be one of {tuple(SUITE_REGIMES)}, got {regime!r}")
    settings = {**SUITE_REGIMES[regime], **overrides}
    return make_task_suite(n, seed=seed, **settings)
