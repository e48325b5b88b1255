"""Adaptive task transfer: select peers from measured affinity and regulate the transfer (chapter 6).

Notation: ``n`` tasks, losses :math:`L \\in \\mathbb{R}^n` (already uncertainty-weighted by the
trainer), measured affinity :math:`A` (:class:`~mtlbook.adatt.affinity.TaskAffinityComputer`),
learnable logits :math:`W` (``n x n``, init 0), group prior :math:`P`
(:func:`~mtlbook.adatt.prior.build_group_prior`), prior-blend ratio :math:`r`.

**Select.**

.. math::

    R = (W + A)(1 - r) + P r \\quad (R = W + A \\text{ without a prior}), \\qquad
    \\mathcal B = \\{(i, i)\\} \\cup \\{(i, j) : A_{ij} < \\tau\\}

    w_{ij} = \\frac{\\exp(R_{ij}/T)}{\\sum_{k:(i,k) \\notin \\mathcal B} \\exp(R_{ik}/T)}
    \\ \\text{for } (i, j) \\notin \\mathcal B, \\qquad w_{ij} = 0 \\text{ for } (i, j) \\in \\mathcal B

A row whose peers are all blocked is all zeros. For a batch without targets for task
``j``, column ``j`` is multiplied by 0 *after* the softmax (the other weights in the row are
not renormalised, so the row sums to less than 1: the missing task's share of the
attention is dropped, not handed to the remaining peers), and row ``j`` is 0 as well
(a missing task has no loss to enhance).

**Regulate.**

.. math::

    L_i^{\\text{adaTT}} = L_i + \\min\\Bigl(\\lambda \\sum_{j \\ne i} w_{ij} L_j,\\;
    \\rho_{\\max}\\, \\operatorname{sg}(L_i)\\Bigr)

with :math:`\\operatorname{sg}` the stop-gradient (``detach``): when the cap binds, the
transfer term is a constant and sends no gradient anywhere. The cap assumes
:math:`L_i \\ge 0`; uncertainty-weighted losses can be negative (the
:math:`\\tfrac12 \\log \\sigma^2` term), and then the cap is negative, always binds, and the
transfer for that task is switched off (gradient-wise) while its value shifts by
:math:`\\rho_{\\max} L_i`.

**What the shared parameters see.** The trainer sums the enhanced losses, and the sum is
:math:`\\sum_j c_j L_j` plus constants, with
:math:`c_j = 1 + \\lambda \\sum_{i \\text{ uncapped}, i \\ne j} w_{ij} \\in [1, 1 + \\lambda (n-1)]`
(:meth:`AdaptiveTaskTransfer.effective_task_weights`, appendix A.5): the transfer rescales each
task's own gradient; it does not route one task's gradient into another's update.

**Schedule** (epoch ``e``, 0-based): warmup (``e < warmup_epochs``) measures only and returns
the losses unchanged; dynamic (``warmup_epochs <= e < freeze_epoch``) measures, transfers and
learns :math:`W` while :math:`r` anneals; frozen (``e >= freeze_epoch``) stops measuring and
transfers with a detached, frozen :math:`W`.

.. math::

    r(e) = r_\\text{start} - (r_\\text{start} - r_\\text{end})
    \\min\\Bigl(\\frac{\\max(e - e_\\text{warmup}, 0)}{e_\\text{freeze} - e_\\text{warmup}}, 1\\Bigr)

The name comes from AdaTT (Li et al., KDD 2023, ``li2023adatt``), a network whose gated
fusion units mix task representations; the loss-level transfer here (affinity-driven peer
weights, clamp, masking, prior blend, blocking) follows the book's source notes and is not
that paper's architecture.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlbook._checks import check_int, check_number
from mtlbook.adatt.affinity import (
    COMPUTER_EXTRACTIONS,
    PARAMETER_SETS,
    TaskAffinityComputer,
    as_loss_vector,
    as_presence,
    check_choice,
    check_task_names,
    check_unit_interval,
)
from mtlbook.adatt.prior import build_group_prior, check_groups

PHASES = ("warmup", "dynamic", "frozen")
BLOCKINGS = ("exact", "zero_logit")

__all__ = ["AdaptiveTaskTransfer", "PHASES", "BLOCKINGS"]


def _check_nonnegative(value: Any, name: str) -> float:
    return check_number(value, name, 0)


def _check_int(value: Any, name: str, minimum: int) -> int:
    return check_int(value, name, minimum)


def _sync_after_load(module: "AdaptiveTaskTransfer", _incompatible_keys: Any) -> None:
    module.sync_requires_grad()


class AdaptiveTaskTransfer(nn.Module):
    """adaTT transfer module: affinity measurement, peer selection and the transfer loss.

    Args:
        task_names: task order (rows/columns of every matrix).
        transfer_lambda: :math:`\\lambda \\ge 0`, weight of the peer term (default 0.1).
        temperature: :math:`T \\ge 10^{-3}` of the row softmax (default 1.0; below 0.5 the weight
            concentrates on few peers, above 2 it flattens).
        negative_threshold: :math:`\\tau \\in [-1, 1]`; pairs with :math:`A_{ij} < \\tau` are
            blocked (default -0.1: blocks clear conflict, tolerates near-zero noise).
        ema_decay: :math:`\\beta \\in [0, 1)` of the affinity EMA (default 0.9).
        grad_interval: measure every this many steps (>= 1, default 10).
        max_transfer_ratio: :math:`\\rho_{\\max} \\ge 0`, cap of the transfer term as a
            fraction of the task's own loss (default 0.5).
        warmup_epochs: epochs of measurement without transfer (>= 0). The sources give no
            default; 2 is chosen so that all three phases fit in the trainer's default
            15-epoch phase 1.
        freeze_epoch: first frozen epoch (> ``warmup_epochs``; default 10).
        task_groups: optional ``{group: [task names]}``; builds the prior :math:`P`.
            Without it no prior is used (:math:`r = 0`).
        intra_group_strength: same-group prior strength, one value or one per group (0.7).
        inter_group_strength: cross-group prior strength (0.3).
        prior_blend_start, prior_blend_end: :math:`r_\\text{start}, r_\\text{end} \\in [0, 1]`
            (0.5 and 0.1).
        extraction, parameter_set, chunk_size: passed to the :class:`TaskAffinityComputer`.
        blocking: ``"exact"`` (default) gives blocked entries weight exactly 0.
            ``"zero_logit"`` reproduces the sources' flawed variant for the book's
            ablation: blocked logits (diagonal included) are set to 0 *before* a softmax
            over the whole row, so each still receives :math:`e^0 / Z > 0`; a fully blocked
            row becomes uniform. The loss still sums over ``j != i`` only.

    State (``state_dict``): ``transfer_logits`` (:math:`W`), the computer's ``affinity``,
    ``pair_observed`` and ``n_updates``, and the buffers ``prior``, ``prior_configured``,
    ``epoch_index`` and ``enabled_flag``. The phase and :math:`r` are functions of the epoch
    and the schedule given at construction; after :meth:`load_state_dict`,
    ``W.requires_grad`` is re-synchronised with the loaded phase.
    """

    prior: Tensor
    prior_configured: Tensor
    epoch_index: Tensor
    enabled_flag: Tensor
    last_transfer_weights: Tensor

    #: Smallest accepted temperature: scores ``mixed / T`` stay far from float overflow.
    MIN_TEMPERATURE = 1e-3

    def __init__(
        self,
        task_names: Sequence[str],
        *,
        transfer_lambda: float = 0.1,
        temperature: float = 1.0,
        negative_threshold: float = -0.1,
        ema_decay: float = 0.9,
        grad_interval: int = 10,
        max_transfer_ratio: float = 0.5,
        warmup_epochs: int = 2,
        freeze_epoch: int = 10,
        task_groups: Mapping[str, Sequence[str]] | None = None,
        intra_group_strength: float | Mapping[str, float] = 0.7,
        inter_group_strength: float = 0.3,
        prior_blend_start: float = 0.5,
        prior_blend_end: float = 0.1,
        extraction: str = "auto",
        parameter_set: str = "all",
        blocking: str = "exact",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.task_names = check_task_names(task_names)
        self.transfer_lambda = _check_nonnegative(transfer_lambda, "transfer_lambda")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature < self.MIN_TEMPERATURE
        ):
            raise ValueError(
                f"temperature must be a finite number >= {self.MIN_TEMPERATURE} (below it the row softmax is a hard "
                f"max that overflows), got {temperature!r}"
            )
        self.temperature = float(temperature)
        if (
            isinstance(negative_threshold, bool)
            or not isinstance(negative_threshold, (int, float))
            or not -1.0 <= negative_threshold <= 1.0
        ):
            raise ValueError(f"negative_threshold must be a number in [-1, 1], got {negative_threshold!r}")
        self.negative_threshold = float(negative_threshold)
        self.grad_interval = _check_int(grad_interval, "grad_interval", 1)
        self.max_transfer_ratio = _check_nonnegative(max_transfer_ratio, "max_transfer_ratio")
        self.warmup_epochs = _check_int(warmup_epochs, "warmup_epochs", 0)
        if isinstance(freeze_epoch, bool) or not isinstance(freeze_epoch, int) or freeze_epoch <= self.warmup_epochs:
            raise ValueError(
                f"freeze_epoch must be an int > warmup_epochs={self.warmup_epochs} "
                f"(otherwise the dynamic phase never runs), got {freeze_epoch!r}"
            )
        self.freeze_epoch = freeze_epoch
        self.prior_blend_start = check_unit_interval(prior_blend_start, "prior_blend_start")
        self.prior_blend_end = check_unit_interval(prior_blend_end, "prior_blend_end")
        check_choice(extraction, "extraction", COMPUTER_EXTRACTIONS)
        check_choice(parameter_set, "parameter_set", PARAMETER_SETS)
        self.blocking = check_choice(blocking, "blocking", BLOCKINGS)

        n = len(self.task_names)
        self.affinity_computer = TaskAffinityComputer(
            self.task_names, ema_decay=ema_decay, extraction=extraction, parameter_set=parameter_set,
            chunk_size=chunk_size,
        )
        # W: learnable logits added to the affinity; zero init = start from A (and P) alone.
        self.transfer_logits = nn.Parameter(torch.zeros(n, n))
        if task_groups is not None:
            check_groups(self.task_names, task_groups, "task_groups")
            prior = build_group_prior(self.task_names, task_groups, inter_group_strength, intra_group_strength)
        else:
            check_unit_interval(inter_group_strength, "inter_group_strength")
            if not isinstance(intra_group_strength, Mapping):
                check_unit_interval(intra_group_strength, "intra_group_strength")
            prior = torch.zeros(n, n)
        self.register_buffer("prior", prior)
        self.register_buffer("prior_configured", torch.tensor(task_groups is not None))
        self.register_buffer("epoch_index", torch.zeros((), dtype=torch.long))
        self.register_buffer("enabled_flag", torch.tensor(True))
        # For plots and logs only; a resumed run recomputes it, so it is not saved.
        self.register_buffer("last_transfer_weights", torch.zeros(n, n), persistent=False)
        self.register_load_state_dict_post_hook(_sync_after_load)

    # ----------------------------------------------------------------- readable state
    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    @property
    def W(self) -> nn.Parameter:  # noqa: N802 (the book's symbol)
        """Alias of ``transfer_logits``."""
        return self.transfer_logits

    @property
    def affinity(self) -> Tensor:
        """A copy of the current affinity ``A`` ``[n, n]``."""
        return self.affinity_computer.affinity.detach().clone()

    @property
    def transfer_matrix(self) -> Tensor:
        """A copy of the transfer weights from the latest :meth:`transfer_weights` call."""
        return self.last_transfer_weights.detach().clone()

    @property
    def epoch(self) -> int:
        """The current (0-based) epoch."""
        return int(self.epoch_index)

    @property
    def enabled(self) -> bool:
        return bool(self.enabled_flag)

    @property
    def phase(self) -> str:
        """``"warmup"``, ``"dynamic"`` or ``"frozen"`` for the current epoch."""
        return self.phase_at(self.epoch)

    def phase_at(self, epoch: int) -> str:
        if epoch < self.warmup_epochs:
            return "warmup"
        return "dynamic" if epoch < self.freeze_epoch else "frozen"

    @property
    def blend_ratio(self) -> float:
        """Effective :math:`r` now: :meth:`prior_blend_ratio` of the epoch, 0 without a prior."""
        return self.prior_blend_ratio(self.epoch) if bool(self.prior_configured) else 0.0

    def prior_blend_ratio(self, epoch: float) -> float:
        """:math:`r(e) = r_s - (r_s - r_e) \\min(\\max(e - e_w, 0) / (e_f - e_w), 1)`."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not epoch >= 0:
            raise ValueError(f"epoch must be a number >= 0, got {epoch!r}")
        progress = min(max(epoch - self.warmup_epochs, 0) / (self.freeze_epoch - self.warmup_epochs), 1.0)
        return self.prior_blend_start - (self.prior_blend_start - self.prior_blend_end) * progress

    def extra_repr(self) -> str:
        return (
            f"tasks={list(self.task_names)}, lambda={self.transfer_lambda}, T={self.temperature}, "
            f"tau={self.negative_threshold}, max_ratio={self.max_transfer_ratio}, "
            f"warmup={self.warmup_epochs}, freeze={self.freeze_epoch}, blocking={self.blocking!r}"
        )

    # ----------------------------------------------------------------- schedule
    def enable(self) -> None:
        self.enabled_flag.fill_(True)

    def disable(self) -> None:
        """Pass-through mode (the trainer's phase 2): no measurement, no transfer."""
        self.enabled_flag.fill_(False)

    def set_epoch(self, epoch: int) -> str:
        """Move to ``epoch`` (0-based); sync ``W.requires_grad`` with the phase; return the phase."""
        _check_int(epoch, "epoch", 0)
        self.epoch_index.fill_(epoch)
        self.sync_requires_grad()
        return self.phase

    def on_epoch_end(self, epoch: int) -> str:
        """Call after epoch ``epoch`` (0-based) finished: moves to ``epoch + 1``; returns the new phase.

        The trainer freezes the CGC gates when this returns ``"frozen"``.
        """
        _check_int(epoch, "epoch", 0)
        return self.set_epoch(epoch + 1)

    def sync_requires_grad(self) -> None:
        """``W`` learns unless the phase is frozen."""
        self.transfer_logits.requires_grad_(self.phase != "frozen")

    def should_measure(self, step: int) -> bool:
        """True when enabled, in warmup or dynamic, and ``step % grad_interval == 0``."""
        _check_int(step, "step", 0)
        return self.enabled and self.phase != "frozen" and step % self.grad_interval == 0

    # ----------------------------------------------------------------- measure
    def attach(self, model: nn.Module) -> "AdaptiveTaskTransfer":
        """See :meth:`TaskAffinityComputer.attach`; returns ``self``."""
        self.affinity_computer.attach(model)
        return self

    def measure(self, task_losses: Tensor | Sequence[Tensor], present: Tensor | Sequence[bool] | None = None) -> Tensor:
        """Measure and fold into ``A`` when enabled and not frozen; return a copy of ``A``.

        Does not check ``grad_interval``: the trainer asks :meth:`should_measure` first.
        """
        if self.enabled and self.phase != "frozen":
            return self.affinity_computer.measure(task_losses, present)
        return self.affinity

    # ----------------------------------------------------------------- select
    def transfer_weights(self, present: Tensor | Sequence[bool] | None = None) -> Tensor:
        """Transfer weights ``w`` ``[n, n]`` (row ``i`` receives from column ``j``); see module doc.

        Differentiable in ``W`` except in the frozen phase (then ``W`` is detached). The
        result is also stored (detached) for :attr:`transfer_matrix`.
        """
        n = self.n_tasks
        affinity = self.affinity_computer.affinity
        mask = as_presence(present, n, affinity.device)
        logits_w = self.transfer_logits.detach() if self.phase == "frozen" else self.transfer_logits
        mixed = logits_w + affinity
        if bool(self.prior_configured):
            r = self.blend_ratio
            mixed = mixed * (1.0 - r) + self.prior * r
        scores = mixed / self.temperature
        blocked = torch.eye(n, dtype=torch.bool, device=affinity.device) | (affinity < self.negative_threshold)
        if self.blocking == "exact":
            # -inf gives exp(-inf) = 0 exactly; a fully blocked row would be all -inf (NaN
            # after softmax), so its scores are reset to 0 and the row is zeroed afterwards.
            scores = scores.masked_fill(blocked, float("-inf"))
            scores = scores.masked_fill(blocked.all(dim=1, keepdim=True), 0.0)
            weights = torch.softmax(scores, dim=1).masked_fill(blocked, 0.0)
        else:
            weights = torch.softmax(scores.masked_fill(blocked, 0.0), dim=1)
        keep = mask[:, None] & mask[None, :]
        weights = weights * keep.to(weights.dtype)
        self.last_transfer_weights.copy_(weights.detach())
        return weights

    def detect_negative_transfer(self) -> dict[str, list[str]]:
        """``{task: [peers j with A_ij < tau]}``, only tasks with at least one such peer."""
        affinity = self.affinity_computer.affinity
        below = (affinity < self.negative_threshold) & ~torch.eye(self.n_tasks, dtype=torch.bool, device=affinity.device)
        out: dict[str, list[str]] = {}
        for i, task in enumerate(self.task_names):
            peers = [self.task_names[j] for j in below[i].nonzero().flatten().tolist()]
            if peers:
                out[task] = peers
        return out

    # ----------------------------------------------------------------- regulate
    def compute_transfer_loss(
        self,
        task_losses: Tensor | Sequence[Tensor],
        task_gradients: Tensor | None = None,
        present: Tensor | Sequence[bool] | None = None,
    ) -> Tensor:
        """Transfer-enhanced losses ``[n]`` (see module doc for the formula and phases).

        Args:
            task_losses: ``[n]`` per-task losses, graph attached.
            task_gradients: optional ``[n, d]`` per-task gradients; folded into ``A`` when
                the module is enabled and the phase measures (warmup, dynamic).
            present: bool ``[n]``, False for tasks without targets in the batch. Their
                losses never enter a peer's transfer term (even when NaN) and are returned
                unchanged.
        """
        losses = as_loss_vector(task_losses, self.n_tasks)
        if not self.enabled:
            return losses
        mask = as_presence(present, self.n_tasks, losses.device)
        phase = self.phase
        if task_gradients is not None and phase != "frozen":
            self.affinity_computer.update(task_gradients, mask)
        if phase == "warmup":
            return losses
        weights = self.transfer_weights(mask).to(device=losses.device, dtype=losses.dtype)
        # sum over j != i (the diagonal is already 0 unless blocking="zero_logit")
        weights = weights.masked_fill(torch.eye(self.n_tasks, dtype=torch.bool, device=losses.device), 0.0)
        peer_losses = torch.where(mask, losses, torch.zeros_like(losses))
        transfer = self.transfer_lambda * (weights @ peer_losses)
        cap = self.max_transfer_ratio * losses.detach()
        enhanced = losses + torch.minimum(transfer, cap)
        return torch.where(mask, enhanced, losses)

    @torch.no_grad()
    def effective_task_weights(
        self, task_losses: Tensor | Sequence[Tensor], present: Tensor | Sequence[bool] | None = None
    ) -> Tensor:
        """Weight ``c_j`` ``[n]`` with which each task loss enters the summed transfer-enhanced loss.

        Summing the transfer-enhanced losses over the tasks gives, up to terms that carry no
        gradient (the capped rows' :math:`\\rho_{\\max} \\operatorname{sg}(L_i)`),

        .. math::

            \\sum_i L_i^{\\text{adaTT}} = \\sum_j c_j L_j + \\text{const}, \\qquad
            c_j = 1 + \\lambda \\sum_{i \\ne j,\\ i \\in \\mathcal U} w_{ij},

        with :math:`\\mathcal U` the present rows whose cap does not bind
        (:math:`\\lambda \\sum_k w_{ik} L_k < \\rho_{\\max} L_i`; a row exactly at its cap
        counts one half, as ``torch.minimum`` splits the gradient of a tie). So the shared
        parameters receive :math:`\\sum_j c_j \\nabla L_j`: adaTT rescales each task's own
        gradient, with :math:`1 \\le c_j \\le 1 + \\lambda (n - 1)`; it never hands one task
        another's gradient direction. ``c_j`` is the column sum of the uncapped rows of
        :math:`\\lambda w`, plus 1 (appendix A.5).

        An absent task keeps weight 1 (its loss passes through unchanged) and lends nothing
        (its column of ``w`` is 0). When the module is disabled or in warmup every weight is 1.
        The result equals the Jacobian :math:`\\partial \\sum_i L_i^{\\text{adaTT}} / \\partial L_j`
        at these losses and the current ``W``, ``A`` and epoch; it does not update
        :attr:`transfer_matrix`.

        Args:
            task_losses: ``[n]`` per-task losses (already balancer-weighted, as fed to
                :meth:`compute_transfer_loss`); absent entries may be NaN.
            present: bool ``[n]``, False for tasks without targets; ``None`` means all present.
        """
        losses = as_loss_vector(task_losses, self.n_tasks).detach()
        ones = torch.ones_like(losses)
        if not self.enabled or self.phase == "warmup":
            return ones
        mask = as_presence(present, self.n_tasks, losses.device)
        stored = self.last_transfer_weights.clone()  # transfer_weights overwrites it; keep the plots' copy
        weights = self.transfer_weights(mask).detach().to(device=losses.device, dtype=losses.dtype)
        self.last_transfer_weights.copy_(stored)
        weights = weights.masked_fill(torch.eye(self.n_tasks, dtype=torch.bool, device=losses.device), 0.0)
        peer_losses = torch.where(mask, losses, torch.zeros_like(losses))
        transfer = self.transfer_lambda * (weights @ peer_losses)
        cap = self.max_transfer_ratio * losses
        # d min(t, c)/dt as torch.minimum computes it: 1 below the cap, 1/2 at a tie, 0 above
        open_rows = torch.where(transfer < cap, ones, torch.where(transfer == cap, 0.5 * ones, 0.0 * ones))
        open_rows = torch.where(mask, open_rows, torch.zeros_like(open_rows))
        return ones + self.transfer_lambda * (open_rows[:, None] * weights).sum(dim=0)

    def forward(
        self,
        task_losses: Tensor | Sequence[Tensor],
        task_gradients: Tensor | None = None,
        present: Tensor | Sequence[bool] | None = None,
    ) -> Tensor:
        """Same as :meth:`compute_transfer_loss`."""
        return self.compute_transfer_loss(task_losses, task_gradients, present)
