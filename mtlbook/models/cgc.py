r"""CGC and PLE: customized gate control and progressive layered extraction (Tang et al., 2020,
:cite:`tang2020progressive`).

**One extraction level (CGC).** A level holds :math:`n_s` shared experts
:math:`S_1, \dots, S_{n_s}` and, for each task :math:`k`, :math:`n_k` task experts
:math:`T_{k,1}, \dots, T_{k,n_k}` (the counts are independent; :math:`n_s + n_k \ge 1`).
Task :math:`k`'s gate sees only the shared experts and its own:

.. math::

    \mathcal E_k = (S_1, \dots, S_{n_s}, T_{k,1}, \dots, T_{k,n_k}), \qquad
    g_k(u_k) = \operatorname{softmax}(W_k u_k) \in \Delta^{n_s + n_k - 1},

    f_k = \sum_{i=1}^{n_s + n_k} g_k(u_k)_i \, \mathcal E_{k,i} \qquad \text{(mixture)},

where shared experts read the shared input :math:`u_s` and task :math:`k`'s experts and
gate read the task input :math:`u_k`. A *shared* gate weighs every expert of the level,

.. math::

    \mathcal E_s = (S_1, \dots, S_{n_s}, T_{1,1}, \dots, T_{K,n_K}), \qquad
    f_s = \sum_i \operatorname{softmax}(W_s u_s)_i \, \mathcal E_{s,i}.

**PLE** stacks :math:`L` levels. Level 0 reads :math:`u_s^{(0)} = u_k^{(0)} = x`; level
:math:`l > 0` reads the previous level's outputs, :math:`u_s^{(l)} = f_s^{(l-1)}` and
:math:`u_k^{(l)} = f_k^{(l-1)}`. Every level but the last has a shared gate (it feeds the
next level's shared experts); the last level has none, because nothing reads
:math:`f_s^{(L-1)}`. The towers read the last level: :math:`y_k = h_k(f_k^{(L-1)})`. CGC is
PLE with :math:`L = 1`. Through the shared gates, task :math:`j`'s experts below the last
level do feed task :math:`k`'s tower; only the last level's task experts are private.

**Block attention** (``combine="block"``). Experts may then have different output widths
(``shared_expert_dims``); each gate concatenates its experts' outputs, block :math:`i`
scaled by :math:`g_i \sqrt{\bar d / d_i}` (see :mod:`mtlbook.models.gates` for the width
correction and why), so the output width is the sum of the experts' widths.

Gate weights are keyed ``"level{l}/{task}"`` and ``"level{l}/shared"``; their experts are
labelled ``shared[i]`` and ``{task}[j]`` in ``gate_expert_names``. ``shared_experts`` lists
the shared experts of every level; ``shared_outputs`` and ``last_shared_layers()`` refer to
the last level's.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlbook.data.batch import TaskSpec
from mtlbook.models._validation import (
    check_dropout,
    check_int,
    check_per_expert_widths,
    check_task_expert_counts,
    check_widths,
)
from mtlbook.models.banks import ExpertBank, GateBank, experts_forward, group_by
from mtlbook.models.base import MixtureRecord, MultiTaskModel, _LastForward
from mtlbook.models.experts import Expert
from mtlbook.models.gates import SoftmaxGate, block_scales, concat_blocks, mix_experts

COMBINE_MODES = ("mixture", "block")


def _rows_of_owners(stacked_inputs: Tensor, owners: Sequence[int]) -> Tensor:
    """Row ``owners[i]`` of the task-major ``[K, batch, d]`` inputs for task expert ``i``."""
    if list(owners) == list(range(stacked_inputs.shape[0])):
        return stacked_inputs  # one expert per task: the inputs as they are
    return stacked_inputs.index_select(0, torch.as_tensor(owners, device=stacked_inputs.device))


class ExtractionLevel(nn.Module):
    """One CGC level: shared experts, per-task experts, per-task gates and an optional shared gate.

    Args:
        shared_in: width of the shared input ``u_s`` (may be None when there are no shared experts).
        task_ins: width of each task's input ``u_k``, in task order.
        shared_hidden: hidden widths of each shared expert (one tuple per shared expert).
        shared_dims: output width of each shared expert.
        n_task_experts: number of task experts per task.
        task_hidden: hidden widths of every task expert.
        task_dim: output width of every task expert.
        dropout: dropout inside the experts.
        combine: ``"mixture"`` (weighted sum; all widths equal) or ``"block"``.
        shared_gate: whether the level computes ``f_s`` (every PLE level but the last).

    ``forward(u_s, [u_k])`` returns ``(f_s or None, [f_k], [S_i(u_s)], {gate: weights})``
    with gate keys ``"shared"`` and the task indices as strings.
    """

    def __init__(
        self,
        shared_in: int | None,
        task_ins: Sequence[int],
        shared_hidden: Sequence[Sequence[int]],
        shared_dims: Sequence[int],
        n_task_experts: Sequence[int],
        task_hidden: Sequence[int],
        task_dim: int,
        dropout: float,
        combine: str,
        shared_gate: bool,
    ) -> None:
        super().__init__()
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        self.combine = combine
        n_shared = len(shared_dims)
        self.shared_experts = nn.ModuleList(
            Expert(shared_in, d, h, dropout) for h, d in zip(shared_hidden, shared_dims)
        )
        self.task_experts = nn.ModuleList(
            nn.ModuleList(Expert(d_in, task_dim, task_hidden, dropout) for _ in range(n))
            for d_in, n in zip(task_ins, n_task_experts)
        )
        self.task_gates = nn.ModuleList(
            SoftmaxGate(d_in, n_shared + n) for d_in, n in zip(task_ins, n_task_experts)
        )
        self.shared_gate = SoftmaxGate(shared_in, n_shared + sum(n_task_experts)) if shared_gate else None

        # expert widths seen by each gate, in gate order: shared experts first
        task_widths = [list(shared_dims) + [task_dim] * n for n in n_task_experts]
        shared_widths = list(shared_dims) + [task_dim] * sum(n_task_experts)
        if combine == "block":
            self.task_scales = [block_scales(w) for w in task_widths]
            self.shared_scales = block_scales(shared_widths) if shared_gate else ()
            self.task_out_dims = [sum(w) for w in task_widths]
            self.shared_out_dim = sum(shared_widths) if shared_gate else None
        else:
            if len(set(shared_widths)) > 1:
                raise ValueError(
                    f"combine='mixture' needs every expert to have width expert_dim={task_dim}, got widths "
                    f"{sorted(set(shared_widths))}; use combine='block' for experts of different output widths"
                )
            self.task_scales = [()] * len(task_ins)
            self.shared_scales = ()
            self.task_out_dims = [task_dim] * len(task_ins)
            self.shared_out_dim = task_dim if shared_gate else None

    def _combine(self, weights: Tensor, outputs: list[Tensor], scales: Sequence[float]) -> Tensor:
        if self.combine == "block":
            return concat_blocks(weights, outputs, scales)
        return mix_experts(weights, torch.stack(outputs, dim=1))

    def forward(
        self, shared_input: Tensor | None, task_inputs: Sequence[Tensor]
    ) -> tuple[Tensor | None, list[Tensor], list[Tensor], dict[str, Tensor]]:
        shared_outputs = [expert(shared_input) for expert in self.shared_experts]
        task_outputs = [[expert(u) for expert in experts] for experts, u in zip(self.task_experts, task_inputs)]
        weights: dict[str, Tensor] = {}
        task_features = []
        for k, (gate, u) in enumerate(zip(self.task_gates, task_inputs)):
            w = gate(u)
            weights[str(k)] = w
            task_features.append(self._combine(w, shared_outputs + task_outputs[k], self.task_scales[k]))
        shared_feature = None
        if self.shared_gate is not None:
            w = self.shared_gate(shared_input)
            weights["shared"] = w
            every_expert = shared_outputs + [t for outs in task_outputs for t in outs]
            shared_feature = self._combine(w, every_expert, self.shared_scales)
        return shared_feature, task_features, shared_outputs, weights

    def forward_bank(
        self, shared_input: Tensor | None, task_inputs: Sequence[Tensor] | Tensor, training: bool
    ) -> tuple[Tensor | None, list[Tensor] | Tensor, list[Tensor], dict[str, Tensor]]:
        """:meth:`forward` with experts, task gates and mixtures batched (see :mod:`mtlbook.models.banks`).

        ``task_inputs`` may be one ``[K, batch, d]`` tensor; the task features come back as one
        ``[K, batch, d]`` tensor when every task gate has the same shape (``"mixture"``), else
        as a list. The shared outputs are the exact tensors the mixtures read.
        """
        n_tasks = len(self.task_gates)
        owners = [k for k, experts in enumerate(self.task_experts) for _ in experts]
        flat_task_experts = [e for experts in self.task_experts for e in experts]
        stacked_inputs = task_inputs if isinstance(task_inputs, Tensor) else None
        task_list = list(task_inputs.unbind(0)) if stacked_inputs is not None else list(task_inputs)

        # the shared experts one module call each: a level has few, so stacking their weights
        # saves nothing, and adaTT's per-task backward through them can then be written out
        # (mtlbook.expert_vjp recomputes each as a module call, bit for bit)
        shared_outputs = [expert(shared_input) for expert in self.shared_experts]
        single_shape = len(group_by(flat_task_experts, lambda e: (e.in_dim, e.hidden, e.out_dim))) == 1
        task_bank = ExpertBank(flat_task_experts) if flat_task_experts and single_shape else None
        gate_groups = group_by(list(self.task_gates), lambda g: (g.in_dim, g.n_experts))
        weights: dict[str, Tensor] = {}
        task_features: list[Tensor] | Tensor
        if (
            self.combine == "mixture" and len(gate_groups) == 1 and task_bank is not None and not task_bank.hooked
            and (stacked_inputs is not None or all(t is task_list[0] for t in task_list))
        ):  # fmt: skip
            # the fast path: task experts stay one [n_t, batch, d] tensor from matmul to mixture
            x = task_list[0] if stacked_inputs is None else _rows_of_owners(stacked_inputs, owners)
            task_stack = task_bank.stacked(x, training)  # [n_t, batch, d], task-major
            u = stacked_inputs if stacked_inputs is not None else task_list[0]
            gate_w32 = GateBank(list(self.task_gates))(u)  # float32 [K, batch, m], recorded as the module form's
            gate_w = gate_w32.to(task_stack.dtype)  # the mixture's dtype (bf16 under autocast)
            n_s = len(shared_outputs)
            n_own = len(self.task_experts[0])  # one gate shape: every task has n_own experts
            own = task_stack.reshape(n_tasks, n_own, *task_stack.shape[1:])  # [K, n_own, batch, d]
            # f_k = sum_s g_ks S_s + sum_j g_kj T_kj as m multiply-adds over [K, batch, d]: no
            # gather (task experts are task-major), and no einsum, which over m = 2..4 experts
            # becomes one tiny matmul per batch row on CPU
            # unbind, not indexing: one backward node that stacks the m gradients, instead of m
            # zero-filled full-size gradients summed
            gate_cols = [g.unsqueeze(-1) for g in gate_w.unbind(2)]  # m x [K, batch, 1]
            own_rows = own.unbind(1)  # n_own x [K, batch, d]
            terms = [gate_cols[s] * shared_outputs[s] for s in range(n_s)]
            terms += [gate_cols[n_s + j] * own_rows[j] for j in range(n_own)]
            task_features = sum(terms[1:], terms[0])
            for k in range(n_tasks):
                weights[str(k)] = gate_w32[k]
            shared_feature = None
            if self.shared_gate is not None:
                w32 = self.shared_gate(shared_input)  # [batch, n_s + n_t]
                w = w32.to(task_stack.dtype)
                shared_feature = (w[:, n_s:].t().unsqueeze(-1) * task_stack).sum(0)
                for s in range(n_s):
                    shared_feature = shared_feature + w[:, s, None] * shared_outputs[s]
                weights["shared"] = w32
            return shared_feature, task_features, shared_outputs, weights

        if flat_task_experts and stacked_inputs is not None and single_shape:
            x = _rows_of_owners(stacked_inputs, owners)  # one [n, batch, d] input, no unbind/restack
            flat_outputs = experts_forward(flat_task_experts, [x] * len(owners), training, stacked=True)
        else:
            flat_outputs = experts_forward(flat_task_experts, [task_list[k] for k in owners], training)
        task_outputs: list[list[Tensor]] = [[] for _ in range(n_tasks)]
        for k, out in zip(owners, flat_outputs):
            task_outputs[k].append(out)
        every_expert = shared_outputs + flat_outputs
        task_features = []  # gates of different shapes, block attention or hooked experts: task by task
        for k, (gate, u) in enumerate(zip(self.task_gates, task_list)):
            w = gate(u)
            weights[str(k)] = w
            task_features.append(self._combine(w, shared_outputs + task_outputs[k], self.task_scales[k]))
        shared_feature = None
        if self.shared_gate is not None:
            w = self.shared_gate(shared_input)
            weights["shared"] = w
            if self.combine == "mixture":
                # sum_i w_i E_i elementwise over [m, batch, d] (see the task mixture above)
                stacked_all = torch.stack(every_expert)
                shared_feature = (w.to(stacked_all.dtype).t().unsqueeze(-1) * stacked_all).sum(0)
            else:
                shared_feature = self._combine(w, every_expert, self.shared_scales)
        return shared_feature, task_features, shared_outputs, weights


class PLE(MultiTaskModel):
    """Progressive layered extraction: ``n_levels`` CGC levels under per-task towers.

    Args:
        n_features: input width (>= 1).
        task_specs: the tasks (no task may be called ``"shared"``, the shared gate's key).
        n_levels: number of extraction levels (>= 1).
        n_shared_experts: shared experts per level (>= 0).
        n_task_experts: task experts per level, one int for every task or a mapping
            ``{task: int}`` naming every task (>= 0 each); each task needs
            ``n_shared_experts + n_task_experts[task] >= 1``.
        expert_hidden: hidden widths of every task expert, and of every shared expert unless
            ``shared_expert_hidden`` is given.
        expert_dim: output width of the task experts, and of the shared experts unless
            ``shared_expert_dims`` is given (>= 1).
        tower_hidden: hidden widths of each tower.
        dropout: dropout in experts and towers, in [0, 1).
        gate_entropy_weight: weight of the gate-entropy regulariser (see
            :mod:`mtlbook.models.base`).
        combine: ``"mixture"`` (weighted sum, the paper's CGC) or ``"block"`` (block
            attention over experts of different widths).
        shared_expert_hidden: hidden widths per shared expert, one tuple for all or one per
            shared expert, e.g. ``[(16,), (128, 64)]`` (heterogeneous pool).
        shared_expert_dims: output width per shared expert (``n_shared_experts`` ints).
            With ``"mixture"`` they must all equal ``expert_dim`` (the experts' last layer is
            the projection to the common width); ``"block"`` allows any widths.
        check_finite: reject NaN/inf inputs.
        experts: ``"bank"`` (default): experts, gates and towers of one shape computed as
            one batched matmul (:mod:`mtlbook.models.banks`), task experts, task gates and
            towers stored stacked (:mod:`mtlbook.models.bank_storage`); or ``"modules"``, one
            call per module (the form chapter 3 teaches).
    """

    def __init__(
        self,
        n_features: int,
        task_specs: Sequence[TaskSpec],
        *,
        n_levels: int = 2,
        n_shared_experts: int = 2,
        n_task_experts: int | Mapping[str, int] = 1,
        expert_hidden: Sequence[int] = (64,),
        expert_dim: int = 32,
        tower_hidden: Sequence[int] = (32,),
        dropout: float = 0.0,
        gate_entropy_weight: float = 0.0,
        combine: str = "mixture",
        shared_expert_hidden: Sequence[int] | Sequence[Sequence[int]] | None = None,
        shared_expert_dims: Sequence[int] | None = None,
        check_finite: bool = True,
        experts: str = "bank",
    ) -> None:
        super().__init__(
            n_features, task_specs, gate_entropy_weight=gate_entropy_weight, check_finite=check_finite, experts=experts
        )
        if "shared" in self.task_names:
            raise ValueError('task_specs: the task name "shared" is reserved for the shared gate; rename the task')
        self.n_levels = check_int(n_levels, "n_levels", 1)
        self.n_shared_experts = check_int(n_shared_experts, "n_shared_experts", 0)
        self.n_task_experts = check_task_expert_counts(n_task_experts, self.task_names)
        empty = [t for t, n in zip(self.task_names, self.n_task_experts) if self.n_shared_experts + n == 0]
        if empty:
            raise ValueError(
                f"tasks {empty} would have zero experts: n_shared_experts + n_task_experts[task] must be >= 1"
            )
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        self.combine = combine
        expert_dim = check_int(expert_dim, "expert_dim", 1)
        dropout = check_dropout(dropout)
        task_hidden = check_widths(expert_hidden, "expert_hidden")
        n_s = self.n_shared_experts
        shared_hidden = (
            [task_hidden] * n_s
            if shared_expert_hidden is None
            else check_per_expert_widths(shared_expert_hidden, n_s, "shared_expert_hidden")
        )
        if shared_expert_dims is None:
            shared_dims = [expert_dim] * n_s
        else:
            shared_dims = list(check_widths(shared_expert_dims, "shared_expert_dims"))
            if len(shared_dims) != n_s:
                raise ValueError(
                    f"shared_expert_dims gives {len(shared_dims)} widths, expected n_shared_experts={n_s}"
                )

        levels = []
        shared_in, task_ins = n_features, [n_features] * len(self.task_names)
        for level in range(self.n_levels):
            has_shared_gate = level < self.n_levels - 1 and n_s > 0
            layer = ExtractionLevel(
                shared_in, task_ins, shared_hidden, shared_dims, self.n_task_experts,
                task_hidden, expert_dim, dropout, combine, has_shared_gate,
            )  # fmt: skip
            levels.append(layer)
            shared_in, task_ins = layer.shared_out_dim, layer.task_out_dims
        self.levels = nn.ModuleList(levels)
        self._label_gates()
        self._build_towers(task_ins, check_widths(tower_hidden, "tower_hidden"), dropout)
        self._finish_build()

    def _label_gates(self) -> None:
        shared = [f"shared[{i}]" for i in range(self.n_shared_experts)]
        own = {t: [f"{t}[{j}]" for j in range(n)] for t, n in zip(self.task_names, self.n_task_experts)}
        names: dict[str, tuple[str, ...]] = {}
        for level, layer in enumerate(self.levels):
            for t in self.task_names:
                names[f"level{level}/{t}"] = tuple(shared + own[t])
            if layer.shared_gate is not None:
                names[f"level{level}/shared"] = tuple(shared + [e for t in self.task_names for e in own[t]])
        self.gate_expert_names = names

    @property
    def shared_experts(self) -> nn.ModuleList:
        return nn.ModuleList(e for layer in self.levels for e in layer.shared_experts)

    def _last_shared_experts(self) -> list[Expert]:
        return list(self.levels[-1].shared_experts)

    def shared_parameters_by_level(self) -> list[list[nn.Parameter]]:
        return [[p for expert in layer.shared_experts for p in expert.parameters()] for layer in self.levels]

    def _task_features(self, x: Tensor, record: _LastForward) -> list[Tensor]:
        return self._run_levels(x, record, bank=False)

    def _task_features_bank(self, x: Tensor, record: _LastForward) -> list[Tensor] | Tensor:
        return self._run_levels(x, record, bank=True)

    def _run_levels(self, x: Tensor, record: _LastForward, bank: bool) -> list[Tensor] | Tensor:
        shared_input: Tensor | None = x
        task_inputs: list[Tensor] | Tensor = [x] * len(self.task_names)
        # what the structured per-task gradients read: its premise (task k's features
        # feed only task k) holds up to two levels; from three on, task experts below
        # the last two levels reach every tower through the shared gates
        mixture = self.combine == "mixture" and self.n_levels <= 2
        record.levels = [] if mixture else None
        for level, layer in enumerate(self.levels):
            level_input = shared_input
            if bank:
                outputs = layer.forward_bank(shared_input, task_inputs, self.training)
            else:
                outputs = layer(shared_input, task_inputs)
            shared_input, task_inputs, shared_outputs, weights = outputs
            for key, w in weights.items():
                name = "shared" if key == "shared" else self.task_names[int(key)]
                record.gate_weights[f"level{level}/{name}"] = w
            record.shared_outputs = shared_outputs
            if record.levels is not None:
                gates = [weights[str(k)] for k in range(len(self.task_names))]
                features = task_inputs if isinstance(task_inputs, Tensor) else list(task_inputs)
                record.levels.append(
                    MixtureRecord(shared_outputs, features, gates, shared_input, level_input,
                                  list(layer.shared_experts), weights.get("shared"))
                )
        return task_inputs


class CGC(PLE):
    """A single extraction level (PLE with ``n_levels=1``): per-task gates, no shared gate.

    Takes the arguments of :class:`PLE` except ``n_levels``.
    """

    def __init__(self, n_features: int, task_specs: Sequence[TaskSpec], **kwargs) -> None:
        if "n_levels" in kwargs:
            raise TypeError("CGC has exactly one level; use PLE(n_levels=...) for more")
        super().__init__(n_features, task_specs, n_levels=1, **kwargs)


class BlockAttentionCGC(CGC):
    """CGC whose gates concatenate width-corrected expert blocks (``combine="block"``).

    Takes the arguments of :class:`CGC` except ``combine``; set ``shared_expert_dims`` for
    shared experts of different widths. Tower ``k`` reads a vector of width
    ``sum(shared_expert_dims) + n_task_experts[k] * expert_dim``.
    """

    def __init__(self, n_features: int, task_specs: Sequence[TaskSpec], **kwargs) -> None:
        if "combine" in kwargs:
            raise TypeError("BlockAttentionCGC always uses combine='block'; use CGC(combine=...) to choose")
        super().__init__(n_features, task_specs, combine="block", **kwargs)
