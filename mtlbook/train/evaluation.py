"""Running metric sums over one pass and their reduction to the flat metric dict.

A pass adds each batch's per-task losses (weighted by its present rows) and keeps the raw
outputs, targets and masks of the tasks with a metric (AUC, RMSE or accuracy, see
:mod:`mtlbook.train.metrics`). :func:`reduce_metrics` returns ``"loss"`` (the sum of the
fixed-weighted task losses) and per task ``"<task>/loss"`` and ``"<task>/<metric>"``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlbook.data.batch import Batch, TaskSpec
from mtlbook.train.guards import is_out_of_memory
from mtlbook.train.metrics import METRIC_FOR_KIND, task_metric

__all__ = ["MetricSums", "epoch_snapshots", "evaluate_batch", "reduce_metrics", "slice_batch"]


class MetricSums:
    """Per-task running sums over one pass (losses weighted by present rows, raw outputs kept)."""

    def __init__(self, task_specs: Sequence[TaskSpec], device: torch.device) -> None:
        self.specs = tuple(task_specs)
        n = len(self.specs)
        self.loss_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.rows = torch.zeros(n, dtype=torch.float64, device=device)
        self.outputs: dict[str, list[Tensor]] = {s.name: [] for s in self.specs if METRIC_FOR_KIND[s.kind]}
        self.targets: dict[str, list[Tensor]] = {name: [] for name in self.outputs}
        self.present: dict[str, list[Tensor]] = {name: [] for name in self.outputs}

    def add(self, losses: Tensor, outputs: Mapping[str, Tensor], batch: Batch) -> None:
        rows = torch.stack([batch.present[s.name].sum() for s in self.specs]).to(self.rows)
        self.loss_sum += losses.detach().double() * rows
        self.rows += rows
        for name in self.outputs:
            self.outputs[name].append(outputs[name].detach().float().cpu())
            self.targets[name].append(batch.targets[name].detach().cpu())
            self.present[name].append(batch.present[name].detach().cpu())


def reduce_metrics(sums: MetricSums, fixed_weights: Tensor, strategy: Any) -> dict[str, float]:
    """Turn one pass's sums into the flat metric dict, reduced over every rank by ``strategy``
    (a collective under several processes: every rank must call it)."""
    metrics: dict[str, float] = {}
    sums, loss_sum, rows = strategy.reduce(sums, sums.loss_sum, sums.rows)
    rows = rows.cpu()
    mean = (loss_sum.cpu() / rows.clamp(min=1)).tolist()
    total, any_rows = 0.0, False
    for i, spec in enumerate(sums.specs):
        if rows[i] > 0:
            metrics[f"{spec.name}/loss"] = float(mean[i])
            total += float(fixed_weights[i]) * float(mean[i])
            any_rows = True
        else:
            metrics[f"{spec.name}/loss"] = math.nan
        if spec.name in sums.outputs:
            key = f"{spec.name}/{METRIC_FOR_KIND[spec.kind]}"
            if sums.outputs[spec.name]:
                metrics[key] = float(
                    task_metric(
                        spec,
                        torch.cat(sums.outputs[spec.name]),
                        torch.cat(sums.targets[spec.name]),
                        torch.cat(sums.present[spec.name]),
                    )
                )
            else:
                metrics[key] = math.nan
    metrics["loss"] = total if any_rows else math.nan
    return metrics


def slice_batch(batch: Batch, rows: slice) -> Batch:
    """Rows ``rows`` of ``batch`` (views, no copy)."""
    return Batch(
        batch.inputs[rows],
        {k: v[rows] for k, v in batch.targets.items()},
        {k: v[rows] for k, v in batch.present.items()},
    )


def evaluate_batch(model: nn.Module, batch: Batch, sums: MetricSums, pipeline: Any, precision: Any, strategy: Any) -> None:
    """Add one batch to ``sums``; after an out-of-memory error, retry it in two halves.

    Validation must not skip rows (the metrics would silently change), so a batch that does
    not fit is split until it does; a single row that still does not fit, or any OOM under
    DDP (the other ranks wait in collectives), re-raises.
    """
    try:
        with precision.autocast():
            outputs = model(batch.inputs)
            raw = pipeline.task_losses(outputs, batch)
    except Exception as error:  # noqa: BLE001 - only OOM is handled, the rest re-raised
        if not is_out_of_memory(error) or not strategy.can_recover_oom() or len(batch) <= 1:
            raise
        outputs = raw = None
        if batch.inputs.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(batch) // 2
        for part in (slice(0, half), slice(half, len(batch))):
            evaluate_batch(model, slice_batch(batch, part), sums, pipeline, precision, strategy)
        return
    sums.add(raw.float(), outputs, batch)


@torch.no_grad()
def epoch_snapshots(balancer: nn.Module, adatt: nn.Module | None) -> dict[str, Any]:
    """Balancer weights and adaTT matrices at the end of an epoch (small: n and n x n)."""
    out: dict[str, Any] = {"balancer_weights": [float(v) for v in balancer.weights().flatten().tolist()]}
    if adatt is None:
        out["affinity"] = out["transfer_weights"] = None
    else:
        out["affinity"] = adatt.affinity.double().tolist()
        out["transfer_weights"] = adatt.transfer_weights(None).detach().double().tolist()
    return out
