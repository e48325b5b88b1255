"""benchmarks/expert_vjp.py runs, and both paths it times compute the same gradients.

No timing is asserted (the machine is shared).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "expert_vjp.py"


def test_the_benchmark_writes_one_row_per_task_count_with_equal_gradients(tmp_path):
    out = tmp_path / "expert_vjp.csv"
    subprocess.run([sys.executable, str(BENCHMARK), "--tasks", "2", "3", "--rounds", "3", "--block", "1",
                    "--batch-size", "16", "--out", str(out)], capture_output=True, text=True, timeout=120,
                   check=True)  # fmt: skip
    table = pd.read_csv(out)
    assert list(table.n_tasks) == [2, 3]
    assert (table.written_ms > 0).all() and (table.autograd_ms > 0).all() and (table.ratio > 0).all()
    assert (table.max_abs_diff <= 1e-5).all()
