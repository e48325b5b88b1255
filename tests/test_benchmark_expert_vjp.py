"""benchmarks/expert_vjp.py runs, and both paths it times compute the same gradients.

No timing is asserted (the machine is shared).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "expert_vjp.py"


def test_the_benchmark_prints_one_row_per_task_count_with_equal_gradients():
    result = subprocess.run([sys.executable, str(BENCHMARK), "--tasks", "2", "3", "--rounds", "2", "--block", "1",
                             "--batch-size", "16"], capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["2", "3"]
    for row in rows:
        written, autograd, ratio, diff = map(float, row[1:])
        assert written > 0 and autograd > 0 and abs(ratio - written / autograd) < 0.01
        assert diff <= 1e-5
