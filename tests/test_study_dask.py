"""The study grid on a Dask cluster: run_grid(..., backend="dask") through joblib's Dask backend
gives the same table as the local process pool (loky)."""

from __future__ import annotations

import dataclasses
import os

import pytest
from dask.distributed import Client, LocalCluster

from mtlbook.experiments import study
from mtlbook.experiments.study import load_table, run_grid

from test_study import TINY

CELLS = dict(configs=["ple_uw", "ple_uw_adatt"], datasets=["suite_conflict"], seeds=[3])


def worker_pid(config, dataset, seed, size):
    """A train_fn that reports where it ran (the metric is the worker's process id)."""
    return study.CellResult([("pid", "rmse", float(os.getpid()))], wall_time=0.0, epochs_run=1)


def test_two_cells_on_a_local_dask_cluster_match_the_loky_run(tmp_path):
    tiny = dataclasses.replace(study.SIZES["small"], **TINY)
    loky = run_grid(tmp_path / "loky.csv", **CELLS, size=tiny, n_jobs=2, backend="loky")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(
        cluster
    ) as client:
        worker_pids = {float(pid) for pid in client.run(os.getpid).values()}
        assert len(worker_pids) == 2 and float(os.getpid()) not in worker_pids
        dask = run_grid(tmp_path / "dask.csv", **CELLS, size=tiny, n_jobs=2, backend="dask")
        where = run_grid(None, ["ple_uw"], ["suite_conflict"], [0, 1, 2, 3], size=tiny, backend="dask",
                         train_fn=worker_pid)  # fmt: skip
    assert set(where["value"]) <= worker_pids  # the cells ran on the cluster's workers
    a, b = load_table(tmp_path / "loky.csv"), load_table(tmp_path / "dask.csv")
    assert len(a) == 2 * 8 and set(a["status"]) == {"ok"}  # two cells, eight task rows each
    columns = [c for c in a.columns if c != "wall_time"]
    assert a[columns].equals(b[columns])  # every row bit-identical, only the timing differs
    assert a[columns].equals(loky[columns]) and b[columns].equals(dask[columns])


def test_run_grid_rejects_a_bad_backend():
    with pytest.raises(ValueError, match="backend must be a joblib backend name"):
        run_grid(None, ["ple_uw"], ["suite_conflict"], [0], backend="")
