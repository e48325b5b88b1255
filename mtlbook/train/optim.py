"""The optimizer's parameter groups, by name, so a checkpoint can rebuild them exactly.

AdamW with one named param group per shared expert (``shared_expert_{i}``, with
``config.expert_lr`` / ``config.expert_weight_decay`` overrides), then ``shared`` (shared
parameters outside any expert), ``gates``, ``task`` (task experts and towers), ``balancer``
and ``adatt`` (weight decay 0: shrinking a log-variance or a transfer logit toward 0 would
bias it, not regularise it). Frozen parameters are left out and empty groups dropped.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from mtlbook.train.schedules import build_phase1_scheduler, build_phase2_scheduler

__all__ = ["adamw_implementation", "build_phase_optimizer", "default_groups", "groups_from_names", "named_trainables"]


def named_trainables(model: nn.Module, balancer: nn.Module, adatt: nn.Module | None) -> dict[str, nn.Parameter]:
    """Every parameter the trainer could optimise, by qualified name."""
    named = {f"model.{n}": p for n, p in model.named_parameters()}
    named.update({f"balancer.{n}": p for n, p in balancer.named_parameters()})
    if adatt is not None:
        named.update({f"adatt.{n}": p for n, p in adatt.named_parameters()})
    return named


def default_groups(model: nn.Module, balancer: nn.Module, adatt: nn.Module | None, config: Any) -> list[dict[str, Any]]:
    """Named AdamW groups for the current trainability (see module doc); empty ones dropped.

    ``adatt`` is passed only while it is enabled. Each group carries ``param_names``."""
    cfg = config
    name_of = {id(p): n for n, p in named_trainables(model, balancer, adatt).items()}
    taken: set[int] = set()

    def pick(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        out = []
        for p in params:
            if p.requires_grad and id(p) not in taken:
                taken.add(id(p))
                out.append(p)
        return out

    groups: list[dict[str, Any]] = []
    for i, expert in enumerate(model.shared_experts):
        groups.append(
            {
                "name": f"shared_expert_{i}",
                "params": pick(expert.parameters()),
                "lr": cfg.expert_lr.get(i, cfg.lr),
                "weight_decay": cfg.expert_weight_decay.get(i, cfg.weight_decay),
            }
        )
    rest = [
        ("shared", model.shared_parameters(), cfg.weight_decay),  # shared params outside any expert
        ("gates", model.gate_parameters(), cfg.weight_decay),
        ("task", model.parameters(), cfg.weight_decay),  # whatever is left: task experts, towers
        ("balancer", balancer.parameters(), 0.0),
    ]
    if adatt is not None:
        rest.append(("adatt", adatt.parameters(), 0.0))
    for name, params, decay in rest:
        groups.append({"name": name, "params": pick(params), "lr": cfg.lr, "weight_decay": decay})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["param_names"] = [name_of[id(p)] for p in g["params"]]
    return groups


def groups_from_names(named: dict[str, nn.Parameter], groups_by_name: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups a checkpoint recorded (``name`` and ``param_names``), as parameter lists."""
    groups = []
    for g in groups_by_name:
        unknown = [n for n in g["param_names"] if n not in named]
        if unknown:
            raise ValueError(f"checkpoint optimizer refers to unknown parameters {unknown[:5]}")
        params = [named[n] for n in g["param_names"]]
        groups.append({"name": g["name"], "params": params, "param_names": list(g["param_names"])})
    return groups


def adamw_implementation(groups: list[dict[str, Any]], fast_path: bool) -> dict[str, bool]:
    """``{"foreach": True}``, or ``{"fused": True}`` on the fast path (``experts="bank"``) when every
    parameter is a float tensor on a CPU or CUDA device (where torch has the fused kernel).

    foreach: one multi-tensor kernel per update term instead of a Python loop over the ~100-300
    tensors (torch picks it only on CUDA); the same arithmetic in the same order, so the weights
    are bit-identical to the loop (``tests/test_train_trainer.py`` checks it). fused: the whole
    update of a tensor in one kernel, three to four times faster on the bank form's ~40
    tensors (``benchmarks/plain_step.py``), rounding differently in the last bit.
    """
    params = [p for g in groups for p in g["params"]]
    if fast_path and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_phase_optimizer(trainer: Any, pending: dict[str, Any] | None) -> tuple[Any, Any, Any, list[dict[str, Any]]]:
    """AdamW, the phase's schedule and the scaler for ``trainer``'s current phase, restored
    from ``pending`` (a checkpoint's ``optim`` entry) when given; returns them with the
    groups' names and parameter names (what a checkpoint records)."""
    cfg = trainer.config
    if pending is not None and pending.get("groups"):
        groups = groups_from_names(trainer.named_trainables(), pending["groups"])
    else:
        pending = None
        groups = default_groups(trainer.model, trainer.balancer, trainer.adatt if trainer.adatt_active else None, cfg)
    if not groups:
        raise ValueError(f"nothing to train in phase {trainer.phase}: every parameter is frozen")
    names = [{"name": g["name"], "param_names": g.pop("param_names")} for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                                  **adamw_implementation(groups, getattr(trainer, "fast_path", False)))
    if trainer.phase == 1:
        scheduler = build_phase1_scheduler(optimizer, cfg.warmup_epochs, cfg.warmup_start_factor, cfg.cosine_t0,
                                           cfg.cosine_t_mult, cfg.min_lr)  # fmt: skip
    else:
        scheduler = build_phase2_scheduler(optimizer, cfg.phase2_epochs, cfg.phase2_warmup_epochs,
                                           cfg.warmup_start_factor, cfg.min_lr)  # fmt: skip
    scaler = trainer.precision.make_scaler()
    if pending is not None:
        optimizer.load_state_dict(pending["optimizer"])
        scheduler.load_state_dict(pending["scheduler"])
        if scaler is not None and pending.get("scaler"):
            scaler.load_state_dict(pending["scaler"])
    optimizer.zero_grad(set_to_none=True)
    return optimizer, scheduler, scaler, names
