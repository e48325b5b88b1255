r"""Paired inference for chapter 8: an exact sign-flip test, TOST equivalence and the minimum detectable effect.

All three work on the per-seed paired differences :math:`d_1, \dots, d_n` of two
configurations (same data, initial weights and batches per seed).

**Exact sign-flip permutation test** (:func:`sign_flip_test`). Under the null hypothesis that
the two configurations are exchangeable within a seed, every :math:`d_k` is as likely to be
:math:`+|d_k|` as :math:`-|d_k|`. With :math:`S = \sum_k d_k`, the two-sided p-value is the
share of the :math:`2^n` sign patterns :math:`\varepsilon \in \{\pm 1\}^n` with
:math:`|\sum_k \varepsilon_k |d_k|| \ge |S|`. It is computed exactly, without sampling, by
meeting in the middle: the :math:`2^{\lceil n/2 \rceil}` partial sums of one half are sorted
and, for each of the :math:`2^{\lfloor n/2 \rfloor}` partial sums :math:`a` of the other half,
the patterns with :math:`a + b \ge |S|` or :math:`a + b \le -|S|` are counted by binary
search. The smallest p-value it can reach is :math:`2 / 2^n` (0.0625 for five seeds).

**TOST equivalence** (:func:`tost`, Schuirmann 1987). Equivalence within a margin
:math:`\delta > 0` stated in advance is shown by rejecting both one-sided hypotheses
:math:`H_0^-: \mu \le -\delta` and :math:`H_0^+: \mu \ge \delta`:

.. math:: t^- = \frac{\bar d + \delta}{s_d/\sqrt n}, \quad p^- = 1 - F_{n-1}(t^-), \qquad
          t^+ = \frac{\bar d - \delta}{s_d/\sqrt n}, \quad p^+ = F_{n-1}(t^+),

with :math:`F_{n-1}` the t distribution's CDF; :math:`p = \max(p^-, p^+)`. Equivalent at level
:math:`\alpha` exactly when the :math:`1 - 2\alpha` t-interval lies inside
:math:`(-\delta, \delta)`.

**Minimum detectable effect** (:func:`mde`, :func:`power`). The two-sided paired t-test at
level :math:`\alpha` rejects when :math:`|T| > t_{1-\alpha/2,\,n-1}`; under a true mean
difference :math:`\mu`, :math:`T` follows a noncentral t with :math:`n - 1` degrees of freedom
and noncentrality :math:`\mu\sqrt n / \sigma_d`. The MDE is the :math:`\mu` at which the
power reaches the target (80%), found by root search; roughly
:math:`(t_{1-\alpha/2,\,n-1} + t_{\text{power},\,n-1})\,\sigma_d/\sqrt n`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["mde", "power", "sign_flip_test", "tost"]

#: Largest n the exact test enumerates (2^20 partial sums per half).
MAX_EXACT_N = 40


def _differences(d: Sequence[float] | np.ndarray, name: str = "d") -> np.ndarray:
    x = np.asarray(d, dtype=float).reshape(-1)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers, got {x.tolist()[:5]}...")
    return x


def _check_alpha(alpha: float, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {alpha!r}")
    return float(alpha)


def _half_sums(values: np.ndarray) -> np.ndarray:
    """All :math:`2^m` sums :math:`\\sum_k \\varepsilon_k v_k` over sign patterns."""
    sums = np.zeros(1)
    for v in values:
        sums = np.concatenate([sums + v, sums - v])
    return sums


def sign_flip_test(d: Sequence[float] | np.ndarray) -> float:
    r"""Exact two-sided sign-flip permutation p-value of :math:`\sum_k d_k` (see the module docstring).

    ``p = 1`` when every difference is 0. Raises ``ValueError`` for more than
    :data:`MAX_EXACT_N` differences.
    """
    x = _differences(d)
    if x.size > MAX_EXACT_N:
        raise ValueError(f"d must hold at most {MAX_EXACT_N} differences for the exact test, got {x.size}")
    magnitudes = np.abs(x)
    observed = abs(float(x.sum()))
    if observed == 0.0:
        return 1.0
    # a pattern ties the observed sum up to rounding: count it as at least as extreme
    tolerance = 1e-12 * float(magnitudes.sum())
    threshold = observed - tolerance
    half = x.size // 2
    left, right = _half_sums(magnitudes[:half]), np.sort(_half_sums(magnitudes[half:]))
    upper = right.size - np.searchsorted(right, threshold - left, side="left")  # a + b >= threshold
    lower = np.searchsorted(right, -threshold - left, side="right")  # a + b <= -threshold
    count = int(upper.sum() + lower.sum())
    return min(1.0, count / float(2**x.size))


def tost(d: Sequence[float] | np.ndarray, margin: float, alpha: float = 0.05) -> dict[str, float | bool]:
    r"""Paired TOST for :math:`|\mu| < \delta` = ``margin`` (see the module docstring).

    Returns ``p`` (the larger one-sided p), ``p_lower`` (:math:`p^-`), ``p_upper``
    (:math:`p^+`), the :math:`1-2\alpha` interval ``ci_low``/``ci_high`` and ``equivalent``
    (``p < alpha``). With all differences equal the standard error is 0: equivalent exactly
    when :math:`|\bar d| < \delta`.
    """
    from scipy import stats

    x = _differences(d)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin <= 0:
        raise ValueError(f"margin must be a finite number > 0, got {margin!r}")
    alpha = _check_alpha(alpha)
    if x.size < 2:
        raise ValueError(f"d must hold at least 2 differences, got {x.size}")
    mean, n = float(x.mean()), x.size
    se = float(x.std(ddof=1)) / math.sqrt(n)
    if se == 0.0:
        inside = abs(mean) < margin
        p_lower = 0.0 if mean > -margin else 1.0
        p_upper = 0.0 if mean < margin else 1.0
        return {"p": max(p_lower, p_upper), "p_lower": p_lower, "p_upper": p_upper, "ci_low": mean,
                "ci_high": mean, "equivalent": bool(inside)}  # fmt: skip
    p_lower = float(stats.t.sf((mean + margin) / se, n - 1))
    p_upper = float(stats.t.cdf((mean - margin) / se, n - 1))
    half = float(stats.t.ppf(1.0 - alpha, n - 1)) * se
    p = max(p_lower, p_upper)
    return {"p": p, "p_lower": p_lower, "p_upper": p_upper, "ci_low": mean - half, "ci_high": mean + half,
            "equivalent": bool(p < alpha)}  # fmt: skip


def power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    r"""Power of the two-sided paired t-test at level ``alpha`` for a true mean difference ``effect``."""
    from scipy import stats

    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    if isinstance(sd, bool) or not isinstance(sd, (int, float)) or not math.isfinite(sd) or sd <= 0:
        raise ValueError(f"sd must be a finite number > 0, got {sd!r}")
    alpha = _check_alpha(alpha)
    critical = float(stats.t.ppf(1.0 - alpha / 2.0, n - 1))
    noncentrality = abs(float(effect)) * math.sqrt(n) / float(sd)  # the test is symmetric in the sign
    near = float(stats.nct.sf(critical, n - 1, noncentrality))
    far = float(stats.nct.cdf(-critical, n - 1, noncentrality))  # the wrong-sign tail: tiny, NaN in scipy when ~0
    return min(1.0, near + (far if math.isfinite(far) else 0.0))


def mde(sd: float, n: int, alpha: float = 0.05, target_power: float = 0.8) -> float:
    r"""Smallest true mean difference the paired t-test detects with ``target_power``.

    ``sd`` is the standard deviation of the paired differences :math:`\sigma_d`, ``n`` the
    number of seeds. The answer is in the units of ``sd``.
    """
    from scipy.optimize import brentq

    target_power = _check_alpha(target_power, "target_power")
    alpha = _check_alpha(alpha)
    if target_power <= alpha:
        raise ValueError(f"target_power must exceed alpha={alpha}, got {target_power!r}")
    power(1.0, sd, n, alpha)  # validates sd and n
    upper = float(sd)
    while power(upper, sd, n, alpha) < target_power:
        upper *= 2.0
    return float(brentq(lambda effect: power(effect, sd, n, alpha) - target_power, 0.0, upper, xtol=1e-12 * upper))
