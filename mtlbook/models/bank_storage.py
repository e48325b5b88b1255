r"""Bank storage: the task-owned affine maps of one shape kept as one stacked Parameter.

:mod:`mtlbook.models.banks` computes :math:`n` experts (gates, towers) of one shape with one
batched matmul, but in the module form their weights live in :math:`n` separate Parameters,
so every step first stacks them (a copy forward, a split backward) and the optimizer walks
:math:`n` small tensors. A model built with ``experts="bank"`` instead *stores* each such
layer once, stacked:

.. math::

    \mathbf A = \big[A^{(1)\top}; \dots; A^{(n)\top}\big] \in \mathbb{R}^{n \times d_\text{in} \times d_\text{out}},
    \qquad \mathbf a \in \mathbb{R}^{n \times 1 \times d_\text{out}},

the layout ``torch.baddbmm`` reads (:class:`LinearBank`). The bank's forward then uses
:math:`\mathbf A` as it is (no copy), its gradient lands in one tensor, and AdamW updates
one tensor per layer instead of :math:`n`.

**What is stored in banks** (:func:`bank_plan`): the task experts of each PLE/CGC level
(grouped by shape, one bank per layer), the task gates of a level (or MMoE's gates), and
the towers (grouped by shape, one bank per layer). **Not** the shared experts: each keeps
its own Parameters, because the trainer gives every shared expert its own optimizer group
(per-expert learning rate and weight decay), adaTT's affinity is defined on exactly those
Parameters, and ``last_shared_layers()`` hooks their output layers. A PLE/CGC level has few
shared experts, and the bank form calls them one module at a time (MMoE, whose experts are
all shared, stacks their weights in the forward pass). Nor the shared gate (one per level).

**The modules stay.** Every ``nn.Linear`` whose weights moved into a bank becomes a
:class:`BankedLinear`: the same module, whose ``weight`` and ``bias`` are views of its row
of the bank (``bank.weight[i].T``, ``bank.bias[i, 0]``). So ``model.towers[k]``,
``levels[l].task_experts[k][j]`` and the module-by-module forward still work, and
gradients through a view reach the bank. Such a module owns no Parameters, so one task's
layer cannot be frozen on its own (``requires_grad`` belongs to the whole bank): build the
model with ``experts="modules"`` for that.

**state_dict.** A bank model's ``state_dict`` holds ``banks.<name>.weight`` ``[n, d_in,
d_out]`` and ``banks.<name>.bias`` ``[n, 1, d_out]`` in place of the members'
``<member>.weight`` ``[d_out, d_in]`` / ``<member>.bias`` ``[d_out]`` keys; ``<name>`` is
``level{l}_task_experts_s{g}_layer{j}`` (shape group :math:`g`), ``level{l}_task_gates_s{g}``,
``gates_s{g}`` (MMoE) or ``towers_s{g}_layer{j}``. :func:`convert_state_dict` maps either
layout to the other, and every model runs it when it loads a ``state_dict``, so a
module-form checkpoint loads into a bank model and back (a checkpoint of another
architecture still fails with PyTorch's missing/unexpected-key message).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from mtlbook.models.base import MultiTaskModel

BANK_ROLES = ("expert", "gate", "tower")


class LinearBank(nn.Module):
    """``n`` affine maps ``d_in -> d_out`` stored stacked: ``weight [n, d_in, d_out]``, ``bias [n, 1, d_out]``.

    Args:
        weight: the initial stacked weights (copied), ``[n, d_in, d_out]``.
        bias: the initial stacked biases ``[n, 1, d_out]``, or None for maps without bias.
        role: ``"expert"``, ``"gate"`` or ``"tower"`` (gate banks count as gate parameters).
        members: the qualified module names of the ``n`` ``nn.Linear`` it replaces, in row order.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, role: str, members: Sequence[str]) -> None:
        super().__init__()
        if role not in BANK_ROLES:
            raise ValueError(f"role must be one of {BANK_ROLES}, got {role!r}")
        if weight.dim() != 3 or len(members) != weight.shape[0]:
            raise ValueError(f"weight must be [n={len(members)}, d_in, d_out], got shape {tuple(weight.shape)}")
        self.role = role
        self.members = tuple(members)
        self.weight = nn.Parameter(weight.detach().clone().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().reshape(weight.shape[0], 1, -1))

    def extra_repr(self) -> str:
        n, d_in, d_out = self.weight.shape
        return f"role={self.role}, n={n}, in_features={d_in}, out_features={d_out}, bias={self.bias is not None}"


class BankedLinear(nn.Linear):
    """An ``nn.Linear`` whose ``weight``/``bias`` are views of row ``row`` of a :class:`LinearBank`.

    Made from an existing ``nn.Linear`` by :func:`store_in_banks` (never constructed
    directly); it owns no Parameters. The bank is referenced, not registered, so it appears
    once in ``parameters()`` and ``state_dict`` (under ``banks``).
    """

    _bank: LinearBank
    _row: int

    @property  # type: ignore[override]
    def weight(self) -> Tensor:
        return self._bank.weight[self._row].t()

    @property  # type: ignore[override]
    def bias(self) -> Tensor | None:
        bias = self._bank.bias
        return None if bias is None else bias[self._row, 0]


def bank_rows(layers: Sequence[nn.Linear]) -> LinearBank | None:
    """The bank whose rows are exactly ``layers`` in order, or None (then the caller stacks)."""
    if not layers or not all(isinstance(layer, BankedLinear) for layer in layers):
        return None
    bank = layers[0]._bank  # type: ignore[union-attr]
    if len(layers) != bank.weight.shape[0]:
        return None
    if any(layer._bank is not bank or layer._row != i for i, layer in enumerate(layers)):  # type: ignore[union-attr]
        return None
    return bank


# --------------------------------------------------------------------------- the plan
class BankSpec(NamedTuple):
    """One bank of a model: its name under ``banks``, its role, and the linears it replaces."""

    name: str
    role: str
    members: tuple[nn.Linear, ...]


def _mlp_linears(body: nn.Sequential, last: nn.Linear) -> list[nn.Linear]:
    return [m for m in body if isinstance(m, nn.Linear)] + [last]


def _layer_banks(prefix: str, role: str, mlps: Sequence[list[nn.Linear]], groups: list[list[int]]) -> Iterator[BankSpec]:
    for g, idx in enumerate(groups):
        for j in range(len(mlps[idx[0]])):
            yield BankSpec(f"{prefix}_s{g}_layer{j}", role, tuple(mlps[i][j] for i in idx))


def bank_plan(model: "MultiTaskModel") -> list[BankSpec]:
    """The banks a model in bank storage has, derived from its modules (either form).

    Groups are those the bank forward batches (:mod:`mtlbook.models.banks`): task experts
    of one level by shape, task gates of one level by ``(in_dim, n_experts)``, towers by
    shape; each bank has at least two members.
    """
    from mtlbook.models.banks import _expert_shape, _tower_shape, group_by

    plan: list[BankSpec] = []
    for l, level in enumerate(getattr(model, "levels", ())):
        experts = [e for per_task in level.task_experts for e in per_task]
        groups = group_by(experts, lambda e: _expert_shape(e).key)
        mlps = [_mlp_linears(e.body, e.output_layer) for e in experts]
        plan.extend(_layer_banks(f"level{l}_task_experts", "expert", mlps, groups))
        gates = list(level.task_gates)
        for g, idx in enumerate(group_by(gates, lambda gate: (gate.in_dim, gate.n_experts))):
            plan.append(BankSpec(f"level{l}_task_gates_s{g}", "gate", tuple(gates[i].linear for i in idx)))
    if hasattr(model, "gates") and isinstance(model.gates, nn.ModuleList):  # MMoE: one gate per task
        gates = list(model.gates)
        for g, idx in enumerate(group_by(gates, lambda gate: (gate.in_dim, gate.n_experts))):
            plan.append(BankSpec(f"gates_s{g}", "gate", tuple(gates[i].linear for i in idx)))
    towers = list(model.towers)
    groups = group_by(towers, lambda t: (t.in_dim, _tower_shape(t).key))
    plan.extend(_layer_banks("towers", "tower", [_mlp_linears(t.body, t.head) for t in towers], groups))
    return [spec for spec in plan if len(spec.members) >= 2]


def _qualified_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


# --------------------------------------------------------------------------- switching storage
def store_in_banks(model: "MultiTaskModel") -> None:
    """Move the weights of every :func:`bank_plan` group into a :class:`LinearBank` (in place).

    The values are unchanged; afterwards ``model.banks`` holds the banks and each member is
    a :class:`BankedLinear`. A model already in bank storage is left as it is.
    """
    if "banks" in model._modules:
        return
    names = _qualified_names(model)
    banks = nn.ModuleDict()
    for spec in bank_plan(model):
        layers = spec.members
        weight = torch.stack([layer.weight.detach().t() for layer in layers])
        bias = None if layers[0].bias is None else torch.stack([layer.bias.detach() for layer in layers]).unsqueeze(1)
        bank = LinearBank(weight, bias, spec.role, [names[id(layer)] for layer in layers])
        banks[spec.name] = bank
        for row, layer in enumerate(layers):
            del layer._parameters["weight"]
            del layer._parameters["bias"]
            layer.__class__ = BankedLinear
            # referenced, not registered: the bank is a module of model.banks only
            object.__setattr__(layer, "_bank", bank)
            object.__setattr__(layer, "_row", row)
    model.banks = banks


def store_in_modules(model: "MultiTaskModel") -> None:
    """Give every :class:`BankedLinear` its own Parameters again and drop ``model.banks`` (in place)."""
    if "banks" not in model._modules:
        return
    for layer in list(model.modules()):
        if isinstance(layer, BankedLinear):
            weight, bias = layer.weight.detach().clone(), layer.bias
            bias = None if bias is None else bias.detach().clone()
            requires_grad = layer._bank.weight.requires_grad
            object.__delattr__(layer, "_bank")
            object.__delattr__(layer, "_row")
            layer.__class__ = nn.Linear
            layer.weight = nn.Parameter(weight.contiguous(), requires_grad=requires_grad)
            layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=requires_grad)
    del model.banks


def bank_parameters(model: nn.Module, role: str) -> list[nn.Parameter]:
    """The Parameters of ``model``'s banks of one role (empty for a model in module storage)."""
    banks = model._modules.get("banks")
    if banks is None:
        return []
    return [p for bank in banks.values() if bank.role == role for p in bank.parameters()]


# --------------------------------------------------------------------------- checkpoints
def convert_state_dict(model: "MultiTaskModel", state_dict: dict[str, Tensor], prefix: str = "") -> None:
    """Rewrite ``state_dict`` (in place) to ``model``'s storage: bank keys to member keys or back.

    Only complete groups are converted (every member key present, or the bank's keys), so a
    checkpoint of another architecture is left for ``load_state_dict`` to report.
    """
    banked = "banks" in model._modules
    names = _qualified_names(model)
    for spec in bank_plan(model):
        bank_key = f"{prefix}banks.{spec.name}."
        member_keys = [f"{prefix}{names[id(layer)]}." for layer in spec.members]
        has_bias = spec.members[0].bias is not None
        fields = ("weight", "bias") if has_bias else ("weight",)
        if banked and all(m + f in state_dict for m in member_keys for f in fields) and bank_key + "weight" not in state_dict:
            state_dict[bank_key + "weight"] = torch.stack([state_dict.pop(m + "weight").t() for m in member_keys])
            if has_bias:
                state_dict[bank_key + "bias"] = torch.stack([state_dict.pop(m + "bias") for m in member_keys]).unsqueeze(1)
        elif not banked and all(bank_key + f in state_dict for f in fields):
            weight = state_dict.pop(bank_key + "weight")
            if weight.dim() != 3 or weight.shape[0] != len(member_keys):
                raise RuntimeError(
                    f"{bank_key}weight has shape {tuple(weight.shape)}, expected [{len(member_keys)}, d_in, d_out]"
                )
            for i, m in enumerate(member_keys):
                state_dict[m + "weight"] = weight[i].t().contiguous()
            if has_bias:
                bias = state_dict.pop(bank_key + "bias")
                for i, m in enumerate(member_keys):
                    state_dict[m + "bias"] = bias[i, 0].clone()
