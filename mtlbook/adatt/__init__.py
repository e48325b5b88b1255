"""adaTT: adaptive task-to-task transfer (chapters 4-6).

The name follows AdaTT (Li et al., KDD 2023, ``li2023adatt``: task-to-task fusion with gates
inside the network); what is built here is the loss-level variant of the book's source
notes, in three stages:

* **Measure** (:class:`TaskAffinityComputer`): EMA of the cosine similarity of per-task
  gradients on the shared parameters.
* **Select** (:meth:`AdaptiveTaskTransfer.transfer_weights`): a row softmax over peers of
  learned logits plus affinity, blended with a group prior (:func:`build_group_prior`),
  with self-transfer and negative-affinity pairs blocked.
* **Regulate** (:meth:`AdaptiveTaskTransfer.compute_transfer_loss`): each task's loss gets a
  capped, weighted share of its peers' losses, on a warmup / dynamic / frozen schedule.
"""

from mtlbook.adatt.affinity import (
    COMPUTER_EXTRACTIONS,
    EXTRACTIONS,
    PARAMETER_SETS,
    TaskAffinityComputer,
    cosine_matrix,
)
from mtlbook.adatt.prior import build_group_prior
from mtlbook.adatt.transfer import BLOCKINGS, PHASES, AdaptiveTaskTransfer

__all__ = [
    "AdaptiveTaskTransfer",
    "TaskAffinityComputer",
    "build_group_prior",
    "cosine_matrix",
    "BLOCKINGS",
    "COMPUTER_EXTRACTIONS",
    "EXTRACTIONS",
    "PARAMETER_SETS",
    "PHASES",
]
