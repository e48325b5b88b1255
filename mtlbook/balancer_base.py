"""The interface every loss balancer implements (:class:`LossBalancer`) and the helpers the
gradient-based balancers share; the balancers themselves and their registry are in
:mod:`mtlbook.balancing`."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from mtlbook._checks import check_int, check_mask, check_number
from mtlbook.gradients import flat_task_gradients

__all__ = ["LossBalancer", "ScaleFn", "SeededGeneratorState"]

ScaleFn = Callable[[Tensor], Tensor]


def _check_n_tasks(n_tasks: Any) -> int:
    return check_int(n_tasks, "n_tasks", 1)


def _check_positive(value: Any, name: str) -> float:
    return check_number(value, name, 0, open_low=True, wrong_type=TypeError)


def _check_scale(scale: Any) -> None:
    if scale is not None and not callable(scale):
        raise TypeError(f"scale must be callable or None, got {type(scale).__name__}")


def _trainable(parameters: Sequence[Tensor]) -> list[Tensor]:
    """The shared parameters that can receive a gradient (frozen ones are skipped)."""
    params = list(parameters)
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"shared_parameters must hold tensors, got {type(p).__name__}")
    return [p for p in params if p.requires_grad]


def _per_task_gradients(losses: Tensor, params: list[Tensor], active: Tensor) -> Tensor:
    """Task-major ``[n_tasks, d]`` float32 gradients of ``losses[i]`` on ``params`` (zeros for
    an inactive task or a parameter it does not reach); see :mod:`mtlbook.gradients`."""
    rows = [i for i in range(losses.shape[0]) if bool(active[i])]
    return flat_task_gradients(losses, params, rows, dtype=torch.float32)


def _unflatten_into(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].view_as(p).to(p.dtype))
        start += p.numel()
    return out


class LossBalancer(nn.Module):
    """Common interface of every balancing strategy (the default behaviour is equal weights).

    Args:
        n_tasks: number of tasks (``>= 1``); every per-task tensor is ``[n_tasks]``.
    """

    #: True when :meth:`backward` overwrites the shared parameters' gradients with its own
    #: combination (a distributed trainer must then average them itself).
    rewrites_shared_gradients: ClassVar[bool] = False

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.n_tasks = _check_n_tasks(n_tasks)

    # -- input checks ------------------------------------------------------------------

    def _check_losses(self, task_losses: Tensor, present: Tensor | None) -> tuple[Tensor, Tensor]:
        if not isinstance(task_losses, Tensor):
            raise TypeError(f"task_losses must be a torch.Tensor, got {type(task_losses).__name__}")
        if task_losses.shape != (self.n_tasks,):
            raise ValueError(f"task_losses must have shape [{self.n_tasks}], got {list(task_losses.shape)}")
        if present is None:
            present = torch.ones(self.n_tasks, dtype=torch.bool, device=task_losses.device)
        else:
            present = check_mask(present, self.n_tasks).to(task_losses.device)
        return task_losses, present

    @staticmethod
    def _masked(values: Tensor, present: Tensor) -> Tensor:
        """``values`` with absent tasks set to an exact 0 (their placeholder never leaks)."""
        return torch.where(present, values, torch.zeros((), dtype=values.dtype, device=values.device))

    # -- the interface -----------------------------------------------------------------

    def weight_losses(self, task_losses: Tensor, present: Tensor | None = None) -> Tensor:
        """Weighted per-task losses ``[n_tasks]``; their sum is the training objective."""
        task_losses, present = self._check_losses(task_losses, present)
        weights = self.weights().to(device=task_losses.device, dtype=task_losses.dtype)
        return self._masked(weights * self._masked(task_losses, present), present)

    def backward(self, objective: Tensor, weighted_losses: Tensor, shared_parameters: Sequence[Tensor],
                 scale: ScaleFn | None = None) -> None:
        """Accumulate gradients of ``objective`` into ``.grad`` (plain backward by default).

        Args:
            objective: the scalar to minimise (normally ``weighted_losses.sum()`` plus
                regularisers).
            weighted_losses: the output of :meth:`weight_losses` for this batch.
            shared_parameters: parameters shared by all tasks (used by GradNorm and PCGrad).
            scale: optional loss scaler (``GradScaler.scale``) applied before backward.
        """
        _check_scale(scale)
        (scale(objective) if scale is not None else objective).backward()

    def on_epoch_end(self, epoch: int, epoch_mean_losses: Tensor) -> None:
        """Hook called once per epoch with the epoch-mean task losses (default: nothing)."""

    def after_optimizer_step(self) -> None:
        """Hook called right after every optimizer step (default: nothing).

        :class:`UncertaintyBalancer` projects its log-variances back into their range here.
        """

    def weights(self) -> Tensor:
        """Current task weights ``[n_tasks]`` for logging (default: ones)."""
        return torch.ones(self.n_tasks)

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}"


class SeededGeneratorState:
    """Mixin of the balancers that draw from their own ``torch.Generator`` (``self._generator``,
    seeded with ``self.seed``): its state is part of ``state_dict`` (``_extra_state``), so a
    resumed run draws the same numbers. Put it before the balancer base class."""

    def _seed_generator(self, seed: int) -> None:
        """Check ``seed`` and build the balancer's own generator from it."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"generator_state": self._generator.get_state()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self._generator.set_state(state["generator_state"])

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, seed={self.seed}"
