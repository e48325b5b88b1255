"""What :class:`~mtlbook.adatt.affinity.TaskAffinityComputer` keeps of a model's latest forward
pass: forward hooks that store the tensors a measurement reads afterwards (the inputs and
pre-activations of the last shared Linear layers, for ``parameter_set="last_layer"``; the
model's outputs, where the cut and the structured extraction start). Both are shared, not
copied, by ``copy.deepcopy`` and check the module's identity, so a copied model's hooks are inert.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

from torch import Tensor, nn

__all__ = ["LastLayerCapture", "OutputCapture"]


class LastLayerCapture:
    """Forward hooks that remember, for each captured ``nn.Linear``, its input ``h`` and
    its output ``u = h W^T + b`` (the pre-activation) from the latest forward pass.

    A forward pre-hook on the model clears the store, so a layer called several times in
    one forward (weight sharing) keeps every call of that forward, and nothing older.
    Nothing is captured when the output does not require grad (``torch.no_grad``/eval).
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Linear]) -> None:
        self.layers = list(layers)
        self.calls: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.layers]
        self.model_ref = weakref.ref(model)
        self.handles = [model.register_forward_pre_hook(self._on_model_forward)]
        for k, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._make_hook(k)))

    def __deepcopy__(self, memo: dict) -> "LastLayerCapture":
        # Shared, not copied: it holds live graph tensors, and the identity checks below
        # make the hooks of a copied model inert.
        return self

    def _on_model_forward(self, module: nn.Module, *_: Any) -> None:
        # copy.deepcopy(model) copies the hooks too: a copy's forward must not touch our store
        if module is self.model_ref():
            self._clear()

    def _clear(self) -> None:
        for calls in self.calls:
            calls.clear()

    def _make_hook(self, k: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if module is self.layers[k] and isinstance(output, Tensor) and output.requires_grad:
                # h is only a value (no gradient needed); u must stay on the graph.
                self.calls[k].append((inputs[0].detach(), output))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._clear()


class OutputCapture:
    """A forward hook that keeps the model's outputs (the tensors of its output dict, list or
    tuple, or the output tensor) from its latest forward pass with grad enabled: where the ``"cut"``
    extraction splits the chain rule. A deep copy of the model does not touch the store."""

    def __init__(self, model: nn.Module) -> None:
        self.model_ref = weakref.ref(model)
        self.outputs: list[Tensor] = []
        self.handle = model.register_forward_hook(self._hook)

    def __deepcopy__(self, memo: dict) -> "OutputCapture":
        return self  # holds live graph tensors; the identity check makes a copy's hook inert

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if module is not self.model_ref():
            return
        if isinstance(output, dict):
            output = list(output.values())
        values = output if isinstance(output, (list, tuple)) else [output]
        self.outputs = [y for y in values if isinstance(y, Tensor) and y.requires_grad]

    def remove(self) -> None:
        self.handle.remove()
        self.outputs = []
