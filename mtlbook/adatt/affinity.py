"""Measuring task affinity from per-task gradients on the shared parameters (chapter 5).

For tasks ``i = 1..n`` with losses :math:`L_i` and shared parameters :math:`\\theta_s`
(the shared experts only; task experts, gates and towers are excluded):

.. math::

    g_i = \\operatorname{flatten}\\bigl(\\partial L_i / \\partial \\theta_s\\bigr), \\qquad
    G = [g_1; \\dots; g_n] \\in \\mathbb{R}^{n \\times d}

    \\hat G = G / \\max(\\lVert g_i \\rVert, 10^{-8}) \\ \\text{(row-wise)}, \\qquad
    C = \\hat G \\hat G^\\top \\quad (C_{ij} = \\cos(g_i, g_j))

    A_t = \\beta A_{t-1} + (1 - \\beta) C_t, \\quad \\beta = 0.9, \\quad
    A_t \\leftarrow \\operatorname{clamp}(A_t, -1, 1)

The first observation of a pair initialises it (:math:`A_{ij} = C_{ij}`) and a pair that
involves a task absent from the batch keeps its previous value. :math:`A` is an
exponential moving average, i.e. a first-order low-pass filter whose memory is about
:math:`1 / (1 - \\beta) = 10` measurements.

Attribution: the name adaTT comes from AdaTT (Li et al., KDD 2023, ``li2023adatt``), whose
fusion units learn task-to-task mixing with gates inside the network. The loss-level
variant in this subpackage (gradient-cosine affinity, transfer loss, prior, phases) is the
one described by the book's source notes; it is not the architecture of that paper.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import Tensor, nn

from mtlbook.adatt._capture import LastLayerCapture, OutputCapture
from mtlbook.adatt._checks import (  # also imported from here by prior.py and transfer.py
    as_presence,
    check_choice,
    check_chunk_size,
    check_task_names,
    check_unit_interval,
    refuse_compiled_forward,
)
from mtlbook.gradients import (
    EXTRACTIONS,
    FeatureCotangents,
    cosine_matrix,
    losses_are_task_separable,
    stacked_gradients,
    structured_gradients,
)

PARAMETER_SETS = ("all", "weights", "last_layer")
#: What ``extraction=`` accepts: ``"auto"`` (the default: the cheapest exact mode the attached
#: model allows) or one of :data:`~mtlbook.gradients.EXTRACTIONS`.
COMPUTER_EXTRACTIONS = ("auto",) + EXTRACTIONS

__all__ = ["TaskAffinityComputer", "cosine_matrix", "COMPUTER_EXTRACTIONS", "EXTRACTIONS", "PARAMETER_SETS"]


# --------------------------------------------------------------------------- helpers
def auto_extraction(model: nn.Module, parameter_set: str, task_names: Sequence[str]) -> str:
    """The mode ``extraction="auto"`` picks for ``model``: ``"structured"`` for an mtlbook model
    (it has ``mixture_levels``) measured on its shared parameters in its own task order, else
    ``"cut"``. Both are exact; chapter 5 measures what each costs. Where a forward records no
    mixture (Shared-Bottom, block attention, three PLE levels) the structured mode takes the
    cut itself."""
    mixture = hasattr(model, "mixture_levels") and hasattr(model, "shared_parameters_by_level")
    same_order = tuple(getattr(model, "task_names", ())) == tuple(task_names)
    return "structured" if mixture and same_order and parameter_set != "last_layer" else "cut"


def as_loss_vector(task_losses: Tensor | Sequence[Tensor], n_tasks: int) -> Tensor:
    """Stack per-task losses into a ``[n_tasks]`` tensor (task order of ``task_names``)."""
    if not isinstance(task_losses, Tensor):
        items = list(task_losses)
        if not all(isinstance(t, Tensor) and t.numel() == 1 for t in items):
            raise TypeError("task_losses must be a tensor [n_tasks] or a sequence of scalar tensors")
        task_losses = torch.stack([t.reshape(()) for t in items])
    if task_losses.shape != (n_tasks,):
        raise ValueError(
            f"task_losses must have shape [{n_tasks}] (one scalar loss per task), got {tuple(task_losses.shape)}"
        )
    return task_losses


def loss_roots(task_losses: Tensor | Sequence[Tensor], n_tasks: int) -> list[Tensor]:
    """The ``n_tasks`` scalar losses to differentiate, one per task.

    A sequence of scalar tensors is kept as is, so an absent task's graph is never
    traversed; a stacked ``[n_tasks]`` tensor is indexed (its absent rows still receive a
    zero gradient through the stack, which is correct but not free).
    """
    if isinstance(task_losses, Tensor):
        return list(as_loss_vector(task_losses, n_tasks).unbind(0))
    items = list(task_losses)
    if len(items) != n_tasks or not all(isinstance(t, Tensor) and t.numel() == 1 for t in items):
        raise ValueError(f"task_losses must be a tensor [{n_tasks}] or a sequence of {n_tasks} scalar tensors")
    return [t.reshape(()) for t in items]


# --------------------------------------------------------------------------- module
class TaskAffinityComputer(nn.Module):
    """EMA of the pairwise cosine similarity of per-task gradients on the shared parameters.

    Args:
        task_names: task order (rows/columns of the affinity matrix).
        ema_decay: :math:`\\beta \\in [0, 1)` of :math:`A_t = \\beta A_{t-1} + (1-\\beta) C_t`.
        extraction: ``"auto"`` (default: ``"structured"`` for a mixture model after
            :meth:`attach`, ``"cut"`` for other models, see :func:`auto_extraction`;
            :attr:`mode` says which), ``"batched"`` (one ``autograd.grad`` call with
            ``is_grads_batched=True``, ``grad_outputs = I``: row ``i`` of the identity selects
            :math:`L_i`; the default before the structured mode existed, and the mode every
            stored run of the book's study used), ``"loop"`` (one ``autograd.grad`` call per task through the whole
            graph) or ``"cut"`` (per task, the cotangents of the model's outputs, then one
            backward from those outputs only; see :func:`mtlbook.gradients.cut_gradients`; it
            needs :meth:`attach`, without which it is the loop) or ``"structured"`` (one
            backward to the task-private features, then one backward through the shared
            experts batched over the tasks; see :func:`mtlbook.gradients.structured_gradients`;
            for MMoE, CGC and two-level PLE after :meth:`attach`, the cut elsewhere; the losses
            are checked to be task-separable on the first measurement). All four give the same
            ``G`` up to float rounding.
        parameter_set: which shared parameters define :math:`g_i`:
            ``"all"`` every shared parameter; ``"weights"`` only those with ``dim >= 2``
            (matrices: biases and norm scales dropped); ``"last_layer"`` only the weight and
            bias of the last ``nn.Linear`` of each shared expert, computed cheaply from the
            gradient with respect to that layer's output (see :meth:`extract_gradients`).
        chunk_size: when the mode is ``"structured"`` (asked for, or picked by ``"auto"``),
            take the tasks this many at a time through the shared experts (``None``, the
            default: all at once). Same ``G``; the batched backward's working memory shrinks
            with the chunk and the time grows with the number of chunks (chapter 5). ``None`` for every other extraction (with
            ``"auto"`` it is ignored when the mode is the cut).

    Buffers (in ``state_dict``, moved by ``.to``, never optimised):
        ``affinity`` ``[n, n]`` float, starts as the **identity** (every task fully aligned
        with itself, no information about pairs: off-diagonal 0, which is neutral for
        blocking); ``pair_observed`` ``[n, n]`` bool, True once both tasks of a pair were
        measured together; ``n_updates`` long scalar, number of :meth:`update` calls.

    Typical use inside a trainer::

        computer.attach(model)               # once: shared params (+ hooks for last_layer)
        out = model(batch.inputs)            # forward
        losses = torch.stack([...])          # [n_tasks], graph kept
        computer.measure(losses, present)    # every grad_interval steps
        losses.sum().backward()              # the trainer's backward still works

    Where the objective is that plain sum (no transfer loss built from this step's affinity),
    ``computer.measure_in_backward(losses, present)`` does both in one backward
    (:meth:`gradients_in_backward`).
    """

    affinity: Tensor
    pair_observed: Tensor
    n_updates: Tensor

    def __init__(
        self,
        task_names: Sequence[str],
        ema_decay: float = 0.9,
        extraction: str = "auto",
        parameter_set: str = "all",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.task_names = check_task_names(task_names)
        self.ema_decay = check_unit_interval(ema_decay, "ema_decay", closed_right=False)
        self.extraction = check_choice(extraction, "extraction", COMPUTER_EXTRACTIONS)
        # the mode in use: "auto" is settled by attach() (before it, no outputs are captured,
        # and the batched call is what the cut and structured modes would fall back to)
        self._mode = "batched" if extraction == "auto" else extraction
        self.parameter_set = check_choice(parameter_set, "parameter_set", PARAMETER_SETS)
        self.chunk_size = check_chunk_size(chunk_size, self.extraction)
        n = len(self.task_names)
        self.register_buffer("affinity", torch.eye(n))
        self.register_buffer("pair_observed", torch.zeros(n, n, dtype=torch.bool))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))
        # What attach() stores: plain Python containers, so nothing here becomes a
        # submodule or a parameter of this module (or enters its state_dict).
        self._shared_parameters: list[nn.Parameter] = []
        self._capture: LastLayerCapture | None = None
        self._outputs: OutputCapture | None = None
        self._model_ref: weakref.ref | None = None
        self._separable: bool | None = None  # structured mode: do the losses separate by task?

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def extra_repr(self) -> str:
        chunk = "" if self.chunk_size is None else f", chunk_size={self.chunk_size}"
        mode = f" (mode {self._mode!r})" if self.extraction == "auto" else ""
        return (
            f"tasks={list(self.task_names)}, ema_decay={self.ema_decay}, "
            f"extraction={self.extraction!r}{mode}, parameter_set={self.parameter_set!r}{chunk}"
        )

    @property
    def mode(self) -> str:
        """The extraction in use: :attr:`extraction`, or what ``"auto"`` picked at :meth:`attach`."""
        return self._mode

    # ----------------------------------------------------------------- attach
    def attach(self, model: nn.Module) -> "TaskAffinityComputer":
        """Remember what :meth:`measure` needs from ``model``.

        Stores ``model.shared_parameters()``; with ``parameter_set="last_layer"`` also
        registers forward hooks on every layer of ``model.last_shared_layers()`` that keep
        the layer's input and pre-activation output from the latest forward pass; with
        ``extraction="cut"`` or ``"structured"`` a forward hook on ``model`` keeps its
        outputs of the latest forward pass (where the cut mode splits the chain rule; the
        structured mode checks there, once, that each loss reads only its own output, and
        reads the model's ``mixture_levels``). Calling it again re-attaches (old hooks are
        removed first). Returns ``self``.

        Hooks of a ``copy.deepcopy`` of the model are inert (they check identity); a deep
        copy of this module keeps pointing at the original model: attach copies anew.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.release()
        if self.parameter_set == "last_layer":
            if not hasattr(model, "last_shared_layers"):
                raise TypeError('parameter_set="last_layer" needs a model with last_shared_layers()')
            layers = list(model.last_shared_layers())
            if not layers or not all(isinstance(layer, nn.Linear) for layer in layers):
                raise TypeError("model.last_shared_layers() must return a non-empty list of nn.Linear")
            self._capture = LastLayerCapture(model, layers)
        else:
            if not hasattr(model, "shared_parameters"):
                raise TypeError("model must expose shared_parameters()")
            self._shared_parameters = list(model.shared_parameters())
            if not self._shared_parameters:
                raise ValueError("model.shared_parameters() is empty: nothing to measure affinity on")
        if self.extraction == "auto":
            self._mode = auto_extraction(model, self.parameter_set, self.task_names)
        if self._mode == "structured":
            if not (hasattr(model, "mixture_levels") and hasattr(model, "shared_parameters_by_level")):
                raise TypeError('extraction="structured" needs an mtlbook mixture model (MMoE, CGC, PLE); '
                                'use "cut" for other models')  # fmt: skip
            if tuple(getattr(model, "task_names", ())) != self.task_names:
                raise ValueError(f'extraction="structured" needs the model\'s task order, '
                                 f'{tuple(getattr(model, "task_names", ()))}; got task_names={self.task_names}')  # fmt: skip
        if self._mode in ("cut", "structured"):
            self._outputs = OutputCapture(model)
        self._separable = None
        self._model_ref = weakref.ref(model)
        return self

    def release(self) -> None:
        """Remove hooks and forget the attached model (safe to call when nothing is attached)."""
        if self._capture is not None:
            self._capture.remove()
        if self._outputs is not None:
            self._outputs.remove()
        self._capture = None
        self._outputs = None
        self._shared_parameters = []
        self._model_ref = None

    @property
    def attached(self) -> bool:
        return self._model_ref is not None and self._model_ref() is not None

    # ----------------------------------------------------------------- extraction
    @torch.compiler.disable
    def extract_gradients(
        self,
        task_losses: Tensor | Sequence[Tensor],
        shared_parameters: Sequence[nn.Parameter] | None = None,
        present: Tensor | Sequence[bool] | None = None,
        shared_outputs: Sequence[Tensor] | None = None,
        last_layers: Sequence[nn.Linear] | None = None,
        layer_inputs: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Per-task gradients ``G`` ``[n_tasks, d]`` on the shared parameters.

        Uses ``torch.autograd.grad(..., retain_graph=True, allow_unused=True)``, which
        neither frees the graph nor touches ``.grad``: the trainer's own
        ``loss.backward()`` afterwards behaves as if nothing happened. A parameter the
        loss does not reach (or one with ``requires_grad=False``) contributes zeros. Rows of
        absent tasks (``present[i]`` False) are zeros and are not computed (pass
        ``task_losses`` as a list of scalars and their graphs are not even traversed; see
        :func:`loss_roots`). Runs outside
        any ``torch.compile`` region (``torch.compiler.disable``).

        ``parameter_set="all"``/``"weights"``: ``shared_parameters`` (default: the ones
        stored by :meth:`attach`) in order, each flattened; ``"weights"`` keeps ``dim >= 2``.

        ``parameter_set="last_layer"``: for a Linear layer ``u = h W^T + b`` applied to rows
        ``h`` (any leading dims, flattened to ``[B, d_in]``), the chain rule gives

        .. math::
            \\partial L_i / \\partial W = (\\partial L_i / \\partial u)^\\top h, \\qquad
            \\partial L_i / \\partial b = \\textstyle\\sum_{rows} \\partial L_i / \\partial u,

        so only the (small) gradient with respect to ``u`` is back-propagated, not the one
        with respect to every expert parameter. ``u`` is the layer's own output, i.e. the
        pre-activation: when an activation follows the last Linear, the chain rule above
        still holds because differentiation stops at ``u``. By default ``h`` and ``u``
        come from the hooks registered by :meth:`attach`; explicitly, pass
        ``last_layers`` (the Linear modules), ``shared_outputs`` (their outputs ``u`` of the
        latest forward, **pre-activation**, one tensor per layer) and ``layer_inputs``
        (their inputs ``h``). The row is ``[W_1.flatten(), b_1, W_2.flatten(), b_2, ...]``,
        the same order as the full gradient on those parameters.
        """
        roots, rows = self._roots_and_rows(task_losses, present)
        device = roots[0].device
        if self.parameter_set == "last_layer":
            layers, calls = self._resolve_last_layers(shared_outputs, last_layers, layer_inputs)
            return self._last_layer_gradients(roots, rows, layers, calls, device)
        return self._parameter_gradients(roots, rows, self._parameter_set(shared_parameters), device)

    def _roots_and_rows(self, task_losses: Tensor | Sequence[Tensor],
                        present: Tensor | Sequence[bool] | None) -> tuple[list[Tensor], list[int]]:  # fmt: skip
        """The per-task scalar losses (:func:`loss_roots`) and the rows to compute: present
        tasks whose loss is on the graph (a constant loss has a zero row, like an absent task)."""
        roots = loss_roots(task_losses, self.n_tasks)
        mask = as_presence(present, self.n_tasks, roots[0].device)
        if not any(r.requires_grad for r in roots):
            raise ValueError("task_losses must require grad (computed from the model, graph not freed)")
        refuse_compiled_forward(self._model_ref() if self._model_ref is not None else None)
        return roots, [i for i in mask.nonzero().flatten().tolist() if roots[i].requires_grad]

    def _parameter_set(self, shared_parameters: Sequence[nn.Parameter] | None = None) -> list[nn.Parameter]:
        """The parameters ``G`` is taken on: ``shared_parameters`` (default: those of
        :meth:`attach`), only the matrices for ``parameter_set="weights"``."""
        params = list(shared_parameters) if shared_parameters is not None else self._shared_parameters
        if not params:
            raise ValueError("shared_parameters is empty: pass them or call attach(model) first")
        if self.parameter_set == "weights":
            params = [p for p in params if p.dim() >= 2]
            if not params:
                raise ValueError('parameter_set="weights" found no shared parameter with dim >= 2')
        return params

    def _batched_task_grads(self, roots: Sequence[Tensor], rows: Sequence[int], inputs: Sequence[Tensor]) -> list[Tensor | None]:
        """For each tensor in ``inputs``: ``[len(rows), *shape]`` gradients of ``roots[rows]``, or None if unused."""
        outputs = self._outputs.outputs if self._outputs is not None else None
        return stacked_gradients(roots, rows, inputs, self._mode, outputs)

    def _structured_plan(self, roots: Sequence[Tensor], rows: Sequence[int], params: Sequence[Tensor]):
        """``(levels, params_by_level)`` for :func:`~mtlbook.gradients.structured_gradients`, or
        None where the model recorded no mixture levels, ``params`` are not all its shared
        experts' or a loss mixes tasks (the caller then cuts)."""
        model = self._model_ref() if self._model_ref is not None else None
        levels = getattr(model, "mixture_levels", None)
        outputs = self._outputs.outputs if self._outputs is not None else []
        if model is None or levels is None or len(outputs) != self.n_tasks:
            return None
        wanted = {id(p) for p in params}
        by_level = [[p for p in level if id(p) in wanted] for level in model.shared_parameters_by_level()]
        if sum(len(level) for level in by_level) != len(params):
            return None  # parameters outside the shared experts: not this mode's business
        if self._separable is None:  # the loss function's property: checked on the first measurement
            self._separable = losses_are_task_separable(roots, rows, outputs)
        if not self._separable:
            return None
        return levels, by_level

    def _structured_task_grads(self, roots: Sequence[Tensor], rows: Sequence[int], params: Sequence[Tensor],
                               plan=None, private: FeatureCotangents | None = None) -> list[Tensor | None] | None:  # fmt: skip
        """:func:`~mtlbook.gradients.structured_gradients` for ``params``, or None (see :meth:`_structured_plan`)."""
        plan = plan or self._structured_plan(roots, rows, params)
        if plan is None:
            return None
        levels, by_level = plan
        result = structured_gradients(roots, rows, levels, by_level, chunk_size=self.chunk_size, private=private)
        found = {id(p): g for level, grads in zip(by_level, result) for p, g in zip(level, grads)}
        return [found[id(p)] for p in params]

    def _parameter_gradients(
        self, roots: Sequence[Tensor], rows: Sequence[int], params: Sequence[Tensor], device: torch.device,
        backward: Tensor | None = None,
    ) -> Tensor:
        """``G`` on ``params``; with ``backward`` (a scalar: the plain sum of the task losses),
        also run ``backward.backward()``, keeping the features' cotangents on the way when the
        structured mode applies (:class:`~mtlbook.gradients.FeatureCotangents`)."""
        sizes = [p.numel() for p in params]
        live = [k for k, p in enumerate(params) if p.requires_grad]  # frozen ones stay zero
        grads = None
        plan = None
        if rows and live and self._mode == "structured":
            plan = self._structured_plan(roots, rows, [params[k] for k in live])
        if backward is not None:
            if plan is None:  # measure first (from the graph), then the caller's backward
                if rows and live:
                    grads = self._batched_task_grads(roots, rows, [params[k] for k in live])
                backward.backward()
            else:
                kept = FeatureCotangents(plan[0])
                try:
                    # the graph is kept until the caller drops the losses: a level whose experts
                    # are not written out differentiates it once more
                    backward.backward(retain_graph=True)
                finally:
                    kept.remove()
                grads = self._structured_task_grads(roots, rows, [params[k] for k in live], plan, kept)
        elif plan is not None:
            grads = self._structured_task_grads(roots, rows, [params[k] for k in live], plan)
        if not rows or not live:
            return torch.zeros(self.n_tasks, sum(sizes), dtype=torch.float32, device=device)
        if grads is None:
            grads = self._batched_task_grads(roots, rows, [params[k] for k in live])
        every_row = list(rows) == list(range(self.n_tasks))
        if every_row and len(live) == len(params) and all(g is not None for g in grads):
            return torch.cat([g.reshape(len(rows), -1).float() for g in grads], dim=1)  # one op, not a copy each
        out = torch.zeros(self.n_tasks, sum(sizes), dtype=torch.float32, device=device)
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        row_index = slice(None) if every_row else torch.as_tensor(rows, device=device)  # a slice: no index_put
        for k, g in zip(live, grads):
            if g is not None:
                out[row_index, offsets[k] : offsets[k + 1]] = g.reshape(len(rows), -1)
        return out

    def _resolve_last_layers(
        self,
        shared_outputs: Sequence[Tensor] | None,
        last_layers: Sequence[nn.Linear] | None,
        layer_inputs: Sequence[Tensor] | None,
    ) -> tuple[list[nn.Linear], list[list[tuple[Tensor, Tensor]]]]:
        given = [x is not None for x in (shared_outputs, last_layers, layer_inputs)]
        if any(given):
            if not all(given):
                raise ValueError(
                    "for parameter_set='last_layer' pass all of last_layers, shared_outputs "
                    "(pre-activation outputs of those layers) and layer_inputs, or none (use attach)"
                )
            layers, outs, ins = list(last_layers), list(shared_outputs), list(layer_inputs)
            if not (len(layers) == len(outs) == len(ins)) or not layers:
                raise ValueError("last_layers, shared_outputs and layer_inputs must have the same non-zero length")
            if not all(isinstance(layer, nn.Linear) for layer in layers):
                raise TypeError("last_layers must hold nn.Linear modules")
            return layers, [[(h.detach(), u)] for h, u in zip(ins, outs)]
        if self._capture is None:
            raise ValueError("parameter_set='last_layer' needs attach(model) or explicit layer tensors")
        if not any(self._capture.calls):
            raise ValueError("no activations captured: run a forward pass with grad enabled before measuring")
        return self._capture.layers, self._capture.calls

    def _last_layer_gradients(
        self,
        roots: Sequence[Tensor],
        rows: Sequence[int],
        layers: Sequence[nn.Linear],
        calls: Sequence[Sequence[tuple[Tensor, Tensor]]],
        device: torch.device,
    ) -> Tensor:
        sizes = [layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0) for layer in layers]
        out = torch.zeros(self.n_tasks, sum(sizes), dtype=torch.float32, device=device)
        flat = [(k, h, u) for k, layer_calls in enumerate(calls) for h, u in layer_calls if u.requires_grad]
        if not rows or not flat:
            return out
        k_rows = len(rows)
        d_outputs = self._batched_task_grads(roots, rows, [u for _, _, u in flat])
        grad_w = [torch.zeros(k_rows, *layer.weight.shape, device=device) for layer in layers]
        grad_b = [torch.zeros(k_rows, layer.weight.shape[0], device=device) for layer in layers]
        for (k, h, _), du in zip(flat, d_outputs):
            if du is None:
                continue
            d_out, d_in = layers[k].weight.shape
            du = du.reshape(k_rows, -1, d_out).float()  # leading dims of u flattened to rows
            h = h.reshape(-1, d_in).float()
            grad_w[k] += torch.einsum("rbo,bi->roi", du, h)  # dL/dW = du^T h, per task
            grad_b[k] += du.sum(dim=1)  # dL/db = sum over rows of du
        pieces = []
        for k, layer in enumerate(layers):
            pieces.append(grad_w[k].reshape(k_rows, -1))
            if layer.bias is not None:
                pieces.append(grad_b[k])
        out[torch.as_tensor(rows, device=device)] = torch.cat(pieces, dim=1)
        return out

    # ----------------------------------------------------------------- EMA
    cosine_matrix = staticmethod(cosine_matrix)

    @torch.no_grad()
    def update(
        self,
        gradients: Tensor | None = None,
        present: Tensor | Sequence[bool] | None = None,
        *,
        cosine: Tensor | None = None,
        observed_pairs: Tensor | None = None,
    ) -> Tensor:
        """Fold one measurement into the EMA and return the affinity buffer.

        Pass either ``gradients`` ``[n, d]`` (cosine computed here) or ``cosine`` ``[n, n]``.
        ``observed_pairs`` (bool ``[n, n]``, optional) further restricts which pairs are
        folded in: a cosine averaged over the ranks of a distributed run may know a pair only
        where both tasks met on some rank, which is not always every pair of present tasks.
        For every pair (i, j) with both tasks observed in this measurement:

        .. math::
            A_{ij} \\leftarrow \\begin{cases}
                C_{ij} & \\text{first observation of the pair} \\\\
                \\beta A_{ij} + (1-\\beta) C_{ij} & \\text{otherwise}
            \\end{cases}

        Pairs with an unobserved task keep their value (they are not pulled toward 0).
        A task is observed when ``present[i]`` is True and, when ``gradients`` are given,
        its gradient row is finite and non-zero (a zero or NaN gradient has no direction,
        so it carries no information about the pair). Then
        ``A = clamp(A, -1, 1)`` and ``n_updates += 1``.
        """
        if (gradients is None) == (cosine is None):
            raise ValueError("update needs exactly one of gradients [n, d] or cosine [n, n]")
        n = self.n_tasks
        device = self.affinity.device
        observed = as_presence(present, n, device).clone()
        if gradients is not None:
            if not isinstance(gradients, Tensor) or gradients.dim() != 2 or gradients.shape[0] != n:
                raise ValueError(f"gradients must have shape [{n}, d], got {tuple(getattr(gradients, 'shape', ()))}")
            grads = gradients.detach().to(device=device, dtype=self.affinity.dtype)
            # a row's largest |g| is NaN or inf exactly when the row holds one (amax propagates
            # NaN); one reduction instead of isfinite's four passes over G
            finite = torch.isfinite(grads.abs().amax(dim=1)) if grads.shape[1] else torch.ones_like(observed)
            observed &= finite & (grads.norm(dim=1) > 0)
            current = cosine_matrix(grads if bool(finite.all()) else torch.nan_to_num(grads))
        else:
            if not isinstance(cosine, Tensor) or cosine.shape != (n, n):
                raise ValueError(f"cosine must have shape [{n}, {n}], got {tuple(getattr(cosine, 'shape', ()))}")
            current = cosine.detach().to(device=device, dtype=self.affinity.dtype)
        pair = observed[:, None] & observed[None, :]
        if observed_pairs is not None:
            if (
                not isinstance(observed_pairs, Tensor)
                or observed_pairs.dtype != torch.bool
                or observed_pairs.shape != (n, n)
            ):
                raise ValueError(f"observed_pairs must be a bool tensor of shape [{n}, {n}] or None")
            pair = pair & observed_pairs.to(device)
        blended = self.ema_decay * self.affinity + (1.0 - self.ema_decay) * current
        # observed before: blend; first observation: take C; pair not observed now: keep A
        new = torch.where(pair, torch.where(self.pair_observed, blended, current), self.affinity)
        self.affinity.copy_(new.clamp(-1.0, 1.0))
        self.pair_observed |= pair
        self.n_updates += 1
        return self.affinity

    def measure(self, task_losses: Tensor | Sequence[Tensor], present: Tensor | Sequence[bool] | None = None) -> Tensor:
        """Extract per-task gradients from the attached model, update the EMA, return a copy of ``A``."""
        if self._model_ref is None:
            raise ValueError("measure needs attach(model) first (or call extract_gradients + update)")
        roots = loss_roots(task_losses, self.n_tasks)
        mask = as_presence(present, self.n_tasks, roots[0].device)
        gradients = self.extract_gradients(task_losses, present=mask)
        return self.update(gradients, mask).clone()

    @torch.compiler.disable
    def gradients_in_backward(self, task_losses: Tensor | Sequence[Tensor],
                              present: Tensor | Sequence[bool] | None = None) -> Tensor:  # fmt: skip
        r"""``G`` ``[n_tasks, d]`` as :meth:`extract_gradients` gives it, and the training backward
        of :math:`\mathcal L = \sum_k L_k` (all entries of ``task_losses``, as
        ``losses.sum().backward()`` runs it: ``.grad`` accumulates exactly the same values).

        In the structured mode the backward keeps the cotangents of the task features on its
        way (:class:`~mtlbook.gradients.FeatureCotangents`), so :math:`G` costs only the pass
        through the shared experts: the backward to the features, which :meth:`measure` runs
        on its own before the caller's, is the training backward itself. Every other mode (and
        ``parameter_set="last_layer"``) measures first and then runs the same backward. Only for
        a plain sum: where the objective has more terms (adaTT's transfer, a balancer's weights,
        a gate regulariser), measure before building it with :meth:`measure`.
        """
        if self._model_ref is None:
            raise ValueError("gradients_in_backward needs attach(model) first")
        roots, rows = self._roots_and_rows(task_losses, present)
        device = roots[0].device
        # the caller's losses.sum(); a list of scalars is summed as given
        total = as_loss_vector(task_losses, self.n_tasks).sum() if isinstance(task_losses, Tensor) else sum(roots)
        if self.parameter_set == "last_layer":
            layers, calls = self._resolve_last_layers(None, None, None)
            gradients = self._last_layer_gradients(roots, rows, layers, calls, device)
            total.backward()
            return gradients
        return self._parameter_gradients(roots, rows, self._parameter_set(), device, backward=total)

    def measure_in_backward(self, task_losses: Tensor | Sequence[Tensor],
                            present: Tensor | Sequence[bool] | None = None) -> Tensor:  # fmt: skip
        """:meth:`measure` and the caller's ``losses.sum().backward()`` in one: the same
        affinity update, the same ``.grad``, one backward to the task features fewer
        (:meth:`gradients_in_backward`). Returns a copy of ``A``."""
        mask = as_presence(present, self.n_tasks, loss_roots(task_losses, self.n_tasks)[0].device)
        gradients = self.gradients_in_backward(task_losses, mask)
        return self.update(gradients, mask).clone()

    def forward(self, task_losses: Tensor, present: Tensor | None = None) -> Tensor:  # noqa: D401
        """Same as :meth:`measure`."""
        return self.measure(task_losses, present)

