r"""The toy two-task simulator of chapter 1 (numpy and torch).

One shared scalar parameter :math:`\theta` is pulled towards two different optima by two
quadratic task losses,

.. math::

    L_1(\theta) = \frac{\rho}{2}(\theta - 1)^2, \qquad
    L_2(\theta) = \frac{1}{2}(\theta + 1)^2, \qquad \rho > 0,

and is trained on the plain sum :math:`L = L_1 + L_2`. The gradient of the sum is
:math:`g(\theta) = \rho(\theta - 1) + (\theta + 1) = (\rho + 1)\theta - (\rho - 1)`, so the
sum is a single parabola with curvature :math:`\rho + 1` and minimiser

.. math::

    \theta^\star = \frac{\rho - 1}{\rho + 1},

which depends on :math:`\rho` alone (see :func:`fixed_point`). Plain gradient descent with
step :math:`\eta` contracts the error by a constant factor per step,
:math:`\theta_{t+1} - \theta^\star = (1 - \eta(\rho + 1))(\theta_t - \theta^\star)`, so it
converges iff :math:`0 < \eta < 2/(\rho + 1)` (see :func:`stable_lr`).

Trajectory convention used everywhere in this module: arrays have ``n_steps + 1`` entries and
entry ``t`` holds the value *after* ``t`` optimizer steps, so entry 0 is the starting point
``theta0`` and entry ``n_steps`` the final iterate. Losses are evaluated at the same iterates.

Three update rules are implemented, each matching its ``torch.optim`` counterpart exactly:

* ``"sgd"``: :math:`\theta \leftarrow \theta - \eta g` (``torch.optim.SGD``).
* ``"momentum"``: heavy ball :cite:`polyak1964some` in torch's form,
  :math:`b \leftarrow \mu b + g` (with :math:`b_1 = g_1`),
  :math:`\theta \leftarrow \theta - \eta b` (``torch.optim.SGD(momentum=mu)``, no
  dampening, no Nesterov), default :math:`\mu = 0.9`.
* ``"adam"`` :cite:`kingma2015adam`: :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
  :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
  :math:`\theta \leftarrow \theta - \eta\, \hat m / (\sqrt{\hat v} + \epsilon)` with the
  bias corrections :math:`\hat m = m / (1-\beta_1^t)`, :math:`\hat v = v / (1-\beta_2^t)`
  (``torch.optim.Adam``), defaults
  :math:`\beta = (0.9, 0.999)`, :math:`\epsilon = 10^{-8}`.

Divergence: an iterate that is not finite or whose magnitude exceeds
``DIVERGENCE_BOUND * (1 + |theta0|)`` stops the run. That iterate and every later entry are
stored as ``nan`` (theta and both losses), ``diverged`` is set and ``diverged_at`` records the
step. No overflow warning is emitted and nothing is raised.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "OPTIMIZERS",
    "DIVERGENCE_BOUND",
    "fixed_point",
    "stable_lr",
    "losses",
    "gradient",
    "sgd_update",
    "momentum_update",
    "adam_update",
    "ToyResult",
    "ToyGridResult",
    "RunSettings",
    "simulate",
    "simulate_grid",
    "ToyModel",
    "simulate_torch",
]

#: Optimizer names accepted by :func:`simulate`, :func:`simulate_grid` and :func:`simulate_torch`.
OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam")

#: An iterate with ``|theta| > DIVERGENCE_BOUND * (1 + |theta0|)`` counts as diverged. Every
#: convergent run of the three rules stays many orders of magnitude below it.
DIVERGENCE_BOUND: float = 1e6

# Keyword arguments each rule accepts, with torch.optim's defaults.
_DEFAULT_HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "sgd": {},
    "momentum": {"momentum": 0.9},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8},
}


# ----------------------------------------------------------------------------- validation


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_rho(rho: object) -> float:
    if not _is_real(rho) or not math.isfinite(float(rho)) or float(rho) <= 0:
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    return float(rho)


def _check_lr(lr: object) -> float:
    if not _is_real(lr) or not math.isfinite(float(lr)) or float(lr) <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    return float(lr)


def _check_n_steps(n_steps: object) -> int:
    if not isinstance(n_steps, numbers.Integral) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")
    return int(n_steps)


def _check_theta0(theta0: object) -> float:
    if not _is_real(theta0) or not math.isfinite(float(theta0)):
        raise ValueError(f"theta0 must be a finite number, got {theta0!r}")
    return float(theta0)


def _check_optimizer(optimizer: object) -> str:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    return str(optimizer)


def _check_hyperparameters(optimizer: str, opt_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Merge ``opt_kwargs`` into the optimizer's defaults after checking names and ranges."""
    defaults = _DEFAULT_HYPERPARAMETERS[optimizer]
    unknown = sorted(set(opt_kwargs) - set(defaults))
    if unknown:
        accepted = ", ".join(defaults) or "none"
        raise ValueError(
            f"optimizer {optimizer!r} does not accept {unknown}; accepted keywords: {accepted}"
        )
    merged = {**defaults, **opt_kwargs}
    if "momentum" in merged:
        mu = merged["momentum"]
        if not _is_real(mu) or not 0.0 <= float(mu) < 1.0:
            raise ValueError(f"momentum must be a number in [0, 1), got {mu!r}")
        merged["momentum"] = float(mu)
    if "betas" in merged:
        betas = merged["betas"]
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(_is_real(b) and 0.0 <= float(b) < 1.0 for b in betas)
        ):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        merged["betas"] = (float(betas[0]), float(betas[1]))
    if "eps" in merged:
        eps = merged["eps"]
        if not _is_real(eps) or not math.isfinite(float(eps)) or float(eps) <= 0:
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        merged["eps"] = float(eps)
    return merged


# ------------------------------------------------------------------------ closed forms


def fixed_point(rho: float) -> float:
    r"""Minimiser of :math:`L_1 + L_2`, the only fixed point of every rule here.

    Setting the gradient to zero, :math:`\rho(\theta - 1) + (\theta + 1) = 0`, gives
    :math:`\theta^\star = (\rho - 1)/(\rho + 1)`: 0 for equal weights, tending to 1 (task 1's
    optimum) as :math:`\rho \to \infty`. It does not depend on the optimizer or the step size.
    """
    rho = _check_rho(rho)
    return (rho - 1.0) / (rho + 1.0)


def stable_lr(rho: float, momentum: float = 0.0) -> float:
    r"""Supremum of the learning rates for which (heavy-ball) gradient descent converges.

    The summed loss has constant curvature :math:`h = \rho + 1`. For plain gradient descent
    (``momentum=0``) the error obeys
    :math:`\theta_{t+1} - \theta^\star = (1 - \eta h)(\theta_t - \theta^\star)`, so the run
    converges from every start iff :math:`|1 - \eta h| < 1`, i.e. iff
    ``0 < lr < stable_lr(rho) = 2 / (rho + 1)``. At ``lr == stable_lr(rho)`` the factor is
    :math:`-1`: the iterate flips between ``theta0`` and ``2 theta* - theta0`` forever (neither
    converging nor diverging); above it the error grows geometrically.

    With heavy-ball momentum :math:`\mu \in [0, 1)` the error follows
    :math:`e_{t+1} = (1 + \mu - \eta h)e_t - \mu e_{t-1}`, whose characteristic roots lie inside
    the unit circle iff :math:`0 < \eta h < 2(1 + \mu)`; hence the bound
    ``2 (1 + momentum) / (rho + 1)`` (converge iff ``lr`` is strictly below it).
    """
    rho = _check_rho(rho)
    if not _is_real(momentum) or not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    return 2.0 * (1.0 + float(momentum)) / (rho + 1.0)


def losses(theta: np.ndarray | float, rho: np.ndarray | float) -> tuple[Any, Any]:
    r"""Both task losses :math:`(L_1, L_2) = (\tfrac{\rho}{2}(\theta-1)^2, \tfrac12(\theta+1)^2)`.

    Works elementwise on floats or broadcastable numpy arrays (no validation: a hot path).
    """
    return 0.5 * rho * (theta - 1.0) ** 2, 0.5 * (theta + 1.0) ** 2


def gradient(theta: np.ndarray | float, rho: np.ndarray | float) -> Any:
    r"""Gradient of :math:`L_1 + L_2`: task 1 pulls with :math:`\rho(\theta - 1)`, task 2 with
    :math:`\theta + 1`. Elementwise on floats or broadcastable arrays."""
    return rho * (theta - 1.0) + (theta + 1.0)


# ---------------------------------------------------------------------- update rules
# Each rule maps (theta, grad, state) to the next theta and updates `state` (a dict that
# starts empty) in place. They are elementwise, so the same code drives one run or a grid.


def sgd_update(theta: Any, grad: Any, state: dict, lr: float) -> Any:
    r"""Plain gradient descent, :math:`\theta \leftarrow \theta - \eta g`."""
    return theta - lr * grad


def momentum_update(theta: Any, grad: Any, state: dict, lr: float, momentum: float = 0.9) -> Any:
    r"""Heavy ball as ``torch.optim.SGD(momentum=mu)`` writes it.

    :math:`b_1 = g_1`, :math:`b_t = \mu b_{t-1} + g_t`, :math:`\theta \leftarrow \theta - \eta b_t`.
    """
    buffer = grad if "buffer" not in state else momentum * state["buffer"] + grad
    state["buffer"] = buffer
    return theta - lr * buffer


def adam_update(
    theta: Any,
    grad: Any,
    state: dict,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Any:
    r"""Adam as ``torch.optim.Adam`` computes it (no weight decay, no AMSGrad).

    With step count :math:`t` starting at 1:
    :math:`m_t = m_{t-1} + (1-\beta_1)(g_t - m_{t-1})`,
    :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2`,
    :math:`\hat m_t = m_t / (1-\beta_1^t)`, :math:`\hat v_t = v_t / (1-\beta_2^t)`,
    :math:`\theta \leftarrow \theta - \eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)`.
    The code keeps torch's order of operations (divide by :math:`\sqrt{1-\beta_2^t}` after the
    square root, fold :math:`1/(1-\beta_1^t)` into the step size), so results agree to rounding.
    The step is at most about :math:`\eta` in size whatever the gradient's scale, which is why
    Adam never diverges on this problem but also cannot take large strides.
    """
    beta1, beta2 = betas
    step = state.get("step", 0) + 1
    exp_avg = state.get("exp_avg", 0.0)
    exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)  # torch's lerp form
    exp_avg_sq = beta2 * state.get("exp_avg_sq", 0.0) + (1.0 - beta2) * grad * grad
    state.update(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    denom = np.sqrt(exp_avg_sq) / math.sqrt(bias_correction2) + eps
    return theta - (lr / bias_correction1) * exp_avg / denom


_UPDATE_RULES: dict[str, Callable[..., Any]] = {
    "sgd": sgd_update,
    "momentum": momentum_update,
    "adam": adam_update,
}


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class ToyResult:
    """One run of the toy simulator.

    ``theta``, ``loss1`` and ``loss2`` have ``n_steps + 1`` entries; entry ``t`` is the value
    after ``t`` steps (entry 0 is the start). After a divergence, entries from ``diverged_at``
    on are ``nan``.
    """

    rho: float
    optimizer: str
    lr: float
    n_steps: int
    theta0: float
    theta: np.ndarray
    loss1: np.ndarray
    loss2: np.ndarray
    diverged: bool
    diverged_at: int | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_trajectory(cls, run: "RunSettings", theta: np.ndarray, diverged_at: int | None) -> "ToyResult":
        """The result of a run with settings ``run`` whose iterates are ``theta`` (losses computed here)."""
        with np.errstate(over="ignore", invalid="ignore"):
            loss1, loss2 = losses(theta, run.rho)
        return cls(rho=run.rho, optimizer=run.optimizer, lr=run.lr, n_steps=run.n_steps, theta0=run.theta0,
                   theta=theta, loss1=loss1, loss2=loss2, diverged=diverged_at is not None,
                   diverged_at=diverged_at, hyperparameters=run.hyperparameters)

    @property
    def fixed_point(self) -> float:
        """The closed-form target :math:`(\\rho - 1)/(\\rho + 1)` of this run."""
        return fixed_point(self.rho)

    @property
    def final_theta(self) -> float:
        """The last iterate (``nan`` when the run diverged)."""
        return float(self.theta[-1])

    def steps_to_within(self, tol: float, target: float | None = None) -> int | None:
        """First step ``t`` such that every iterate from ``t`` to the end is within ``tol``
        of ``target`` (default: the fixed point); ``None`` if the run never settles there."""
        return _steps_to_within(self.theta, self.fixed_point if target is None else target, tol)


@dataclass(frozen=True, eq=False)
class ToyGridResult:
    """Runs for many values of rho at once: arrays are ``[n_rho, n_steps + 1]``, rows follow
    ``rhos``; ``diverged`` is ``[n_rho]`` bool and ``diverged_at`` is ``[n_rho]`` int with -1
    for rows that did not diverge."""

    rhos: np.ndarray
    optimizer: str
    lr: float
    n_steps: int
    theta0: float
    theta: np.ndarray
    loss1: np.ndarray
    loss2: np.ndarray
    diverged: np.ndarray
    diverged_at: np.ndarray
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    @property
    def fixed_points(self) -> np.ndarray:
        """Closed-form fixed point of every row."""
        return (self.rhos - 1.0) / (self.rhos + 1.0)

    def row(self, i: int) -> ToyResult:
        """Row ``i`` as a :class:`ToyResult` (the same object :func:`simulate` returns)."""
        at = int(self.diverged_at[i])
        return ToyResult(
            rho=float(self.rhos[i]),
            optimizer=self.optimizer,
            lr=self.lr,
            n_steps=self.n_steps,
            theta0=self.theta0,
            theta=self.theta[i].copy(),
            loss1=self.loss1[i].copy(),
            loss2=self.loss2[i].copy(),
            diverged=bool(self.diverged[i]),
            diverged_at=None if at < 0 else at,
            hyperparameters=dict(self.hyperparameters),
        )


def _steps_to_within(theta: np.ndarray, target: float, tol: float) -> int | None:
    if not _is_real(tol) or not float(tol) > 0:
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    with np.errstate(invalid="ignore"):
        outside = ~(np.abs(np.asarray(theta) - target) <= tol)  # nan counts as outside
    if outside[-1]:
        return None
    last_outside = np.flatnonzero(outside)
    return 0 if last_outside.size == 0 else int(last_outside[-1]) + 1


class RunSettings(NamedTuple):
    """The checked arguments of one toy run (what :func:`simulate` and :func:`simulate_torch` share)."""

    rho: float
    optimizer: str
    lr: float
    n_steps: int
    theta0: float
    hyperparameters: dict[str, Any]


def _run_settings(rho: object, optimizer: object, lr: object, n_steps: object, theta0: object,
                  opt_kwargs: dict[str, Any]) -> RunSettings:
    rho, lr = _check_rho(rho), _check_lr(lr)  # checked in the order of the signature
    n_steps, theta0 = _check_n_steps(n_steps), _check_theta0(theta0)
    optimizer = _check_optimizer(optimizer)
    return RunSettings(rho, optimizer, lr, n_steps, theta0, _check_hyperparameters(optimizer, opt_kwargs))


def _divergence_limit(theta0: float) -> float:
    return DIVERGENCE_BOUND * (1.0 + abs(theta0))


# -------------------------------------------------------------------------- simulators


def simulate(rho: float, optimizer: str = "sgd", lr: float = 0.05, n_steps: int = 60, theta0: float = 0.0,
             **opt_kwargs: Any) -> ToyResult:
    """Train the shared scalar on ``L1 + L2`` with one of :data:`OPTIMIZERS` (float64 numpy).

    ``opt_kwargs`` overrides the rule's hyperparameters (``momentum`` for ``"momentum"``,
    ``betas`` and ``eps`` for ``"adam"``; torch's defaults otherwise). Returns a
    :class:`ToyResult` whose arrays have ``n_steps + 1`` entries, entry 0 being ``theta0``.
    A run that leaves the divergence bound stops there (see the module docstring).

    Raises ``ValueError`` for ``rho`` or ``lr`` that are not finite and > 0, ``n_steps`` that
    is not an int >= 1, a non-finite ``theta0``, an unknown optimizer or keyword.
    """
    run = _run_settings(rho, optimizer, lr, n_steps, theta0, opt_kwargs)
    rho, optimizer, lr, n_steps, theta0, hyper = run
    update = _UPDATE_RULES[optimizer]
    limit = _divergence_limit(theta0)

    theta = np.full(n_steps + 1, np.nan)
    theta[0] = theta0
    state: dict = {}
    diverged_at = None
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected below instead
        current = np.float64(theta0)
        for t in range(1, n_steps + 1):
            current = update(current, gradient(current, rho), state, lr, **hyper)
            if not abs(current) <= limit:  # also true for nan and inf
                diverged_at = t
                break
            theta[t] = current
    return ToyResult.from_trajectory(run, theta, diverged_at)


def simulate_grid(
    rhos: Sequence[float] | np.ndarray,
    optimizer: str = "sgd",
    lr: float = 0.05,
    n_steps: int = 60,
    theta0: float = 0.0,
    **opt_kwargs: Any,
) -> ToyGridResult:
    """:func:`simulate` for every value in ``rhos`` at once, vectorised over rho.

    Row ``i`` of the result equals ``simulate(rhos[i], ...)`` (same convention, same ``nan``
    fill after a divergence); rows diverge independently. Useful for precomputing frames.
    """
    rho_array = np.asarray(rhos, dtype=np.float64) if _all_real(rhos) else None
    if rho_array is None or rho_array.ndim != 1 or rho_array.size == 0:
        raise ValueError(f"rhos must be a non-empty 1-D sequence of numbers, got {rhos!r}")
    if not np.all(np.isfinite(rho_array) & (rho_array > 0)):
        raise ValueError(f"rhos must all be finite numbers > 0, got {rho_array!r}")
    lr, n_steps, theta0 = _check_lr(lr), _check_n_steps(n_steps), _check_theta0(theta0)
    optimizer = _check_optimizer(optimizer)
    hyper = _check_hyperparameters(optimizer, opt_kwargs)
    update = _UPDATE_RULES[optimizer]
    limit = _divergence_limit(theta0)

    n_rho = rho_array.size
    theta = np.full((n_rho, n_steps + 1), np.nan)
    theta[:, 0] = theta0
    active = np.ones(n_rho, dtype=bool)
    diverged_at = np.full(n_rho, -1, dtype=np.int64)
    state: dict = {}
    with np.errstate(over="ignore", invalid="ignore"):
        current = np.full(n_rho, theta0)
        for t in range(1, n_steps + 1):
            current = update(current, gradient(current, rho_array), state, lr, **hyper)
            newly_out = active & ~(np.abs(current) <= limit)
            diverged_at[newly_out] = t
            active &= ~newly_out
            theta[active, t] = current[active]
            if not active.any():
                break
        loss1, loss2 = losses(theta, rho_array[:, None])
    return ToyGridResult(
        rhos=rho_array,
        optimizer=optimizer,
        lr=lr,
        n_steps=n_steps,
        theta0=theta0,
        theta=theta,
        loss1=loss1,
        loss2=loss2,
        diverged=diverged_at >= 0,
        diverged_at=diverged_at,
        hyperparameters=hyper,
    )


def _all_real(values: object) -> bool:
    if isinstance(values, np.ndarray):
        return values.dtype.kind in "iuf"
    try:
        return all(_is_real(v) for v in values)  # type: ignore[union-attr]
    except TypeError:
        return False


# ------------------------------------------------------------------------------ torch


class ToyModel(nn.Module):
    """The toy problem as an ``nn.Module``: one shared scalar parameter ``theta``.

    ``losses(rho)`` returns the two task losses as 0-d tensors connected to ``theta``, so the
    usual ``(L1 + L2).backward(); optimizer.step()`` loop trains it.
    """

    def __init__(self, theta0: float = 0.0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        theta0 = _check_theta0(theta0)
        self.theta = nn.Parameter(torch.tensor(theta0, dtype=dtype))

    def losses(self, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L1, L2) = ((rho/2)(theta - 1)^2, (1/2)(theta + 1)^2)``."""
        rho = _check_rho(rho)
        loss1 = 0.5 * rho * (self.theta - 1.0) ** 2  # pulls theta towards +1
        loss2 = 0.5 * (self.theta + 1.0) ** 2  # pulls theta towards -1
        return loss1, loss2

    def forward(self, rho: float) -> torch.Tensor:
        """The summed multi-task loss ``L1 + L2``."""
        loss1, loss2 = self.losses(rho)
        return loss1 + loss2


def _make_torch_optimizer(
    optimizer: str, params: Any, lr: float, hyper: dict[str, Any]
) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if optimizer == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=hyper["momentum"])
    return torch.optim.Adam(params, lr=lr, betas=hyper["betas"], eps=hyper["eps"])


def simulate_torch(rho: float, optimizer: str = "sgd", lr: float = 0.05, n_steps: int = 60, theta0: float = 0.0,
                   **opt_kwargs: Any) -> ToyResult:
    """Same run as :func:`simulate`, but with :class:`ToyModel`, autograd and ``torch.optim``
    (``SGD``, ``SGD(momentum=...)`` or ``Adam``) in float64. Same result convention,
    same divergence handling, same errors."""
    run = _run_settings(rho, optimizer, lr, n_steps, theta0, opt_kwargs)
    rho, optimizer, lr, n_steps, theta0, hyper = run
    limit = _divergence_limit(theta0)

    model = ToyModel(theta0)
    opt = _make_torch_optimizer(optimizer, model.parameters(), lr, hyper)
    theta = np.full(n_steps + 1, np.nan)
    theta[0] = theta0
    diverged_at = None
    for t in range(1, n_steps + 1):
        opt.zero_grad()
        model(rho).backward()
        opt.step()
        current = model.theta.item()
        if not abs(current) <= limit:
            diverged_at = t
            break
        theta[t] = current
    return ToyResult.from_trajectory(run, theta, diverged_at)
