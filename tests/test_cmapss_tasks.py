"""C-MAPSS as RUL regression + health-state classification (mtlbook.data.cmapss_health).

Most tests run on a small synthetic data set in the C-MAPSS layout, so every property
(no leakage into the scaler, labels, engine split, constant-sensor rule) can be checked
against an independent computation; one test runs on the real FD001 copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtlbook.data.cmapss import CMAPSS, CMAPSS_COLUMNS, load_cmapss
from mtlbook.data.cmapss_health import (
    HEALTH_STATES,
    SENSOR_COLUMNS,
    cap_rul,
    class_balance,
    constant_columns,
    fit_standardizer,
    health_state,
    make_cmapss_health,
    split_units,
    window_features,
)

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("MTLBOOK_DATA") or REPO.parent / "shared" / "data")

WINDOW = 10
CONSTANT = ("s_1", "s_5", "s_10")


def _frame(lengths: dict[int, int], rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for unit, length in lengths.items():
        cycles = np.arange(1, length + 1)
        wear = cycles / length
        block = {"unit": np.full(length, unit), "cycle": cycles}
        for i in range(1, 4):
            block[f"setting_{i}"] = rng.normal(0, 0.001, length)
        for k, name in enumerate(SENSOR_COLUMNS):
            if name in CONSTANT:
                block[name] = np.full(length, 100.0 + k)
            else:
                block[name] = 10.0 * k + (k % 3 - 1) * 5 * wear**2 + rng.normal(0, 0.3, length)
        rows.append(pd.DataFrame(block))
    frame = pd.concat(rows, ignore_index=True)[list(CMAPSS_COLUMNS)]
    frame[["unit", "cycle"]] = frame[["unit", "cycle"]].astype(np.int64)
    return frame


def synthetic_cmapss(seed: int = 0) -> CMAPSS:
    """10 training engines (60-150 cycles) and 4 test engines cut off early, C-MAPSS layout."""
    rng = np.random.default_rng(seed)
    train = _frame({u: int(rng.integers(60, 150)) for u in range(1, 11)}, rng)
    train["rul"] = train.groupby("unit")["cycle"].transform("max") - train["cycle"]
    test = _frame({u: int(rng.integers(WINDOW + 5, 50)) for u in range(1, 5)}, rng)
    final = pd.Series([5, 40, 90, 200], index=pd.Index([1, 2, 3, 4], name="unit"), name="rul")
    last = test.groupby("unit")["cycle"].transform("max")
    test["rul"] = test["unit"].map(final).to_numpy() + (last - test["cycle"]).to_numpy()
    return CMAPSS(train=train, test=test, final_rul=final, subset="FD001", paths={})


def build(data: CMAPSS, **kwargs):
    options = {"window": WINDOW, "val_fraction": 0.3, "seed": 1}
    options.update(kwargs)
    return make_cmapss_health(data, **options)


def reference_features(frame: pd.DataFrame, sensors, window: int) -> np.ndarray:
    """Window mean and slope by pandas rolling windows and np.polyfit: an independent implementation."""
    means, slopes = [], []
    for _, engine in frame.groupby("unit", sort=False):
        values = engine[list(sensors)].to_numpy(float)
        t = engine["cycle"].to_numpy(float)
        means.append(engine[list(sensors)].rolling(window, min_periods=1).mean().to_numpy())
        s = np.zeros_like(values)
        for row in range(len(engine)):
            lo = max(0, row - window + 1)
            if row > lo:
                s[row] = np.polyfit(t[lo : row + 1], values[lo : row + 1], 1)[0]
        slopes.append(s)
    return np.hstack([np.vstack(means), np.vstack(slopes)])


# --------------------------------------------------------------------------- labels


def test_health_state_thresholds_by_hand():
    rul = [0, 1, 30, 31, 79, 80, 81, 125, 300]
    assert health_state(rul).tolist() == [2, 2, 2, 1, 1, 1, 0, 0, 0]
    assert health_state(rul, thresholds=(0, 100)).tolist() == [2, 1, 1, 1, 1, 1, 1, 0, 0]
    assert HEALTH_STATES == ("healthy", "degrading", "critical")


def test_cap_rul_is_piecewise_linear():
    assert cap_rul([0, 124, 125, 126, 400], 125).tolist() == [0, 124, 125, 125, 125]
    values = np.arange(0, 300)
    capped = cap_rul(values, 50)
    assert np.all(np.diff(capped) >= 0) and capped.max() == 50
    np.testing.assert_array_equal(capped[:51], values[:51])


@pytest.mark.parametrize("bad", [(80, 30), (30, 30), (-1, 10), (10,), "ab", None])
def test_bad_thresholds_are_rejected(bad):
    with pytest.raises(ValueError, match="thresholds"):
        health_state([1, 2, 3], bad)


def test_labels_follow_the_documented_rule():
    problem = build(synthetic_cmapss(), rul_cap=50, thresholds=(20, 45))
    for split in (problem.train, problem.val, problem.test):
        raw = split.extras["rul_raw"].numpy()
        np.testing.assert_array_equal(split.targets["rul"].numpy(), np.minimum(raw, 50).astype(np.float32))
        expected = np.where(raw <= 20, 2, np.where(raw <= 45, 1, 0))
        np.testing.assert_array_equal(split.targets["health"].numpy(), expected)
        assert split.targets["health"].dtype == torch.int64
    assert problem.rul_cap == 50 and problem.thresholds == (20, 45)


def test_class_balance_counts_shares():
    np.testing.assert_allclose(class_balance([0, 0, 1, 2, 2, 2]), [2 / 6, 1 / 6, 3 / 6])
    with pytest.raises(ValueError, match="labels"):
        class_balance([0, 3], 3)


# --------------------------------------------------------------------------- split


def test_split_is_by_engine_with_no_engine_in_two_splits():
    data = synthetic_cmapss()
    problem = build(data)
    train_units = set(problem.train.extras["unit"].tolist())
    val_units = set(problem.val.extras["unit"].tolist())
    assert train_units == set(problem.train_units.tolist())
    assert val_units == set(problem.val_units.tolist())
    assert not train_units & val_units
    assert train_units | val_units == set(data.train["unit"].unique().tolist())
    assert len(val_units) == 3  # round(0.3 * 10)
    # test: exactly the last recorded cycle of each test engine, labelled by the RUL file
    test_units = problem.test.extras["unit"].numpy()
    assert sorted(test_units.tolist()) == [1, 2, 3, 4]
    last_cycle = data.test.groupby("unit")["cycle"].max()
    np.testing.assert_array_equal(problem.test.extras["cycle"].numpy(), last_cycle.loc[test_units].to_numpy())
    np.testing.assert_array_equal(problem.test.extras["rul_raw"].numpy(), data.final_rul.loc[test_units].to_numpy())


def test_split_units_is_seeded_and_covers_everything():
    units = np.arange(1, 21)
    a = split_units(units, 0.25, seed=3)
    b = split_units(units, 0.25, seed=3)
    c = split_units(units, 0.25, seed=4)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert len(a[1]) == 5 and sorted(np.r_[a[0], a[1]].tolist()) == units.tolist()
    with pytest.raises(ValueError, match="val_fraction"):
        split_units(units, 1.0)


# --------------------------------------------------------------------------- inputs


def test_constant_sensors_are_decided_on_training_engines_only():
    data = synthetic_cmapss()
    problem = build(data)
    assert set(CONSTANT) <= set(problem.dropped_sensors)
    assert not set(problem.sensors) & set(problem.dropped_sensors)
    assert len(problem.feature_names) == 2 * len(problem.sensors)

    # s_2 constant on the training engines but varying on validation and test engines: dropped
    tweaked = synthetic_cmapss()
    in_train = tweaked.train["unit"].isin(problem.train_units)
    tweaked.train.loc[in_train, "s_2"] = 7.0
    tweaked.test["s_2"] = np.linspace(0, 1, len(tweaked.test))
    assert "s_2" in build(tweaked).dropped_sensors
    # s_3 constant only outside the training engines: kept
    tweaked = synthetic_cmapss()
    tweaked.train.loc[~in_train, "s_3"] = 7.0
    tweaked.test["s_3"] = 7.0
    assert "s_3" in build(tweaked).sensors


def test_constant_columns_rule():
    frame = pd.DataFrame({"a": [1.0, 1.0, 1.0], "b": [1.0, 2.0, 1.0], "c": [1.0, 2.0, 3.0]})
    assert constant_columns(frame, ["a", "b", "c"]) == ("a", "b")
    assert constant_columns(frame, ["a", "b", "c"], max_unique=1) == ("a",)


def test_window_features_of_a_linear_signal():
    units = np.array([1] * 8 + [2] * 5)
    cycles = np.r_[np.arange(1, 9), np.arange(1, 6)]
    values = np.c_[3.0 + 2.0 * cycles, np.where(units == 1, 5.0, -5.0)]
    out = window_features(units, cycles, values, window=4)
    # slope of the line is 2 wherever the window holds two or more rows; the constant has slope 0
    np.testing.assert_allclose(out[[0, 8], 2], 0.0)
    np.testing.assert_allclose(np.delete(out[:, 2], [0, 8]), 2.0)
    np.testing.assert_allclose(out[:, 3], 0.0)
    # mean over the last 4 cycles, restarting with each engine
    np.testing.assert_allclose(out[7, 0], np.mean(3.0 + 2.0 * np.arange(5, 9)))
    np.testing.assert_allclose(out[8, 0], 5.0)  # engine 2, first cycle: its own reading only
    np.testing.assert_allclose(out[:, 1], np.where(units == 1, 5.0, -5.0))


def test_window_features_match_an_independent_implementation():
    data = synthetic_cmapss()
    sensors = ("s_2", "s_7", "s_21")
    frame = data.train[data.train["unit"] <= 3]
    ours = window_features(frame["unit"].to_numpy(), frame["cycle"].to_numpy(), frame[list(sensors)].to_numpy(), 7)
    np.testing.assert_allclose(ours, reference_features(frame, sensors, 7), rtol=1e-7, atol=1e-9)


def test_scaler_uses_training_engines_only():
    data = synthetic_cmapss()
    problem = build(data)
    # recompute independently: windows per engine, training-split engines, full windows only
    train_rows = data.train[data.train["unit"].isin(problem.train_units)]
    reference = reference_features(train_rows, problem.sensors, WINDOW)[train_rows["cycle"].to_numpy() >= WINDOW]
    np.testing.assert_allclose(problem.feature_mean, reference.mean(axis=0), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(problem.feature_std, reference.std(axis=0), rtol=1e-7, atol=1e-9)
    # the training inputs are standardised by exactly these statistics
    np.testing.assert_allclose(problem.train.inputs.double().mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(problem.train.inputs.double().std(0, unbiased=False).numpy(), 1.0, atol=1e-4)


def test_changing_held_out_rows_leaves_the_scaler_alone():
    data = synthetic_cmapss()
    problem = build(data)
    shifted = synthetic_cmapss()
    sensors = list(problem.sensors)
    shifted.test[sensors] = shifted.test[sensors] * 3.0 + 50.0
    is_val = shifted.train["unit"].isin(problem.val_units)
    shifted.train.loc[is_val, sensors] = shifted.train.loc[is_val, sensors] - 20.0
    other = build(shifted)
    np.testing.assert_array_equal(other.feature_mean, problem.feature_mean)
    np.testing.assert_array_equal(other.feature_std, problem.feature_std)
    torch.testing.assert_close(other.train.inputs, problem.train.inputs)
    # ...while the held-out inputs did change (the edit reached them)
    assert not torch.allclose(other.test.inputs, problem.test.inputs)
    assert not torch.allclose(other.val.inputs, problem.val.inputs)


def test_fit_standardizer_floors_the_std():
    mean, std = fit_standardizer(np.c_[np.ones(5), np.arange(5.0)])
    np.testing.assert_allclose(mean, [1.0, 2.0])
    assert std[0] > 0 and std[1] == pytest.approx(np.sqrt(2.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"rul_cap": 0}, "rul_cap"), ({"window": 0}, "window"), ({"val_fraction": 0.0}, "val_fraction"),
     ({"thresholds": (50, 10)}, "thresholds"), ({"seed": -1}, "seed")],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(synthetic_cmapss(), **kwargs)


def test_data_must_be_a_cmapss_object():
    with pytest.raises(TypeError, match="data must be"):
        make_cmapss_health(data=pd.DataFrame())


# --------------------------------------------------------------------------- the real FD001


@pytest.fixture(scope="module")
def fd001():
    from mtlbook.data import _files

    def no_network(url, destination):
        raise OSError(f"network disabled in tests (asked for {url})")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_files, "_download", no_network)
        return make_cmapss_health(load_cmapss("FD001", DATA_ROOT))


def test_fd001_problem(fd001):
    assert fd001.dropped_sensors == ("s_1", "s_5", "s_6", "s_10", "s_16", "s_18", "s_19")
    assert len(fd001.sensors) == 14 and fd001.train.n_features == 28
    assert len(fd001.train_units) == 80 and len(fd001.val_units) == 20 and len(fd001.test) == 100
    balance = class_balance(fd001.train.targets["health"].numpy())
    assert balance.argmin() == HEALTH_STATES.index("critical")  # the rare class
    assert 0.1 < balance[2] < 0.25
    for split in (fd001.train, fd001.val, fd001.test):
        assert torch.isfinite(split.inputs).all()
        assert split.targets["rul"].max() <= 125
    table = fd001.class_balance_table()
    np.testing.assert_allclose(table[list(HEALTH_STATES)].sum(axis=1), 1.0)
