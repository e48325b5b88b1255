r"""The noise baseline: how low a cosine gets from mini-batch noise alone.

A cosine between two *noisy* gradients can be negative without any conflict between the
tasks' true gradients (GUIDE section 8). To know what noise alone gives, split a batch into
two disjoint halves :math:`B_A, B_B` and take **the same task** on both:

.. math::

    n_i(B) = \cos\bigl(\nabla_{\theta_s} L_i(B_A),\ \nabla_{\theta_s} L_i(B_B)\bigr).

This *noise cosine* says how well one batch determines a task's direction (near 1: well; near
0: the batch gradient is mostly noise). It is not the right yardstick for a *pair's* cosine,
though: two tasks measured on the same rows share those rows' structure, and their cosine
wobbles more than the cosine of one task on two disjoint halves (on two pure-noise tasks, a
threshold taken from the noise cosines calls about twice too many batches conflicting). So the
threshold for a pair uses the same halves differently. With mean losses the full-batch
gradient is :math:`g_j \approx (g_j^A + g_j^B)/2`; the difference

.. math::

    e_j = g_j^A - g_j^B

has the same noise as :math:`g_j` (flipping the sign of half B's rows) and none of its
signal. The null cosines of the pair are :math:`\cos(g_i, e_j)` and :math:`\cos(e_i, g_j)`: what
the pair's cosine looks like when one task carries only its noise, on the same rows. Pool
them (and their negatives, as the null is symmetric) over the batches and take the lower
:math:`\alpha`-quantile; the pair's **noise threshold** is

.. math::

    t_{ij} = \min\bigl(0,\ q_\alpha\{\pm\cos(g_i(B), e_j(B)),\ \pm\cos(e_i(B), g_j(B))\}_B\bigr),

and a batch counts as **conflict** for the pair only when :math:`\cos(g_i, g_j) < t_{ij}`.
For two tasks whose gradients are pure noise, :math:`(g_i, e_j)` has exactly the distribution
of :math:`(g_i, g_j)`, so this happens on a share :math:`\alpha` of the batches (a one-sided
binomial test against :math:`\alpha` says whether an observed share is more); for two
identical tasks :math:`\cos = 1` and it never happens. When the tasks have real signal,
:math:`e_j` is all noise while :math:`g_j` is not, so the null is wider than the pair's own
wobble: the threshold errs on the side of calling fewer conflicts.

:func:`split_batch` is the default way of halving a batch: rows ``0, 2, 4, ...`` and
``1, 3, 5, ...`` of every tensor with a leading batch dimension, inside tensors, dicts,
tuples / lists (named tuples too) and dataclasses (such as :class:`mtlbook.data.Batch`);
anything else is passed to both halves unchanged. Interleaving rather than cutting in the
middle keeps the halves alike when a batch is sorted (by time, by user).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
from torch import Tensor

__all__ = ["binomial_tail", "noise_thresholds", "split_batch"]


def _leading_sizes(obj: Any, sizes: list[int]) -> None:
    if isinstance(obj, Tensor):
        if obj.dim() >= 1:
            sizes.append(int(obj.shape[0]))
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _leading_sizes(value, sizes)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            _leading_sizes(value, sizes)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _leading_sizes(getattr(obj, f.name), sizes)


def _take(obj: Any, start: int) -> Any:
    if isinstance(obj, Tensor):
        return obj[start::2] if obj.dim() >= 1 else obj
    if isinstance(obj, Mapping):
        halves = {key: _take(value, start) for key, value in obj.items()}
        if type(obj) is dict:
            return halves
        try:
            return type(obj)(halves)
        except TypeError:  # a mapping type that cannot be built from a dict (e.g. defaultdict)
            return halves
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuple
        return type(obj)(*(_take(value, start) for value in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take(value, start) for value in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _take(getattr(obj, f.name), start) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Two disjoint halves of ``batch``: its even rows and its odd rows.

    Every tensor with at least one dimension is sliced along dim 0 (``x[0::2]``, ``x[1::2]``);
    containers (dict, tuple, list, named tuple, dataclass) are rebuilt around the halves;
    0-d tensors and other objects go to both halves unchanged.

    Raises:
        ValueError: the batch holds no tensor with a batch dimension, the tensors disagree on
            the batch size, or the batch has fewer than 2 rows.
    """
    sizes: list[int] = []
    _leading_sizes(batch, sizes)
    if not sizes:
        raise ValueError(
            f"split: the default split_batch found no tensor with a leading batch dimension in a "
            f"{type(batch).__name__}; pass split=callable(batch) -> (half_a, half_b)"
        )
    if len(set(sizes)) != 1:
        raise ValueError(
            f"split: the default split_batch needs one batch size for every tensor, found {sorted(set(sizes))}; "
            "pass split=callable(batch) -> (half_a, half_b)"
        )
    if sizes[0] < 2:
        raise ValueError(f"split: a batch needs at least 2 rows for the noise baseline, got {sizes[0]}")
    return _take(batch, 0), _take(batch, 1)


def noise_thresholds(null_cosines: np.ndarray, alpha: float) -> np.ndarray:
    """Pairwise noise thresholds :math:`t_{ij}` ``[n, n]`` from null cosines ``[n_batches, n, n]``.

    ``null_cosines[b, i, j]`` is :math:`\\cos(g_i, e_j)` on batch ``b`` (module docstring).
    ``t_ij = min(0, quantile_alpha(+-null[:, i, j], +-null[:, j, i]))`` over the finite values;
    0 where there is none (then only the sign of the cosine is left).
    """
    values = np.asarray(null_cosines, dtype=np.float64)
    n = values.shape[1]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            pooled = np.concatenate([values[:, i, j], values[:, j, i]])
            pooled = pooled[np.isfinite(pooled)]
            if pooled.size and i != j:
                out[i, j] = min(0.0, float(np.quantile(np.concatenate([pooled, -pooled]), alpha)))
    return out


def binomial_tail(k: int, m: int, p: float) -> float:
    """One-sided binomial p-value :math:`P(X \\ge k)` for :math:`X \\sim \\mathrm{Bin}(m, p)` (log-space sum)."""
    if m <= 0 or k <= 0:
        return 1.0
    if k > m:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(m + 1) - math.lgamma(x + 1) - math.lgamma(m - x + 1) + x * log_p + (m - x) * log_q
        for x in range(k, m + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))
