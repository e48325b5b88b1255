r"""Experts: the small MLPs every multi-task model in mtlbook is assembled from.

An expert maps an input :math:`x \in \mathbb{R}^{d_\text{in}}` to a representation
:math:`E(x) \in \mathbb{R}^{d_\text{out}}`. With hidden widths :math:`(h_1, \dots, h_J)`:

.. math::

    z_0 = x, \qquad
    z_j = \operatorname{Dropout}\big(\sigma(A_j z_{j-1} + a_j)\big) \quad (j = 1, \dots, J), \qquad
    E(x) = \sigma_\text{out}(B z_J + b).

:math:`\sigma` is ReLU by default; :math:`\sigma_\text{out}` is the identity by default,
so an expert's output *is* the output of its last affine map :math:`u = B z + b`. That is
what adaTT's cheap "last shared layer" mode needs: it back-propagates a task loss only to
:math:`u` and forms :math:`\partial L / \partial B = (\partial L / \partial u)^\top z`, so
the tensor it differentiates must be the layer's own output (and a linear output also
cannot die the way a ReLU output can). The nonlinearity after the mixture is the tower's.

The final affine map is the expert's ``output_layer``: it projects whatever the hidden
stack produced onto the output width, which is how experts of different hidden widths and
depths still emit vectors of one common width for a weighted sum.

No BatchNorm is used anywhere, so a batch of one row behaves like any other batch in
train mode.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from mtlbook.models._validation import check_dropout, check_int, check_widths

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def _activation(name: str, param: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"{param} must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def hidden_stack(
    in_dim: int, hidden: Sequence[int], dropout: float = 0.0, activation: str = "relu"
) -> tuple[nn.Sequential, int]:
    """``Linear -> activation -> Dropout`` for each hidden width; returns the stack and its output width.

    An empty ``hidden`` gives an empty (identity) stack of width ``in_dim``.
    """
    in_dim = check_int(in_dim, "in_dim", 1)
    hidden = check_widths(hidden, "hidden")
    dropout = check_dropout(dropout)
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers.append(nn.Linear(width, h))
        layers.append(_activation(activation, "activation"))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    return nn.Sequential(*layers), width


class Expert(nn.Module):
    """An MLP expert ``E: R^in_dim -> R^out_dim``.

    Args:
        in_dim: input width (>= 1).
        out_dim: output width (>= 1).
        hidden: hidden-layer widths, e.g. ``(64,)`` or ``(128, 64)``; ``()`` makes the
            expert a single affine layer.
        dropout: dropout probability after each hidden activation, in [0, 1).
        activation: hidden activation, one of ``"relu"``, ``"gelu"``, ``"tanh"``, ``"identity"``.
        output_activation: activation after ``output_layer`` (same choices; default
            ``"identity"`` so the expert's output is the last layer's output).

    Attributes:
        body: the hidden stack (``nn.Sequential``, possibly empty).
        output_layer: the final ``nn.Linear`` (the expert's "last layer").
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
        activation: str = "relu",
        output_activation: str = "identity",
    ) -> None:
        super().__init__()
        self.in_dim = check_int(in_dim, "in_dim", 1)
        self.out_dim = check_int(out_dim, "out_dim", 1)
        self.hidden = check_widths(hidden, "hidden")
        self.body, width = hidden_stack(in_dim, self.hidden, dropout, activation)
        self.output_layer = nn.Linear(width, out_dim)
        self.output_activation = _activation(output_activation, "output_activation")

    def forward(self, x: Tensor) -> Tensor:
        """``[batch, in_dim] -> [batch, out_dim]``."""
        return self.output_activation(self.output_layer(self.body(x)))
