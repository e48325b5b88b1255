r"""Learning-rate schedules of the two training phases, as torch schedulers and in closed form.

Both schedules are stepped **once per epoch** (after the epoch), so the learning rate used
during epoch :math:`e` (0-based, counted from the start of the phase) is the value below.
With base rate :math:`\eta`, floor :math:`\eta_{min}` and start factor :math:`f`:

**Phase 1** (shared pretraining): a linear warmup over :math:`W` epochs, then cosine
annealing with warm restarts (period :math:`T_0`, growing by :math:`T_{mult}` per cycle),

.. math::

    \eta_e = \eta \Bigl(f + (1 - f)\frac{e}{W}\Bigr) \quad (e < W), \qquad
    \eta_e = \eta_{min} + \frac{\eta - \eta_{min}}{2}
             \Bigl(1 + \cos\frac{\pi\, t_{cur}}{T_i}\Bigr) \quad (e \ge W),

where :math:`t = e - W` is located in its restart cycle :math:`i`: cycle lengths are
:math:`T_0, T_0 T_{mult}, T_0 T_{mult}^2, \dots` and :math:`t_{cur}` is the offset inside
the cycle. With the defaults (:math:`W = 5`, :math:`f = 0.1`, :math:`T_0 = 10`,
:math:`T_{mult} = 2`) the rate climbs from :math:`5\cdot 10^{-5}` to :math:`5\cdot 10^{-4}`
over epochs 0-4 and restarts at epochs 5, 15, 35, ...

**Phase 2** (task finetuning, :math:`N` epochs): a :math:`W_2`-epoch linear warmup, then one
plain cosine decay over the remaining :math:`N - W_2` epochs (a restart period would never
complete in so short a phase),

.. math::

    \eta_e = \eta_{min} + \frac{\eta - \eta_{min}}{2}
             \Bigl(1 + \cos\frac{\pi (e - W_2)}{\max(N - W_2, 1)}\Bigr) \quad (e \ge W_2).

The warmup is :class:`torch.optim.lr_scheduler.LinearLR`, the cosine parts are
:class:`~torch.optim.lr_scheduler.CosineAnnealingWarmRestarts` and
:class:`~torch.optim.lr_scheduler.CosineAnnealingLR`, joined by
:class:`~torch.optim.lr_scheduler.SequentialLR`. Every param group follows the same shape
scaled to its own base rate (per-expert learning rates keep their ratio).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    LinearLR,
    LRScheduler,
    SequentialLR,
)

__all__ = ["build_phase1_scheduler", "build_phase2_scheduler", "phase1_lr", "phase2_lr"]


def _check_common(warmup_epochs: int, start_factor: float, eta_min: float) -> None:
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
    if not (isinstance(start_factor, (int, float)) and 0.0 < start_factor <= 1.0):
        raise ValueError(f"start_factor must be a number in (0, 1], got {start_factor!r}")
    if not (isinstance(eta_min, (int, float)) and math.isfinite(eta_min) and eta_min >= 0):
        raise ValueError(f"eta_min must be a finite number >= 0, got {eta_min!r}")


def _check_cosine(t0: int, t_mult: int) -> None:
    if isinstance(t0, bool) or not isinstance(t0, int) or t0 < 1:
        raise ValueError(f"t0 must be an int >= 1, got {t0!r}")
    if isinstance(t_mult, bool) or not isinstance(t_mult, int) or t_mult < 1:
        raise ValueError(f"t_mult must be an int >= 1, got {t_mult!r}")


def build_phase1_scheduler(
    optimizer: Optimizer,
    warmup_epochs: int = 5,
    start_factor: float = 0.1,
    t0: int = 10,
    t_mult: int = 2,
    eta_min: float = 0.0,
) -> LRScheduler:
    """Linear warmup then cosine annealing with warm restarts (epoch-stepped, see module doc)."""
    _check_common(warmup_epochs, start_factor, eta_min)
    _check_cosine(t0, t_mult)
    cosine = CosineAnnealingWarmRestarts(optimizer, T_0=t0, T_mult=t_mult, eta_min=eta_min)
    if warmup_epochs == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_epochs)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])


def build_phase2_scheduler(
    optimizer: Optimizer,
    epochs: int,
    warmup_epochs: int = 2,
    start_factor: float = 0.1,
    eta_min: float = 0.0,
) -> LRScheduler:
    """Linear warmup then one plain cosine decay over the rest of the phase (see module doc)."""
    _check_common(warmup_epochs, start_factor, eta_min)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    cosine = CosineAnnealingLR(optimizer, T_max=max(epochs - warmup_epochs, 1), eta_min=eta_min)
    if warmup_epochs == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_epochs)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])


def _cosine(base_lr: float, eta_min: float, t_cur: float, period: float) -> float:
    return eta_min + (base_lr - eta_min) * (1.0 + math.cos(math.pi * t_cur / period)) / 2.0


def phase1_lr(
    epoch: int,
    base_lr: float = 5e-4,
    warmup_epochs: int = 5,
    start_factor: float = 0.1,
    t0: int = 10,
    t_mult: int = 2,
    eta_min: float = 0.0,
) -> float:
    """Closed form of :func:`build_phase1_scheduler`: the rate used during epoch ``epoch``."""
    _check_common(warmup_epochs, start_factor, eta_min)
    _check_cosine(t0, t_mult)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    if epoch < warmup_epochs:
        return base_lr * (start_factor + (1.0 - start_factor) * epoch / warmup_epochs)
    t_cur, period = epoch - warmup_epochs, t0
    while t_cur >= period:  # walk the restart cycles T0, T0*m, T0*m^2, ...
        t_cur -= period
        period *= t_mult
    return _cosine(base_lr, eta_min, t_cur, period)


def phase2_lr(
    epoch: int,
    epochs: int,
    base_lr: float = 5e-4,
    warmup_epochs: int = 2,
    start_factor: float = 0.1,
    eta_min: float = 0.0,
) -> float:
    """Closed form of :func:`build_phase2_scheduler`: the rate used during epoch ``epoch``."""
    _check_common(warmup_epochs, start_factor, eta_min)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    if epoch < warmup_epochs:
        return base_lr * (start_factor + (1.0 - start_factor) * epoch / warmup_epochs)
    return _cosine(base_lr, eta_min, epoch - warmup_epochs, max(epochs - warmup_epochs, 1))
