"""The argument checks every public function uses, with one message format.

A bad argument raises ``ValueError`` (or ``TypeError`` where the caller asks for it on a
value of the wrong type) whose message names the parameter and the accepted range:
``"<name> must be <accepted>, got <value>"``, e.g. ``"rho must be a finite number > 0,
got -1.0"``. Bools are never accepted as numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_int", "check_mask", "check_number", "check_registration", "fail"]


def fail(name: str, accepted: str, value: Any, error: type[Exception] = ValueError) -> None:
    """Raise ``error("<name> must be <accepted>, got <value!r>")``."""
    raise error(f"{name} must be {accepted}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_int(value: Any, name: str, minimum: int, maximum: int | None = None, *,
              wrong_type: type[Exception] = ValueError) -> int:  # fmt: skip
    """``value`` as an int in ``[minimum, maximum]`` (no upper bound when ``maximum`` is None).

    A value that is not an int (a bool, a float, a str) raises ``wrong_type``; one out of
    range raises ``ValueError``.
    """
    accepted = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
    if not _is_int(value):
        fail(name, accepted, value, wrong_type)
    if value < minimum or (maximum is not None and value > maximum):
        fail(name, accepted, value)
    return int(value)


def check_number(value: Any, name: str, low: float | None = None, high: float | None = None, *,
                 open_low: bool = False, open_high: bool = False,
                 wrong_type: type[Exception] = ValueError) -> float:  # fmt: skip
    """``value`` as a finite float in the interval from ``low`` to ``high`` (``None``: unbounded;
    ``open_low`` / ``open_high`` exclude the end point). ``check_number(x, "lr", 0, open_low=True)``
    accepts a finite number > 0."""
    if low is not None and high is not None:
        accepted = f"a finite number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    elif low is not None:
        accepted = f"a finite number {'>' if open_low else '>='} {low:g}"
    elif high is not None:
        accepted = f"a finite number {'<' if open_high else '<='} {high:g}"
    else:
        accepted = "a finite number"
    if not _is_real(value):
        fail(name, accepted, value, wrong_type)
    number = float(value)
    below = low is not None and (number <= low if open_low else number < low)
    above = high is not None and (number >= high if open_high else number > high)
    if not math.isfinite(number) or below or above:
        fail(name, accepted, value)
    return number


def check_mask(present: Any, n: int, name: str = "present", *, per: str = "task",
               wrong_type: type[Exception] = TypeError) -> Any:  # fmt: skip
    """A presence mask: a bool tensor of shape ``[n]`` (one flag per task or per row).

    A tensor of another dtype (or not a tensor) raises ``wrong_type``, a wrong shape
    ``ValueError``; the mask is returned unchanged (callers move it to their device).
    """
    import torch

    accepted = f"a bool tensor of shape [{n}] (one flag per {per})"
    if not isinstance(present, torch.Tensor) or present.dtype != torch.bool:
        got = f"dtype {present.dtype}" if isinstance(present, torch.Tensor) else type(present).__name__
        raise wrong_type(f"{name} must be {accepted}, got {got}")
    if tuple(present.shape) != (n,):
        raise ValueError(f"{name} must be {accepted}, got shape {list(present.shape)}")
    return present


def check_registration(name: Any, registry: dict, what: str, value: Any, *, callable_value: bool = True) -> None:
    """Refuse a registry entry: ``name`` must be a new non-empty str and ``value`` callable."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if name in registry:
        raise ValueError(f"name must be a new {what} name, got {name!r}, which is already registered")
    if callable_value and not callable(value):
        raise TypeError(f"{what} must be callable, got {type(value).__name__}")
