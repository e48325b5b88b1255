r"""Run chapter 8's grid (does adaTT help?) and store its results table.

Usage (from the repository root, with the census file under $MTLBOOK_DATA)::

    MTLBOOK_DATA=../shared/data .venv/bin/python benchmarks/run_study.py --size small
    MTLBOOK_DATA=../shared/data .venv/bin/python benchmarks/run_study.py --size full --n-jobs 8

Chapter 8's verdict table: every configuration first gets the learning-rate search
(validation split, search seeds, the same lrs for every configuration), then the evaluation
at its chosen lr (``--lr chosen``: ``evaluation_lr`` of ``mtlbook.experiments.lr_search``,
where the design's controls take the reference's rate)::

    export MTLBOOK_DATA=../shared/data
    SMALL="suite_conflict suite_benign census"
    python benchmarks/run_study.py --lr-search --configs primary secondary --datasets $SMALL \
        --n-jobs 2 --out mtlbook/tables/study_lr_search_suites.csv
    python benchmarks/run_study.py --lr chosen --configs primary secondary --seeds 20 --datasets $SMALL \
        --n-jobs 2 --out mtlbook/tables/study_verdict.csv
    python benchmarks/run_study.py --lr-search --configs ablations weighting --datasets $SMALL \
        --n-jobs 2 --out mtlbook/tables/study_lr_search_ablations.csv
    python benchmarks/run_study.py --lr chosen --configs ablations weighting --seeds 20 --datasets $SMALL \
        --n-jobs 2 --out mtlbook/tables/study_verdict.csv
    python benchmarks/run_study.py --lr-search --configs real --datasets census_many cmapss \
        --n-jobs 2 --out mtlbook/tables/study_lr_search.csv
    python benchmarks/run_study.py --lr chosen --configs real --seeds 20 --datasets census_many cmapss \
        --n-jobs 2 --out mtlbook/tables/study_verdict.csv
    python benchmarks/run_study.py --lr chosen --configs real --seeds 36 --datasets census_many \
        --n-jobs 2 --out mtlbook/tables/study_verdict.csv
    python benchmarks/run_study.py --lr-search --configs methods --datasets census_many cmapss \
        --n-jobs 2 --out mtlbook/tables/study_lr_search_methods.csv
    python benchmarks/run_study.py --lr chosen --configs methods --seeds 10 --datasets census_many cmapss \
        --n-jobs 2 --out mtlbook/tables/study_verdict.csv
    # the scale check, a table of its own (outside the design's Holm families)
    python benchmarks/run_study.py --lr-search --configs real --datasets census_full \
        --n-jobs 2 --out mtlbook/tables/study_lr_search_census_full.csv
    python benchmarks/run_study.py --lr chosen --configs real --seeds 20 --datasets census_full \
        --n-jobs 2 --out mtlbook/tables/study_census_full.csv

(``python`` is ``.venv/bin/python``; chapter 8 prints the same list.)

The table goes to ``mtlbook/tables/study_<size>.csv`` unless ``--out`` says otherwise. The run
can be stopped and started again: finished cells are read back from the file and skipped,
failed cells are tried again (``--keep-failed`` leaves them alone). Every cell trains on one
CPU thread; ``--n-jobs`` runs that many cells at once in separate processes (joblib's
default process backend). ``--configs primary`` / ``secondary`` / ``real`` / ``methods`` / ``ablations`` /
``weighting`` name the groups ``PRIMARY_CONFIGS`` / ``SECONDARY_CONFIGS`` /
``REAL_PRIMARY_CONFIGS`` / ``METHOD_CONFIGS`` / ``ABLATION_CONFIGS`` / ``WEIGHTING_CONFIGS``.

**More than one machine: Dask.** ``--backend dask`` sends the cells to a Dask cluster through
joblib's Dask backend (``run_grid(..., backend="dask")``); the table is still written by this
process after every cell, so stopping and resuming work the same way. Start a scheduler and
workers (one thread each: every cell trains on one thread) on the machines, each with this
repository, the locked environment and ``MTLBOOK_DATA``, then point the runner at the
scheduler::

    .venv/bin/dask scheduler                                   # on one machine: prints tcp://HOST:8786
    .venv/bin/dask worker tcp://HOST:8786 --nthreads 1 --nworkers 8   # on every machine
    MTLBOOK_DATA=../shared/data .venv/bin/python benchmarks/run_study.py --size full \
        --backend dask --scheduler tcp://HOST:8786

Without ``--scheduler``, ``--backend dask`` starts a local cluster of ``--n-jobs`` worker
processes (one thread each) on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtlbook.experiments.study import (  # noqa: E402
    ABLATION_CONFIGS, ALL_DATASETS, WEIGHTING_CONFIGS, CONFIG_NAMES, DATASETS, METHOD_CONFIGS, PRIMARY_CONFIGS, REAL_PRIMARY_CONFIGS, SECONDARY_CONFIGS, SIZES, run_grid,
)
from mtlbook.experiments.lr_search import (  # noqa: E402
    LR_GRID, SEARCH_SEEDS, chosen_config, run_lr_search, select_lr,
)
from mtlbook.experiments.study_runner import load_table  # noqa: E402
from mtlbook.experiments.study_configs import with_compute  # noqa: E402
from mtlbook.gradients import EXTRACTIONS  # noqa: E402
from mtlbook.models import EXPERT_MODES  # noqa: E402

GROUPS = {"primary": PRIMARY_CONFIGS, "secondary": SECONDARY_CONFIGS, "real": REAL_PRIMARY_CONFIGS,
          "methods": METHOD_CONFIGS, "ablations": ABLATION_CONFIGS, "weighting": WEIGHTING_CONFIGS,
          "all": CONFIG_NAMES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="small", help="grid size (default: small)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default: mtlbook/tables/study_<size>.csv)")
    parser.add_argument("--configs", nargs="+", choices=CONFIG_NAMES + tuple(GROUPS), default=["all"],
                        help="config names or groups (primary, secondary, real, methods, ablations, weighting, all; "
                             "default: all)")
    parser.add_argument("--datasets", nargs="+", choices=ALL_DATASETS, default=list(DATASETS),
                        help="datasets (default: the design's; census_full is the scale check's)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: the size's)")
    parser.add_argument("--n-jobs", "--workers", dest="n_jobs", type=int, default=1,
                        help="cells run at once (processes via joblib; default 1)")
    parser.add_argument("--backend", choices=("loky", "dask"), default="loky",
                        help="joblib backend: loky (local processes, default) or dask (a Dask cluster)")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="with --backend dask: the scheduler's address, e.g. tcp://host:8786 "
                             "(default: a local cluster of --n-jobs worker processes)")
    parser.add_argument("--keep-failed", action="store_true", help="do not retry cells that failed before")
    parser.add_argument("--quiet", action="store_true", help="no line per cell")
    parser.add_argument("--lr-search", action="store_true",
                        help=f"run the lr search instead (lrs {LR_GRID}, seeds {SEARCH_SEEDS}, validation split); "
                             "the chosen lrs go to <out>_chosen.csv")
    parser.add_argument("--lr", choices=("size", "chosen"), default="size",
                        help="'size': the size's lr (default); 'chosen': evaluation_lr per (config, dataset)")
    parser.add_argument("--experts", choices=EXPERT_MODES, default=None,
                        help="compute the models' experts this way (timing runs only; needs --out outside mtlbook/tables)")
    parser.add_argument("--extraction", choices=EXTRACTIONS, default=None,
                        help="adaTT's per-task gradient mode (timing runs only; needs --out outside mtlbook/tables)")
    args = parser.parse_args(argv)
    if args.scheduler is not None and args.backend != "dask":
        parser.error("--scheduler needs --backend dask")
    size = args.size
    if args.experts is not None or args.extraction is not None:
        # same models up to float rounding: such a table is a timing, never the stored study's
        tables = (ROOT / "mtlbook" / "tables").resolve()
        if args.out is None or tables in args.out.resolve().parents:
            parser.error("--experts/--extraction need --out outside mtlbook/tables (the stored study is computed "
                         "with the library defaults)")
        size = with_compute(args.size, args.experts, args.extraction)

    out = args.out or ROOT / "mtlbook" / "tables" / f"study_{args.size}.csv"
    seeds = None if args.seeds is None else list(range(args.seeds))
    configs = list(dict.fromkeys(name for item in args.configs for name in GROUPS.get(item, (item,))))
    before = _finished_cells(out)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.backend == "dask":
            from dask.distributed import Client, LocalCluster

            if args.scheduler is None:
                cluster = stack.enter_context(
                    LocalCluster(n_workers=args.n_jobs, threads_per_worker=1, processes=True, dashboard_address=None)
                )
                stack.enter_context(Client(cluster))
            else:
                stack.enter_context(Client(args.scheduler))
        log = None if args.quiet else (lambda line: print(line, flush=True))
        if args.lr_search:
            search = run_lr_search(out, configs, args.datasets, size=size, n_jobs=args.n_jobs, log=log)
            chosen = select_lr(search)
            chosen.to_csv(out.with_name(out.stem + "_chosen.csv"), index=False)
            print(chosen.loc[chosen["chosen"]].to_string(index=False))
            table = search
        elif args.lr == "chosen":
            # one grid per dataset: the same config name carries a different lr on each dataset
            for dataset in args.datasets:
                table = run_grid(out, configs=[chosen_config(name, dataset) for name in configs], datasets=[dataset],
                                 seeds=seeds, size=size, retry_failed=not args.keep_failed, n_jobs=args.n_jobs,
                                 log=log, backend=args.backend)  # fmt: skip
        else:
            table = run_grid(out, configs=configs, datasets=args.datasets, seeds=seeds, size=size,
                             retry_failed=not args.keep_failed, n_jobs=args.n_jobs, log=log, backend=args.backend)  # fmt: skip
    elapsed = time.perf_counter() - started
    cells = table.drop_duplicates(["config", "dataset", "seed"])
    failed = int((cells["status"] == "failed").sum())
    print(f"{len(cells)} cells in {out} ({failed} failed); this run took {elapsed:.1f} s "
          f"(training time summed over all cells in the file: {cells['wall_time'].sum():.1f} s)")  # fmt: skip
    trained = len(cells) - before
    if trained:
        print(f"this run trained {trained} cells: {trained / elapsed * 3600:.0f} cells per hour")
    return 1 if failed else 0


def _finished_cells(path: Path) -> int:
    """How many cells ``path`` already holds (resumed, not trained by this run)."""
    if not path.exists():
        return 0
    table = load_table(path)
    return len(table.loc[table["status"] == "ok"].drop_duplicates(["config", "dataset", "seed"]))


if __name__ == "__main__":
    raise SystemExit(main())
