r"""C-MAPSS FD001 as a two-task problem: remaining useful life and health state (chapter 2).

Both tasks read the same engine and differ in what they ask of it:

* ``rul`` (regression, in cycles): the piecewise-linear target
  :math:`y = \min(\mathrm{RUL}, R_c)` with :math:`R_c = 125` by default. Early in an
  engine's life the sensors barely move, so no model can tell 300 cycles to go from 200;
  capping the target says "healthy, far from failure" for all of those cycles and keeps the
  loss from being dominated by unpredictable early rows. 125 is the usual choice for FD001
  :cite:`li2018remaining`; the shortest training engine runs 128 cycles, so every engine
  shows the cap and the linear part.
* ``health`` (multiclass, 3 states) cut from the *uncapped* RUL with thresholds
  :math:`(t_c, t_d) = (30, 80)`:

  .. math::

      h = \begin{cases} 0\ \text{healthy} & \mathrm{RUL} > t_d \\
                         1\ \text{degrading} & t_c < \mathrm{RUL} \le t_d \\
                         2\ \text{critical} & \mathrm{RUL} \le t_c . \end{cases}

  Thirty cycles is a maintenance window (the last 31 cycles of every engine are critical);
  80 leaves a 50-cycle degrading band. Every training engine contributes exactly 31 critical
  and 50 degrading rows and all its remaining rows as healthy, so critical is the rare class
  (about 17 % of the rows used for training, healthy about 55 %). Since :math:`R_c > t_d`, the
  state is also a function of the capped target.

Inputs. FD001 has a single operating condition, so the three ``setting_*`` columns are
measurement noise around one point and are left out. A sensor is dropped as constant when it
takes at most ``max_unique`` (default 2) distinct values on the *training* engines: in FD001
that is ``s_1, s_5, s_6, s_10, s_16, s_18, s_19``, leaving 14 sensors. Each row then
summarises a trailing window of the last ``window`` cycles of its own engine: per sensor the window mean and the least-squares slope against the cycle
number,

.. math::

    \bar x = \frac{1}{m}\sum_{j} x_j, \qquad
    \beta = \frac{m\sum_j t_j x_j - \sum_j t_j \sum_j x_j}{m \sum_j t_j^2 - (\sum_j t_j)^2}
    \quad(\beta = 0 \text{ when } m = 1),

which gives ``2 * n_sensors`` features that only look backwards in time. Training and
validation keep only rows with a full window (``cycle >= window``): a slope through two or
three noisy readings is an outlier that the network would chase. This drops the first
``window - 1`` cycles of each engine, all of them healthy. Every FD001 test engine has at least
31 cycles, so its last cycle has a full window too. The features are
standardised with the mean and standard deviation of the training-split rows alone
(validation and test rows never enter the statistics).

Splits are by engine: the training file's units are divided into train and validation engines
(``val_fraction``, seeded), and the test set is the last recorded cycle of every test engine,
labelled with the RUL file, which is how C-MAPSS results are usually reported
:cite:`saxena2008damage`. ``extras`` keep ``unit``, ``cycle`` and the uncapped ``rul_raw`` of
every row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mtlbook._checks import check_int
from mtlbook.data.batch import MultiTaskDataset, TaskSpec
from mtlbook.data.cmapss import CMAPSS, load_cmapss

__all__ = [
    "CMAPSSHealth",
    "HEALTH_STATES",
    "HEALTH_TASKS",
    "DEFAULT_RUL_CAP",
    "DEFAULT_THRESHOLDS",
    "SENSOR_COLUMNS",
    "cap_rul",
    "class_balance",
    "constant_columns",
    "fit_standardizer",
    "health_state",
    "make_cmapss_health",
    "split_units",
    "window_features",
]

DEFAULT_RUL_CAP = 125
DEFAULT_THRESHOLDS = (30, 80)
HEALTH_STATES: tuple[str, ...] = ("healthy", "degrading", "critical")
HEALTH_TASKS: tuple[TaskSpec, ...] = (TaskSpec("rul", "regression"), TaskSpec("health", "multiclass", 3))
SENSOR_COLUMNS: tuple[str, ...] = tuple(f"s_{i}" for i in range(1, 22))


# --------------------------------------------------------------------------- validation


_check_int = check_int


def _check_thresholds(thresholds: object) -> tuple[int, int]:
    try:
        critical, degrading = thresholds  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"thresholds must be a pair (critical, degrading) of ints, got {thresholds!r}") from None
    critical = _check_int(critical, "thresholds[0] (critical)", 0)
    degrading = _check_int(degrading, "thresholds[1] (degrading)", 0)
    if not critical < degrading:
        raise ValueError(f"thresholds must satisfy 0 <= critical < degrading, got {thresholds!r}")
    return critical, degrading


# --------------------------------------------------------------------------- labels


def cap_rul(rul: np.ndarray | Sequence[float], cap: int = DEFAULT_RUL_CAP) -> np.ndarray:
    """The piecewise-linear target :math:`\\min(\\mathrm{RUL}, \\text{cap})` as float32.

    Raises:
        ValueError: ``cap`` is not an int >= 1, or an RUL value is negative or not finite.
    """
    cap = _check_int(cap, "cap", 1)
    values = np.asarray(rul, dtype=np.float64)
    if values.size and (not np.isfinite(values).all() or values.min() < 0):
        raise ValueError("rul must hold finite values >= 0")
    return np.minimum(values, cap).astype(np.float32)


def health_state(rul: np.ndarray | Sequence[float], thresholds: tuple[int, int] = DEFAULT_THRESHOLDS) -> np.ndarray:
    """Health state per row from the (uncapped) RUL: 0 healthy, 1 degrading, 2 critical.

    ``critical`` is ``rul <= thresholds[0]``, ``degrading`` is
    ``thresholds[0] < rul <= thresholds[1]``, ``healthy`` is ``rul > thresholds[1]``.

    Returns:
        int64 array of the same shape as ``rul``.
    """
    critical, degrading = _check_thresholds(thresholds)
    values = np.asarray(rul, dtype=np.float64)
    if values.size and (not np.isfinite(values).all() or values.min() < 0):
        raise ValueError("rul must hold finite values >= 0")
    state = np.zeros(values.shape, dtype=np.int64)
    state[values <= degrading] = 1
    state[values <= critical] = 2
    return state


def class_balance(labels: np.ndarray | torch.Tensor, n_classes: int = 3) -> np.ndarray:
    """Fraction of rows in each class, ``[n_classes]`` (zeros for an empty input)."""
    n_classes = _check_int(n_classes, "n_classes", 1)
    values = np.asarray(labels, dtype=np.int64).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    counts = np.bincount(values, minlength=n_classes).astype(np.float64)
    return counts / max(values.size, 1)


# --------------------------------------------------------------------------- inputs


def constant_columns(frame, columns: Sequence[str], max_unique: int = 2) -> tuple[str, ...]:
    """The columns of ``frame`` that take at most ``max_unique`` distinct values.

    Pass the *training* rows only: the decision must not look at held-out engines.
    """
    max_unique = _check_int(max_unique, "max_unique", 1)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"columns not in frame: {missing}")
    return tuple(c for c in columns if frame[c].nunique() <= max_unique)


def _window_sum(a: np.ndarray, window: int) -> np.ndarray:
    """Sum of the last ``window`` rows up to each row (fewer at the start), along axis 0."""
    total = np.cumsum(a, axis=0)
    lagged = np.zeros_like(total)
    lagged[window:] = total[:-window]
    return total - lagged


def window_features(
    units: np.ndarray, cycles: np.ndarray, values: np.ndarray, window: int = 30
) -> np.ndarray:
    """Trailing-window mean and least-squares slope of every column, per engine.

    Args:
        units: ``[n]`` engine ids; rows of one engine must be contiguous and sorted by cycle.
        cycles: ``[n]`` cycle numbers.
        values: ``[n, k]`` sensor readings.
        window: number of cycles in the window (>= 1); the first rows of an engine use the
            cycles available so far.

    Returns:
        float64 ``[n, 2k]``: the ``k`` window means, then the ``k`` slopes (per cycle).
    """
    window = _check_int(window, "window", 1)
    units = np.asarray(units)
    cycles = np.asarray(cycles, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or units.shape != (values.shape[0],) or cycles.shape != units.shape:
        raise ValueError("units and cycles must be [n] and values [n, k] with the same n")
    out = np.empty((values.shape[0], 2 * values.shape[1]), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
    ends = np.r_[starts[1:], units.shape[0]]
    if len(np.unique(units[starts])) != len(starts):
        raise ValueError("rows of each unit must be contiguous")
    for start, end in zip(starts, ends):
        t, x = cycles[start:end], values[start:end]
        if np.any(np.diff(t) <= 0):
            raise ValueError("cycles must increase within each unit")
        # centre t per engine so the sums stay small (better conditioned slopes)
        t = t - t[0]
        m = np.minimum(np.arange(1, end - start + 1), window).astype(np.float64)
        s_t, s_tt = _window_sum(t, window), _window_sum(t * t, window)
        s_x, s_tx = _window_sum(x, window), _window_sum(t[:, None] * x, window)
        denominator = m * s_tt - s_t * s_t
        safe = np.where(denominator > 0, denominator, 1.0)
        slope = (m[:, None] * s_tx - s_t[:, None] * s_x) / safe[:, None]
        slope[denominator <= 0] = 0.0
        out[start:end, : x.shape[1]] = s_x / m[:, None]
        out[start:end, x.shape[1] :] = slope
    return out


def fit_standardizer(features: np.ndarray, min_std: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and standard deviation of ``features`` (std floored at ``min_std``)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [n >= 2, k], got shape {features.shape}")
    return features.mean(axis=0), np.maximum(features.std(axis=0), min_std)


def split_units(units: Sequence[int], val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Divide engine ids into sorted ``(train_units, val_units)`` at random (seeded).

    ``round(val_fraction * n)`` engines go to validation, at least one and at most ``n - 1``.
    """
    unique = np.unique(np.asarray(units, dtype=np.int64))
    if unique.size < 2:
        raise ValueError(f"units must hold at least 2 distinct engines, got {unique.size}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    seed = _check_int(seed, "seed", 0)
    n_val = int(min(max(round(val_fraction * unique.size), 1), unique.size - 1))
    order = np.random.default_rng(seed).permutation(unique.size)
    return np.sort(unique[order[n_val:]]), np.sort(unique[order[:n_val]])


# --------------------------------------------------------------------------- the problem


@dataclass
class CMAPSSHealth:
    """FD001 as RUL regression + 3-state health classification (see the module docstring).

    Attributes:
        train, val, test: datasets with tasks ``rul`` (capped, cycles) and ``health``
            (0 healthy, 1 degrading, 2 critical); ``extras`` ``unit``, ``cycle``, ``rul_raw``.
        feature_names: input columns, ``"{sensor}_mean"`` then ``"{sensor}_slope"``.
        sensors: the sensors kept; ``dropped_sensors``: those found constant.
        feature_mean, feature_std: the standardisation, fitted on ``train`` rows only.
        rul_cap, thresholds, window: the settings used.
        train_units, val_units, test_units: engine ids of each split.
    """

    train: MultiTaskDataset
    val: MultiTaskDataset
    test: MultiTaskDataset
    feature_names: tuple[str, ...]
    sensors: tuple[str, ...]
    dropped_sensors: tuple[str, ...]
    feature_mean: np.ndarray
    feature_std: np.ndarray
    rul_cap: int
    thresholds: tuple[int, int]
    window: int
    train_units: np.ndarray
    val_units: np.ndarray
    test_units: np.ndarray

    def class_balance_table(self):
        """A DataFrame: rows per split, columns the share of each health state and the row count."""
        import pandas as pd

        rows = {}
        for name in ("train", "val", "test"):
            labels = getattr(self, name).targets["health"].numpy()
            rows[name] = dict(zip(HEALTH_STATES, class_balance(labels, len(HEALTH_STATES))), rows=len(labels))
        return pd.DataFrame.from_dict(rows, orient="index")


def _dataset(features: np.ndarray, frame, rul_cap: int, thresholds: tuple[int, int]) -> MultiTaskDataset:
    raw = frame["rul"].to_numpy(dtype=np.int64)
    return MultiTaskDataset(
        torch.from_numpy(features.astype(np.float32)),
        {
            "rul": torch.from_numpy(cap_rul(raw, rul_cap)),
            "health": torch.from_numpy(health_state(raw, thresholds)),
        },
        HEALTH_TASKS,
        extras={
            "unit": torch.tensor(frame["unit"].to_numpy(dtype=np.int64)),
            "cycle": torch.tensor(frame["cycle"].to_numpy(dtype=np.int64)),
            "rul_raw": torch.tensor(raw),
        },
    )


def make_cmapss_health(
    data: CMAPSS | None = None,
    *,
    path: str | os.PathLike | None = None,
    rul_cap: int = DEFAULT_RUL_CAP,
    thresholds: tuple[int, int] = DEFAULT_THRESHOLDS,
    window: int = 30,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_unique: int = 2,
) -> CMAPSSHealth:
    """Build the two-task FD001 problem.

    Args:
        data: a loaded subset (from :func:`~mtlbook.data.cmapss.load_cmapss`, without
            ``rul_cap``); ``None`` loads FD001 from ``path`` / ``$MTLBOOK_DATA``.
        path: where to look for the files when ``data`` is None.
        rul_cap: cap :math:`R_c` of the regression target (int >= 1).
        thresholds: ``(critical, degrading)`` RUL limits of the health states.
        window: trailing window length in cycles (int >= 1).
        val_fraction: share of the training engines held out for validation, in (0, 1).
        seed: seed of the engine split.
        max_unique: a sensor with at most this many distinct training values is dropped.

    Returns:
        :class:`CMAPSSHealth`.
    """
    if data is None:
        data = load_cmapss("FD001", path)
    if not isinstance(data, CMAPSS):
        raise TypeError(f"data must be a CMAPSS (from load_cmapss) or None, got {type(data).__name__}")
    rul_cap = _check_int(rul_cap, "rul_cap", 1)
    thresholds = _check_thresholds(thresholds)
    window = _check_int(window, "window", 1)

    train_units, val_units = split_units(data.train["unit"].to_numpy(), val_fraction, seed)
    in_train = data.train["unit"].isin(train_units).to_numpy()
    train_frame = data.train[in_train].reset_index(drop=True)
    val_frame = data.train[~in_train].reset_index(drop=True)
    # the test set: the last recorded cycle of each test engine, features from its own history
    test_all = data.test
    is_last = (test_all["cycle"] == test_all.groupby("unit")["cycle"].transform("max")).to_numpy()

    dropped = constant_columns(train_frame, SENSOR_COLUMNS, max_unique)
    sensors = tuple(c for c in SENSOR_COLUMNS if c not in dropped)
    names = tuple(f"{s}_mean" for s in sensors) + tuple(f"{s}_slope" for s in sensors)

    def features(frame) -> np.ndarray:
        return window_features(
            frame["unit"].to_numpy(), frame["cycle"].to_numpy(), frame[list(sensors)].to_numpy(np.float64), window
        )

    # train/val rows need a full window: slopes over 2-3 noisy readings are wild outliers;
    # a test engine shorter than the window (none in FD001) keeps its partial window
    full_train = (train_frame["cycle"] >= window).to_numpy()
    full_val = (val_frame["cycle"] >= window).to_numpy()
    train_x, val_x = features(train_frame)[full_train], features(val_frame)[full_val]
    train_frame = train_frame[full_train].reset_index(drop=True)
    val_frame = val_frame[full_val].reset_index(drop=True)
    test_x = features(test_all)[is_last]
    mean, std = fit_standardizer(train_x)

    def scaled(x: np.ndarray) -> np.ndarray:
        return (x - mean) / std

    test_frame = test_all[is_last].reset_index(drop=True)
    return CMAPSSHealth(
        train=_dataset(scaled(train_x), train_frame, rul_cap, thresholds),
        val=_dataset(scaled(val_x), val_frame, rul_cap, thresholds),
        test=_dataset(scaled(test_x), test_frame, rul_cap, thresholds),
        feature_names=names,
        sensors=sensors,
        dropped_sensors=dropped,
        feature_mean=mean,
        feature_std=std,
        rul_cap=rul_cap,
        thresholds=thresholds,
        window=window,
        train_units=train_units,
        val_units=val_units,
        test_units=np.sort(test_frame["unit"].to_numpy(dtype=np.int64)),
    )
