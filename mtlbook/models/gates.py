r"""Gates: input-conditioned softmax weights over a set of experts, and the two ways to combine.

**Gate.** For an input :math:`x` and :math:`m` experts, a gate is one affine map and a softmax,

.. math::

    g(x) = \operatorname{softmax}(W x + c) \in \Delta^{m-1},
    \qquad g(x)_i \ge 0, \quad \textstyle\sum_i g(x)_i = 1.

The softmax is evaluated in float32 even under autocast, so the weights sum to one to
float32 precision whatever the compute dtype.

**Mixture** (MMoE, CGC, PLE). Experts of one common width :math:`d` are averaged:

.. math::

    f(x) = \sum_{i=1}^{m} g(x)_i \, E_i(x) \in \mathbb{R}^{d}.

**Block attention** (heterogeneous experts). Experts of widths :math:`d_1, \dots, d_m` are
*concatenated*, each block scaled by its gate weight and a fixed width correction,

.. math::

    f(x) = \big[\, g(x)_1 c_1 E_1(x) \;\|\; \cdots \;\|\; g(x)_m c_m E_m(x) \,\big]
    \in \mathbb{R}^{d_1 + \cdots + d_m},
    \qquad c_i = \sqrt{\bar d / d_i}, \quad \bar d = \tfrac{1}{m}\textstyle\sum_j d_j .

*Why* :math:`c_i`: if the entries of every expert output have a similar scale
:math:`s`, block :math:`i` has squared norm about :math:`d_i s^2`, so a 128-wide expert
would reach the next layer with four times the energy of a 32-wide one and the gate would
drift toward it for its width alone (the "dim-asymmetry collapse" the PLE notes describe).
With the correction every block has squared norm about :math:`\bar d s^2` before gating,
so its share of :math:`\lVert f \rVert^2` is set by :math:`g_i^2` alone. Using the mean width
:math:`\bar d` (rather than 1) keeps :math:`\lVert f \rVert` near its uncorrected size, and when
all widths are equal every :math:`c_i = 1` and the layer is a plain weighted concatenation.

**Entropy.** The regulariser and the plots use the normalised entropy of a gate,
:math:`\tilde H(g) = -\sum_i g_i \log g_i / \log m \in [0, 1]` (1 = uniform use of the
experts, 0 = a single expert), averaged over the batch; a gate with one expert has
:math:`\tilde H = 0` by convention and is left out of averages.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from mtlbook.models._validation import check_int


class SoftmaxGate(nn.Module):
    """``g(x) = softmax(W x + c)`` over ``n_experts`` experts.

    Args:
        in_dim: input width (>= 1).
        n_experts: number of experts the gate weighs (>= 1).

    ``forward(x)`` returns float32 weights ``[batch, n_experts]`` whose rows sum to 1.
    """

    def __init__(self, in_dim: int, n_experts: int) -> None:
        super().__init__()
        self.in_dim = check_int(in_dim, "in_dim", 1)
        self.n_experts = check_int(n_experts, "n_experts", 1)
        self.linear = nn.Linear(in_dim, n_experts)

    def forward(self, x: Tensor) -> Tensor:
        # float32 softmax: bf16 rounding would leave rows summing to 1 +- 1e-2
        return torch.softmax(self.linear(x).float(), dim=-1)


def mix_experts(weights: Tensor, stacked: Tensor) -> Tensor:
    """Weighted sum ``f = sum_i weights[:, i] * stacked[:, i]``.

    Args:
        weights: ``[batch, m]`` gate weights.
        stacked: ``[batch, m, d]`` expert outputs stacked along dim 1.

    Returns:
        ``[batch, d]``.
    """
    if stacked.dim() != 3 or weights.shape != stacked.shape[:2]:
        raise ValueError(
            f"mix_experts expects weights [batch, m] and stacked [batch, m, d], "
            f"got {tuple(weights.shape)} and {tuple(stacked.shape)}"
        )
    return (weights.unsqueeze(-1) * stacked).sum(dim=1)


def block_scales(widths: Sequence[int]) -> tuple[float, ...]:
    """Width corrections ``c_i = sqrt(mean(widths) / widths[i])`` for block attention."""
    widths = [check_int(w, "widths entries", 1) for w in widths]
    if not widths:
        raise ValueError("widths must name at least one expert width")
    mean_width = sum(widths) / len(widths)
    return tuple(math.sqrt(mean_width / w) for w in widths)


def concat_blocks(weights: Tensor, outputs: Sequence[Tensor], scales: Sequence[float]) -> Tensor:
    """Block attention ``[g_1 c_1 E_1 || ... || g_m c_m E_m]``.

    Args:
        weights: ``[batch, m]`` gate weights.
        outputs: ``m`` tensors ``[batch, d_i]``.
        scales: ``m`` width corrections (see :func:`block_scales`).

    Returns:
        ``[batch, d_1 + ... + d_m]``.
    """
    if len(outputs) != weights.shape[1] or len(scales) != len(outputs):
        raise ValueError(
            f"concat_blocks needs one output and one scale per gate weight, got {weights.shape[1]} weights, "
            f"{len(outputs)} outputs and {len(scales)} scales"
        )
    return torch.cat([weights[:, i : i + 1] * (c * e) for i, (e, c) in enumerate(zip(outputs, scales))], dim=-1)


def normalized_entropy(weights: Tensor) -> Tensor:
    """Batch mean of ``-sum_i g_i log g_i / log m`` for ``weights [batch, m]`` (0 when m == 1)."""
    m = weights.shape[-1]
    if m < 2:
        return weights.new_zeros(())
    w = weights.float()
    entropy = -(w * w.clamp_min(1e-12).log()).sum(dim=-1)
    return entropy.mean() / math.log(m)
