"""Chapter 8's pilot for the real datasets: model width check and the MDE pilot.

Two small tables, both written before the main study runs:

* ``mtlbook/tables/study_model_check.csv``: PLE + UW at lr 1e-2 on the *validation* split of each
  real dataset (``census_many``, ``cmapss``), three model widths (:data:`WIDTHS`), the lr
  search's seeds. The width with the best mean validation score (task-averaged relative
  change vs the median over widths, the lr search's criterion) is the one
  ``mtlbook.experiments.study.REAL_SETTINGS`` uses; a cheaper width wins a tie within noise.
* ``mtlbook/tables/study_pilot.csv``: PLE + UW and PLE + UW + adaTT at lr 1e-2 on the *test*
  split with pilot seeds 200.. (disjoint from the study's seeds): the spread of the paired
  difference sizes the number of seeds so that the minimum detectable effect of adaTT vs PLE + UW
  is at most 0.25 % on census many-task.

Usage: ``MTLBOOK_DATA=../shared/data nice -n 5 .venv/bin/python benchmarks/study_pilot.py --n-jobs 2``;
``--model-check census_full`` runs only the width check of the scale check's dataset and
appends it to ``study_model_check.csv``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from mtlbook.experiments.lr_search import SEARCH_SEEDS  # noqa: E402
from mtlbook.experiments.study import REAL_DATASETS, SCALE_DATASETS, SIZES, StudySize, run_cell  # noqa: E402
from mtlbook.experiments.study_configs import MODEL_WIDTHS  # noqa: E402

#: Model widths of the check: expert hidden units, expert output, tower hidden units.
WIDTHS = MODEL_WIDTHS
PILOT_SEEDS = tuple(range(200, 206))


def sized(width: str) -> StudySize:
    base = SIZES["small"]
    per = {d: {**base.per_dataset[d], "model": WIDTHS[width]} for d in REAL_DATASETS + SCALE_DATASETS}
    return replace(base, name=f"small-{width}", per_dataset=per)


def _cell(kind, config, dataset, seed, width):
    result = run_cell(config, dataset, seed, sized(width), score_split="val" if kind == "model_check" else "test")
    return [{"study": kind, "width": width, "config": config, "dataset": dataset, "seed": seed, "task": t,
             "metric": m, "value": v, "wall_time": result.wall_time} for t, m, v in result.metrics]


def main() -> int:
    from joblib import Parallel, delayed

    parser = argparse.ArgumentParser()
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--model-check", nargs="+", choices=SCALE_DATASETS, default=None, metavar="DATASET",
                        help="only the width check of these datasets, appended to study_model_check.csv "
                             "(the scale check's census_full was added after the real datasets)")
    args = parser.parse_args()
    if args.model_check:
        jobs = [("model_check", "ple_uw", d, s, w) for d in args.model_check for w in WIDTHS for s in SEARCH_SEEDS]
        rows = Parallel(n_jobs=args.n_jobs)(delayed(_cell)(*job) for job in jobs)
        new = pd.DataFrame([r for cell in rows for r in cell]).drop(columns="study")
        path = ROOT / "mtlbook" / "tables" / "study_model_check.csv"
        old = pd.read_csv(path)
        old = old.loc[~old["dataset"].isin(args.model_check)]
        pd.concat([old, new], ignore_index=True).to_csv(path, index=False)
        print(new.groupby(["dataset", "width"])["wall_time"].mean())
        return 0
    jobs = [("model_check", "ple_uw", d, s, w) for d in REAL_DATASETS for w in WIDTHS for s in SEARCH_SEEDS]
    jobs += [("pilot", c, d, s, "medium") for d in REAL_DATASETS for s in PILOT_SEEDS
             for c in ("ple_uw", "ple_uw_adatt")]
    rows = Parallel(n_jobs=args.n_jobs)(delayed(_cell)(*job) for job in jobs)
    table = pd.DataFrame([r for cell in rows for r in cell])
    for kind, name in (("model_check", "study_model_check.csv"), ("pilot", "study_pilot.csv")):
        table.loc[table["study"] == kind].drop(columns="study").to_csv(ROOT / "mtlbook" / "tables" / name, index=False)
    print(table.groupby(["study", "dataset", "width", "config"])["wall_time"].mean())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
