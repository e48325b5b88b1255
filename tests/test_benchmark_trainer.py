"""Helpers of benchmarks/trainer_step.py: timed blocks, ratios, quantiles and memory peaks.

No timing is asserted (the machine is shared); what is checked is that the machinery
measures what it claims: a block times exactly its steps after the warm-up, each
configuration measures affinity exactly as often as its interval says, every round has one
block per configuration, ratios are taken per round, and the memory peak follows
allocations and frees.
"""

from __future__ import annotations

import importlib.util
import itertools
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "trainer_step.py"


@pytest.fixture(scope="module")
def ts():
    spec = importlib.util.spec_from_file_location("trainer_step_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny(ts):
    torch.manual_seed(0)
    return ts.make_problem(3, batch_size=16, n_batches=4, expert_hidden=(8,), expert_dim=4)


def test_round_ratios_divide_by_the_same_round(ts):
    times = {"plain": [1.0, 2.0, 4.0], "x": [1.5, 2.0, 2.0]}
    ratios = ts.round_ratios(times)
    assert ratios["plain"] == [1.0, 1.0, 1.0]
    assert ratios["x"] == [1.5, 1.0, 0.5]
    with pytest.raises(ValueError, match="baseline"):
        ts.round_ratios({"x": [1.0]})
    with pytest.raises(ValueError, match="rounds"):
        ts.round_ratios({"plain": [1.0, 2.0], "x": [1.0]})


@pytest.mark.parametrize("seed", range(5))
def test_quantile_matches_numpy_linear_interpolation(ts, seed):
    rng = random.Random(seed)
    values = [rng.uniform(-3, 3) for _ in range(rng.randint(1, 12))]
    for q in (0.0, 0.25, 0.5, 0.75, 1.0, rng.random()):
        assert ts.quantile(values, q) == pytest.approx(float(np.quantile(values, q)))
    with pytest.raises(ValueError):
        ts.quantile([], 0.5)
    with pytest.raises(ValueError):
        ts.quantile([1.0], 1.5)


@pytest.mark.parametrize("seed", range(5))
def test_running_peak_is_the_largest_prefix_sum_in_time_order(ts, seed):
    rng = random.Random(seed)
    events = [(rng.randrange(1000), rng.choice([-1, 1]) * rng.randrange(1, 100)) for _ in range(30)]
    ordered = [b for _, b in sorted(events, key=lambda e: e[0])]
    expected = max([0] + list(itertools.accumulate(ordered)))
    shuffled = list(events)
    rng.shuffle(shuffled)
    assert ts.running_peak(shuffled) == expected
    assert ts.running_peak([(0, -5), (1, -5)]) == 0  # frees of older memory never count as a peak


def test_memory_probe_follows_allocations_and_frees(ts):
    probe = ts.MemoryProbe(torch.device("cpu"))
    mib = 1 << 20

    def two_alive():
        a = torch.ones(mib // 4)  # 1 MiB of float32
        b = torch.ones(mib // 4)
        return a, b

    def one_at_a_time():
        for _ in range(2):
            a = torch.ones(mib // 4)
            del a
        return None

    both = ts.measure(probe, two_alive)
    sequential = ts.measure(probe, one_at_a_time)
    assert 2 * mib <= both < 2 * mib + 64 * 1024
    assert mib <= sequential < mib + 64 * 1024


def test_a_block_times_its_steps_after_the_warm_up_and_measures_as_its_interval_says(ts, tiny):
    block = len(tiny.batches)
    updates, spans = {}, {}
    for name in ts.CONFIGS:
        trainer, timer = ts.run_block(tiny, name)
        assert len(trainer.history) == 1 and timer.seconds > 0  # one epoch, one timed block
        assert timer._seen == block + 1  # the warm-up step and the block's steps, nothing more
        spans[name] = timer.span
        if trainer.adatt is not None:
            assert trainer.adatt.phase == "dynamic"
            updates[name] = int(trainer.adatt.affinity_computer.n_updates)
    # step 0 (the warm-up) measures, then every interval-th step
    every1 = [n for n, setup in ts.CONFIGS.items() if setup.interval == 1]
    assert len(every1) == 4 and all(updates[n] == block + 1 for n in every1)
    assert updates["adatt_every10"] == updates["adatt_every10_structured"] == 1 + block // 10
    assert updates["adatt_transfer_only"] == 1  # only the untimed warm-up step
    assert "plain" not in updates and "plain_bank" not in updates
    # blocks run one after another, in this thread
    ordered = sorted(spans.values())
    assert all(end <= next_start for (_, end), (next_start, _) in zip(ordered, ordered[1:]))


def test_each_configuration_trains_its_form_and_extraction(ts, tiny):
    """The bank configurations train a bank model (same initial weights), the structured ones
    measure the structured way; each ratio's own baseline is the plain trainer of its form."""
    for name, setup in ts.CONFIGS.items():
        trainer = ts.make_trainer(tiny, name, epochs=1)
        assert trainer.model.experts_mode == setup.experts
        if setup.interval is None:
            assert trainer.adatt is None
        else:
            assert trainer.adatt.affinity_computer.extraction == setup.extraction
        assert ts.own_baseline(name, tuple(ts.CONFIGS)) == ("plain" if setup.experts == "modules" else "plain_bank")
    bank = ts.make_trainer(tiny, "plain_bank", epochs=1).model
    plain = ts.make_trainer(tiny, "plain", epochs=1).model
    batch = tiny.batches[0]
    for task, out in plain.eval()(batch.inputs).items():
        torch.testing.assert_close(bank.eval()(batch.inputs)[task], out, rtol=1e-6, atol=1e-6)
    assert ts.own_baseline("adatt_every1_bank", ("plain", "adatt_every1_bank")) is None


def test_every_round_times_one_block_per_configuration(ts, tiny, monkeypatch):
    calls = []
    real = ts.run_block

    def counting(problem, config, device="cpu"):
        calls.append(config)
        return real(problem, config, device)

    monkeypatch.setattr(ts, "run_block", counting)  # a module function of the script, not the trainer
    rounds = 2
    times = ts.time_blocks(tiny, ("plain", "adatt_every1", "adatt_every10"), rounds, seed=3)
    assert set(times) == {"plain", "adatt_every1", "adatt_every10"}
    assert all(len(v) == rounds and all(t > 0 for t in v) for v in times.values())
    warm, timed = calls[:3], calls[3:]
    assert warm == ["plain", "adatt_every1", "adatt_every10"]
    for r in range(rounds):  # baseline first and last, the others once each in between
        this_round = timed[4 * r:4 * r + 4]
        assert this_round[0] == this_round[-1] == "plain"
        assert sorted(this_round[1:3]) == ["adatt_every1", "adatt_every10"]
    with pytest.raises(ValueError, match="rounds"):
        ts.time_blocks(tiny, ("plain",), 0)
    with pytest.raises(ValueError, match="configs"):
        ts.time_blocks(tiny, (), 1)


def test_block_timer_refuses_a_short_fit(ts):
    timer = ts.BlockTimer(3, warmup_steps=1)
    with pytest.raises(RuntimeError, match="fewer than"):
        timer.seconds
    with pytest.raises(ValueError, match="n_steps"):
        ts.BlockTimer(0)


def test_a_measured_step_is_flagged_and_needs_more_memory(ts, tiny):
    plain_peak, plain_measured = ts.step_peak(tiny, "plain")
    every1_peak, every1_measured = ts.step_peak(tiny, "adatt_every1")
    _, transfer_measured = ts.step_peak(tiny, "adatt_transfer_only")
    assert (plain_measured, every1_measured, transfer_measured) == (False, True, False)
    assert 0 < plain_peak < every1_peak


def test_invalid_arguments_are_refused(ts, tiny):
    with pytest.raises(ValueError, match="config"):
        ts.make_trainer(tiny, "adatt_every3", epochs=1)
    with pytest.raises(ValueError, match="baseline"):
        ts.benchmark(3, 1, configs=("adatt_every1", "plain"))
    with pytest.raises(ValueError, match="n_tasks"):
        ts.make_problem(1)


def test_csv_has_the_documented_columns(ts, tmp_path):
    row = {c: 1.0 for c in ts.CSV_COLUMNS}
    row.update(config="plain", n_tasks=4)
    path = ts.write_csv([row], tmp_path / "out.csv")
    header, values = path.read_text().splitlines()
    assert header.split(",") == list(ts.CSV_COLUMNS)
    assert values.split(",")[ts.CSV_COLUMNS.index("config")] == "plain"
