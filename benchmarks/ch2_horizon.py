"""Chapter 2's checks at the source's own horizon (30 epochs, several seeds), and its new-task case.

Chapter 2 runs its full comparison for 10 epochs on one seed (to stay inside the book's
time budget). This script reruns the two settings the source's symptom claims are about,
equal weights with Adam and plain SGD, for 30 epochs on seeds 0..N-1, with exactly the
chapter's data, model and hyper-parameters, and stores one row per (setting, seed, epoch)
with the per-epoch median gradient-norm ratio and the validation metrics.

Usage (from the repository root, with C-MAPSS under $MTLBOOK_DATA)::

    MTLBOOK_DATA=../shared/data .venv/bin/python benchmarks/ch2_horizon.py            # 30 epochs, 5 seeds
    MTLBOOK_DATA=../shared/data .venv/bin/python benchmarks/ch2_horizon.py --seeds 3 --epochs 30

The table goes to ``mtlbook/tables/ch2_horizon.csv`` unless ``--out`` says otherwise. Each run
trains on one CPU thread; the whole default run is a few minutes of CPU time.

``--new-task`` runs chapter 2's exercise 2 instead, over the same seeds: the health label is
replaced by the tertile of each row's projection on the second principal axis of the
training inputs (a label the inputs predict but RUL does not), and the model trains for 10
epochs with equal weights, with the new task alone and with weight 100 on it. One row per
(setting, seed): the new task's validation accuracy, the RUL error, and the accuracy of a
linear probe on the trunk's outputs (plus the probe on an untrained trunk of the same seed).
It goes to ``mtlbook/tables/ch2_new_task.csv``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtlbook import diagnostics as dg  # noqa: E402
from mtlbook.data import cmapss_health as ch  # noqa: E402
from mtlbook.data.batch import MultiTaskDataset  # noqa: E402
from mtlbook.models import SharedBottom  # noqa: E402

# chapter 2's settings (cell "Every run"): batch 256, Adam at 1e-3, plain SGD at 1e-4
SETTINGS = {
    "equal (Adam)": {"lr": 1e-3},
    "plain SGD": {"optimizer": "sgd", "lr": 1e-4, "momentum": 0.0},
}
BATCH_SIZE = 256


def run(epochs: int, seeds: list[int], log=print) -> pd.DataFrame:
    problem = ch.make_cmapss_health()
    rows = []
    for name, options in SETTINGS.items():
        for seed in seeds:
            started = time.perf_counter()
            result = dg.train_with_diagnostics(problem.train, problem.val, epochs=epochs, batch_size=BATCH_SIZE,
                                               seed=seed, **options)
            batch_epoch = result.batches["epoch"]
            for epoch, metrics in enumerate(result.epochs):
                # metrics entry 0 is before training; batches are recorded with their 1-based epoch
                in_epoch = result.batches["rho"][batch_epoch == epoch] if epoch > 0 else np.array([])
                recall = np.asarray(metrics["recall"], dtype=float)
                rows.append({
                    "setting": name, "seed": seed, "epoch": epoch,
                    "median_rho": float(np.median(in_epoch)) if in_epoch.size else np.nan,
                    "rmse": metrics["rmse"], "accuracy": metrics["accuracy"],
                    **{f"recall_{state}": float(recall[k]) for k, state in enumerate(ch.HEALTH_STATES)},
                    "run_median_rho": float(np.median(result.batches["rho"])),
                    "diverged_at": -1 if result.diverged_at is None else int(result.diverged_at),
                })
            log(f"{name}, seed {seed}: {epochs} epochs in {time.perf_counter() - started:.1f} s")
    return pd.DataFrame(rows)


NEW_TASK_SETTINGS = {
    "equal": {},
    "new task alone": {"fixed_weights": {"rul": 0.0}},
    "new task x100": {"fixed_weights": {"health": 100.0}},
}
MODEL = {"expert_hidden": (64,), "expert_dim": 32, "tower_hidden": (32,), "experts": "modules"}  # train_with_diagnostics' default


def run_new_task(epochs: int, seeds: list[int], log=print) -> pd.DataFrame:
    problem = ch.make_cmapss_health()
    x = problem.train.inputs.numpy()
    centre = x.mean(axis=0)
    direction = np.linalg.svd(x - centre, full_matrices=False)[2][1]  # second principal axis
    cuts = np.quantile((x - centre) @ direction, [1 / 3, 2 / 3])

    def relabelled(data: MultiTaskDataset) -> MultiTaskDataset:
        label = torch.as_tensor(np.digitize((data.inputs.numpy() - centre) @ direction, cuts))
        return MultiTaskDataset(data.inputs, {"rul": data.targets["rul"], "health": label}, data.task_specs)

    train, val = relabelled(problem.train), relabelled(problem.val)
    y_train, y_val = train.targets["health"].numpy(), val.targets["health"].numpy()

    def probe(model) -> float:
        features = dg.shared_features(model, train.inputs), dg.shared_features(model, val.inputs)
        return float(dg.linear_probe(features[0], y_train, features[1], y_val).accuracy)

    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        untrained = probe(SharedBottom(train.n_features, train.task_specs, **MODEL))
        for name, options in NEW_TASK_SETTINGS.items():
            started = time.perf_counter()
            result = dg.train_with_diagnostics(train, val, epochs=epochs, batch_size=BATCH_SIZE, seed=seed, **options)
            rows.append({"setting": name, "seed": seed, "epochs": epochs,
                         "accuracy": result.epochs[-1]["accuracy"], "rmse": result.epochs[-1]["rmse"],
                         "probe_accuracy": probe(result.model), "untrained_probe_accuracy": untrained,
                         "median_rho": float(np.median(result.batches["rho"]))})
            log(f"new task, {name}, seed {seed}: {epochs} epochs in {time.perf_counter() - started:.1f} s")
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30, the source's horizon)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--new-task", action="store_true", help="run exercise 2's new-task case (10 epochs by default)")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV path (default: mtlbook/tables/ch2_horizon.csv, or ch2_new_task.csv with --new-task)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.seeds < 1:
        raise ValueError(f"--epochs and --seeds must be >= 1, got {args.epochs} and {args.seeds}")
    if args.new_task:
        epochs = 10 if args.epochs == 30 else args.epochs  # the exercise's horizon unless told otherwise
        args.out = args.out or ROOT / "mtlbook" / "tables" / "ch2_new_task.csv"
        table = run_new_task(epochs, list(range(args.seeds)))
    else:
        args.out = args.out or ROOT / "mtlbook" / "tables" / "ch2_horizon.csv"
        table = run(args.epochs, list(range(args.seeds)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False, float_format="%.6g")
    print(f"{len(table)} rows written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
