r"""Scaling the trainer out: data parallelism with ``torch.distributed`` (DDP under ``torchrun``).

Every rank (process) holds a full copy of the model, reads its own shard of each epoch and
computes gradients on it; the gradients are averaged across ranks before each optimizer
step, so all copies take the same step and stay identical.

**Process group.** :func:`init_distributed` joins the group that ``torchrun`` describes in
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) unless the caller already initialised one. The backend follows the
device: ``nccl`` on CUDA (rank ``r`` of a node uses ``cuda:LOCAL_RANK``), ``gloo`` on CPU.
A world of one process is no distributed run at all: the trainer then behaves exactly as
without ``torchrun``.

**What is averaged, and how.** The model's gradients are averaged by
``DistributedDataParallel`` (bucketed all-reduces overlapping the backward pass). The
loss balancer's and adaTT's own parameters (log-variances, transfer logits) are not part
of the model, so :func:`average_gradients` all-reduces them in one flat buffer before the
step. Each rank's loss is the mean over its local rows, so the average of the per-rank
gradients is the gradient of the global mean loss when every rank holds the same number of
rows, which :class:`~torch.utils.data.DistributedSampler` guarantees (it repeats up to
``world_size - 1`` rows to even the shards).

**adaTT affinity on every rank.** The affinity EMA must be the same everywhere, otherwise
the transfer weights, hence the losses and the steps, drift apart. Let rank :math:`r` hold
:math:`m_{ri}` rows with a target for task :math:`i` and local per-task gradients
:math:`g_{ri}` (of the local *mean* loss). Two modes:

* ``"exact"``: all-reduce :math:`m_{ri} g_{ri}` and :math:`m_{ri}`, then

  .. math::
      g_i = \frac{\sum_r m_{ri}\, g_{ri}}{\sum_r m_{ri}},

  which is the gradient of task :math:`i`'s mean loss over the *global* batch, whatever
  the per-rank row counts and missing-target masks (weighting by present counts is what
  makes uneven shards exact). The cosine of these rows is the matrix one process would
  compute on the concatenated batch. Communication: :math:`n (d + 1)` floats per
  measurement. Exact for losses that are means over rows (every loss in
  :mod:`mtlbook.losses` except InfoNCE, whose in-batch negatives depend on the split).
* ``"cheap"``: each rank computes its own cosine matrix :math:`C_r`; the matrices are
  averaged over the ranks where a pair was observed (both tasks present with a usable
  gradient): :math:`2 n^2` floats (cosine sums and pair counts). The result is an average
  of local affinities, not the affinity of the global batch: cosines of small local
  batches are noisier, and the mean of cosines is not the cosine of the mean.

**Only rank 0** writes checkpoints, shows progress bars and emits warnings; every rank
waits at a barrier after a checkpoint is written, so all of them can resume from it.
Metrics are reduced over ranks: losses by summing (loss x rows) and rows; AUC, RMSE and
accuracy from the gathered raw outputs, targets and masks (exact, not an approximation).

**Agreement.** Whatever one rank decides alone would desynchronise the collectives (and
hang the run): a batch with a non-finite loss on any rank is skipped on every rank
(:func:`any_rank`); an out-of-memory error is re-raised instead of skipped.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from mtlbook.gradients import cosine_matrix

__all__ = [
    "DistributedContext",
    "ShardSampler",
    "adatt_sync_bytes",
    "any_rank",
    "average_gradients",
    "broadcast_tensors",
    "gather_objects",
    "init_distributed",
    "measure_affinity",
    "reduce_cosines",
    "reduce_task_gradients",
    "sum_over_ranks",
]

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a distributed run.

    Attributes:
        rank: global rank in ``0 .. world_size - 1`` (rank 0 is the main process).
        world_size: number of processes (``>= 2``; a world of one is not distributed).
        local_rank: rank within this node (selects the GPU).
        backend: ``"gloo"`` or ``"nccl"``.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must live for a collective: CUDA for NCCL, CPU for gloo."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {raw!r}") from None


def init_distributed(
    backend: str | None = None, device: str | None = None, timeout_s: float = 1800.0
) -> DistributedContext | None:
    """Join (or describe) the process group; ``None`` when this is a single-process run.

    * A group already initialised by the caller is used as it is (its backend wins).
    * Otherwise, when ``RANK`` and ``WORLD_SIZE`` are set (``torchrun`` sets them, with
      ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) and ``WORLD_SIZE > 1``, the
      group is initialised from the environment (``init_method="env://"``).
    * Otherwise (no group, no variables, or a world of one) nothing happens.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None`` (choose: ``nccl`` when CUDA is available
            and ``device`` is not a CPU device, else ``gloo``).
        device: the trainer's requested device string (``None``: automatic).
        timeout_s: collective timeout in seconds (> 0).

    On NCCL the current CUDA device is set to ``cuda:LOCAL_RANK``.
    """
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {backend!r}")
    if device is not None and not isinstance(device, str):
        raise TypeError(f"device must be None or a device string, got {type(device).__name__}")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not all(name in os.environ for name in _TORCHRUN_VARIABLES):
            return None
        if _env_int("WORLD_SIZE") <= 1:
            return None
        wants_cpu = device is not None and device.startswith("cpu")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() and not wants_cpu else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    world_size = dist.get_world_size()
    if world_size <= 1:
        return None
    rank = dist.get_rank()
    actual_backend = str(dist.get_backend())
    if actual_backend == "nccl":
        local_rank = _env_int("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(local_rank)
    else:
        local_rank = _env_int("LOCAL_RANK", rank)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=actual_backend)


# ---------------------------------------------------------------------------- collectives
def sum_over_ranks(tensor: Tensor, context: DistributedContext) -> Tensor:
    """All-reduce (sum) a copy of ``tensor``; returned on ``tensor``'s device and dtype."""
    buffer = tensor.detach().to(context.comm_device, copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(device=tensor.device, dtype=tensor.dtype)


def any_rank(flag: bool, context: DistributedContext | None) -> bool:
    """True on every rank when ``flag`` is True on at least one (unchanged without a context)."""
    if context is None:
        return bool(flag)
    votes = torch.tensor([1.0 if flag else 0.0], device=context.comm_device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item() > 0)


def average_gradients(parameters: Sequence[Tensor], context: DistributedContext) -> None:
    """Replace each parameter's ``.grad`` by its mean over the ranks, in one flat all-reduce.

    A rank without a gradient for a parameter contributes zeros; a parameter no rank has
    a gradient for keeps ``grad = None`` (AdamW then leaves it untouched, as in a single
    process). Parameters are deduplicated by identity; order must match across ranks.
    """
    unique: list[Tensor] = []
    seen: set[int] = set()
    for p in parameters:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    if not unique:
        return
    device = context.comm_device
    pieces = [
        torch.zeros(p.numel(), device=device) if p.grad is None else p.grad.detach().reshape(-1).float().to(device)
        for p in unique
    ]
    has_grad = torch.tensor([float(p.grad is not None) for p in unique], device=device)
    flat = torch.cat(pieces + [has_grad])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= context.world_size
    offset = 0
    counts = flat[-len(unique) :]
    for k, p in enumerate(unique):
        size = p.numel()
        if counts[k] > 0:
            mean = flat[offset : offset + size].view_as(p).to(device=p.device, dtype=p.dtype)
            if p.grad is None:
                p.grad = mean.clone()
            else:
                p.grad.copy_(mean)
        offset += size


def broadcast_tensors(tensors: Sequence[Tensor], context: DistributedContext, src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (one flat broadcast).

    Used for state outside the DDP module: the balancer's and adaTT's parameters and
    buffers (e.g. GradNorm's weights, which each rank would otherwise update from its local
    gradient norms).
    """
    items = [t for t in tensors if t.numel() > 0]
    if not items:
        return
    device = context.comm_device
    flat = torch.cat([t.detach().reshape(-1).double().to(device) for t in items])
    dist.broadcast(flat, src=src)
    offset = 0
    with torch.no_grad():
        for t in items:
            t.copy_(flat[offset : offset + t.numel()].view_as(t).to(device=t.device, dtype=t.dtype))
            offset += t.numel()


def gather_objects(obj: Any, context: DistributedContext) -> list[Any]:
    """Every rank's ``obj`` in rank order (pickled; for modest sizes such as metric rows)."""
    out: list[Any] = [None] * context.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------- adaTT affinity
def reduce_task_gradients(
    gradients: Tensor, present_rows: Tensor, context: DistributedContext
) -> tuple[Tensor, Tensor]:
    r"""``"exact"`` mode: the per-task gradients of the global batch.

    Args:
        gradients: local ``[n_tasks, d]`` gradients of each task's local mean loss.
        present_rows: local ``[n_tasks]`` count of rows with a target for each task.

    Returns:
        ``(G, present)``: ``G[i] = sum_r m_ri g_ri / sum_r m_ri`` (zeros where no rank had a
        row) and the bool ``[n_tasks]`` mask of tasks present on some rank.
    """
    if gradients.dim() != 2 or present_rows.shape != gradients.shape[:1]:
        raise ValueError(
            f"gradients must be [n_tasks, d] and present_rows [n_tasks], got {tuple(gradients.shape)} "
            f"and {tuple(present_rows.shape)}"
        )
    counts = present_rows.detach().to(gradients.device, torch.float32)
    weighted = gradients.detach().float() * counts[:, None]
    flat = torch.cat([weighted.reshape(-1), counts])
    flat = sum_over_ranks(flat, context)
    n = gradients.shape[0]
    total_counts = flat[-n:]
    summed = flat[:-n].view_as(weighted)
    present = total_counts > 0
    global_gradients = summed / total_counts.clamp_min(1.0)[:, None]
    return global_gradients, present


def reduce_cosines(gradients: Tensor, present: Tensor, context: DistributedContext) -> tuple[Tensor, Tensor]:
    """``"cheap"`` mode: the mean over ranks of each rank's cosine matrix, pair by pair.

    A task counts as observed on a rank when it is present there and its gradient row is
    finite and non-zero (as in :meth:`~mtlbook.adatt.TaskAffinityComputer.update`). Pair
    ``(i, j)`` is averaged over the ranks where both were observed.

    Returns:
        ``(C, pairs)``: the ``[n, n]`` mean cosines (0 where no rank saw the pair) and the
        bool ``[n, n]`` mask of pairs seen on at least one rank.
    """
    grads = gradients.detach().float()
    observed = present.to(grads.device).bool() & torch.isfinite(grads).all(dim=1) & (grads.norm(dim=1) > 0)
    local_cosine = cosine_matrix(torch.nan_to_num(grads))
    pair = (observed[:, None] & observed[None, :]).float()
    flat = torch.cat([(local_cosine * pair).reshape(-1), pair.reshape(-1)])
    flat = sum_over_ranks(flat, context)
    n = grads.shape[0]
    sums, counts = flat[: n * n].view(n, n), flat[n * n :].view(n, n)
    return sums / counts.clamp_min(1.0), counts > 0


def measure_affinity(
    adatt: nn.Module,
    task_losses: Tensor,
    present_rows: Tensor,
    context: DistributedContext,
    mode: str = "exact",
) -> Tensor:
    """One adaTT measurement that leaves the same affinity on every rank; returns a copy.

    Args:
        adatt: an :class:`~mtlbook.adatt.AdaptiveTaskTransfer` (attached to the model).
        task_losses: the local ``[n_tasks]`` losses (graph kept, as for ``adatt.measure``).
        present_rows: local ``[n_tasks]`` counts of rows with a target per task.
        context: the distributed context.
        mode: ``"exact"`` or ``"cheap"`` (see the module doc).

    The per-task gradients are taken with ``torch.autograd.grad`` on the *module's*
    parameters: that neither fills ``.grad`` nor fires DDP's reducer hooks (which sit on
    the gradient accumulators), so DDP's own backward afterwards is unaffected.
    """
    if mode not in ("exact", "cheap"):
        raise ValueError(f"mode must be 'exact' or 'cheap', got {mode!r}")
    computer = adatt.affinity_computer
    local_present = present_rows > 0
    gradients = computer.extract_gradients(task_losses, present=local_present.to(task_losses.device))
    if mode == "exact":
        global_gradients, present = reduce_task_gradients(gradients, present_rows, context)
        computer.update(global_gradients, present)
    else:
        cosine, pairs = reduce_cosines(gradients, local_present, context)
        computer.update(cosine=cosine, present=pairs.any(dim=1), observed_pairs=pairs)
    return computer.affinity.detach().clone()


def adatt_sync_bytes(mode: str, n_tasks: int, n_shared_parameters: int) -> int:
    r"""Bytes all-reduced per adaTT measurement (float32 payload, one all-reduce).

    ``"exact"``: :math:`4 n (d + 1)` (row-count-weighted per-task gradients plus the counts);
    ``"cheap"``: :math:`4 \cdot 2 n^2` (cosine sums plus pair counts). The payload does not
    grow with the number of ranks :math:`k`; a ring all-reduce sends about
    :math:`2 (k - 1) / k` times it from each rank.
    """
    if mode not in ("exact", "cheap"):
        raise ValueError(f"mode must be 'exact' or 'cheap', got {mode!r}")
    for name, value in (("n_tasks", n_tasks), ("n_shared_parameters", n_shared_parameters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if mode == "exact":
        return 4 * n_tasks * (n_shared_parameters + 1)
    return 4 * 2 * n_tasks * n_tasks


# ---------------------------------------------------------------------------- evaluation shards
class ShardSampler(Sampler[int]):
    """Rows ``rank, rank + world_size, ...`` of a dataset, in order, without padding.

    For evaluation: unlike :class:`~torch.utils.data.DistributedSampler` no row is repeated,
    so metrics reduced over ranks are those of the whole dataset (shards may differ in
    length by one row, which is fine because evaluation runs no DDP backward).
    """

    def __init__(self, n_rows: int, rank: int, world_size: int) -> None:
        for name, value, minimum in (("n_rows", n_rows, 0), ("world_size", world_size, 1), ("rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
        self.n_rows, self.rank, self.world_size = n_rows, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n_rows, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n_rows, self.world_size))
