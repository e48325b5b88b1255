r"""Multi-task models (chapter 3): Shared-Bottom, MMoE, CGC/PLE and their building blocks.

Every model maps ``x [batch, n_features]`` to ``{task: raw output}`` through per-task
features and towers,

.. math::

    g_k(x) = \operatorname{softmax}(W_k x), \qquad
    f_k(x) = \sum_i g_k(x)_i \, E_i(x), \qquad
    y_k = h_k\big(f_k(x)\big),

and differs only in which experts :math:`E_i` task :math:`k`'s gate may use:

* :class:`SharedBottom`: one shared expert, no gate (:math:`f_k = E_1`);
* :class:`MMoE`: all experts are shared, one gate per task;
* :class:`CGC`: shared experts plus each task's own experts;
* :class:`PLE`: CGC levels stacked, with a shared gate feeding the next level;
* :class:`BlockAttentionCGC`: CGC over experts of different widths, concatenated.

Every model computes experts, gates and towers of one shape as one batched matmul
(``experts="bank"``, the default; :mod:`mtlbook.models.banks`); ``experts="modules"`` calls
each as its own module, the form chapter 3 teaches and the book's stored experiments used.

The common interface (``shared_parameters()``, ``shared_experts``, ``gate_weights``,
``freeze_gates`` ...) is documented in :mod:`mtlbook.models.base`.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from mtlbook._checks import check_registration
from mtlbook.data.batch import TaskSpec
from mtlbook.models.banks import EXPERT_MODES, ExpertBank, GateBank, TowerBank, from_bank, to_bank
from mtlbook.models.base import MultiTaskModel
from mtlbook.models.cgc import CGC, PLE, BlockAttentionCGC, ExtractionLevel
from mtlbook.models.experts import Expert
from mtlbook.models.gates import SoftmaxGate, block_scales, concat_blocks, mix_experts, normalized_entropy
from mtlbook.models.mmoe import MMoE
from mtlbook.models.shared_bottom import SharedBottom
from mtlbook.models.towers import TaskTower

MODELS: dict[str, type[MultiTaskModel]] = {
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "cgc": CGC,
    "ple": PLE,
    "block_cgc": BlockAttentionCGC,
}


def register_model(name: str, cls: type) -> None:
    """Add a model class to :data:`MODELS` under ``name`` (``build_model(name, ...)`` then builds
    it). The class takes ``(n_features, task_specs, **kwargs)`` and has the multi-task
    interface (see ``mtlbook.train.inputs.REQUIRED_MODEL_API``)."""
    check_registration(name, MODELS, "model", cls, callable_value=False)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    MODELS[name] = cls


def build_model(kind: str, n_features: int, task_specs: Sequence[TaskSpec], **kwargs) -> MultiTaskModel:
    """Build a model by name: one of ``"shared_bottom"``, ``"mmoe"``, ``"cgc"``, ``"ple"``, ``"block_cgc"``.

    ``kwargs`` go to the model's constructor.
    """
    if kind not in MODELS:
        raise ValueError(f"kind must be one of {sorted(MODELS)}, got {kind!r}")
    return MODELS[kind](n_features, task_specs, **kwargs)


__all__ = [
    "BlockAttentionCGC",
    "CGC",
    "EXPERT_MODES",
    "Expert",
    "ExpertBank",
    "GateBank",
    "TowerBank",
    "ExtractionLevel",
    "MMoE",
    "MODELS",
    "MultiTaskModel",
    "PLE",
    "SharedBottom",
    "SoftmaxGate",
    "TaskTower",
    "block_scales",
    "build_model",
    "register_model",
    "concat_blocks",
    "from_bank",
    "mix_experts",
    "normalized_entropy",
    "to_bank",
]
