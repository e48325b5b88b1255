"""Smoke tests of the peers benchmark (benchmarks/peers.py) at tiny size.

No timing is asserted: only that every configuration computes the same per-task gradients,
that a step of each one trains, that a missing peer is skipped with a line saying how to
install it, and that the table has its columns.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers_benchmark"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("peers_benchmark", None)


@pytest.fixture(scope="module")
def problem(peers):
    return peers.make_problem(4, batch_size=16, n_batches=2, n_features=12, expert_hidden=(8,), expert_dim=4,
                              n_levels=1)  # fmt: skip


def test_the_problem_is_a_cgc_with_a_clean_shared_trunk(problem):
    assert problem.model.n_levels == 1
    # torchjd's features: the shared experts' outputs the mixtures read
    problem.model(problem.batches[0].inputs)
    assert len(problem.model.shared_outputs) == problem.model.n_shared_experts == 2


def test_mtlbook_modes_and_torchjd_compute_the_loops_gradients(peers, problem):
    """Every peer's ``G`` is the loop's to float rounding."""
    names, _ = peers.available(("plain", "mtlbook/structured", "mtlbook/in-backward", "mtlbook/cut", "mtlbook/loop",
                                "mtlbook/batched", "torchjd"))  # fmt: skip
    assert "torchjd" in names  # in the book's lock
    diffs = peers.gradient_check(problem, names)
    assert math.isnan(diffs["plain"])
    # the same arithmetic up to the order of some sums (bit for bit on some CPUs)
    assert all(diffs[name] < 1e-6 for name in names[1:]), diffs


def test_every_configuration_takes_a_training_step(peers, problem):
    names, _ = peers.available(("plain",) + peers.MEASURED)
    for name in names:
        runner = peers.Runner(problem, name)
        before = [p.detach().clone() for p in runner.model.parameters()]
        runner.step()
        assert runner.i == 1
        moved = [not torch.equal(a, p) for a, p in zip(before, runner.model.parameters())]
        assert any(moved), name
        if name != "plain":  # the measured ones produced an affinity (cosines)
            affinity = runner.affinity if runner.computer is None else runner.computer.affinity
            assert affinity.shape == (4, 4)


def test_the_torchjd_step_applies_the_plain_steps_gradient(peers, problem):
    """The shared gradient torchjd's step applies is the sum of the Jacobian's rows: the
    same update as the plain step, so the timings compare like with like."""
    plain, jd = peers.Runner(problem, "plain"), peers.Runner(problem, "torchjd")
    plain.step()
    jd.step()
    for a, b in zip(plain.model.parameters(), jd.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_missing_peer_is_skipped_with_the_install_command(peers, monkeypatch):
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.setattr(peers, "load_torchjd", lambda: None)
    names, skipped = peers.available(("plain", "mtlbook/cut", "torchjd", "libmtl/backward"))
    assert names == ["plain", "mtlbook/cut"]
    assert any(line.startswith("torchjd: not installed") for line in skipped)
    assert any("libmtl/backward" in line and "--target benchmarks/.peers" in line for line in skipped)


def test_the_table_has_its_columns_and_sane_values(peers, tmp_path):
    args = peers.parse_args(["--tasks", "2", "--rounds", "1", "--batch-size", "8", "--block-steps", "1"])
    rows = peers.run(args)
    assert {r["config"] for r in rows} >= {"plain", "mtlbook/cut", "mtlbook/loop", "mtlbook/batched"}
    assert all(set(r) == set(peers.COLUMNS) for r in rows)
    plain = next(r for r in rows if r["config"] == "plain")
    assert plain["ratio"] == 1.0 and plain["floor_ms"] > 0 and plain["plain_over_floor"] > 0
    assert "torch 2." in plain["versions"]
    assert "ratio to a plain step" in peers.table(rows)


@pytest.mark.parametrize("argv, message", [(["--rounds", "0"], "--rounds must be >= 1"),
                                           (["--tasks", "1"], "--tasks must all be >= 2")])  # fmt: skip
def test_bad_arguments_name_the_option(peers, argv, message, capsys):
    with pytest.raises(SystemExit):
        peers.parse_args(argv)
    assert message in capsys.readouterr().err


def test_write_rows_creates_the_folder_and_keeps_the_column_order(peers, tmp_path):
    import csv

    path = peers.write_rows(tmp_path / "new" / "peers.csv", [{"b": 2, "a": 1.5}], ["a", "b"])
    with open(path, newline="") as handle:
        assert list(csv.reader(handle)) == [["a", "b"], ["1.5", "2"]]
