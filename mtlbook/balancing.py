"""Loss-balancing baselines behind one interface (chapters 7 and 8).

The trainer holds one :class:`LossBalancer` and, for every batch, does

.. code-block:: python

    weighted = balancer.weight_losses(task_losses, present)      # [n_tasks]
    objective = weighted.sum() + extra_terms                      # adaTT transfer, gate entropy
    balancer.backward(objective, weighted, model.shared_parameters(), scale=scaler.scale)
    ...                                                           # clip, optimizer.step()
    balancer.on_epoch_end(epoch, epoch_mean_task_losses)          # once per epoch

Implementations:

* :class:`EqualWeighting`: :math:`\\sum_i L_i`.
* :class:`UncertaintyBalancer`: Kendall et al.'s learned task uncertainty; its ``log_var``
  is an ``nn.Parameter`` trained by the trainer's optimizer.
* :class:`DWA`: Dynamic Weight Average, weights from the ratio of the last two epoch losses.
* :class:`GradNorm`: learned weights pushed so every task's gradient norm on the shared
  parameters matches a common target scaled by its relative training speed.
* :class:`GradientCombiner`: the base of every method that replaces the shared parameters'
  gradient by a combination of the per-task gradients (``rewrites_shared_gradients``).
* :class:`PCGrad`: gradient surgery, projecting away the conflicting part of each task's
  gradient on the shared parameters.
* :mod:`mtlbook.balancers_torchjd`: MGDA, CAGrad, Nash-MTL, Aligned-MTL and UPGrad, the
  ``torchjd`` library's aggregators as :class:`GradientCombiner`\\ s.
* :mod:`mtlbook.balancers_random`: random loss weighting (RLW).

Every balancer has a name in :data:`BALANCERS`; :func:`register_balancer` adds one (also a
class defined outside the package), and ``TrainerConfig(balancing=name)`` accepts any
registered name.

Only :class:`UncertaintyBalancer` owns ``nn.Parameter``\\ s; the state of the others lives in
buffers (saved by ``state_dict``, moved by ``.to``, never seen by an optimizer), so putting
``balancer.parameters()`` into the main optimizer is always safe.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Sequence

import torch
from torch import Tensor

from mtlbook.balancer_base import (  # noqa: F401 - LossBalancer and ScaleFn re-exported
    LossBalancer,
    ScaleFn,
    _check_positive,
    _per_task_gradients,
    _check_scale,
    _trainable,
)
from mtlbook.balancers_combine import GradientCombiner, PCGrad  # noqa: F401 - re-exported
from mtlbook.losses import UncertaintyWeighting

__all__ = [
    "BALANCERS",
    "DWA",
    "EqualWeighting",
    "GradNorm",
    "GradientCombiner",
    "LossBalancer",
    "PCGrad",
    "UncertaintyBalancer",
    "build_balancer",
    "register_balancer",
]


class EqualWeighting(LossBalancer):
    r"""Every task with weight 1: the objective is :math:`\sum_i L_i` over present tasks."""


class UncertaintyBalancer(LossBalancer):
    r"""Uncertainty weighting :cite:`kendall2018multi` as a balancer.

    Wraps :class:`~mtlbook.losses.UncertaintyWeighting`:
    :math:`L_i' = L_i / (2\sigma_i^2) + \tfrac12\log\sigma_i^2`. The ``log_var`` parameters
    are a submodule's ``nn.Parameter``: the trainer must give ``balancer.parameters()`` to
    its optimizer and call :meth:`after_optimizer_step` after each step (which keeps
    ``log_var`` in ``[-4, 4]``; :meth:`weight_losses` projects as well before using it, so a
    training loop that does not call the hook still never uses an out-of-range value).
    :meth:`weights` reports :math:`1/(2\sigma_i^2)`.
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__(n_tasks)
        self.uncertainty = UncertaintyWeighting(n_tasks)

    def weight_losses(self, task_losses: Tensor, present: Tensor | None = None) -> Tensor:
        task_losses, present = self._check_losses(task_losses, present)
        # a loop that does not call after_optimizer_step still never uses an out-of-range s_i
        self.uncertainty.project_()
        return self.uncertainty(task_losses, present)

    def after_optimizer_step(self) -> None:
        self.uncertainty.project_()

    def weights(self) -> Tensor:
        return self.uncertainty.weights()


class DWA(LossBalancer):
    r"""Dynamic Weight Average :cite:`liu2019end`.

    From the epoch-mean losses :math:`\bar L_i(\cdot)` of the two previous epochs,

    .. math::
        r_i(t-1) = \frac{\bar L_i(t-1)}{\bar L_i(t-2)}, \qquad
        w_i(t) = \frac{n \exp(r_i(t-1)/T)}{\sum_j \exp(r_j(t-1)/T)},

    so a task whose loss fell less (ratio near or above 1) gets more weight; the weights
    sum to :math:`n`. Epochs 0 and 1 use :math:`w_i = 1`. A larger temperature :math:`T`
    makes the weights more even. Only the losses themselves are needed, no gradients.

    A ratio that cannot be formed (a task absent for a whole epoch: non-finite or
    non-positive epoch mean) is taken as 1, i.e. "no change".

    Args:
        n_tasks: number of tasks.
        temperature: :math:`T`, a finite number ``> 0`` (the paper uses 2).
    """

    def __init__(self, n_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(n_tasks)
        self.temperature = _check_positive(temperature, "temperature")
        self.register_buffer("previous_losses", torch.full((2, n_tasks), float("nan")))  # rows: t-2, t-1
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("task_weights", torch.ones(n_tasks))

    def on_epoch_end(self, epoch: int, epoch_mean_losses: Tensor) -> None:
        """Record this epoch's mean losses and compute the weights of the next epoch."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if not isinstance(epoch_mean_losses, Tensor) or epoch_mean_losses.shape != (self.n_tasks,):
            raise ValueError(f"epoch_mean_losses must be a tensor of shape [{self.n_tasks}]")
        with torch.no_grad():
            latest = epoch_mean_losses.detach().to(self.previous_losses)
            self.previous_losses[0] = self.previous_losses[1].clone()
            self.previous_losses[1] = latest
            self.epochs_seen += 1
            if int(self.epochs_seen) >= 2:
                before, last = self.previous_losses[0], self.previous_losses[1]
                ratio = last / before
                usable = torch.isfinite(ratio) & (before > 0) & torch.isfinite(last)
                ratio = torch.where(usable, ratio, torch.ones_like(ratio))
                self.task_weights.copy_(self.n_tasks * torch.softmax(ratio / self.temperature, dim=0))

    def weights(self) -> Tensor:
        return self.task_weights.detach().clone()

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, temperature={self.temperature}"


class GradNorm(LossBalancer):
    r"""GradNorm :cite:`chen2018gradnorm`: learn task weights that equalise training rates.

    With weights :math:`w_i` (init 1) and shared parameters :math:`W`:

    .. math::
        G_i = \lVert \nabla_W\, w_i L_i \rVert_2, \quad \bar G = \operatorname{mean}_i G_i,
        \quad \tilde L_i = \frac{L_i}{L_i(0)}, \quad r_i = \frac{\tilde L_i}{\operatorname{mean}_j \tilde L_j},

        L_\text{grad} = \sum_i \bigl| G_i - [\bar G\, r_i^{\alpha}]_\text{const} \bigr|.

    Each step: the network gets the plain backward of the objective built with the current
    weights; then :math:`w` takes one step of its own optimizer on :math:`L_\text{grad}`
    and is renormalised to :math:`\sum_i w_i = n` (the tasks present in the batch are
    rescaled to keep their previous total, so an absent task's weight does not move). A task that trains slower (larger
    :math:`r_i`) gets a larger gradient-norm target, so its weight rises. :math:`\alpha`
    sets how hard rates are equalised (the paper: 0.12 to 3; 1.5 here).

    Because :math:`G_i = w_i \lVert \nabla_W L_i \rVert` is linear in :math:`w_i > 0`,
    :math:`\partial L_\text{grad} / \partial w_i` needs only the per-task gradient norms,
    not a second-order backward. :math:`L_i(0)` is recorded the first time task :math:`i`
    is present. Means are over the tasks present in the batch. Weights are kept ``>= 1e-3`` before renormalising
    so a task is never switched off or flipped in sign.

    The weights, the initial losses and the optimizer state are buffers, not parameters,
    so the trainer's optimizer never touches them and ``state_dict`` saves them.

    Args:
        n_tasks: number of tasks.
        alpha: asymmetry :math:`\alpha`, a finite number ``>= 0``.
        lr: learning rate of the weight optimizer, ``> 0``.
        optimizer: ``"adam"`` (default) or ``"sgd"``.
    """

    MIN_WEIGHT = 1e-3
    ADAM_BETAS = (0.9, 0.999)
    ADAM_EPS = 1e-8

    def __init__(self, n_tasks: int, alpha: float = 1.5, lr: float = 0.025, optimizer: str = "adam") -> None:
        super().__init__(n_tasks)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.lr = _check_positive(lr, "lr")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.optimizer = optimizer
        self.register_buffer("task_weights", torch.ones(n_tasks))
        self.register_buffer("initial_losses", torch.full((n_tasks,), float("nan")))
        self.register_buffer("adam_exp_avg", torch.zeros(n_tasks))
        self.register_buffer("adam_exp_avg_sq", torch.zeros(n_tasks))
        self.register_buffer("adam_steps", torch.zeros(n_tasks))
        #: Diagnostics of the last update (``None`` before the first one).
        self.last_grad_norms: Tensor | None = None
        self.last_targets: Tensor | None = None
        self.last_grad_loss: float | None = None
        self._last_losses: Tensor | None = None
        self._last_present: Tensor | None = None

    def weight_losses(self, task_losses: Tensor, present: Tensor | None = None) -> Tensor:
        task_losses, present = self._check_losses(task_losses, present)
        self._last_losses = task_losses.detach().float()
        self._last_present = present
        weights = self.task_weights.to(device=task_losses.device, dtype=task_losses.dtype)
        return self._masked(weights * self._masked(task_losses, present), present)

    def backward(self, objective: Tensor, weighted_losses: Tensor, shared_parameters: Sequence[Tensor],
                 scale: ScaleFn | None = None) -> None:
        _check_scale(scale)
        params = _trainable(shared_parameters)
        losses, present = self._last_losses, self._last_present
        if losses is None or weighted_losses.shape != (self.n_tasks,):
            raise RuntimeError("GradNorm.backward needs the [n_tasks] output of weight_losses from this batch")
        self._last_losses = self._last_present = None
        grad_norms = None
        if params:
            # Norms of the scaled graph, divided by the scale: under fp16 the unscaled
            # per-task gradients could underflow.
            factor = 1.0
            to_differentiate = weighted_losses
            if scale is not None:
                to_differentiate = scale(weighted_losses)
                factor = float(scale(torch.ones((), device=weighted_losses.device)))
            grads = _per_task_gradients(to_differentiate, params, present)
            grad_norms = grads.norm(dim=1) / factor
        (scale(objective) if scale is not None else objective).backward()
        if grad_norms is not None:
            self._update_weights(grad_norms, losses.to(grad_norms.device), present.to(grad_norms.device))

    @torch.no_grad()
    def _update_weights(self, weighted_grad_norms: Tensor, losses: Tensor, present: Tensor) -> None:
        if not bool(torch.isfinite(weighted_grad_norms).all() & torch.isfinite(losses[present]).all()):
            return  # an overflowing (scaled) step: the weights wait for a clean one
        first_time = present & torch.isnan(self.initial_losses)
        self.initial_losses[first_time] = losses[first_time]
        active = present & (self.initial_losses > 0)
        if not bool(active.any()):
            return
        weights = self.task_weights
        # ||grad_W L_i|| from ||grad_W (w_i L_i)||; G_i = w_i * that norm is linear in w_i.
        raw_norms = weighted_grad_norms / weights
        relative_loss = losses / self.initial_losses
        rate = relative_loss / relative_loss[active].mean()
        g = weights * raw_norms
        target = g[active].mean() * rate.clamp(min=0) ** self.alpha
        gap = torch.where(active, g - target, torch.zeros_like(g))
        grad_w = torch.sign(gap) * raw_norms  # d/dw_i of sum_i |w_i n_i - target_i|
        self.last_grad_norms = torch.where(active, g, torch.full_like(g, float("nan")))
        self.last_targets = torch.where(active, target, torch.full_like(g, float("nan")))
        self.last_grad_loss = float(gap.abs().sum())

        if self.optimizer == "sgd":
            step = self.lr * grad_w
        else:
            beta1, beta2 = self.ADAM_BETAS
            self.adam_steps[active] += 1
            self.adam_exp_avg[active] = beta1 * self.adam_exp_avg[active] + (1 - beta1) * grad_w[active]
            self.adam_exp_avg_sq[active] = beta2 * self.adam_exp_avg_sq[active] + (1 - beta2) * grad_w[active] ** 2
            steps = self.adam_steps.clamp(min=1)
            m_hat = self.adam_exp_avg / (1 - beta1**steps)
            v_hat = self.adam_exp_avg_sq / (1 - beta2**steps)
            step = self.lr * m_hat / (v_hat.sqrt() + self.ADAM_EPS)
        # Renormalise among the tasks that took part, so they keep their share of the total
        # and an absent task's weight is left exactly as it was; the total stays n.
        updated = torch.where(active, (weights - step).clamp(min=self.MIN_WEIGHT), weights)
        share = weights[active].sum() / updated[active].sum()
        updated = torch.where(active, updated * share, updated)
        self.task_weights.copy_(updated * (self.n_tasks / updated.sum()))

    def weights(self) -> Tensor:
        return self.task_weights.detach().clone()

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, alpha={self.alpha}, lr={self.lr}, optimizer={self.optimizer!r}"


#: Balancer name -> class; ``build_balancer`` looks names up here.
BALANCERS: dict[str, type[LossBalancer]] = {
    "equal": EqualWeighting,
    "uncertainty": UncertaintyBalancer,
    "gradnorm": GradNorm,
    "dwa": DWA,
    "pcgrad": PCGrad,
}


_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register_balancer(name: str, cls: type[LossBalancer], *, replace: bool = False) -> type[LossBalancer]:
    """Add ``cls`` to :data:`BALANCERS` under ``name``, so ``build_balancer(name, ...)`` and
    ``TrainerConfig(balancing=name)`` find it. Returns ``cls`` (usable as a decorator body).

    Args:
        name: lower-case identifier (``[a-z][a-z0-9_]*``), e.g. ``"my_method"``.
        cls: a concrete subclass of :class:`LossBalancer` whose constructor takes
            ``n_tasks`` first.
        replace: allow replacing a name that is already registered to another class.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name must be a lower-case identifier matching [a-z][a-z0-9_]*, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, LossBalancer)):
        raise TypeError(f"cls must be a subclass of LossBalancer, got {cls!r}")
    if inspect.isabstract(cls):
        raise TypeError(f"cls must be a concrete class; {cls.__name__} leaves abstract methods undefined")
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be a bool, got {type(replace).__name__}")
    if name in BALANCERS and BALANCERS[name] is not cls and not replace:
        raise ValueError(
            f"name {name!r} is already registered to {BALANCERS[name].__name__}; pass replace=True to replace it"
        )
    BALANCERS[name] = cls
    return cls


def build_balancer(name: str, n_tasks: int, **kwargs: Any) -> LossBalancer:
    """Build a balancer by its name in :data:`BALANCERS` (``"equal"``, ``"uncertainty"``,
    ``"gradnorm"``, ``"dwa"``, ``"pcgrad"``, ``"rlw"``, ``"mgda"``, ``"cagrad"``,
    ``"nash_mtl"``, ``"aligned_mtl"``, ``"upgrad"``, and any added by
    :func:`register_balancer`); ``kwargs`` go to its constructor (e.g. ``temperature`` for
    DWA)."""
    if name not in BALANCERS:
        raise ValueError(f"name must be one of {list(BALANCERS)}, got {name!r}")
    return BALANCERS[name](n_tasks, **kwargs)


# The balancers defined in their own modules register themselves on import; importing them
# here makes every name available as soon as mtlbook.balancing is imported.
from mtlbook import balancers_random as _balancers_random  # noqa: E402,F401
from mtlbook import balancers_torchjd as _balancers_torchjd  # noqa: E402,F401
