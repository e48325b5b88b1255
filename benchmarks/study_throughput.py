"""Cells per hour of chapter 8's grid, computed two ways, in one run of each.

``benchmarks/run_study.py --size small`` (every configuration, the design's datasets, the
size's seeds) is run twice from an empty table: once with the study's own settings, form
``defaults`` (experts as modules, ``extraction="batched"``: what the stored study used; see
:data:`~mtlbook.experiments.study_configs.STUDY_EXPERTS`) and once with
``--experts bank --extraction structured`` (task-owned layers stored stacked,
:mod:`mtlbook.models.bank_storage`, trained with the bank form's grouped losses and fused
AdamW; per-task gradients through the shared experts only,
:func:`mtlbook.gradients.structured_gradients`): the library's default path. The two runs start together, one process
and one thread each, so that both see the same machine load (a 2-core machine then has no
core left for anything else). Both train the same models from the same weights; the two
forms compute the same functions up to float rounding, and that rounding, carried through
training, is all that separates the tables (``max_rel_diff``: the largest relative difference
of a metric between them; 3 % in the committed run, where a few epochs of training grow the
first differences of about 1e-7).

Columns: ``form``, ``cells`` (cells trained), ``seconds`` (wall time of the run),
``cells_per_hour``, ``training_seconds`` (sum of the cells' own training time),
``speedup`` (cells per hour over the defaults'), ``max_rel_diff``, ``threads``, ``size``.

    MTLBOOK_DATA=../shared/data .venv/bin/python benchmarks/study_throughput.py --quick   # 2 configs, 1 seed
    MTLBOOK_DATA=../shared/data nice .venv/bin/python benchmarks/study_throughput.py      # writes mtlbook/tables/study_throughput.csv

The tables themselves go to a temporary folder (never to ``mtlbook/tables``). Nothing asserts
on these timings.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mtlbook.experiments.bench import write_rows  # noqa: E402
from mtlbook.experiments.study_runner import load_table  # noqa: E402

FORMS = {"defaults": [], "bank_structured": ["--experts", "bank", "--extraction", "structured"]}
COLUMNS = ("form", "cells", "seconds", "cells_per_hour", "training_seconds", "speedup", "max_rel_diff", "threads",
           "size")  # fmt: skip


def max_relative_difference(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Largest ``|x - y| / max(|x|, 1e-12)`` over the metrics both tables hold."""
    keys = ["config", "dataset", "seed", "task", "metric"]
    both = a[a["status"] == "ok"].merge(b[b["status"] == "ok"], on=keys, suffixes=("_a", "_b"))
    if both.empty:
        return float("nan")
    scale = both["value_a"].abs().clip(lower=1e-12)
    return float(((both["value_a"] - both["value_b"]).abs() / scale).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--configs", nargs="+", default=None, help="config names or groups (default: run_study's)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the size's)")
    parser.add_argument("--quick", action="store_true", help="two configurations, one seed; writes nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "mtlbook" / "tables" / "study_throughput.csv")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.seeds = ["ple_equal", "ple_uw_adatt"], 1
    extra = ["--size", args.size, "--quiet"]
    extra += ["--configs", *args.configs] if args.configs else []
    extra += ["--seeds", str(args.seeds)] if args.seeds else []
    with tempfile.TemporaryDirectory() as folder:
        tables = {form: Path(folder) / f"{form}.csv" for form in FORMS}
        started, running = time.perf_counter(), {}
        for form, flags in FORMS.items():
            command = [sys.executable, str(ROOT / "benchmarks" / "run_study.py"), *extra, *flags,
                       "--out", str(tables[form])]  # fmt: skip
            running[form] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # --quiet: a few lines
        seconds = {}
        while len(seconds) < len(running):  # each run's own end (they need not end together)
            for form, process in running.items():
                if form not in seconds and process.poll() is not None:
                    seconds[form] = time.perf_counter() - started
            time.sleep(0.5)
        for form, process in running.items():
            if process.returncode != 0:
                print(process.stdout.read())
                raise SystemExit(f"{form}: run_study.py exited with {process.returncode}")
        frames = {form: load_table(path) for form, path in tables.items()}
    diff = max_relative_difference(frames["defaults"], frames["bank_structured"])
    rows = []
    for form, frame in frames.items():
        cells = frame.drop_duplicates(["config", "dataset", "seed"])
        rows.append({"form": form, "cells": len(cells), "seconds": round(seconds[form], 1),
                     "cells_per_hour": round(len(cells) / seconds[form] * 3600, 1),
                     "training_seconds": round(float(cells["wall_time"].sum()), 1), "max_rel_diff": f"{diff:.2g}",
                     "threads": 1, "size": args.size})  # fmt: skip
    for row in rows:
        row["speedup"] = round(row["cells_per_hour"] / rows[0]["cells_per_hour"], 3)
        print(", ".join(f"{k}={row[k]}" for k in COLUMNS))
    if not args.quick:
        print(f"wrote {write_rows(args.out, rows, COLUMNS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
