"""Every task's backward through one shared expert: written out against autograd's batched call.

The structured extraction (:func:`mtlbook.gradients.structured_gradients`) ends with a
vector-Jacobian product through each shared expert for all :math:`K` tasks at once. This
script times, in interleaved rounds on one thread, for a 32 -> 64 -> 32 expert (the benchmark
problem's) at batch 256 and 4 / 8 / 16 tasks:

* ``written``: :func:`mtlbook.expert_vjp.expert_vjp` (recomputes the hidden layer without a
  graph, checks it against the recorded output, then a few matmuls over all tasks);
* ``autograd``: ``torch.autograd.grad(output, params, cotangents, retain_graph=True,
  is_grads_batched=True)`` through the recorded graph (``vmap`` over the backward).

It checks that both give the same gradients first (``max_abs_diff``), then prints and writes
(``benchmarks/results/expert_vjp.csv``; ``--copy-to`` for the book's copy) the medians over
rounds of each block's time per call and of each round's ratio ``written / autograd``.
Nothing asserts on these timings.

    .venv/bin/python benchmarks/expert_vjp.py --copy-to mtlbook/tables/expert_vjp.csv
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from plain_step import time_block  # noqa: E402
from mtlbook.experiments.bench import round_ratios, write_rows  # noqa: E402
from mtlbook.expert_vjp import expert_vjp  # noqa: E402
from mtlbook.models.experts import Expert  # noqa: E402

COLUMNS = ("n_tasks", "written_ms", "autograd_ms", "ratio", "max_abs_diff", "batch_size", "rounds", "threads")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "expert_vjp.csv")
    parser.add_argument("--copy-to", type=Path, default=None, help="also write the CSV here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    expert = Expert(32, 32, (64,))
    params = list(expert.parameters())
    u = torch.randn(args.batch_size, 32)
    output = expert(u)
    print(f"expert 32 -> 64 -> 32, batch {args.batch_size}, 1 thread, {args.rounds} rounds; ms per call")
    print(f"{'tasks':>5} {'written':>9} {'autograd':>9} {'ratio':>6} {'max |diff|':>11}")
    rows = []
    for n_tasks in args.tasks:
        cotangents = torch.randn(n_tasks, args.batch_size, 32)

        def written():
            return expert_vjp(expert, u, output.detach(), cotangents)

        def autograd():
            return torch.autograd.grad(output, params, cotangents, retain_graph=True, is_grads_batched=True)

        diff = max(float((g - a).abs().max()) for (_, g), a in zip(written().parameters, autograd()))
        times: dict[str, list[float]] = {"written": [], "autograd": []}
        for r in range(args.rounds):
            order = [("written", written), ("autograd", autograd)]
            for name, action in order if r % 2 == 0 else order[::-1]:
                times[name].append(1e3 * time_block(action, args.block))
        w, a = statistics.median(times["written"]), statistics.median(times["autograd"])
        ratio = statistics.median(round_ratios(times, baseline="autograd")["written"])
        print(f"{n_tasks:>5} {w:>9.3f} {a:>9.3f} {ratio:>6.2f} {diff:>11.1e}")
        rows.append({"n_tasks": n_tasks, "written_ms": round(w, 4), "autograd_ms": round(a, 4), "ratio": round(ratio, 3),
                     "max_abs_diff": diff, "batch_size": args.batch_size, "rounds": args.rounds, "threads": 1})  # fmt: skip
    for path in [args.out] + ([args.copy_to] if args.copy_to else []):
        print("wrote", write_rows(path, rows, COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
