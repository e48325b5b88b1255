"""The group prior: domain knowledge about which tasks should help each other (chapter 6).

Before the measured affinity means anything (early training, random gradients), adaTT leans
on a hand-written prior :math:`P`: tasks in the same group are expected to transfer more
than tasks in different groups.

.. math::

    \\tilde P_{ij} = \\begin{cases}
        0 & i = j \\\\
        s_g & i \\ne j,\\ \\text{both in group } g \\\\
        s_\\text{inter} & \\text{otherwise}
    \\end{cases}
    \\qquad
    P_{ij} = \\tilde P_{ij} \\Big/ \\textstyle\\sum_k \\tilde P_{ik}

Row normalisation makes each task's incoming prior weights sum to 1 whatever the number of
tasks, so the ratio of a same-group peer to an other-group peer within a row is
:math:`s_g / s_\\text{inter}`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from mtlbook.adatt.affinity import check_task_names, check_unit_interval

__all__ = ["build_group_prior", "check_groups"]


def check_groups(task_names: Sequence[str], groups: Mapping[str, Sequence[str]], name: str = "groups") -> dict[str, tuple[str, ...]]:
    """Validate ``groups`` against ``task_names``: known names, no task in two places."""
    if not isinstance(groups, Mapping):
        raise TypeError(f"{name} must be a dict {{group: [task names]}}, got {type(groups).__name__}")
    known = set(task_names)
    seen: dict[str, str] = {}
    out: dict[str, tuple[str, ...]] = {}
    for group, members in groups.items():
        if not isinstance(group, str) or not group:
            raise TypeError(f"{name} keys must be non-empty str group names, got {group!r}")
        if isinstance(members, str):
            raise TypeError(f"{name}[{group!r}] must be a list of task names, not a single str")
        members = tuple(members)
        for task in members:
            if task not in known:
                raise ValueError(f"{name}[{group!r}] names unknown task {task!r}; known tasks: {sorted(known)}")
            if task in seen:
                raise ValueError(
                    f"{name}: task {task!r} is listed more than once (in {seen[task]!r} and {group!r})"
                )
            seen[task] = group
        out[group] = members
    return out


def build_group_prior(
    task_names: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    inter_group_strength: float = 0.3,
    intra_group_strength: float | Mapping[str, float] = 0.7,
) -> Tensor:
    """Row-normalised prior transfer matrix ``[n, n]`` from task groups.

    Args:
        task_names: task order (rows/columns).
        groups: ``{group name: [task names]}``; a task in no group is a group of its own
            (it has no same-group peers, only inter-group ones).
        inter_group_strength: :math:`s_\\text{inter} \\in [0, 1]` for pairs across groups.
        intra_group_strength: :math:`s_g \\in [0, 1]` for pairs inside a group; one number
            for every group, or a dict with a value for every group in ``groups``.

    Returns:
        float32 ``[n, n]`` with zero diagonal and rows summing to 1. A row whose raw sum is 0
        stays all zero (``n = 1``; or a task whose every peer has strength 0): it has no peer
        to receive from, and no NaN is produced.

    Raises:
        ValueError: unknown or duplicate task names in ``groups``, strengths outside [0, 1],
            or a dict of intra strengths whose keys differ from the group names.
    """
    names = check_task_names(task_names)
    checked = check_groups(names, groups)
    inter = check_unit_interval(inter_group_strength, "inter_group_strength")
    if isinstance(intra_group_strength, Mapping):
        missing = set(checked) - set(intra_group_strength)
        extra = set(intra_group_strength) - set(checked)
        if missing or extra:
            raise ValueError(
                f"intra_group_strength dict must have one entry per group {sorted(checked)}; "
                f"missing {sorted(missing)}, unknown {sorted(extra)}"
            )
        intra = {g: check_unit_interval(v, f"intra_group_strength[{g!r}]") for g, v in intra_group_strength.items()}
    else:
        value = check_unit_interval(intra_group_strength, "intra_group_strength")
        intra = {g: value for g in checked}

    n = len(names)
    index = {t: k for k, t in enumerate(names)}
    raw = torch.full((n, n), inter, dtype=torch.float32)
    for group, members in checked.items():
        idx = torch.tensor([index[t] for t in members], dtype=torch.long)
        if idx.numel():
            raw[idx[:, None], idx[None, :]] = intra[group]
    raw.fill_diagonal_(0.0)
    row_sums = raw.sum(dim=1, keepdim=True)
    return torch.where(row_sums > 0, raw / row_sums.clamp_min(1e-12), torch.zeros_like(raw))
