"""A plain PLE training step, module by module against expert banks, and its FLOP floor.

The benchmark problem of :mod:`mtlbook.experiments.bench` (synthetic ``"conflict"`` suite,
2-level PLE, 2 shared + 1 task expert per task per level, experts 32 -> 64 -> 32, batch 256)
at 4, 8 and 16 tasks. One *plain step* is

    zero_grad -> forward -> per-task losses -> sum().backward() -> AdamW.step()

for the same initial weights in two forms, each as the trainer runs it: ``experts="modules"``
(every expert, gate and tower its own module call; the package default; per-task losses,
:func:`~mtlbook.losses.task_losses`, and AdamW with ``foreach=True``) and ``experts="bank"``
(modules of one shape as one batched matmul, :mod:`mtlbook.models.banks`, with the task
experts, task gates and towers stored as stacked Parameters,
:mod:`mtlbook.models.bank_storage`; the losses a group of tasks at a time,
:mod:`mtlbook.losses_grouped`, and AdamW ``fused=True``). ``bank_per_task_ms`` is the bank
model with the module form's losses and optimizer, so the table separates what the banks
give from what the loss and optimizer paths give. Per round, in shuffled order, the script
times a block of steps of each, a block of AdamW steps alone for each form (``optimizer_ms``,
``bank_optimizer_ms``: the same numbers in ~400 tensors, foreach, or in ~40, fused), a block of
the bank step's matmuls alone (below), and a block of 256x512 @ 512x512 float32
matmuls (the machine's attainable GFLOP/s on ``--threads`` threads, measured in the same
rounds, so under the same load). Reported values are medians over rounds of the per-step
times.

``bank_matmul_ms`` is the bank step's own matmuls alone: every ``mm``/``bmm``/``baddbmm``/``addmm``
of one forward and backward, recorded with their shapes and strides
(``torch.utils._python_dispatch.TorchDispatchMode``) and replayed back to back on random
tensors of the same layout, timed in the same rounds (``n_matmuls`` calls). It is what the
step would cost with no other work at all, at the speed these shapes actually reach on this
CPU; ``bank_matmul_over_floor`` says how far that is from the FLOP floor below, and
``bank_over_matmul`` how much of the step is everything else (elementwise work, the optimizer,
framework overhead).

``bank_fixed_ms`` is the bank step at batch 2 (the same model, losses and optimizer, two rows
per batch): the same ops and autograd nodes (tested) with next to no arithmetic, i.e. what
eager PyTorch charges for launching this step's few hundred ops whatever the batch.
``bank_bound_over_floor`` is ``(bank_fixed_ms + floor_ms) / floor_ms``: one thread launches
the ops and does the arithmetic one after the other, and the arithmetic takes at least the
floor, so no batch-256 step made of these ops can be faster (a lower bound for this code in
eager mode; only fewer ops, fused by hand or by a compiler, can go below it).

``compiled_ms`` is the bank step with its forward pass and losses compiled by ``torch.compile``
(Inductor), as the trainer runs it with ``TrainerConfig(compile_forward=True)``
(:mod:`mtlbook.train.compiled`; the backward call and fused AdamW stay as they are): the same
arithmetic in fewer, fused ops, the way below the eager bound. ``compile_s`` is what its first
step took: the compilation, from an empty Inductor cache (the script points
``TORCHINDUCTOR_CACHE_DIR`` at a new temporary folder, removed at exit, unless it is set; a
second run of a reader's model reuses its cache and compiles faster).
``--no-compile`` leaves it out.

The FLOP floor is ``step_mflop / matmul_gflops``, with ``step_mflop`` the forward plus
backward FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls
only; the optimizer's elementwise work is not counted, which makes the floor optimistic). The
bank form's count is reported too (``bank_step_mflop``; it differs only where one form
computes a mixture as a matmul and the other elementwise); the floor uses the module form's
count for both.

    .venv/bin/python benchmarks/plain_step.py --quick                      # smoke run
    nice .venv/bin/python benchmarks/plain_step.py                         # writes mtlbook/tables/plain_step.csv

Nothing asserts on these timings.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

if __name__ == "__main__" and "--no-compile" not in sys.argv[1:] and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    # compile_s: a cold compilation, not one served from an earlier run's cache (set before
    # torch is imported: parts of Inductor fix their cache folder when first imported)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="plain_step_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mtlbook.experiments.bench import make_problem, write_rows  # noqa: E402
from mtlbook.losses import task_losses  # noqa: E402
from mtlbook.losses_grouped import grouped_task_losses  # noqa: E402
from mtlbook.models import PLE, to_bank  # noqa: E402
from mtlbook.train.compiled import forward_and_losses  # noqa: E402
from mtlbook.train.optim import adamw_implementation  # noqa: E402

COLUMNS = (
    "n_tasks", "module_ms", "bank_ms", "speedup", "step_mflop", "bank_step_mflop", "matmul_gflops", "floor_ms",
    "module_over_floor", "bank_over_floor", "optimizer_ms", "bank_optimizer_ms", "bank_per_task_ms",
    "bank_matmul_ms", "n_matmuls", "bank_matmul_over_floor", "bank_over_matmul", "bank_fixed_ms",
    "bank_fixed_over_floor", "bank_bound_over_floor", "compiled_ms", "compiled_over_floor", "compile_s", "rounds", "block_steps", "threads",
    "batch_size",
)  # fmt: skip
MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default,
           torch.ops.aten.addmm.default)  # fmt: skip


class Stepper:
    """Plain AdamW steps of one model over the problem's batches.

    ``fast_path=False``: per-task losses and foreach AdamW (the trainer's module form);
    ``True``: losses a group of tasks at a time and fused AdamW (the trainer's bank form).
    ``compiled``: the forward pass and the losses compiled by ``torch.compile`` (the
    trainer's ``compile_forward=True``).
    """

    def __init__(self, model: PLE, batches, task_specs, lr: float = 5e-4, fast_path: bool = False,
                 compiled: bool = False) -> None:  # fmt: skip
        self.model, self.batches, self.task_specs = model, batches, task_specs
        self.losses = grouped_task_losses if fast_path else task_losses
        self.forward_losses = forward_and_losses(lambda outputs, batch: self.losses(outputs, batch, task_specs), compiled)
        groups = [{"params": list(model.parameters())}]
        # the trainer's choice (foreach: torch's CPU default would be a Python loop over the tensors)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, **adamw_implementation(groups, fast_path))
        self.i = 0

    def forward_backward(self) -> None:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.optimizer.zero_grad(set_to_none=True)
        _, losses = self.forward_losses(self.model, batch)
        losses.sum().backward()

    def step(self) -> None:
        self.forward_backward()
        self.optimizer.step()


class _MatmulRecorder(TorchDispatchMode):
    """Records every matmul call of the ops it sees: the op, and each argument's layout or value."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, list[object]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            layouts = [(a.shape, a.stride(), a.storage_offset()) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, layouts))
        return func(*args, **(kwargs or {}))


def _like(layout: object) -> object:
    """A random float32 tensor with the recorded shape, strides and offset (other arguments as they were)."""
    if not isinstance(layout, tuple):
        return layout
    shape, stride, offset = layout
    extent = offset + sum((size - 1) * step for size, step in zip(shape, stride)) + 1
    return torch.randn(max(extent, 1)).as_strided(shape, stride, offset)


def matmul_replay(stepper: Stepper) -> tuple[Callable[[], None], int]:
    """The matmuls of one forward and backward of ``stepper``, replayed back to back; and their count."""
    recorder = _MatmulRecorder()
    with recorder:
        stepper.forward_backward()
    calls = [(func, [_like(a) for a in layouts]) for func, layouts in recorder.calls]

    def run() -> None:
        for func, args in calls:
            func(*args)

    return run, len(calls)


def step_flops(stepper: Stepper) -> int:
    with FlopCounterMode(display=False) as counter:
        stepper.forward_backward()
    return counter.get_total_flops()


def time_block(action: Callable[[], None], n: int) -> float:
    """Seconds per call over a block of ``n`` calls."""
    start = time.perf_counter()
    for _ in range(n):
        action()
    return (time.perf_counter() - start) / n


def run_task_count(n_tasks: int, args: argparse.Namespace, rng: random.Random) -> dict[str, object]:
    problem = make_problem(n_tasks, batch_size=args.batch_size)
    module = Stepper(problem.model, problem.batches, problem.task_specs)
    bank_model = to_bank(problem.model)
    bank = Stepper(bank_model, problem.batches, problem.task_specs, fast_path=True)
    bank_per_task = Stepper(copy.deepcopy(bank_model), problem.batches, problem.task_specs)
    flops = step_flops(module)
    bank_flops = step_flops(bank)
    a, b = torch.randn(256, 512), torch.randn(512, 512)
    matmul_flop = 2 * 256 * 512 * 512
    bank_matmuls, n_matmuls = matmul_replay(bank)
    # the same step at batch 2: the same ops, next to no arithmetic (the step's fixed cost; at
    # batch 1 autograd skips the bias gradients' sums over the batch, so that would be fewer ops)
    tiny = make_problem(n_tasks, batch_size=2)
    bank_fixed = Stepper(to_bank(tiny.model), tiny.batches, tiny.task_specs, fast_path=True)
    compiled = compile_s = None
    if args.compile:
        compiled = Stepper(copy.deepcopy(bank_model), problem.batches, problem.task_specs, fast_path=True, compiled=True)
        start = time.perf_counter()
        compiled.step()  # compiles
        compile_s = time.perf_counter() - start
    actions: dict[str, Callable[[], None]] = {
        "module": module.step,
        "bank": bank.step,
        "bank_per_task": bank_per_task.step,
        "optimizer": module.optimizer.step,  # grads from the module steps
        "bank_optimizer": bank.optimizer.step,
        "bank_matmul": bank_matmuls,
        "bank_fixed": bank_fixed.step,
        "matmul": lambda: torch.mm(a, b),
    }
    if compiled is not None:
        actions["compiled"] = compiled.step
    for action in actions.values():  # warm-up
        time_block(action, 3)
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(args.rounds):
        order = list(actions)
        rng.shuffle(order)
        for name in order:
            n = args.block * 4 if name == "matmul" else args.block
            times[name].append(time_block(actions[name], n))
    med = {name: statistics.median(v) for name, v in times.items()}
    gflops = matmul_flop / med["matmul"] / 1e9
    floor_ms = flops / (gflops * 1e9) * 1e3
    module_ms, bank_ms = med["module"] * 1e3, med["bank"] * 1e3
    # one thread runs the launches and the arithmetic one after the other, and the arithmetic
    # needs at least the floor: fixed cost + floor bounds this sequence of ops from below
    bound_ms = med["bank_fixed"] * 1e3 + floor_ms
    return {
        "n_tasks": n_tasks,
        "module_ms": round(module_ms, 3),
        "bank_ms": round(bank_ms, 3),
        "speedup": round(module_ms / bank_ms, 3),
        "step_mflop": round(flops / 1e6, 2),
        "bank_step_mflop": round(bank_flops / 1e6, 2),
        "matmul_gflops": round(gflops, 2),
        "floor_ms": round(floor_ms, 3),
        "module_over_floor": round(module_ms / floor_ms, 2),
        "bank_over_floor": round(bank_ms / floor_ms, 2),
        "optimizer_ms": round(med["optimizer"] * 1e3, 3),
        "bank_optimizer_ms": round(med["bank_optimizer"] * 1e3, 3),
        "bank_per_task_ms": round(med["bank_per_task"] * 1e3, 3),
        "bank_matmul_ms": round(med["bank_matmul"] * 1e3, 3),
        "n_matmuls": n_matmuls,
        "bank_matmul_over_floor": round(med["bank_matmul"] * 1e3 / floor_ms, 2),
        "bank_over_matmul": round(bank_ms / (med["bank_matmul"] * 1e3), 2),
        "bank_fixed_ms": round(med["bank_fixed"] * 1e3, 3),
        "bank_fixed_over_floor": round(med["bank_fixed"] * 1e3 / floor_ms, 2),
        "bank_bound_over_floor": round(bound_ms / floor_ms, 2),
        "compiled_ms": None if compiled is None else round(med["compiled"] * 1e3, 3),
        "compiled_over_floor": None if compiled is None else round(med["compiled"] * 1e3 / floor_ms, 2),
        "compile_s": None if compile_s is None else round(compile_s, 1),
        "rounds": args.rounds,
        "block_steps": args.block,
        "threads": args.threads,
        "batch_size": args.batch_size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--block", type=int, default=10, help="steps per timed block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    parser.add_argument("--out", type=Path, default=ROOT / "mtlbook" / "tables" / "plain_step.csv")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out the compiled step (no torch.compile, no C++ compiler needed)")
    parser.add_argument("--quick", action="store_true", help="4 tasks, 2 rounds of 2 steps; writes nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.rounds, args.block = [4], 2, 2
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    rows = []
    for n_tasks in args.tasks:
        row = run_task_count(n_tasks, args, rng)
        rows.append(row)
        print(
            f"{n_tasks:>3} tasks: modules {row['module_ms']:8.2f} ms ({row['module_over_floor']:5.1f}x floor) | "
            f"bank {row['bank_ms']:8.2f} ms ({row['bank_over_floor']:5.1f}x floor; {row['bank_per_task_ms']:.2f} with "
            f"per-task losses and foreach AdamW) | speedup {row['speedup']:.2f} | "
            f"floor {row['floor_ms']:.2f} ms ({row['step_mflop']:.0f} MFLOP at {row['matmul_gflops']:.0f} GFLOP/s) | "
            f"AdamW alone {row['optimizer_ms']:.2f} ms (bank {row['bank_optimizer_ms']:.2f}) | "
            f"bank matmuls alone {row['bank_matmul_ms']:.2f} ms ({row['bank_matmul_over_floor']:.1f}x floor) | "
            f"bank at batch 2 {row['bank_fixed_ms']:.2f} ms ({row['bank_fixed_over_floor']:.1f}x floor); "
            f"bound {row['bank_bound_over_floor']:.1f}x floor"
            + ("" if row["compiled_ms"] is None else
               f" | compiled {row['compiled_ms']:.2f} ms ({row['compiled_over_floor']:.1f}x floor; "
               f"compiled in {row['compile_s']:.0f} s)"),
            flush=True,
        )
    if not args.quick:
        print(f"wrote {write_rows(args.out, rows, COLUMNS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
