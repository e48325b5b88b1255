"""Per-task gradients side by side: mtlbook's four extractions, torchjd and LibMTL, one run.

The model is a CGC (one PLE level: 2 shared experts and 1 expert per task, experts
32 -> 64 -> 32, batch 256) on the synthetic ``"conflict"`` suite at 4, 8 and 16 tasks (the
problem of :mod:`mtlbook.experiments.bench` with ``n_levels=1``): a model with a clean cut
between the shared part and the task heads, which torchjd's ``mtl_backward`` needs. Every
configuration is a *whole training step* on its own copy of the same initial weights:

* ``plain``: forward, ``losses.sum().backward()``, AdamW (``foreach=True``, as the trainer);
* ``mtlbook/structured``, ``mtlbook/cut``, ``mtlbook/loop``, ``mtlbook/batched``: the plain step with
  :class:`~mtlbook.adatt.TaskAffinityComputer` measuring every step (per-task gradients on
  every shared parameter, cosines, EMA) before the backward;
* ``mtlbook/in-backward``: the structured mode inside the training backward
  (:meth:`~mtlbook.adatt.TaskAffinityComputer.measure_in_backward`: the backward of
  ``losses.sum()`` keeps the task features' cotangents on its way, so the measurement adds only
  the pass through the shared experts, the cosines and the EMA); the same ``.grad`` as the plain
  step, for a training objective that is the plain sum of the task losses;
* ``torchjd``: ``torchjd.autojac.mtl_backward(losses, features=shared expert outputs)``, which
  fills the task heads' ``.grad`` and the shared parameters' per-task Jacobian ``.jac`` (one
  backward per task to the features, one batched backward through the shared experts);
  the same cosines from the Jacobian's rows, the shared ``.grad`` is the rows' sum (the plain
  step's gradient), then the same AdamW step;
* ``libmtl/backward``, ``libmtl/autograd``: LibMTL's ``AbsWeighting._compute_grad`` (one
  ``backward`` or ``autograd.grad`` per task on the shared parameters), the same cosines, the
  shared gradient reset to the rows' sum (its ``_reset_grad``), the AdamW step. LibMTL's
  package imports torchvision at import time, which has no release for this torch; the
  benchmark loads its ``weighting/abstract_weighting.py`` file alone (unchanged) and provides
  the model hooks that class expects (``get_share_params``, ``zero_grad_share_params``:
  under torch 2 ``zero_grad`` sets gradients to ``None`` by default, which its ``_grad2vec``
  would read as zeros, so the adapter zeroes them in place). Skipped, and said so, when
  LibMTL is not installed (``pip install --no-deps --target benchmarks/.peers -r
  benchmarks/requirements.txt``: a folder the script puts on its path).

**Timing** as :mod:`benchmarks.adatt_cost`: blocks of 4 steps per configuration, in a
shuffled order each round, the plain step three times per round; each round's times are
divided by that round's plain step and the table holds medians over rounds. The same rounds
also time a block of 256x512 @ 512x512 float32 matmuls: the machine's attainable GFLOP/s on
``--threads`` threads *under the same load*, which with the plain step's FLOPs (counted by
``torch.utils.flop_counter.FlopCounterMode``, forward plus backward, matmuls only) gives the
plain step's floor and ``plain_over_floor``.

**Memory**: the peak of one step above what was resident at its start, in a worker process
with ``malloc`` tuned before any tensor exists (see :mod:`benchmarks.adatt_cost`); the ratio is
to a plain step's peak.

**Check**: before timing, every configuration's per-task gradients ``G`` on the first batch
are compared with the loop's (``max_abs_diff_vs_loop``): the peers compute the same thing.

``--experts bank`` runs everything on the bank form of the model (:mod:`mtlbook.models.banks`)
and writes ``peers_bank.csv``; there the tasks' towers share batched matmuls, so torchjd's
per-task backward passes keep the graph (``retain_graph=True``).

    .venv/bin/python benchmarks/peers.py --quick                            # smoke run
    nice .venv/bin/python benchmarks/peers.py --copy-to mtlbook/tables/peers.csv

Nothing asserts on these timings.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / ".peers"  # pip install --no-deps --target benchmarks/.peers -r benchmarks/requirements.txt
for path in (ROOT, ROOT / "benchmarks", PEERS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from adatt_cost import _tune_malloc, cpu_peak_available, peak_memory  # noqa: E402
from mtlbook.adatt import TaskAffinityComputer  # noqa: E402
from mtlbook.experiments.bench import Problem, make_problem, write_rows  # noqa: E402
from mtlbook.gradients import cosine_matrix  # noqa: E402
from mtlbook.losses import task_losses  # noqa: E402
from mtlbook.models import to_bank  # noqa: E402

COLUMNS = (
    "n_tasks", "config", "step_ms", "ratio", "ratio_q25", "ratio_q75", "peak_mb", "peak_ratio", "max_abs_diff_vs_loop",
    "step_mflop", "matmul_gflops", "floor_ms", "plain_over_floor", "rounds", "threads", "batch_size", "versions",
)  # fmt: skip
MEASURED = ("mtlbook/structured", "mtlbook/in-backward", "mtlbook/cut", "mtlbook/loop", "mtlbook/batched", "torchjd", "libmtl/backward", "libmtl/autograd")


# --------------------------------------------------------------------------- peers
def load_torchjd():
    try:
        from torchjd.autojac import mtl_backward
    except ImportError:
        return None
    return mtl_backward


def load_libmtl_weighting():
    """LibMTL's ``AbsWeighting`` from its own file, without running the package ``__init__``
    (which imports torchvision); None when LibMTL is not installed."""
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weighting" / "abstract_weighting.py"
    if not path.exists():
        return None
    module_spec = importlib.util.spec_from_file_location("libmtl_abstract_weighting", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.AbsWeighting


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"torch {torch.__version__}"]
    for name in ("torchjd", "LibMTL"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} missing")
    return "; ".join(out)


# --------------------------------------------------------------------------- steps
class Runner:
    """One configuration's copy of the model, its optimizer and its step."""

    def __init__(self, problem: Problem, name: str, lr: float = 5e-4) -> None:
        self.name = name
        self.model = copy.deepcopy(problem.model)
        self.batches, self.task_specs = problem.batches, problem.task_specs
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, foreach=True)
        self.shared = list(self.model.shared_parameters())
        self.i = 0
        self.computer = None
        self.affinity = None
        if name.startswith("mtlbook/"):
            mode = "structured" if name == "mtlbook/in-backward" else name.split("/")[1]
            self.computer = TaskAffinityComputer(self.model.task_names, extraction=mode).attach(self.model)
        elif name == "torchjd":
            self.mtl_backward = load_torchjd()
        elif name.startswith("libmtl/"):
            self.weighting = _libmtl_adapter(load_libmtl_weighting(), self.model, self.shared)
        # in the bank form every task's tower runs in one batched matmul, so the tasks' graphs
        # meet there and torchjd must keep the graph between its per-task backwards
        self.torchjd_kwargs = {"retain_graph": True} if self.model.experts_mode == "bank" else {}

    def losses(self, batch) -> Tensor | list[Tensor]:
        """The loss vector, as the trainer (and LibMTL's trainer) builds it; for torchjd one
        scalar per task, as its examples build them (``mtl_backward`` frees each task's graph
        after its backward, so the tasks' graphs must not meet in one stacked node)."""
        outputs = self.model(batch.inputs)
        if self.name == "torchjd":
            return [task_losses(outputs, batch, [spec])[0] for spec in self.task_specs]
        return task_losses(outputs, batch, self.task_specs)

    def gradients(self, batch) -> Tensor:
        """``G`` ``[n_tasks, d]`` of one batch without stepping (for the check)."""
        losses = self.losses(batch)
        if self.name == "mtlbook/in-backward":
            G = self.computer.gradients_in_backward(losses)
            self.optimizer.zero_grad(set_to_none=True)
            return G
        if self.computer is not None:
            return self.computer.extract_gradients(losses)
        if self.name == "torchjd":
            self.mtl_backward(losses, features=self.model.shared_outputs, shared_params=self.shared, **self.torchjd_kwargs)
            G = torch.cat([p.jac.reshape(p.jac.shape[0], -1) for p in self.shared], dim=1)
            for p in self.model.parameters():
                p.grad = None
                if hasattr(p, "jac"):
                    del p.jac
            return G
        return self.weighting._compute_grad(losses, self.name.split("/")[1])

    def step(self) -> None:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.losses(batch)
        if self.name == "plain":
            losses.sum().backward()
        elif self.name == "mtlbook/in-backward":
            self.affinity = self.computer.measure_in_backward(losses)
        elif self.computer is not None:
            self.computer.measure(losses)
            losses.sum().backward()
        elif self.name == "torchjd":
            self.mtl_backward(losses, features=self.model.shared_outputs, shared_params=self.shared, **self.torchjd_kwargs)
            rows = torch.cat([p.jac.reshape(p.jac.shape[0], -1) for p in self.shared], dim=1)
            self.affinity = cosine_matrix(rows)
            for p in self.shared:
                p.grad = p.jac.sum(0)
                del p.jac
        else:
            mode = self.name.split("/")[1]
            rows = self.weighting._compute_grad(losses, mode)  # backward mode: task heads accumulate too
            self.affinity = cosine_matrix(rows)
            if mode == "autograd":
                losses.sum().backward()
            self.weighting._reset_grad(rows.sum(0))
        self.optimizer.step()

    def run_block(self, n_steps: int) -> float:
        start = time.perf_counter()
        for _ in range(n_steps):
            self.step()
        return (time.perf_counter() - start) / n_steps


def _libmtl_adapter(base, model, shared):
    """An ``AbsWeighting`` subclass instance wired to ``model`` the way LibMTL's trainer wires it."""

    class Adapter(base):
        def __init__(self) -> None:
            super().__init__()
            self.task_num = len(model.task_names)
            self.device = next(model.parameters()).device
            self.rep_grad = False
            self._compute_grad_dim()

        def get_share_params(self):
            return shared

        def zero_grad_share_params(self) -> None:
            for p in shared:  # in place: torch 2's zero_grad() would set them to None
                if p.grad is not None:
                    p.grad.zero_()

    return Adapter()


# --------------------------------------------------------------------------- floor
class Matmul:
    """Blocks of 256x512 @ 512x512 float32 matmuls: attainable GFLOP/s under the same load."""

    def __init__(self, size: tuple[int, int, int] = (256, 512, 512)) -> None:
        m, k, n = size
        self.a, self.b = torch.randn(m, k), torch.randn(k, n)
        self.flop = 2 * m * k * n

    def run_block(self, n_steps: int) -> float:
        start = time.perf_counter()
        for _ in range(n_steps * 10):
            torch.mm(self.a, self.b)
        return (time.perf_counter() - start) / (n_steps * 10)


def step_mflop(problem: Problem) -> float:
    """Forward plus backward FLOPs (matmuls) of one plain step, in MFLOP."""
    model = copy.deepcopy(problem.model)
    batch = problem.batches[0]
    with FlopCounterMode(display=False) as counter:
        task_losses(model(batch.inputs), batch, problem.task_specs).sum().backward()
    return counter.get_total_flops() / 1e6


# --------------------------------------------------------------------------- run
def available(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The configurations whose peer is installed, and a line for each one skipped."""
    keep, skipped = [], []
    for name in names:
        if name == "torchjd" and load_torchjd() is None:
            skipped.append("torchjd: not installed (pip install torchjd)")
        elif name.startswith("libmtl/") and load_libmtl_weighting() is None:
            skipped.append(f"{name}: LibMTL not installed (pip install --no-deps --target benchmarks/.peers "
                           "-r benchmarks/requirements.txt)")
        else:
            keep.append(name)
    return keep, skipped


def time_task_count(problem: Problem, names: Sequence[str], rounds: int, block: int, seed: int) -> dict[str, list[float]]:
    runners = [Runner(problem, name) for name in names]
    matmul = Matmul()
    for runner in runners:
        runner.run_block(2)
    times: dict[str, list[float]] = {name: [] for name in names}
    times["matmul"] = []
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(range(1, len(runners))) + [-1]
        rng.shuffle(order)
        order = [0] + order[: len(order) // 2] + [0] + order[len(order) // 2 :] + [0]
        plain = []
        for index in order:
            if index == -1:
                times["matmul"].append(matmul.run_block(block))
            elif index == 0:
                plain.append(runners[0].run_block(block))
            else:
                times[runners[index].name].append(runners[index].run_block(block))
        times["plain"].append(statistics.median(plain))
    return times


def gradient_check(problem: Problem, names: Sequence[str]) -> dict[str, float]:
    reference = Runner(problem, "mtlbook/loop").gradients(problem.batches[0])
    out = {"plain": math.nan}
    for name in names[1:]:
        out[name] = float((Runner(problem, name).gradients(problem.batches[0]) - reference).abs().max())
    return out


def build_problem(n_tasks: int, args: argparse.Namespace) -> Problem:
    """The CGC problem at ``n_tasks`` tasks, in the form ``--experts`` names."""
    problem = make_problem(n_tasks, batch_size=args.batch_size, n_levels=1)
    if args.experts == "bank":
        problem.model = to_bank(problem.model)
    return problem


def memory_worker(args: argparse.Namespace) -> int:
    """Prints one JSON line ``{n_tasks: {config: peak bytes}}`` (malloc tuned first)."""
    if not (cpu_peak_available() and _tune_malloc()):
        print(json.dumps({}))
        return 0
    out = {}
    for n_tasks in args.tasks:
        problem = build_problem(n_tasks, args)
        peaks = {}
        for name in args.names:
            runner = Runner(problem, name)
            runner.step()  # optimizer state and allocator warm
            peaks[name] = statistics.median(peak_memory(runner.step, torch.device("cpu")) for _ in range(3))
        out[n_tasks] = peaks
    print(json.dumps(out))
    return 0


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    torch.set_num_threads(args.threads)
    names, skipped = available(("plain",) + MEASURED)
    for line in skipped:
        print(f"skipped {line}")
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", "--threads", str(args.threads),
               "--batch-size", str(args.batch_size), "--experts", args.experts, "--tasks", *map(str, args.tasks),
               "--names", *names]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    peaks = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    rows = []
    for n_tasks in args.tasks:
        problem = build_problem(n_tasks, args)
        diffs = gradient_check(problem, names)
        times = time_task_count(problem, names, args.rounds, args.block_steps, seed=n_tasks)
        mflop = step_mflop(problem)
        gflops = statistics.median(Matmul().flop / t for t in times["matmul"]) / 1e9
        floor_ms = mflop / gflops  # MFLOP / (GFLOP/s) = ms
        plain_ms = statistics.median(times["plain"]) * 1e3
        task_peaks = peaks.get(str(n_tasks), {})
        for name in names:
            ratios = sorted(t / p for t, p in zip(times[name], times["plain"]))
            peak = task_peaks.get(name, math.nan)
            rows.append({
                "n_tasks": n_tasks, "config": name, "step_ms": round(statistics.median(times[name]) * 1e3, 3),
                "ratio": round(statistics.median(ratios), 3), "ratio_q25": round(_quantile(ratios, 0.25), 3),
                "ratio_q75": round(_quantile(ratios, 0.75), 3), "peak_mb": round(peak / 2**20, 3),
                "peak_ratio": round(_ratio(peak, task_peaks.get("plain", math.nan)), 3),
                "max_abs_diff_vs_loop": diffs.get(name, math.nan), "step_mflop": round(mflop, 2),
                "matmul_gflops": round(gflops, 2), "floor_ms": round(floor_ms, 3),
                "plain_over_floor": round(plain_ms / floor_ms, 2), "rounds": args.rounds, "threads": args.threads,
                "batch_size": args.batch_size, "versions": versions(),
            })  # fmt: skip
    return rows


def _ratio(a: float, b: float) -> float:
    """``a / b``; NaN where ``b`` is 0 (a tiny run whose plain step grew no memory) or NaN."""
    return a / b if b and not math.isnan(b) else math.nan


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def table(rows: Sequence[dict[str, object]]) -> str:
    tasks = sorted({r["n_tasks"] for r in rows})
    names = list(dict.fromkeys(r["config"] for r in rows))
    cell = {(r["config"], r["n_tasks"]): r for r in rows}
    lines = ["ratio to a plain step (peak memory ratio) at " + " / ".join(f"{t}" for t in tasks) + " tasks"]
    for name in names:
        parts = [f"{cell[name, t]['ratio']:.2f} ({cell[name, t]['peak_ratio']:.2f})" for t in tasks if (name, t) in cell]
        lines.append(f"  {name:<17} " + "   ".join(parts))
    for t in tasks:
        r = cell["plain", t]
        lines.append(f"  plain step at {t} tasks: {r['step_ms']:.1f} ms, floor {r['floor_ms']:.2f} ms "
                     f"({r['step_mflop']:.0f} MFLOP at {r['matmul_gflops']:.0f} GFLOP/s): {r['plain_over_floor']:.1f}x")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--experts", choices=("modules", "bank"), default="modules",
                        help="the model's form (mtlbook.models.banks); bank writes peers_bank.csv")
    parser.add_argument("--quick", action="store_true", help="4 tasks, 3 rounds, batch 64: a smoke run")
    parser.add_argument("--copy-to", type=Path, default=None, help="also write the CSV here")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--names", nargs="+", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.rounds, args.batch_size = [4], 3, 64
    for name in ("rounds", "block_steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(t < 2 for t in args.tasks):
        parser.error(f"--tasks must all be >= 2, got {args.tasks}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_worker:
        torch.set_num_threads(args.threads)
        return memory_worker(args)
    rows = run(args)
    print(table(rows))
    out = ROOT / "benchmarks" / "results" / ("peers.csv" if args.experts == "modules" else "peers_bank.csv")
    for path in [out] + ([args.copy_to] if args.copy_to else []):
        print(f"wrote {write_rows(path, rows, COLUMNS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
