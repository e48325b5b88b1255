r"""The interface every multi-task model in mtlbook shares.

A model with tasks :math:`k = 1, \dots, K` computes per-task features :math:`f_k(x)` from
shared and (for CGC/PLE) task-specific experts, then per-task towers
:math:`y_k = h_k(f_k(x))`. ``forward(x)`` returns ``{task_name: y_k}`` of raw outputs.

What the rest of the package relies on (adaTT, the trainer, the plots):

* ``task_names`` / ``task_specs``: the tasks, in the order every per-task stack uses.
* ``shared_experts``: a flat ``nn.ModuleList`` of every shared expert (all levels), and
  ``shared_parameters()``: exactly their parameters, :math:`\theta_s`. Task experts,
  gates and towers are excluded: they serve one task, so per-task gradients on them
  cannot conflict.
* ``gate_parameters()``, ``task_parameters()``: the gates' parameters, and the rest
  (task experts and towers). The three lists partition ``parameters()``.
* After a forward pass: ``gate_weights`` (detached ``[batch, m]`` tensors keyed
  ``"level{l}/{task}"`` or ``"level{l}/shared"``), ``gate_expert_names`` (the expert labels
  of each gate, for plot axes), ``shared_outputs`` (the last level's shared-expert outputs,
  *not* detached, so :math:`\partial L_k / \partial E_i(x)` is one cheap
  ``autograd.grad`` away; each is exactly the output of the matching
  ``last_shared_layers()`` module) and ``gate_entropy()``.
* ``last_shared_layers()``: the final ``nn.Linear`` of each last-level shared expert.
* ``freeze_gates(flag)``: a registered bool buffer ``gates_frozen`` plus
  ``requires_grad`` on the gate parameters; loading a ``state_dict`` re-applies the flag.
* ``experts_mode``: ``"bank"`` (default: modules of one shape computed as one batched matmul, see
  :mod:`mtlbook.models.banks`, with the task-owned layers stored stacked, see
  :mod:`mtlbook.models.bank_storage`) or ``"modules"`` (every expert, gate and tower called as
  its own module: the form chapter 3 teaches, and the one the book's stored experiments were
  made with). Outputs equal up to float rounding; either form
  loads the other's ``state_dict``. Set it with the constructor's ``experts=`` argument or
  :func:`~mtlbook.models.banks.to_bank`.

**Gate entropy.** With :math:`\tilde H_G` the batch-mean normalised entropy of gate
:math:`G` (see :mod:`mtlbook.models.gates`) and :math:`\mathcal G` the gates with at least
two experts,

.. math::

    H_\text{gate} = \frac{1}{|\mathcal G|} \sum_{G \in \mathcal G} \tilde H_G \in [0, 1],
    \qquad R = -\lambda_H \, H_\text{gate}.

``gate_entropy()`` returns :math:`H_\text{gate}` (differentiable; 0 for models without
gates); the trainer adds :math:`-\lambda_H H_\text{gate}` with its own weight
(``TrainerConfig.gate_entropy_weight``). ``gate_regularizer()`` returns :math:`R` with the
model's own ``gate_entropy_weight`` instead, for training loops without that setting: use
one of the two, not both. A positive :math:`\lambda_H` rewards gates that spread over their
experts (against expert collapse); a negative one rewards peaked gates. While the gates are
frozen the entropy is returned detached, so the term still logs but moves nothing (through
the gate inputs of higher PLE levels it would otherwise push the experts below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from mtlbook._data_checks import defer
from mtlbook.data.batch import TaskSpec
from mtlbook.models._validation import check_bool, check_finite_float, check_int, check_specs
from mtlbook.models.bank_storage import bank_parameters, convert_state_dict, store_in_banks
from mtlbook.models.banks import check_expert_mode, towers_forward
from mtlbook.models.experts import Expert
from mtlbook.models.gates import SoftmaxGate, normalized_entropy
from mtlbook.models.towers import TaskTower


@dataclass
class MixtureRecord:
    """One mixture level of the latest forward pass, for the *structured* per-task gradients
    (:func:`mtlbook.gradients.structured_gradients`). All tensors are live (graph kept).

    Attributes:
        shared_outputs: the level's shared-expert outputs :math:`S_s` ``[B, d]``.
        task_features: the task-private features :math:`F_k` the level hands upward (to the
            next level's task experts and gate, or to the tower): ``[K, B, d]`` or a list.
        task_gates: each task gate's weights ``[K, B, m]`` or a list of ``[B, m_k]``; column
            :math:`s < n_s` weighs :math:`S_s`.
        shared_feature: the shared gate's mixture :math:`f_s` (None without a shared gate).
        shared_input: :math:`u_s`, what the level's shared experts and shared gate read (the
            model input at the first level).
        shared_experts: the modules that computed ``shared_outputs``, one call each on
            ``shared_input`` (None where they ran stacked): lets the per-task backward through
            them be written out (:mod:`mtlbook.expert_vjp`).
        shared_gate: the shared gate's weights ``[B, n_s + n_t]`` (None without one); column
            :math:`s < n_s` weighs :math:`S_s` in :math:`f_s`.
    """

    shared_outputs: list[Tensor]
    task_features: Tensor | list[Tensor]
    task_gates: Tensor | list[Tensor]
    shared_feature: Tensor | None
    shared_input: Tensor | None
    shared_experts: list[nn.Module] | None = None
    shared_gate: Tensor | None = None


class _LastForward:
    """Tensors kept from the latest forward pass.

    They may carry a live autograd graph, which ``copy.deepcopy`` refuses to copy; a copy
    (or a pickle) of the model therefore starts with an empty record.
    """

    def __init__(self) -> None:
        self.gate_weights: dict[str, Tensor] = {}
        self.shared_outputs: list[Tensor] = []
        # mixture levels, bottom first; None for models (or modes) without that structure
        self.levels: list[MixtureRecord] | None = None

    def __deepcopy__(self, memo: dict) -> "_LastForward":
        return _LastForward()

    def __reduce__(self):
        return (_LastForward, ())


def _convert_before_load(module: "MultiTaskModel", state_dict: dict, prefix: str, *args: object) -> None:
    # load_state_dict pre hook: a checkpoint in the other storage (banks vs modules) is rewritten
    convert_state_dict(module, state_dict, prefix)


def _sync_after_load(module: nn.Module, incompatible_keys: object) -> None:
    # load_state_dict post hook: the buffer came from the checkpoint, requires_grad did not
    module.sync_gate_freeze()


class MultiTaskModel(nn.Module):
    """Base class: input checks, towers, parameter groups, gate bookkeeping.

    Subclasses build their experts and gates, call :meth:`_build_towers`, and implement
    :meth:`_task_features` (per-task feature tensors, recording gate weights and shared
    outputs) and :meth:`_last_shared_experts`, plus the ``shared_experts`` property.

    Args:
        n_features: input width (>= 1).
        task_specs: the tasks (non-empty sequence of :class:`~mtlbook.data.batch.TaskSpec`,
            unique names).
        gate_entropy_weight: :math:`\\lambda_H` used by :meth:`gate_regularizer` (any finite
            float; 0 disables).
        check_finite: reject inputs with NaN/inf (one reduction over ``x`` per forward; set
            False to skip it, e.g. on GPU where it forces a host sync).
        experts: forward path, ``"bank"`` (default: batched matmuls over modules of one
            shape; see :mod:`mtlbook.models.banks`) or ``"modules"`` (one call per module).
    """

    gates_frozen: Tensor

    def __init__(
        self,
        n_features: int,
        task_specs: Sequence[TaskSpec],
        *,
        gate_entropy_weight: float = 0.0,
        check_finite: bool = True,
        experts: str = "bank",
    ) -> None:
        super().__init__()
        self.experts_mode = check_expert_mode(experts)
        self.n_features = check_int(n_features, "n_features", 1)
        self.task_specs = check_specs(task_specs)
        self.task_names = tuple(s.name for s in self.task_specs)
        self.gate_entropy_weight = check_finite_float(gate_entropy_weight, "gate_entropy_weight")
        self.check_finite = check_bool(check_finite, "check_finite")
        self.register_buffer("gates_frozen", torch.zeros((), dtype=torch.bool))
        self.register_load_state_dict_pre_hook(_convert_before_load)
        self.register_load_state_dict_post_hook(_sync_after_load)
        self.gate_expert_names: dict[str, tuple[str, ...]] = {}
        self._last = _LastForward()

    # ----------------------------------------------------------------- construction
    def _build_towers(self, in_dims: Sequence[int], tower_hidden: Sequence[int], dropout: float) -> None:
        # a ModuleList in task order (not a ModuleDict) so any task name is allowed
        self.towers = nn.ModuleList(
            TaskTower.for_task(d, spec, tower_hidden, dropout) for d, spec in zip(in_dims, self.task_specs)
        )

    def _finish_build(self) -> None:
        """Called last by every subclass constructor: a bank model stores its task-owned
        layers in banks (:mod:`mtlbook.models.bank_storage`)."""
        if self.experts_mode == "bank":
            store_in_banks(self)

    # ----------------------------------------------------------------- forward
    def validate_input(self, x: Tensor) -> Tensor:
        """Check ``x`` is ``[batch, n_features]`` (and finite); cast it to the model's dtype."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor [batch, n_features], got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D [batch, n_features={self.n_features}], got shape {tuple(x.shape)}")
        if x.shape[1] != self.n_features:
            raise ValueError(f"x has the wrong width: expected n_features={self.n_features} columns, got {x.shape[1]}")
        if x.is_complex():
            raise TypeError(f"x must be real-valued, got dtype {x.dtype}")
        if self.check_finite:
            _refuse_non_finite(x)
        dtype = self.towers[0].head.weight.dtype
        return x if x.dtype == dtype else x.to(dtype)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x [batch, n_features] -> {task: raw output}`` (``[batch]`` or ``[batch, o_k]``)."""
        x = self.validate_input(x)
        record = _LastForward()
        if getattr(self, "experts_mode", "modules") == "bank":  # models pickled before banks have no mode
            features = self._task_features_bank(x, record)
            self._last = record
            return dict(zip(self.task_names, towers_forward(list(self.towers), features, self.training)))
        features = self._task_features(x, record)
        self._last = record
        return {name: tower(f) for name, tower, f in zip(self.task_names, self.towers, features)}

    def _task_features(self, x: Tensor, record: _LastForward) -> list[Tensor]:
        raise NotImplementedError

    def _task_features_bank(self, x: Tensor, record: _LastForward) -> list[Tensor] | Tensor:
        """Bank form of :meth:`_task_features`: a list ``[batch, d_k]`` or one ``[K, batch, d]``.

        The default falls back to the module form (the towers are still banked).
        """
        return self._task_features(x, record)

    # ----------------------------------------------------------------- parameter groups
    @property
    def shared_experts(self) -> nn.ModuleList:
        """Every shared expert module, flat (all levels)."""
        raise NotImplementedError

    def _last_shared_experts(self) -> Sequence[Expert]:
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared experts' parameters (:math:`\\theta_s`), in ``shared_experts`` order."""
        return [p for expert in self.shared_experts for p in expert.parameters()]

    def gate_parameters(self) -> list[nn.Parameter]:
        """Every gate's parameters (empty for models without gates)."""
        own = [p for m in self.modules() if isinstance(m, SoftmaxGate) for p in m.parameters()]
        return own + bank_parameters(self, "gate")

    def task_parameters(self) -> list[nn.Parameter]:
        """Everything that is neither shared-expert nor gate: task experts and towers."""
        taken = {id(p) for p in self.shared_parameters()} | {id(p) for p in self.gate_parameters()}
        return [p for p in self.parameters() if id(p) not in taken]

    def last_shared_layers(self) -> list[nn.Linear]:
        """The final ``nn.Linear`` of each shared expert in the last level."""
        return [expert.output_layer for expert in self._last_shared_experts()]

    def tower(self, name: str) -> TaskTower:
        """The tower of task ``name``."""
        if name not in self.task_names:
            raise KeyError(f"unknown task {name!r}; tasks are {list(self.task_names)}")
        return self.towers[self.task_names.index(name)]

    # ----------------------------------------------------------------- last forward
    @property
    def gate_weights(self) -> dict[str, Tensor]:
        """Detached gate weights ``[batch, m]`` from the last forward pass (empty before one)."""
        return {key: w.detach() for key, w in self._last.gate_weights.items()}

    @property
    def mixture_levels(self) -> list[MixtureRecord] | None:
        """The mixture levels of the last forward pass (live graph), bottom first, or None
        when the model does not record them (Shared-Bottom, block attention, PLE with three
        or more levels, whose lower task features are not task-private)."""
        return self._last.levels

    def shared_parameters_by_level(self) -> list[list[nn.Parameter]]:
        """:meth:`shared_parameters` split by mixture level (one level by default)."""
        return [self.shared_parameters()]

    @property
    def shared_outputs(self) -> list[Tensor]:
        """The last level's shared-expert outputs from the last forward pass (live graph)."""
        return list(self._last.shared_outputs)

    def gate_entropy(self) -> Tensor:
        """Mean normalised gate entropy ``H_gate`` in [0, 1] of the last forward pass (0-dim tensor).

        0 for models without gates (or gates of one expert) and before any forward pass;
        detached while the gates are frozen.
        """
        values = [normalized_entropy(w) for w in self._last.gate_weights.values() if w.shape[-1] > 1]
        if not values:
            return torch.zeros((), device=self.towers[0].head.weight.device)
        mean_entropy = torch.stack(values).mean()
        return mean_entropy.detach() if bool(self.gates_frozen) else mean_entropy

    def gate_regularizer(self) -> Tensor:
        """``-gate_entropy_weight * gate_entropy()``: the loss term with the model's own weight."""
        if self.gate_entropy_weight == 0.0:
            return torch.zeros((), device=self.towers[0].head.weight.device)
        return -self.gate_entropy_weight * self.gate_entropy()

    # ----------------------------------------------------------------- freezing
    def freeze_gates(self, flag: bool = True) -> None:
        """Freeze (True) or unfreeze (False) every gate; the flag is saved in ``state_dict``."""
        check_bool(flag, "flag")
        self.gates_frozen.fill_(flag)
        self.sync_gate_freeze()

    def sync_gate_freeze(self) -> None:
        """Set ``requires_grad`` of the gate parameters from the ``gates_frozen`` buffer."""
        trainable = not bool(self.gates_frozen)
        for p in self.gate_parameters():
            p.requires_grad_(trainable)


def _refuse_non_finite(x: Tensor) -> None:
    # the answer depends on the data: under the trainer's compiled stage 1 the flag is handed
    # over (mtlbook._data_checks), elsewhere checked at once
    failed = ~torch.isfinite(x).all()
    if not defer(failed):
        _raise_non_finite(failed)


@torch.compiler.disable  # outside a compiled stage 1: eagerly, between graphs, without a warning
def _raise_non_finite(failed: Tensor) -> None:
    if bool(failed):
        raise ValueError("x contains NaN or inf values; clean the features (or pass check_finite=False to skip this check)")
