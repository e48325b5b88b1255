"""Smoke tests of the adaTT cost benchmark's helpers (benchmarks/adatt_cost.py) at tiny size.

No timing is asserted: only that the pieces compute what they claim (ratios, quantiles,
block lengths, measurement counts, agreement, the CSV and the verdict).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "adatt_cost.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("adatt_cost", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["adatt_cost"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("adatt_cost", None)


@pytest.fixture(scope="module")
def tiny_problem(bench):
    torch.manual_seed(0)
    return bench.make_problem(4, batch_size=16, n_batches=3, n_features=12, expert_hidden=(8,), expert_dim=4)


def test_configurations_cover_every_combination_once(bench):
    configs = bench.configurations()
    names = [c.name for c in configs]
    assert names[0] == "plain" and not configs[0].measures
    # extractions x parameter sets x intervals, less structured/last_layer and in-backward/last_layer (the cut)
    assert len(names) == len(set(names)) == 1 + (5 * 3 - 2) * 2
    assert {(c.extraction, c.parameter_set, c.interval) for c in configs[1:]} == {
        (e, p, k) for e in ("structured", "in-backward", "cut", "loop", "batched")
        for p in ("all", "weights", "last_layer") for k in (1, 10)
        if (e, p) not in (("structured", "last_layer"), ("in-backward", "last_layer"))
    }
    with pytest.raises(ValueError, match="extractions"):
        bench.configurations(extractions=("fast",))
    with pytest.raises(ValueError, match="intervals"):
        bench.configurations(intervals=(0,))


def test_block_length_holds_whole_measurement_cycles(bench):
    plain, every1, every10 = bench.Config(), bench.Config("loop", "all", 1), bench.Config("loop", "all", 10)
    assert bench.block_length(plain, 10, 4) == 10
    assert bench.block_length(every1, 10, 4) == 4
    assert bench.block_length(every10, 10, 4) == 10
    assert bench.block_length(every10, 12, 4) == 20  # rounded up to a multiple of the interval
    assert bench.block_length(bench.Config("loop", "all", 3), 10, 4) % 3 == 0


def test_round_ratios_divide_by_the_same_round(bench):
    times = {"plain": [1.0, 2.0, 4.0], "a": [1.5, 3.0, 6.0], "b": [2.0, 2.0, 2.0]}
    ratios = bench.round_ratios(times)
    assert ratios["plain"] == [1.0, 1.0, 1.0]
    assert ratios["a"] == pytest.approx([1.5, 1.5, 1.5])  # a drift of the machine cancels out
    assert ratios["b"] == pytest.approx([2.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="baseline"):
        bench.round_ratios({"a": [1.0]})
    with pytest.raises(ValueError, match="rounds"):
        bench.round_ratios({"plain": [1.0, 1.0], "a": [1.0]})


@pytest.mark.parametrize("seed", range(5))
def test_quantile_matches_numpy_linear(bench, seed):
    import numpy as np

    values = list(np.random.default_rng(seed).normal(size=7))
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        assert bench.quantile(values, q) == pytest.approx(float(np.quantile(values, q)))
    with pytest.raises(ValueError):
        bench.quantile([], 0.5)
    with pytest.raises(ValueError):
        bench.quantile(values, 1.5)


def test_offdiag_pearson_uses_only_the_upper_triangle(bench):
    torch.manual_seed(0)
    a = torch.randn(5, 5)
    a = (a + a.T) / 2
    assert bench.offdiag_pearson(a, a) == pytest.approx(1.0)
    assert bench.offdiag_pearson(a, -a) == pytest.approx(-1.0)
    assert bench.offdiag_pearson(a, 3 * a + 1) == pytest.approx(1.0)  # affine invariant
    changed_diagonal = a + torch.diag(torch.randn(5))
    assert bench.offdiag_pearson(a, changed_diagonal) == pytest.approx(1.0)
    assert math.isnan(bench.offdiag_pearson(a, torch.ones(5, 5)))  # constant: undefined
    with pytest.raises(ValueError, match="square"):
        bench.offdiag_pearson(a, torch.randn(4, 4))


@pytest.mark.parametrize("interval", [1, 3])
def test_step_runner_measures_on_its_interval(bench, tiny_problem, interval):
    torch.manual_seed(0)
    runner = bench.StepRunner(tiny_problem, bench.Config("batched", "weights", interval))
    before = [p.detach().clone() for p in runner.model.parameters()]
    seconds = runner.run_block(6)
    assert seconds > 0
    assert runner.steps_taken == 6
    assert runner.measurements == int(runner.computer.n_updates) == math.ceil(6 / interval)
    # the runner trains its own copy; the problem's model is untouched
    assert any(not torch.equal(b, p) for b, p in zip(before, runner.model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(tiny_problem.model.parameters(), before))


def test_plain_runner_never_measures(bench, tiny_problem):
    runner = bench.StepRunner(tiny_problem, bench.Config())
    runner.run_block(3)
    assert runner.computer is None and runner.measurements == 0
    with pytest.raises(ValueError, match="plain"):
        runner.step(measure=True)


def test_time_rounds_gives_one_value_per_round_and_configuration(bench, tiny_problem):
    configs = [bench.Config(), bench.Config("loop", "last_layer", 1), bench.Config("loop", "last_layer", 2)]
    runners = [bench.StepRunner(tiny_problem, c) for c in configs]
    times = bench.time_rounds(runners, rounds=2, block_steps=2, measured_block_steps=1, baseline_repeats=2)
    assert set(times) == {c.name for c in configs}
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in times.values())
    # 2 warm-up steps, then per round: 2 baseline blocks of 2 steps, 1 step, 2 steps
    assert runners[0].steps_taken == 2 * 2 * 2
    assert runners[1].steps_taken == 2 * 1 and runners[1].measurements == 2 + 2
    with pytest.raises(ValueError, match="rounds"):
        bench.time_rounds(runners, rounds=0)


def test_affinity_agreement_reference_agrees_with_itself(bench, tiny_problem):
    torch.manual_seed(0)
    agreement = bench.affinity_agreement(tiny_problem, n_steps=3)
    assert set(agreement) == {"all", "weights", "last_layer"}
    assert agreement["all"] == pytest.approx((1.0, 1.0))
    for ema, raw in agreement.values():
        assert -1.0 - 1e-9 <= ema <= 1.0 + 1e-9 and -1.0 - 1e-9 <= raw <= 1.0 + 1e-9


def test_peak_memory_sees_a_large_allocation(bench):
    kept = []
    # 64 MB: above glibc's largest mmap threshold, so it is fresh memory whatever the heap holds
    peak = bench.peak_memory(lambda: kept.append(torch.ones(16_000_000)), torch.device("cpu"))
    if bench.cpu_peak_available():
        assert peak >= 60e6
    else:
        assert math.isnan(peak)


def _row(bench, n_tasks, extraction, parameter_set, interval, ratio, agreement):
    config = bench.Config(extraction, parameter_set, interval)
    return {"n_tasks": n_tasks, "config": config.name, "extraction": extraction or "none",
            "parameter_set": parameter_set or "none", "interval": interval or 0, "ratio": ratio,
            "agreement_ema": agreement, "peak_ratio": 1.0, "step_ms": 1.0}  # fmt: skip


def test_aim_verdict_picks_the_cheapest_faithful_mode(bench):
    rows = [
        _row(bench, 16, None, None, None, 1.0, math.nan),
        _row(bench, 16, "loop", "all", 1, 3.0, 1.0),
        _row(bench, 16, "loop", "all", 10, 1.2, 1.0),
        _row(bench, 16, "batched", "weights", 1, 1.4, 0.95),
        _row(bench, 16, "batched", "weights", 10, 1.05, 0.95),
        _row(bench, 16, "batched", "last_layer", 1, 1.1, 0.5),  # cheaper, but not faithful
        _row(bench, 16, "batched", "last_layer", 10, 1.01, 0.5),
        _row(bench, 4, "batched", "last_layer", 1, 0.5, 0.99),  # other task count: ignored
        _row(bench, 16, "in-backward", "all", 1, 1.05, 1.0),  # cheaper, but adaTT cannot use it
        _row(bench, 16, "in-backward", "all", 10, 1.0, 1.0),
    ]
    verdict = bench.aim_verdict(rows)
    assert verdict["n_tasks"] == 16 and verdict["mode"] == "batched/weights"
    assert verdict["meets_every_step"] and verdict["meets_interval_10"]
    rows[3]["ratio"] = 1.6
    verdict = bench.aim_verdict(rows)
    assert verdict["mode"] == "batched/weights" and not verdict["meets_every_step"]
    rows[3]["ratio"] = 3.5
    assert bench.aim_verdict(rows)["mode"] == "loop/all"
    assert not bench.aim_verdict(rows)["meets_interval_10"]  # 1.2 > 1.1


def test_write_csv_and_table_round_trip(bench, tmp_path):
    rows = []
    for n in (4, 8):
        for extraction, parameter_set, interval, ratio in ((None, None, None, 1.0), ("loop", "all", 1, 2.5)):
            row = _row(bench, n, extraction, parameter_set, interval, ratio, 1.0 if extraction else math.nan)
            row.update({k: 0.0 for k in bench.CSV_COLUMNS if k not in row})
            rows.append(row)
    path = tmp_path / "sub" / "cost.csv"
    bench.write_csv(rows, path)
    with open(path) as handle:
        read = list(csv.DictReader(handle))
    assert tuple(read[0]) == bench.CSV_COLUMNS
    assert [float(r["ratio"]) for r in read] == [1.0, 2.5, 1.0, 2.5]
    table = bench.ratio_table(rows)
    assert "4 tasks" in table and "8 tasks" in table and "2.50x" in table


def test_parse_args_quick_is_tiny_and_bad_values_fail(bench):
    args = bench.parse_args(["--quick"])
    assert args.tasks == [4] and args.rounds <= 2 and args.batch_size <= 64
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--tasks", "1"])
