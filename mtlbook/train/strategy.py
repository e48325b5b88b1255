"""Where a run executes: one process, or several under ``torch.distributed`` (``torchrun``).

The training loop asks its strategy for everything that differs between the two: the
device, the data loader, the module to call forward on, the ``no_sync`` window of gradient
accumulation, whether *any* rank saw a bad batch, the gradient averaging DDP does not do,
the adaTT measurement and the reduction of metric sums. :class:`SingleProcess` does the
obvious thing everywhere; :class:`DistributedStrategy` does what
:mod:`mtlbook.train.distributed` describes (DDP wrapper rebuilt when trainability changes,
balancer and adaTT gradients averaged by hand, only rank 0 writes, warns and shows progress).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from mtlbook.data.batch import Batch, MultiTaskDataset, make_loader
from mtlbook.train.distributed import (
    DistributedContext,
    ShardSampler,
    any_rank,
    average_gradients,
    broadcast_tensors,
    gather_objects,
    init_distributed,
    measure_affinity,
    sum_over_ranks,
)

__all__ = ["DistributedStrategy", "SingleProcess", "make_strategy", "resolve_device"]


def resolve_device(requested: str | None, context: DistributedContext | None) -> torch.device:
    """The device of ``TrainerConfig.device`` (``None``: CUDA if available), checked."""
    if context is not None and context.backend == "nccl":
        # one GPU per rank: cuda:LOCAL_RANK, whatever "cuda" index was configured
        if requested is not None and not requested.startswith("cuda"):
            raise ValueError(f"TrainerConfig.device={requested!r} does not fit the nccl backend (CUDA only)")
        return torch.device("cuda", context.local_rank)
    if requested:
        device = torch.device(requested)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"TrainerConfig.device={requested!r} needs CUDA, which this machine does not have; use 'cpu'")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(
                    f"TrainerConfig.device={requested!r} does not exist: this machine has "
                    f"{torch.cuda.device_count()} CUDA device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}"
                )
        elif device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"TrainerConfig.device={requested!r} needs Apple MPS, which is not available; use 'cpu'")
        elif device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"TrainerConfig.device={requested!r} is not supported: use 'cpu', 'cuda[:i]' or 'mps'")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SingleProcess:
    """One process: no wrapper, no collectives."""

    context: DistributedContext | None = None
    is_main, rank, world_size = True, 0, 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def loader(self, data: MultiTaskDataset, batch_size: int, train: bool, seed: int) -> DataLoader:
        return make_loader(data, batch_size=batch_size, shuffle=train, seed=seed)

    def start_epoch(self, trainer: Any, loader: Any, epoch: int) -> None:
        """Called before the first batch of every epoch."""

    def forward_module(self, model: nn.Module) -> nn.Module:
        return model

    def accumulation_window(self, syncs: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's backward (``syncs``: last of its window)."""
        return contextlib.nullcontext()

    def after_backward(self, syncs: bool) -> None:
        """Called after each micro-batch's backward."""

    def any_rank(self, flag: bool) -> bool:
        return bool(flag)

    def can_recover_oom(self) -> bool:
        """Whether a batch may be skipped (or split) after an out-of-memory error."""
        return True

    def skip(self) -> None:
        """A batch was dropped together with its accumulation window."""

    def sync_gradients(self, trainer: Any) -> None:
        """Before each optimizer step: average what the backward left local."""

    def after_step(self, balancer: nn.Module) -> None:
        """After each optimizer step."""

    def measure(self, adatt: nn.Module, sync_mode: str) -> Any:
        """The ``measure`` function stage 4 of the loss pipeline uses (``None``: adaTT's own)."""
        return None

    def reduce(self, sums: Any, loss_sum: Tensor, rows: Tensor) -> tuple[Any, Tensor, Tensor]:
        """Metric sums of every rank (here: this one)."""
        return sums, loss_sum, rows

    def barrier(self) -> None:
        """Wait for every rank (here: nothing to wait for)."""


class DistributedStrategy(SingleProcess):
    """Several ranks under ``torch.distributed``; see :mod:`mtlbook.train.distributed`."""

    def __init__(self, device: torch.device, context: DistributedContext, find_unused: bool) -> None:
        super().__init__(device)
        self.context = context
        self.is_main, self.rank, self.world_size = context.is_main, context.rank, context.world_size
        self.find_unused = find_unused
        self.ddp: nn.Module | None = None  # DistributedDataParallel wrapper of the model
        self._signature: tuple[bool, ...] | None = None
        self._unsynced = False  # a no_sync backward left local gradients in .grad

    def loader(self, data: MultiTaskDataset, batch_size: int, train: bool, seed: int) -> DataLoader:
        """This rank's shard: a shuffling ``DistributedSampler`` (even shards) for training,
        a padding-free :class:`ShardSampler` for evaluation."""
        rank, world = self.rank, self.world_size
        if train:
            sampler: Any = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        else:
            sampler = ShardSampler(len(data), rank, world)
        return make_loader(data, batch_size=batch_size, shuffle=False, sampler=sampler)

    def start_epoch(self, trainer: Any, loader: Any, epoch: int) -> None:
        self._ensure_ddp(trainer)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank

    def _ensure_ddp(self, trainer: Any) -> None:
        """(Re)wrap the model in DDP when the set of trainable parameters changed.

        DDP registers the parameters that require a gradient when it is built; freezing
        (phase 2, gate co-freeze) or unfreezing afterwards would leave it waiting for
        gradients that never come, so the wrapper is rebuilt at such a boundary. Building
        it broadcasts rank 0's parameters and buffers; the balancer's and adaTT's state is
        broadcast alongside, so every rank starts the stretch from identical state.
        """
        model = trainer.model
        signature = tuple(bool(p.requires_grad) for p in model.parameters())
        if signature == self._signature:
            return
        from torch.nn.parallel import DistributedDataParallel

        self.ddp = None  # drop the old reducer before the new one registers its hooks
        if any(signature):
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=self.find_unused)
        self._signature = signature
        extra_state = list(trainer.balancer.parameters()) + list(trainer.balancer.buffers())
        if trainer.adatt is not None:
            extra_state += list(trainer.adatt.parameters()) + list(trainer.adatt.buffers())
        broadcast_tensors(extra_state, self.context)

    def forward_module(self, model: nn.Module) -> nn.Module:
        return self.ddp if self.ddp is not None else model

    def accumulation_window(self, syncs: bool) -> contextlib.AbstractContextManager:
        # only the last micro-batch of an accumulation window all-reduces gradients
        return self.ddp.no_sync() if self.ddp is not None and not syncs else contextlib.nullcontext()

    def after_backward(self, syncs: bool) -> None:
        if self.ddp is not None:
            self._unsynced = not syncs

    def any_rank(self, flag: bool) -> bool:
        # a batch skipped on one rank is skipped on all (collectives stay paired)
        return any_rank(flag, self.context)

    def can_recover_oom(self) -> bool:
        return False  # the other ranks are already inside collectives

    def skip(self) -> None:
        self._unsynced = False

    def sync_gradients(self, trainer: Any) -> None:
        """Average over ranks what DDP did not: balancer and adaTT gradients, the shared
        gradients of a balancer that rewrites them (PCGrad), and anything a ``no_sync``
        window left local."""
        params = [p for p in trainer.balancer.parameters() if p.requires_grad]
        if trainer.adatt is not None:
            params += [p for p in trainer.adatt.parameters() if p.requires_grad]
        if self.ddp is None or self._unsynced:
            params += [p for p in trainer.model.parameters() if p.requires_grad]
        elif getattr(trainer.balancer, "rewrites_shared_gradients", False):
            # e.g. PCGrad overwrites the shared gradients after DDP's backward with local surgery
            params += [p for p in trainer.model.shared_parameters() if p.requires_grad]
        average_gradients(params, self.context)
        self._unsynced = False

    def after_step(self, balancer: nn.Module) -> None:
        if any(True for _ in balancer.buffers()):
            # e.g. GradNorm updates its weights from local gradient norms: rank 0's copy wins
            broadcast_tensors(list(balancer.buffers()), self.context)

    def measure(self, adatt: nn.Module, sync_mode: str) -> Any:
        def measure(weighted: Tensor, present: Tensor, batch: Batch) -> None:
            rows = torch.stack([batch.present[t].sum() for t in adatt.task_names]).to(weighted.device)
            measure_affinity(adatt, weighted, rows, self.context, sync_mode)

        return measure

    def reduce(self, sums: Any, loss_sum: Tensor, rows: Tensor) -> tuple[Any, Tensor, Tensor]:
        """Loss sums and row counts all-reduced; raw outputs, targets and masks gathered from
        every rank, so AUC / RMSE / accuracy are those of all rows together."""
        loss_sum, rows = sum_over_ranks(torch.stack([loss_sum, rows]), self.context).unbind(0)
        local = {
            name: (torch.cat(sums.outputs[name]), torch.cat(sums.targets[name]), torch.cat(sums.present[name]))
            if sums.outputs[name]
            else None
            for name in sums.outputs
        }
        gathered = type(sums)(sums.specs, torch.device("cpu"))
        for rank_rows in gather_objects(local, self.context):
            for name, triple in rank_rows.items():
                if triple is not None:
                    gathered.outputs[name].append(triple[0])
                    gathered.targets[name].append(triple[1])
                    gathered.present[name].append(triple[2])
        return gathered, loss_sum, rows

    def barrier(self) -> None:
        self.context.barrier()


def make_strategy(requested_device: str | None, timeout_s: float, find_unused: bool) -> SingleProcess:
    """:class:`DistributedStrategy` when a process group of several ranks is (or can be) set
    up (``torchrun``), :class:`SingleProcess` otherwise."""
    context = init_distributed(device=requested_device, timeout_s=timeout_s)
    device = resolve_device(requested_device, context)
    if context is None:
        return SingleProcess(device)
    return DistributedStrategy(device, context, find_unused)
