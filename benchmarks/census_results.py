"""Train chapter 3's census-income cells and store the tables in mtlbook/tables/.

Usage (from the repository root, with the census file under $MTLBOOK_DATA)::

    MTLBOOK_DATA=../shared/data nice -n 10 .venv/bin/python benchmarks/census_results.py --seeds 3

Writes ``mtlbook/tables/census_two_task.csv`` and ``mtlbook/tables/census_many_task.csv`` (one row per
cell and task; see :mod:`mtlbook.experiments.census_study`). Cells already stored are skipped,
so the run can be stopped and resumed; cells run seed by seed, one CPU thread each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtlbook.experiments.census_study import SETTINGS, TABLES, run_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    parser.add_argument("--out", type=Path, default=ROOT / "mtlbook" / "tables", help="output folder")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print(f"settings: {SETTINGS}", flush=True)
    run_table(args.out, list(range(args.seeds)), args.tables, log=lambda line: print(line, flush=True))
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
