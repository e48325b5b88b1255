r"""Banks: experts, gates and towers of one shape computed as one batched matmul (the default path).

A model built with ``experts="bank"`` (the default) computes the same function as the
module-per-expert form (``experts="modules"``) for the same weights; only its forward pass and
where the weights are stored differ. Instead of calling :math:`n` small ``nn.Linear``
modules one by one, a bank runs one batched matmul over the :math:`n` weight matrices of one
layer, and the task-owned layers keep those matrices stacked (:mod:`mtlbook.models.bank_storage`).

**Math.** Take :math:`n` experts of one shape, layer :math:`j` with weights
:math:`A^{(i)}_j \in \mathbb{R}^{d_\text{out} \times d_\text{in}}` and biases
:math:`a^{(i)}_j`. Stacked,

.. math::

    \mathbf A_j = \big[A^{(1)\top}_j; \dots; A^{(n)\top}_j\big] \in \mathbb{R}^{n \times d_\text{in} \times d_\text{out}},
    \qquad
    \mathbf Z_j = \sigma\big(\mathbf Z_{j-1} \mathbf A_j + \mathbf a_j\big) \in \mathbb{R}^{n \times B \times d_\text{out}},

one batched matmul per layer (``torch.baddbmm``; for maps with a few outputs, gates and task
heads, the transposed products of :mod:`mtlbook.models.narrow_affine`), where row block
:math:`i` of :math:`\mathbf Z_0` is expert
:math:`i`'s input (``[n, B, d_in]``), or one ``x [B, d_in]`` broadcast to every expert
(``torch.matmul`` broadcasting, no copy). Block :math:`i` of the result is
:math:`E_i(x_i)`, the same function the module form computes; only the floating-point
summation order of the matmul kernel may differ (about 1e-7 relative in float32).

A mixture of one level's experts by the gates of all :math:`K` tasks is then :math:`m`
multiply-adds over task-major tensors: with all experts of the level stacked as
:math:`\mathbf E \in \mathbb{R}^{n_e \times B \times d}`, gate weights :math:`\mathbf G \in
\mathbb{R}^{K \times B \times m}` and the index :math:`I \in \{1..n_e\}^{K \times m}` of each
gate's experts,

.. math::

    f_k = \sum_{i=1}^{m} \mathbf G_{k,:,i} \odot \mathbf E_{I_{k,i}},

each term one broadcast product over ``[K, B, d]`` (the shared experts' rows are the same
for every :math:`k`; task :math:`k`'s own experts are row block :math:`k` of the task-major
stack, so no gather is needed). Written as one ``einsum`` the contraction over
:math:`m = 2..4` experts would run as :math:`B` tiny matmuls on CPU, several times slower.

**Tensor layout.** Banks are expert-major: ``[n, batch, width]`` (for towers, ``[K, batch,
width]``, task-major like everything else in the package).

**Parameters and ``state_dict``.** The weights a bank multiplies come from one of two places:

* layers in *bank storage* (task experts, task gates, towers of a bank model; see
  :mod:`mtlbook.models.bank_storage`) are one stacked Parameter already, used as it is:
  no copy, one gradient tensor, one tensor for the optimizer;
* every other group (MMoE's experts, which keep their own Parameters for the trainer's
  one optimizer group per shared expert and for adaTT's parameter set; or a module-form
  model's layers) is stacked inside the forward pass (``torch.stack``, whose backward
  splits the gradient back onto each Parameter): a copy of a few kB per layer and step.
  A PLE/CGC level's shared experts (one or two) are called one module at a time instead:
  stacking so few saves nothing, and adaTT's per-task backward through them
  (:func:`mtlbook.gradients.structured_gradients`) can then be written out
  (:mod:`mtlbook.expert_vjp`, which recomputes each expert as a module call and needs the
  recorded output to match it bit for bit).

``shared_parameters()``, ``freeze_gates``, ``shared_experts`` and ``last_shared_layers()``
are those of the module form; ``gate_parameters()`` and ``task_parameters()`` hold the same
numbers in fewer tensors; a checkpoint of either form loads into the other
(:func:`~mtlbook.models.bank_storage.convert_state_dict`). :func:`to_bank` /
:func:`from_bank` copy a model into the other form.

**Hooks.** The bank does not call the ``nn.Linear`` modules it reads, so their hooks would not
fire. Forward hooks of an expert's ``output_layer`` (what adaTT's ``last_layer`` mode
registers via ``last_shared_layers()``) are replayed with that expert's slice: input
:math:`z_J^{(i)}` and output :math:`u^{(i)} = z_J^{(i)} B^{(i)\top} + b^{(i)}`, and the
model's mixture reads exactly those slices, so :math:`\partial L / \partial u^{(i)}` is
defined as in the module form. Other hooks (forward pre-hooks, hooks on hidden layers, gates
or towers) are not replayed; use ``experts="modules"`` for code that needs them.

**Dropout** is applied to the stacked hidden activations with each module's probability and
the model's ``training`` flag: same distribution, different random draws than the module
form, so the two forms agree exactly only in eval mode (or with ``dropout=0``).
"""

from __future__ import annotations

import copy
from typing import Callable, Hashable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlbook.models.bank_storage import bank_rows, store_in_banks, store_in_modules
from mtlbook.models.experts import Expert
from mtlbook.models.gates import SoftmaxGate
from mtlbook.models.narrow_affine import bank_affine
from mtlbook.models.towers import TaskTower

EXPERT_MODES = ("modules", "bank")

T = TypeVar("T")


def check_expert_mode(value: object) -> str:
    """Return ``value`` if it names a forward path: ``"bank"`` (default) or ``"modules"``."""
    if not isinstance(value, str):
        raise TypeError(f"experts must be one of {EXPERT_MODES} (a str), got {type(value).__name__} {value!r}")
    if value not in EXPERT_MODES:
        raise ValueError(f"experts must be one of {EXPERT_MODES}, got {value!r}")
    return value


# --------------------------------------------------------------------------- MLP structure
class _MLPShape:
    """The layers of an ``Expert`` or ``TaskTower``: Linears, the hidden activation, dropout."""

    def __init__(self, body: nn.Sequential, last: nn.Linear, output_activation: nn.Module | None) -> None:
        self.linears: list[nn.Linear] = [m for m in body if isinstance(m, nn.Linear)] + [last]
        acts = [m for m in body if not isinstance(m, (nn.Linear, nn.Dropout))]
        drops = [m for m in body if isinstance(m, nn.Dropout)]
        self.activation: nn.Module | None = acts[0] if acts else None
        self.dropout = float(drops[0].p) if drops else 0.0
        self.output_activation = output_activation
        self.key: Hashable = (
            tuple((lin.in_features, lin.out_features, lin.bias is not None) for lin in self.linears),
            type(self.activation).__name__,
            self.dropout,
            type(output_activation).__name__,
        )


def _cached_shape(module: nn.Module, make: Callable[[], _MLPShape]) -> _MLPShape:
    # the layer structure is fixed once a module is built; reading it every forward (a few
    # hundred attribute lookups at 16 tasks) costs more than the small matmuls it batches
    shape = module.__dict__.get("_mlp_shape")
    if shape is None:
        shape = module.__dict__["_mlp_shape"] = make()
    return shape


def _expert_shape(expert: Expert) -> _MLPShape:
    return _cached_shape(expert, lambda: _MLPShape(expert.body, expert.output_layer, expert.output_activation))


def _tower_shape(tower: TaskTower) -> _MLPShape:
    return _cached_shape(tower, lambda: _MLPShape(tower.body, tower.head, None))


def group_by(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[int]]:
    """Indices of ``items`` grouped by ``key`` (groups in order of first appearance)."""
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; makes the incoming gradient contiguous in backward."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


def _contiguous_grad(tensor: Tensor) -> Tensor:
    return _ContiguousGrad.apply(tensor) if tensor.requires_grad else tensor


def stack_weights(layers: Sequence[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """The ``n`` layers' weights as one contiguous ``[n, d_in, d_out]`` tensor and biases ``[n, 1, d_out]``.

    The stack's backward hands each Parameter its slice of the gradient, so the layers keep
    their own Parameters (and optimizer groups).
    """
    bank = bank_rows(layers)
    if bank is not None:  # bank storage: the stacked Parameters themselves, no copy
        return bank.weight, bank.bias
    # contiguous [n, d_in, d_out] (CPU bmm on a transposed view is slower), and a contiguous
    # gradient into the stack's backward (a transposed one makes its split onto the n
    # Parameters an order of magnitude slower)
    weight_t = _contiguous_grad(torch.stack([layer.weight for layer in layers])).transpose(1, 2).contiguous()
    if layers[0].bias is None:
        return weight_t, None
    return weight_t, torch.stack([layer.bias for layer in layers]).unsqueeze(1)


def stacked_linear(x: Tensor, layers: Sequence[nn.Linear]) -> Tensor:
    r"""``n`` affine maps in one batched matmul: ``y[i] = x[i] @ W_i^T + b_i``.

    Args:
        x: ``[n, batch, d_in]`` (one input per layer) or ``[batch, d_in]`` (one input for all).
        layers: ``n`` ``nn.Linear`` of the same shape ``d_in -> d_out``.

    Returns:
        ``[n, batch, d_out]``.
    """
    weight_t, bias = stack_weights(layers)
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(len(layers), *x.shape)  # one input for all: a stride-0 view
    return bank_affine(x, weight_t, bias)


def _replay_forward_hooks(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    for hook in list(layer._forward_hooks.values()):
        hook(layer, inputs, output)


def _mlp_bank(x: Tensor, shapes: Sequence[_MLPShape], training: bool) -> tuple[Tensor, Tensor]:
    """Hidden stack and last affine map of ``len(shapes)`` MLPs of one shape; returns ``(z_J, u)``."""
    first = shapes[0]
    z = x
    depth = len(first.linears)
    for j in range(depth - 1):
        z = stacked_linear(z, [s.linears[j] for s in shapes])
        if first.activation is not None:
            z = first.activation(z)
        if first.dropout > 0:
            z = F.dropout(z, first.dropout, training)
    if z.dim() == 2:  # no hidden layer and a broadcast input
        z = z.unsqueeze(0).expand(len(shapes), *z.shape)
    return z, stacked_linear(z, [s.linears[-1] for s in shapes])


class ExpertBank:
    """``n`` ``Expert`` modules of one shape evaluated together.

    Not an ``nn.Module``: it owns no parameters (see the module docstring), so it never
    appears in ``parameters()`` or ``state_dict``.

    ``bank(x, training)`` takes ``x [batch, d_in]`` (every expert reads it) or
    ``[n, batch, d_in]`` and returns the ``n`` outputs ``[batch, d_out]`` as a list, each the
    exact tensor the output layer's replayed forward hooks saw (identity output activation)
    or that tensor after the expert's output activation.
    """

    def __init__(self, experts: Sequence[Expert]) -> None:
        if not experts:
            raise ValueError("an ExpertBank needs at least one expert")
        self.experts = list(experts)
        self.shapes = [_expert_shape(e) for e in self.experts]
        if len({s.key for s in self.shapes}) != 1:
            raise ValueError("every expert of an ExpertBank must have the same shape (widths, activation, dropout)")

    def __len__(self) -> int:
        return len(self.experts)

    def stacked(self, x: Tensor, training: bool) -> Tensor:
        """The ``n`` outputs as one ``[n, batch, d_out]`` tensor (no hook replay: see :attr:`hooked`)."""
        u = _mlp_bank(x, self.shapes, training)[1]
        activation = self.experts[0].output_activation  # one shape: one output activation
        return u if isinstance(activation, nn.Identity) else activation(u)

    @property
    def hooked(self) -> bool:
        """Whether an expert's output layer has forward hooks (only the list form replays them)."""
        return any(e.output_layer._forward_hooks for e in self.experts)

    def __call__(self, x: Tensor, training: bool) -> list[Tensor]:
        z, u = _mlp_bank(x, self.shapes, training)
        outputs = list(u.unbind(0))
        for i, expert in enumerate(self.experts):
            if expert.output_layer._forward_hooks:
                _replay_forward_hooks(expert.output_layer, (z[i],), outputs[i])
            if not isinstance(expert.output_activation, nn.Identity):
                outputs[i] = expert.output_activation(outputs[i])
        return outputs


class GateBank:
    """``K`` ``SoftmaxGate`` of one shape: ``softmax(u_k W_k^T + c_k)`` for every k at once.

    ``bank(u)`` takes ``u [batch, d_in]`` (every gate reads it) or ``[K, batch, d_in]`` and
    returns float32 weights ``[K, batch, m]`` (a transposed view of a contiguous
    ``[K, m, batch]`` softmax).
    """

    def __init__(self, gates: Sequence[SoftmaxGate]) -> None:
        if not gates:
            raise ValueError("a GateBank needs at least one gate")
        self.gates = list(gates)
        if len({(g.in_dim, g.n_experts) for g in self.gates}) != 1:
            raise ValueError("every gate of a GateBank must have the same in_dim and n_experts")

    def __call__(self, u: Tensor) -> Tensor:
        # softmax over a strided dim of the expert-major copy [K, m, batch] (batch contiguous,
        # vectorised), not over a last dim of 2-4 entries (slow on CPU)
        logits = stacked_linear(u, [g.linear for g in self.gates]).float()  # [K, batch, m]
        return torch.softmax(logits.transpose(1, 2).contiguous(), dim=1).transpose(1, 2)  # [K, batch, m] view


class TowerBank:
    """Towers of the same shape evaluated together: ``[K, batch, d_in] -> [K, batch, o]``."""

    def __init__(self, towers: Sequence[TaskTower]) -> None:
        if not towers:
            raise ValueError("a TowerBank needs at least one tower")
        self.towers = list(towers)
        self.shapes = [_tower_shape(t) for t in self.towers]
        if len({s.key for s in self.shapes}) != 1:
            raise ValueError("every tower of a TowerBank must have the same shape")

    def __call__(self, features: Tensor, training: bool) -> Tensor:
        return _mlp_bank(features, self.shapes, training)[1]


def towers_forward(towers: Sequence[TaskTower], features: Sequence[Tensor] | Tensor, training: bool) -> list[Tensor]:
    """Every tower on its task's features, towers of one shape batched; outputs as the module form.

    ``features`` is a list of ``[batch, d_k]`` or, when all widths agree, one ``[K, batch, d]``.
    Returns one output per task: ``[batch]`` for output width 1, else ``[batch, o_k]``.
    """
    outputs: list[Tensor | None] = [None] * len(towers)
    groups = group_by(towers, lambda t: (t.in_dim, _tower_shape(t).key))
    for idx in groups:
        if isinstance(features, Tensor) and len(idx) == len(towers):
            x = features
        elif isinstance(features, Tensor):
            x = features.index_select(0, torch.as_tensor(idx, device=features.device))
        else:
            x = torch.stack([features[k] for k in idx])
        y = TowerBank([towers[k] for k in idx])(x, training)
        for k, out in zip(idx, y.unbind(0)):  # one backward node for the group, not one per task
            outputs[k] = out.squeeze(-1) if towers[k].output_dim == 1 else out
    return outputs  # type: ignore[return-value]


def experts_forward(
    experts: Sequence[Expert], inputs: Sequence[Tensor], training: bool, *, stacked: bool = False
) -> list[Tensor]:
    """Each expert on its input, experts of one shape batched; one output ``[batch, d_i]`` each.

    ``inputs[i]`` is expert ``i``'s input; when every expert of a group reads the same tensor
    object it is broadcast instead of copied. With ``stacked=True`` every entry of ``inputs``
    is the same ``[n, batch, d_in]`` tensor holding expert ``i``'s input in row block ``i``
    (all experts must then have one shape).
    """
    outputs: list[Tensor | None] = [None] * len(experts)
    groups = group_by(experts, lambda e: _expert_shape(e).key)
    if stacked and len(groups) > 1:
        raise ValueError("experts_forward(stacked=True) needs experts of one shape")
    for idx in groups:
        first = inputs[idx[0]]
        if stacked or all(inputs[i] is first for i in idx):
            x = first
        else:
            x = torch.stack([inputs[i] for i in idx])
        for slot, out in zip(idx, ExpertBank([experts[i] for i in idx])(x, training)):
            outputs[slot] = out
    return outputs  # type: ignore[return-value]


# --------------------------------------------------------------------------- conversion
def to_bank(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that computes with banks (``experts="bank"``), same weights.

    The copy keeps its task-owned layers in bank storage (:mod:`mtlbook.models.bank_storage`);
    ``model`` itself is left unchanged.
    """
    return _with_mode(model, "bank")


def from_bank(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that computes module by module (``experts="modules"``), every
    layer with its own Parameters again."""
    return _with_mode(model, "modules")


def _with_mode(model: nn.Module, mode: str) -> nn.Module:
    if not hasattr(model, "experts_mode"):
        raise TypeError(f"model must be an mtlbook multi-task model with an experts= mode, got {type(model).__name__}")
    out = copy.deepcopy(model)
    out.experts_mode = mode
    if mode == "bank":
        store_in_banks(out)
    else:
        store_in_modules(out)
    return out
