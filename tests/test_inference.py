"""Tests of chapter 8's paired inference (exact sign-flip test, TOST, MDE), static-weight search
and verdict design."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mtlbook.balancing import BALANCERS
from mtlbook.experiments.design import CONTRASTS, EQUIVALENCE_MARGIN, cause_verdict, contrast_table
from mtlbook.experiments.inference import mde, power, sign_flip_test, tost
from mtlbook.experiments.static_weights import select_trial, weight_trials
from mtlbook.experiments.study import COLUMNS, holm


# --------------------------------------------------------------------------- sign-flip test
def test_sign_flip_known_small_case():
    # the 8 sign patterns of (1, 2, 3) sum to 6, 4, 2, 0, 0, -2, -4, -6: |S| >= 6 for 2 of them
    assert sign_flip_test([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    assert sign_flip_test([-1.0, 2.0, 3.0]) == pytest.approx(0.5)  # |S| = 4: 6, 4, -4, -6
    # five differences of one sign: the smallest p-value five seeds can give
    assert sign_flip_test([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)
    assert sign_flip_test([0.0, 0.0, 0.0]) == 1.0


@pytest.mark.parametrize("n", [1, 4, 7, 10, 11])
def test_sign_flip_matches_brute_force(n):
    rng = np.random.default_rng(n)
    d = rng.normal(0.4, 1.0, size=n)
    observed = abs(d.sum())
    patterns = np.array(list(itertools.product([1.0, -1.0], repeat=n)))
    brute = float(np.mean(np.abs(patterns @ np.abs(d)) >= observed - 1e-12))
    assert sign_flip_test(d) == pytest.approx(brute, abs=1e-15)


def test_sign_flip_is_exact_for_thirty_seeds_and_validates():
    rng = np.random.default_rng(3)
    p_null = sign_flip_test(rng.normal(0.0, 1.0, size=30))
    p_shift = sign_flip_test(rng.normal(1.0, 1.0, size=30))
    assert 0.0 < p_shift < 0.001 < p_null <= 1.0
    assert (p_shift * 2**30) == pytest.approx(round(p_shift * 2**30))  # a count over 2^30 patterns
    with pytest.raises(ValueError, match="at most"):
        sign_flip_test(np.ones(41))
    with pytest.raises(ValueError, match="finite"):
        sign_flip_test([1.0, float("nan")])


# --------------------------------------------------------------------------- TOST
def test_tost_against_a_hand_computation():
    d = [0.1, -0.05, 0.02, 0.03]
    # mean 0.025; deviations 0.075, -0.075, -0.005, 0.005 -> s^2 = 0.0113 / 3
    se = math.sqrt(0.0113 / 3) / 2
    p_lower = 1 - stats.t.cdf((0.025 + 0.25) / se, 3)
    p_upper = stats.t.cdf((0.025 - 0.25) / se, 3)
    out = tost(d, 0.25)
    assert out["p_lower"] == pytest.approx(p_lower, rel=1e-9)
    assert out["p_upper"] == pytest.approx(p_upper, rel=1e-9)
    assert out["p"] == pytest.approx(max(p_lower, p_upper)) and out["equivalent"]
    half = stats.t.ppf(0.95, 3) * se
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((0.025 - half, 0.025 + half))
    # a narrow margin cannot be shown with these data; the 90% interval decides
    narrow = tost(d, 0.05)
    assert not narrow["equivalent"] and narrow["ci_high"] > 0.05
    # zero spread: equivalence is whether the mean lies inside the margin
    assert tost([0.0, 0.0, 0.0], 0.1)["equivalent"] and not tost([0.2, 0.2], 0.1)["equivalent"]
    with pytest.raises(ValueError, match="margin"):
        tost(d, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        tost([0.1], 0.25)


# --------------------------------------------------------------------------- power and MDE
def test_mde_has_the_target_power_and_shrinks_with_n():
    for n in (5, 20, 30):
        effect = mde(0.264, n)
        assert power(effect, 0.264, n) == pytest.approx(0.8, abs=1e-9)
    # the t-quantile approximation (t_{1-a/2} + t_{power}) s / sqrt(n) is close
    approx = (stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * 0.264 / math.sqrt(5)
    assert mde(0.264, 5) == pytest.approx(approx, rel=0.03)
    values = [mde(1.0, n) for n in range(3, 41)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert mde(1.0, 20, alpha=0.005) > mde(1.0, 20)  # a stricter level needs a larger effect
    assert mde(2.0, 20) == pytest.approx(2 * mde(1.0, 20))  # linear in sd


def test_power_matches_a_simulation():
    rng = np.random.default_rng(0)
    n, sd, effect = 12, 1.0, 0.7
    d = rng.normal(effect, sd, size=(20000, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    simulated = float(np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1)))
    assert power(effect, sd, n) == pytest.approx(simulated, abs=0.01)
    assert power(0.0, sd, n) == pytest.approx(0.05, abs=1e-9)
    with pytest.raises(ValueError, match="n must"):
        power(0.1, 1.0, 1)
    with pytest.raises(ValueError, match="sd must"):
        mde(0.0, 10)


# --------------------------------------------------------------------------- static weights
def test_weight_trials_normalise_by_the_initial_loss():
    losses = {"a": 900.0, "b": 0.7, "c": 1.1}
    trials = weight_trials(losses, 4, seed=3)
    assert len(trials) == 4 and trials[0] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert trials[1] == pytest.approx({t: 1.0 / v for t, v in losses.items()})
    for trial in trials[1:]:
        scales = np.array([trial[t] * losses[t] for t in losses])
        assert scales.sum() == pytest.approx(3.0) and np.all(scales > 0)  # s on 3 * simplex
    assert weight_trials(losses, 4, seed=3) == trials  # seeded
    assert weight_trials(losses, 4, seed=4)[2] != trials[2]
    with pytest.raises(ValueError, match="n_trials"):
        weight_trials(losses, 0, seed=0)
    with pytest.raises(ValueError, match="initial_losses"):
        weight_trials({"a": 0.0}, 2, seed=0)


def test_select_trial_uses_the_signed_relative_change():
    higher = {"auc": True, "rmse": False}
    base = {"x": ("auc", 0.80), "y": ("rmse", 10.0)}
    better_auc = {"x": ("auc", 0.84), "y": ("rmse", 10.2)}  # +5 % and -2 %: +1.5 % on average
    better_rmse = {"x": ("auc", 0.79), "y": ("rmse", 9.0)}  # -1.25 % and +10 %: +4.4 %
    assert select_trial([base, better_auc, better_rmse], higher) == 2
    assert select_trial([base, better_auc], higher) == 1
    assert select_trial([base, base], higher) == 0  # ties go to the earlier trial
    with pytest.raises(ValueError, match="same tasks"):
        select_trial([base, {"x": ("auc", 0.9)}], higher)


# --------------------------------------------------------------------------- design
def _table(effects: dict[str, float], n_seeds: int = 12, noise: float = 0.002) -> pd.DataFrame:
    """Two tasks per cell; config c's AUCs are the seed's base times (1 + effects[c]) plus noise."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(n_seeds):
        base = 0.8 + 0.02 * rng.normal(size=2)
        for config, effect in effects.items():
            jitter = noise * rng.normal(size=2) if effect else np.zeros(2)
            for task, b, j in zip(("a", "b"), base, jitter):
                rows.append({"config": config, "dataset": "census", "seed": seed, "task": task, "metric": "auc",
                             "value": b * (1 + effect) + j, "wall_time": 1.0, "epochs_run": 1, "size": "test",
                             "status": "ok", "error": ""})  # fmt: skip
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_contrast_table_and_cause_verdict_name_the_freeze():
    # adaTT hurts by 1 %, all of it through the freeze: lambda0 = freeze = adaTT, transfer = 0
    table = _table({"ple_uw": 0.0, "ple_uw_adatt": -0.01, "adatt_lambda0": -0.01, "ple_uw_freeze": -0.01})
    table.loc[table["config"] == "adatt_lambda0", "value"] = table.loc[table["config"] == "ple_uw_freeze",
                                                                       "value"].to_numpy()  # fmt: skip
    out = contrast_table(table)
    assert set(out["contrast"]) == {"total", "transfer", "freeze", "measurement"}  # the others lack configs
    primary = out.loc[out["family"] == "primary"]
    assert (primary["family_size"] == 3).all()
    assert primary["p_holm"].to_numpy() == pytest.approx(holm(primary["p_t"].to_numpy()))
    row = out.set_index("contrast")
    assert row.loc["total", "mean"] < -0.5 and row.loc["total", "significant"]
    assert row.loc["measurement", "mean"] == 0.0 and row.loc["measurement", "p_t"] == 1.0
    assert row.loc["measurement", "p_sign_flip"] == 1.0 and row.loc["measurement", "equivalent"]
    assert row.loc["total", "mde"] > 0 and row.loc["total", "mde_family"] > row.loc["total", "mde"]
    verdict = cause_verdict(out, "census")
    assert verdict["outcome"] == "hurts" and verdict["cause"] == "freeze" and verdict["n"] == 12
    assert verdict["margin"] == EQUIVALENCE_MARGIN


def test_cause_verdict_transfer_and_nothing():
    transfer = _table({"ple_uw": 0.0, "ple_uw_adatt": 0.01, "adatt_lambda0": 0.0, "ple_uw_freeze": 0.0})
    assert cause_verdict(contrast_table(transfer), "census")["cause"] == "transfer"
    nothing = _table({"ple_uw": 0.0, "ple_uw_adatt": 1e-6, "adatt_lambda0": 0.0, "ple_uw_freeze": 0.0}, noise=0.0005)
    verdict = cause_verdict(contrast_table(nothing), "census")
    assert verdict["outcome"] == "no measurable difference" and verdict["cause"] == "nothing"
    assert verdict["equivalent"]  # tiny noise: the interval sits well inside +-0.25 %
    assert [c.name for c in CONTRASTS][:3] == ["total", "transfer", "freeze"]
    with pytest.raises(ValueError, match="total"):
        cause_verdict(contrast_table(nothing).query("contrast != 'total'"), "census")


def test_method_contrasts_are_a_family_of_their_own():
    from mtlbook.experiments.design import METHOD_CONTRASTS
    from mtlbook.experiments.study import METHOD_CONFIGS, get_config

    assert [c.candidate for c in METHOD_CONTRASTS] == list(METHOD_CONFIGS)
    assert {c.reference for c in METHOD_CONTRASTS} == {"ple_uw"} and {c.family for c in METHOD_CONTRASTS} == {"methods"}
    for name in METHOD_CONFIGS:  # every method is a registered balancer with no adaTT
        config = get_config(name)
        assert config.kind == "balancer" and config.adatt is None and config.balancing in BALANCERS
    # two methods present, one helping by 1 %: Holm runs over the two, not over the primary family
    table = _table({"ple_uw": 0.0, "ple_upgrad": 0.01, "ple_rlw": 0.0, "ple_uw_adatt": 0.0})
    methods = contrast_table(table, METHOD_CONTRASTS).set_index("contrast")
    assert list(methods.index) == ["ple_upgrad_vs_uw", "ple_rlw_vs_uw"]
    assert (methods["family_size"] == 2).all()
    assert methods.loc["ple_upgrad_vs_uw", "significant"] and methods.loc["ple_upgrad_vs_uw", "mean"] > 0.5
    assert methods.loc["ple_rlw_vs_uw", "mean"] == 0.0 and not methods.loc["ple_rlw_vs_uw", "significant"]
    primary = contrast_table(table)
    assert set(primary["family"]) <= {"primary", "secondary"}


def test_ablation_and_weighting_contrasts_change_one_thing_each():
    from mtlbook.experiments.design import ABLATION_CONTRASTS, WEIGHTING_CONTRASTS
    from mtlbook.experiments.study import ABLATION_CONFIGS, WEIGHTING_CONFIGS, get_config

    assert [c.candidate for c in ABLATION_CONTRASTS] == list(ABLATION_CONFIGS)
    assert {c.reference for c in ABLATION_CONTRASTS} == {"ple_uw_adatt"}
    default = get_config("ple_uw_adatt")
    for contrast in ABLATION_CONTRASTS:  # one adaTT setting changed, nothing else
        knob = get_config(contrast.candidate)
        assert len(knob.adatt) == 1 and dataclasses.replace(knob, name=default.name, label=default.label,
                                                            kind=default.kind, adatt=()) == default
    assert {c.candidate for c in WEIGHTING_CONTRASTS} == set(WEIGHTING_CONFIGS) | {"ple_uw"}
    assert {c.reference for c in WEIGHTING_CONTRASTS} == {"ple_equal"}
    for contrast in WEIGHTING_CONTRASTS:  # none of them uses adaTT or a gate freeze
        config = get_config(contrast.candidate)
        assert config.adatt is None and not config.gate_freeze and not config.tuned_weights
    # each family is corrected on its own: a large effect in one leaves the other's Holm alone
    table = _table({"ple_uw_adatt": 0.0, "adatt_T2": 0.01, "adatt_T0.5": 0.0, "ple_equal": 0.0, "ple_dwa": 0.0})
    ablations = contrast_table(table, ABLATION_CONTRASTS).set_index("contrast")
    weighting = contrast_table(table, WEIGHTING_CONTRASTS).set_index("contrast")
    assert (ablations["family_size"] == 2).all() and ablations.loc["adatt_T2", "significant"]
    assert list(weighting.index) == ["ple_dwa_vs_equal"] and not weighting["significant"].any()
    assert set(ablations["family"]) == {"ablations"} and set(weighting["family"]) == {"weighting"}
