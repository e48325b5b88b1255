r"""Gradient aggregators of the ``torchjd`` library :cite:`quinton2024jacobian` as balancers.

Each class here is a :class:`~mtlbook.balancing.GradientCombiner`: the trainer computes the
task-major Jacobian of the weighted task losses on the shared parameters,

.. math::
    J = \begin{bmatrix} g_1^\top \\ \vdots \\ g_n^\top \end{bmatrix} \in \mathbb{R}^{n \times d},
    \qquad g_i = \nabla_{\theta_s} \tilde L_i,

and the shared parameters receive :math:`d = J^\top \alpha` with weights
:math:`\alpha \in \mathbb{R}^n` that the method derives from :math:`J` (almost always from
its Gramian :math:`M = J J^\top`). The weights are computed by ``torchjd``, used as a
dependency; nothing of the methods is re-implemented here. Every other parameter (task
experts, towers, gates) receives the plain gradient of the objective.

========================= ========================================= =============================
registry name             method                                    torchjd class
========================= ========================================= =============================
``"mgda"``                :class:`MGDABalancer`                     ``torchjd.aggregation.MGDA``
``"cagrad"``              :class:`CAGradBalancer`                   ``torchjd.aggregation.CAGrad``
``"nash_mtl"``            :class:`NashMTLBalancer`                  ``torchjd.aggregation.NashMTL``
``"aligned_mtl"``         :class:`AlignedMTLBalancer`               ``torchjd.aggregation.AlignedMTL``
``"upgrad"``              :class:`UPGradBalancer`                   ``torchjd.aggregation.UPGrad``
========================= ========================================= =============================

The task losses themselves are not reweighted (:meth:`~mtlbook.balancing.LossBalancer.weights`
is 1 for every task, as for PCGrad); the weights of the last combination are kept in the
buffer ``combination_weights`` for plots and logs. ``torchjd`` is imported when a balancer
is built, so ``import mtlbook`` works without it (CAGrad and Nash-MTL need its ``cagrad``
and ``nash-mtl`` extras, UPGrad its ``quadprog-projector`` extra: see ``requirements.txt``).

A Jacobian with a non-finite entry (an overflowing fp16 step) is summed instead of solved, so
the loss scaler sees the overflow and skips the step; an all-zero Jacobian gives a zero
update.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from mtlbook.balancing import GradientCombiner, register_balancer

__all__ = [
    "AlignedMTLBalancer",
    "CAGradBalancer",
    "MGDABalancer",
    "NashMTLBalancer",
    "TorchJDCombiner",
    "UPGradBalancer",
]


def _check_number(value: Any, name: str, low: float, *, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value}")
    return float(value)


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class TorchJDCombiner(GradientCombiner):
    """A :class:`~mtlbook.balancing.GradientCombiner` whose ``combine`` calls a ``torchjd``
    aggregator on the Jacobian ``[n_tasks, d]``.

    Subclasses build the aggregator in :meth:`make_aggregator`. A forward hook on the
    aggregator's weighting records :math:`\\alpha` (the combination is :math:`J^\\top
    \\alpha`) in the buffer ``combination_weights`` (NaN before the first step).
    """

    #: ``"module:Class"`` of the torchjd aggregator, for the documentation table and errors.
    torchjd_class: ClassVar[str] = ""

    def __init__(self, n_tasks: int) -> None:
        super().__init__(n_tasks)
        self.register_buffer("combination_weights", torch.full((n_tasks,), float("nan")))
        self.aggregator: nn.Module = self.make_aggregator()
        self.aggregator.weighting.register_forward_hook(self._record_weights)

    @abstractmethod
    def make_aggregator(self) -> nn.Module:
        """The ``torchjd.aggregation`` aggregator this balancer calls."""

    def _record_weights(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self.combination_weights.copy_(output.detach().reshape(-1).to(self.combination_weights))

    def combine(self, grads: Tensor) -> Tensor:
        """:math:`J^\\top \\alpha` from the torchjd aggregator (``grads`` is :math:`J`)."""
        if grads.dim() != 2 or grads.shape[0] != self.n_tasks:
            raise ValueError(f"grads must be [{self.n_tasks}, d], got shape {list(grads.shape)}")
        if not bool(torch.isfinite(grads).all()):
            return grads.sum(dim=0)  # propagate the overflow: the loss scaler skips this step
        if not bool((grads != 0).any()):
            return torch.zeros_like(grads[0])
        return self.aggregator(grads)

    def weights(self) -> Tensor:
        return torch.ones(self.n_tasks)


def _torchjd_aggregation() -> Any:
    try:
        import torchjd.aggregation as aggregation
    except ImportError as error:  # pragma: no cover - the lock installs it
        raise ImportError(
            "the torchjd balancers need the torchjd package: "
            'pip install "torchjd[cagrad,nash-mtl,quadprog-projector]" (see requirements.txt)'
        ) from error
    return aggregation


class MGDABalancer(TorchJDCombiner):
    r"""MGDA, the multiple-gradient descent algorithm :cite:`desideri2012multiple`, as solved
    for deep multi-task learning by :cite:`sener2018multi` (Frank-Wolfe on the Gramian).

    .. math::
        \alpha^\star = \arg\min_{\alpha \in \Delta_n} \Bigl\lVert \sum_i \alpha_i g_i \Bigr\rVert_2^2,
        \qquad d = J^\top \alpha^\star,

    with :math:`\Delta_n` the probability simplex: the minimum-norm point of the convex hull
    of the task gradients. If :math:`d \neq 0` it is a common descent direction
    (:math:`g_i \cdot d \ge \lVert d \rVert^2 > 0` for every task); :math:`d = 0` marks a
    Pareto-stationary point. Because :math:`d` is the *shortest* such vector, its steps are
    small whenever one task's gradient is small.

    Args:
        n_tasks: number of tasks.
        epsilon: Frank-Wolfe stops when its step size falls below this (``> 0``).
        max_iters: at most this many Frank-Wolfe iterations (``>= 1``).
    """

    torchjd_class = "torchjd.aggregation.MGDA"

    def __init__(self, n_tasks: int, epsilon: float = 1e-3, max_iters: int = 100) -> None:
        self.epsilon = _check_number(epsilon, "epsilon", 0.0, strict=True)
        self.max_iters = _check_int(max_iters, "max_iters", 1)
        super().__init__(n_tasks)

    def make_aggregator(self) -> nn.Module:
        return _torchjd_aggregation().MGDA(epsilon=self.epsilon, max_iters=self.max_iters)

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, epsilon={self.epsilon}, max_iters={self.max_iters}"


class CAGradBalancer(TorchJDCombiner):
    r"""Conflict-averse gradient descent :cite:`liu2021conflict`.

    With the average gradient :math:`g_0 = \frac1n \sum_i g_i`, CAGrad looks for the update
    in a ball around :math:`g_0` that most improves the *worst* task:

    .. math::
        d^\star = \arg\max_{\lVert d - g_0 \rVert \le c \lVert g_0 \rVert} \; \min_i \, g_i \cdot d .

    Its dual is a problem over the simplex: :math:`w^\star = \arg\min_{w \in \Delta_n}
    g_w \cdot g_0 + c \lVert g_0 \rVert \lVert g_w \rVert` with :math:`g_w = J^\top w`, and
    :math:`d^\star = g_0 + c \lVert g_0 \rVert\, g_w / \lVert g_w \rVert`. ``c = 0`` is plain
    averaging; a large ``c`` approaches MGDA's direction.

    Args:
        n_tasks: number of tasks.
        c: radius of the ball relative to :math:`\lVert g_0 \rVert` (``>= 0``; the paper
            uses 0.2 to 0.5, 0.4 here).
        norm_eps: torchjd's guard against dividing by a zero norm (``>= 0``).
    """

    torchjd_class = "torchjd.aggregation.CAGrad"

    def __init__(self, n_tasks: int, c: float = 0.4, norm_eps: float = 1e-4) -> None:
        self.c = _check_number(c, "c", 0.0, strict=False)
        self.norm_eps = _check_number(norm_eps, "norm_eps", 0.0, strict=False)
        super().__init__(n_tasks)

    def make_aggregator(self) -> nn.Module:
        return _torchjd_aggregation().CAGrad(c=self.c, norm_eps=self.norm_eps)

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, c={self.c}"


class NashMTLBalancer(TorchJDCombiner):
    r"""Nash-MTL, multi-task learning as a bargaining game :cite:`navon2022multi`.

    The update :math:`d = J^\top \alpha` is the Nash bargaining solution among the tasks,
    which the paper shows is characterised by

    .. math::
        J J^\top \alpha = 1 / \alpha \quad\text{(elementwise)}, \qquad \text{i.e.}\quad
        g_i \cdot d = \frac{1}{\alpha_i} \ \text{for every task } i,

    so a task that gets a small weight gets a large share of the improvement, and the result
    does not depend on the scale of any one task's gradient. ``torchjd`` solves it by a
    sequence of convex problems (cvxpy, ECOS) on the Gramian normalised by its Frobenius
    norm, warm-started from the previous step's :math:`\alpha`, and rescales :math:`d` to
    norm at most ``max_norm``; both make it stateful. That state (the last :math:`\alpha`,
    the normalisation and the step counter) is part of ``state_dict``, so a run resumed from
    a checkpoint continues exactly. Because of the norm cap the map is not scale-equivariant:
    under a loss scaler it sees the unscaled Jacobian.

    Args:
        n_tasks: number of tasks.
        max_norm: cap on :math:`\lVert d \rVert` (``>= 0``; 0 switches it off; 1 as in the paper's code).
        update_weights_every: solve for new weights every this many steps (``>= 1``).
        optim_niter: iterations of the sequence of convex problems (``>= 1``).
    """

    torchjd_class = "torchjd.aggregation.NashMTL"
    scale_equivariant = False

    def __init__(self, n_tasks: int, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20) -> None:
        self.max_norm = _check_number(max_norm, "max_norm", 0.0, strict=False)
        self.update_weights_every = _check_int(update_weights_every, "update_weights_every", 1)
        self.optim_niter = _check_int(optim_niter, "optim_niter", 1)
        super().__init__(n_tasks)

    def make_aggregator(self) -> nn.Module:
        return _torchjd_aggregation().NashMTL(
            n_tasks=self.n_tasks,
            max_norm=self.max_norm,
            update_weights_every=self.update_weights_every,
            optim_niter=self.optim_niter,
        )

    def combine(self, grads: Tensor) -> Tensor:
        with warnings.catch_warnings():
            # cvxpy notes on every solve that torchjd's problem is not DPP (no speed-up from
            # re-using its compilation); the result is unaffected.
            warnings.filterwarnings("ignore", message="You are solving a parameterized problem that is not DPP")
            return super().combine(grads)

    def get_extra_state(self) -> dict[str, Tensor]:
        w = self.aggregator.weighting
        return {
            "step": torch.tensor(float(w.step), dtype=torch.float64),
            "previous_alpha": torch.from_numpy(np.array(w.prvs_alpha, copy=True)),
            "normalization_factor": torch.from_numpy(np.array(w.normalization_factor, copy=True)),
        }

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        w = self.aggregator.weighting
        w.reset()
        w.prvs_alpha = state["previous_alpha"].cpu().numpy().copy()
        w.normalization_factor = state["normalization_factor"].cpu().numpy().copy()
        w.step = float(state["step"])
        if w.step > 0:
            # torchjd builds its convex problem on the first call (step 0); a restored state
            # past that point needs it built here, from the restored previous weights.
            w._init_optim_problem()

    def extra_repr(self) -> str:
        return (
            f"n_tasks={self.n_tasks}, max_norm={self.max_norm}, "
            f"update_weights_every={self.update_weights_every}, optim_niter={self.optim_niter}"
        )


class AlignedMTLBalancer(TorchJDCombiner):
    r"""Aligned-MTL, independent component alignment :cite:`senushkin2023independent`.

    With the singular value decomposition :math:`J = U \Sigma V^\top` (rank :math:`r`),
    Aligned-MTL replaces the task gradients by an aligned set with condition number 1,

    .. math::
        \hat J = \sigma_{\min}\, U V^\top, \qquad d = \hat J^\top w = \sigma_{\min}\, V U^\top w,

    with :math:`w = \frac1n \mathbf 1` (the preference vector) and :math:`\sigma_{\min}` the
    smallest non-zero singular value: every principal direction of the tasks' gradients gets
    the same step, so no dominant or conflicting component can take over. ``torchjd`` obtains
    it from the Gramian :math:`M = V_M \Lambda V_M^\top` as :math:`\alpha = B w`,
    :math:`B = \sqrt{\lambda_{\min}}\, V_M \Lambda^{-1/2} V_M^\top`.

    Args:
        n_tasks: number of tasks.
        scale_mode: ``"min"`` (the paper's :math:`\sigma_{\min}`), ``"median"`` or ``"rmse"``.
    """

    torchjd_class = "torchjd.aggregation.AlignedMTL"
    SCALE_MODES: ClassVar[tuple[str, ...]] = ("min", "median", "rmse")

    def __init__(self, n_tasks: int, scale_mode: str = "min") -> None:
        if scale_mode not in self.SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {self.SCALE_MODES}, got {scale_mode!r}")
        self.scale_mode = scale_mode
        super().__init__(n_tasks)

    def make_aggregator(self) -> nn.Module:
        return _torchjd_aggregation().AlignedMTL(scale_mode=self.scale_mode)

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, scale_mode={self.scale_mode!r}"


class UPGradBalancer(TorchJDCombiner):
    r"""UPGrad, the unconflicting projection of gradients :cite:`quinton2024jacobian`.

    Each task gradient is projected onto the dual cone of all of them,
    :math:`C^\ast = \{x : g_j \cdot x \ge 0 \ \forall j\}`, and the projections are averaged:

    .. math::
        d = \frac1n \sum_i \pi_{C^\ast}(g_i), \qquad
        \pi_{C^\ast}(g) = \arg\min_{x \in C^\ast} \lVert x - g \rVert .

    The cone is convex, so the average stays in it: :math:`g_j \cdot d \ge 0` for every task,
    no task's loss increases to first order. A gradient already in the cone is kept as it is,
    so with no conflict at all :math:`d` is the mean gradient. The projections are quadratic
    programs solved by ``quadprog`` on the Gramian.

    Args:
        n_tasks: number of tasks.
    """

    torchjd_class = "torchjd.aggregation.UPGrad"

    def make_aggregator(self) -> nn.Module:
        return _torchjd_aggregation().UPGrad()


for _name, _cls in (
    ("mgda", MGDABalancer),
    ("cagrad", CAGradBalancer),
    ("nash_mtl", NashMTLBalancer),
    ("aligned_mtl", AlignedMTLBalancer),
    ("upgrad", UPGradBalancer),
):
    register_balancer(_name, _cls)
