"""What does adaTT cost inside the real training loop? Whole ``Trainer`` steps, side by side.

``benchmarks/adatt_cost.py`` times the affinity measurement against a bare
forward/backward/AdamW step. This script times what a user actually pays: one training step
of :class:`mtlbook.train.Trainer`, i.e. forward, per-task losses, uncertainty weighting,
[affinity measurement], [transfer loss], gate-entropy term, backward, gradient clipping,
AdamW step and the per-batch bookkeeping, for a PLE on the many-task synthetic suite
(:func:`mtlbook.data.make_suite_regime`, ``"conflict"`` regime) at 4, 8 and 16 tasks. The
problem (2-level PLE, 2 shared experts per level, expert width 64 -> 32, batch 256) is the
one of ``adatt_cost.py``, so the two tables can be read together.

Nine configurations (adaTT held in its *dynamic* phase: ``warmup_epochs=0`` and a freeze
epoch that is never reached, so it measures, transfers and learns ``W``):

* ``plain``: the trainer without adaTT;
* ``adatt_every1``: adaTT measuring at every step (``grad_interval=1``);
* ``adatt_every10``: adaTT measuring every 10th step (the default ``grad_interval=10``);
* ``adatt_transfer_only``: adaTT that never measures inside the timed blocks (its interval
  is larger than the run), so only the transfer loss and ``W`` cost anything;
* ``adatt_every1_loop``: like ``adatt_every1`` but with one ``autograd.grad`` call per task
  (``extraction="loop"``, the sources' way) instead of one batched call;
* ``adatt_every1_structured`` / ``adatt_every10_structured``: every step / every 10th step
  with ``extraction="structured"`` (per-task gradients through the shared experts only);
* ``plain_bank``: the trainer without adaTT on the same weights stored as banks
  (``experts="bank"``, :func:`mtlbook.models.to_bank`);
* ``adatt_every1_bank``: the bank model, adaTT measuring every step, structured.

The other adaTT configurations use the package default ``extraction="batched"`` and the
module form. ``ratio`` divides by the ``plain`` blocks (module form) of the same round;
``ratio_own_form`` divides by the blocks of the configuration without adaTT in the same form
(``plain`` or ``plain_bank``) of the same round: what adaTT costs a user of that form.

**Timing through the public API.** A block is one ``Trainer.fit`` of one epoch on a fresh
trainer (same initial weights for every configuration): a warm-up step on the first batch
(it also creates AdamW's state), then the ``block_steps`` batches. A :class:`BlockTimer`
callback times the steps after the warm-up, from ``on_batch_start`` of the first to
``on_batch_end`` of the last, so setup and end-of-epoch work (metrics, scheduler, snapshots)
are outside it: exactly ``block_steps`` complete training steps. Blocks run one at a time
in this process. adaTT measures at step 0 (the warm-up) and every ``grad_interval`` steps
after it, so with ``block_steps = 10`` an interval-10 block holds exactly one measurement.
Every round runs the baseline (``plain``) first and last and the other configurations in
between in a freshly shuffled order; a configuration's ratio in that round is its block
time over the mean of the round's two baseline blocks, and the
reported ``ratio`` is the median over rounds (``ratio_q25`` / ``ratio_q75``: quartiles).
Data loading is not timed (batches are built beforehand); ``torch.set_num_threads`` is fixed.

**Memory.** On CPU, ``torch.profiler`` with ``profile_memory=True`` records every tensor
allocation and free made by PyTorch's CPU allocator (activations, the saved autograd graph,
gradients, per-task gradient rows, optimizer temporaries; not Python objects). For one
training step, taken after a warm-up epoch (so AdamW's state already exists), ``peak_kib`` is
the highest running total of those allocations above the level at the step's start.
``peak_ratio`` divides it by the ``plain`` step's peak. ``forward_peak_kib`` is the same
peak for the forward pass and per-task losses alone (graph kept): the reference of the
sources' claim that measuring with ``retain_graph`` takes "about 2x the forward pass"
(``peak_over_forward``). On CUDA the peaks come from ``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/trainer_step.py           # full run, writes mtlbook/tables/trainer_step.csv
    python benchmarks/trainer_step.py --quick   # a few seconds, writes nothing
    python benchmarks/trainer_step.py --csv other.csv --tasks 4 8 --rounds 9
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from mtlbook.adatt import AdaptiveTaskTransfer
from mtlbook.data import Batch
from mtlbook.losses import task_losses
from mtlbook.models import PLE, to_bank
from mtlbook.train import Callback, Trainer, TrainerConfig

class Setup(NamedTuple):
    """One configuration: adaTT's interval and extraction (``None``: no adaTT; an interval of
    :data:`NEVER`: no measurement inside the timed blocks) and the model's ``experts`` form."""

    interval: int | None
    extraction: str | None
    experts: str = "modules"


NEVER = 2**40
CONFIGS: dict[str, Setup] = {
    "plain": Setup(None, None),
    "adatt_every1": Setup(1, "batched"),
    "adatt_every10": Setup(10, "batched"),
    "adatt_transfer_only": Setup(NEVER, "batched"),
    "adatt_every1_loop": Setup(1, "loop"),
    "adatt_every1_structured": Setup(1, "structured"),
    "adatt_every10_structured": Setup(10, "structured"),
    "plain_bank": Setup(None, None, "bank"),
    "adatt_every1_bank": Setup(1, "structured", "bank"),
}
BASELINE = "plain"
CSV_COLUMNS = (
    "n_tasks", "config", "grad_interval", "extraction", "experts", "step_ms", "ratio", "ratio_q25", "ratio_q75",
    "ratio_own_form",
    "step_measured", "peak_kib", "peak_ratio", "forward_peak_kib", "peak_over_forward",
    "batch_size", "block_steps", "rounds", "threads", "device", "torch",
)  # fmt: skip
DEFAULT_CSV = Path(__file__).resolve().parent.parent / "mtlbook" / "tables" / "trainer_step.csv"


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


# --------------------------------------------------------------------------- problem
# the shared benchmark problem (one definition for both benchmarks)
from mtlbook.experiments.bench import Problem, make_problem, quantile, round_ratios  # noqa: E402


def make_trainer(problem: Problem, config: str, epochs: int, device: str = "cpu") -> Trainer:
    """A :class:`Trainer` for one configuration of :data:`CONFIGS`, on a copy of the model.

    Phase 1 only (``epochs`` epochs), no validation, no early stopping, float32, adaTT (if
    any) in its dynamic phase for the whole run.
    """
    if config not in CONFIGS:
        raise ValueError(f"config must be one of {tuple(CONFIGS)}, got {config!r}")
    _check_int(epochs, "epochs", 1)
    setup = CONFIGS[config]
    model = copy.deepcopy(problem.model) if setup.experts == "modules" else to_bank(problem.model)
    adatt = None
    if setup.interval is not None:
        adatt = AdaptiveTaskTransfer(model.task_names, grad_interval=setup.interval, extraction=setup.extraction,
                                     warmup_epochs=0, freeze_epoch=NEVER)
    settings = TrainerConfig(phase1_epochs=epochs, phase2_epochs=0, warmup_epochs=0, patience=None,
                             restore_best=False, progress=False, seed=0, device=device, amp="off")  # fmt: skip
    return Trainer(model, settings, adatt=adatt)


# --------------------------------------------------------------------------- timed blocks
class BlockTimer(Callback):
    """Times the steps of a ``fit`` that come after its first ``warmup_steps`` steps: one block.

    The block runs from ``on_batch_start`` of the first timed step to ``on_batch_end`` of the
    last one, so setup before the first batch and end-of-epoch work (metrics, scheduler,
    snapshots) are outside it. :attr:`span` holds the block's ``(start, end)``.
    """

    def __init__(self, n_steps: int, warmup_steps: int = 1) -> None:
        self.n_steps = _check_int(n_steps, "n_steps", 1)
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", 0)
        self.span: tuple[float, float] | None = None
        self._seen = 0
        self._start = 0.0

    def on_batch_start(self, trainer: Trainer, batch: Batch) -> None:
        if self._seen == self.warmup_steps:
            self._start = time.perf_counter()

    def on_batch_end(self, trainer: Trainer, batch: Batch, terms: Any) -> None:
        self._seen += 1
        if self._seen == self.warmup_steps + self.n_steps:
            self.span = (self._start, time.perf_counter())

    @property
    def seconds(self) -> float:
        if self.span is None:
            raise RuntimeError(f"the fit ran {self._seen} steps, fewer than {self.warmup_steps} + {self.n_steps}")
        return self.span[1] - self.span[0]


def run_block(problem: Problem, config: str, device: str = "cpu") -> tuple[Trainer, BlockTimer]:
    """One block: a fresh trainer for ``config`` fits one epoch of ``1 + len(problem.batches)``
    steps, the first batch twice; the first step (which also creates AdamW's state) is a
    warm-up, the other ``len(problem.batches)`` steps are timed."""
    trainer = make_trainer(problem, config, epochs=1, device=device)
    timer = BlockTimer(len(problem.batches), warmup_steps=1)
    trainer.fit([problem.batches[0], *problem.batches], callbacks=[timer])
    return trainer, timer


def time_blocks(problem: Problem, configs: Sequence[str], rounds: int, seed: int = 0,
                device: str = "cpu") -> dict[str, list[float]]:  # fmt: skip
    """Block seconds per configuration and round; ``configs[0]`` is the baseline.

    Every configuration first runs one untimed block. Each round runs the baseline first and
    last (its entry is the mean of the two) and the others in between, in an order shuffled
    anew each round, so that a slow spell of a shared machine falls on every configuration
    alike. One block runs at a time, in this process: no threads.
    """
    _check_int(rounds, "rounds", 1)
    if not configs:
        raise ValueError("configs must not be empty")
    rng = random.Random(seed)
    for name in configs:
        run_block(problem, name, device)
    times: dict[str, list[float]] = {name: [] for name in configs}
    others = list(configs[1:])
    for _ in range(rounds):
        rng.shuffle(others)
        gc.collect()
        first = run_block(problem, configs[0], device)[1].seconds
        for name in others:
            gc.collect()
            times[name].append(run_block(problem, name, device)[1].seconds)
        gc.collect()
        times[configs[0]].append((first + run_block(problem, configs[0], device)[1].seconds) / 2.0)
    return times


# --------------------------------------------------------------------------- memory
def running_peak(events: Sequence[tuple[int, int]]) -> int:
    """Highest running total of ``(time, bytes)`` allocation events (frees negative), taken in
    time order and never below 0: the peak memory added above the starting level."""
    total = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        total += int(nbytes)
        peak = max(peak, total)
    return peak


class MemoryProbe:
    """Measures the peak tensor memory of the code that runs between :meth:`start` and :meth:`stop`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._profiler: Any = None
        self._start_bytes = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
            return
        from torch.profiler import ProfilerActivity, profile

        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the profiler's start/stop lines off stderr
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()

    def stop(self) -> float:
        """Bytes of the peak above the level at :meth:`start`; NaN if the profiler gives no events."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device) - self._start_bytes)
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        try:
            events = [(e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                      if e.name() == "[memory]"]  # fmt: skip
        except AttributeError:  # the profiler's result API moved: report "not measured"
            return math.nan
        return float(running_peak(events)) if events else math.nan


def measure(probe: MemoryProbe, action: Callable[[], Any]) -> float:
    """Peak bytes :func:`MemoryProbe` sees while ``action()`` runs (its result kept until the end)."""
    probe.start()
    try:
        kept = action()
    finally:
        peak = probe.stop()
    del kept
    return peak


class StepProbe(Callback):
    """For a two-epoch ``fit``: epoch 0 warms up, the first step of epoch 1 runs under a
    :class:`MemoryProbe` whose peak goes to :attr:`peak_bytes`."""

    def __init__(self, device: torch.device) -> None:
        self.probe = MemoryProbe(device)
        self.peak_bytes = math.nan
        self.on_step_start: Callable[[], None] = lambda: None
        self.updates_before = 0
        self._armed = False

    def on_batch_start(self, trainer: Trainer, batch: Batch) -> None:
        if trainer.epoch == 1 and math.isnan(self.peak_bytes) and not self._armed:
            self.on_step_start()
            self._armed = True
            self.probe.start()

    def on_batch_end(self, trainer: Trainer, batch: Batch, terms: Any) -> None:
        if self._armed:
            self._armed = False
            self.peak_bytes = self.probe.stop()  # the trainer's whole step ran in between


def step_peak(problem: Problem, config: str, device: str = "cpu") -> tuple[float, bool]:
    """Peak bytes of one training step after a warm-up epoch, and whether that step measured
    affinity (read off the affinity computer's update counter, not assumed)."""
    trainer = make_trainer(problem, config, epochs=2, device=device)
    feed = StepProbe(torch.device(device))
    updates = (lambda: 0) if trainer.adatt is None else (lambda: int(trainer.adatt.affinity_computer.n_updates))
    feed.on_step_start = lambda: setattr(feed, "updates_before", updates())
    trainer.fit(list(problem.batches), callbacks=[feed])
    return feed.peak_bytes, updates() > feed.updates_before


def forward_peak(problem: Problem, device: str = "cpu") -> float:
    """Peak bytes of the forward pass and per-task losses alone (graph kept)."""
    model = copy.deepcopy(problem.model).train()
    batch = problem.batches[0]
    return measure(MemoryProbe(torch.device(device)),
                   lambda: task_losses(model(batch.inputs), batch, problem.task_specs))  # fmt: skip


# --------------------------------------------------------------------------- driver
def own_baseline(name: str, configs: Sequence[str]) -> str | None:
    """The configuration without adaTT in ``name``'s experts form (its ``ratio_own_form``
    divides by it, round by round), or ``None`` when ``configs`` has none."""
    form = CONFIGS[name].experts
    for other in configs:
        if CONFIGS[other].interval is None and CONFIGS[other].experts == form:
            return other
    return None


def benchmark(
    n_tasks: int,
    rounds: int,
    *,
    batch_size: int = 256,
    block_steps: int = 10,
    device: str = "cpu",
    seed: int = 0,
    configs: Sequence[str] = tuple(CONFIGS),
) -> list[dict[str, Any]]:
    """CSV rows (see :data:`CSV_COLUMNS`) for one task count; ``configs[0]`` must be the baseline."""
    if not configs or configs[0] != BASELINE:
        raise ValueError(f"configs must start with the baseline {BASELINE!r}, got {configs!r}")
    problem = make_problem(n_tasks, batch_size=batch_size, n_batches=block_steps, seed=seed, device=device)
    times = time_blocks(problem, configs, rounds, seed=seed, device=device)
    ratios = round_ratios(times, configs[0])
    forward = forward_peak(problem, device)
    peaks = {name: step_peak(problem, name, device) for name in configs}
    base_peak = peaks[configs[0]][0]
    rows = []
    for name in configs:
        peak, measured = peaks[name]
        setup = CONFIGS[name]
        own_plain = own_baseline(name, configs)
        rows.append({
            "n_tasks": n_tasks,
            "config": name,
            "grad_interval": "" if setup.interval is None else ("never" if setup.interval == NEVER else setup.interval),
            "extraction": setup.extraction or "",
            "experts": setup.experts,
            "step_ms": 1000.0 * statistics.median(times[name]) / block_steps,
            "ratio": statistics.median(ratios[name]),
            "ratio_q25": quantile(ratios[name], 0.25),
            "ratio_q75": quantile(ratios[name], 0.75),
            "ratio_own_form": math.nan if own_plain is None else
            statistics.median(t / b for t, b in zip(times[name], times[own_plain])),
            "step_measured": measured,
            "peak_kib": peak / 1024.0,
            "peak_ratio": peak / base_peak if base_peak > 0 else math.nan,
            "forward_peak_kib": forward / 1024.0,
            "peak_over_forward": peak / forward if forward > 0 else math.nan,
            "batch_size": batch_size,
            "block_steps": block_steps,
            "rounds": rounds,
            "threads": torch.get_num_threads(),
            "device": device,
            "torch": torch.__version__.split("+")[0],
        })  # fmt: skip
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write ``rows`` with :data:`CSV_COLUMNS` (floats to 4 significant digits)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    return target


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'tasks':>5} {'config':<25} {'step ms':>8} {'ratio':>6} {'[q25, q75]':>14} {'peak KiB':>9} "
             f"{'peak x':>7} {'x fwd':>6}"]  # fmt: skip
    for r in rows:
        lines.append(f"{r['n_tasks']:>5} {r['config']:<25} {r['step_ms']:>8.2f} {r['ratio']:>6.3f} "
                     f"[{r['ratio_q25']:.3f}, {r['ratio_q75']:.3f}] {r['peak_kib']:>9.0f} "
                     f"{r['peak_ratio']:>7.3f} {r['peak_over_forward']:>6.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (4 tasks, 3 rounds, batch 64)")
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="task counts (default 4 8 16)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per task count (default 15)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per batch (default 256)")
    parser.add_argument("--block-steps", type=int, default=10, help="training steps per timed block")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--csv", default=None, help=f"output CSV (default {DEFAULT_CSV} unless --quick)")
    args = parser.parse_args(argv)
    tasks = args.tasks or ([4] if args.quick else [4, 8, 16])
    rounds = args.rounds or (3 if args.quick else 15)
    batch_size = args.batch_size or (64 if args.quick else 256)
    torch.set_num_threads(_check_int(args.threads, "threads", 1))
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for n_tasks in tasks:
        rows += benchmark(n_tasks, rounds, batch_size=batch_size, block_steps=args.block_steps, device=args.device)
        print(format_table([r for r in rows if r["n_tasks"] == n_tasks]), flush=True)
    print(f"total {time.perf_counter() - started:.1f} s on {args.device}, {torch.get_num_threads()} thread(s)")
    out = args.csv if args.csv is not None else (None if args.quick else DEFAULT_CSV)
    if out is not None:
        print(f"wrote {write_csv(rows, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
