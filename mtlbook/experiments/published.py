"""Published census-income AUCs, each read in its source and quoted with the setting it states.

Chapters 3 and 8 print these beside their own numbers. Every row names where it was read
(file and commit) so that a reader can check it; sources whose tables could not be read
while writing (the MMoE and PLE papers' own tables) are left out rather than quoted from
memory. All rows come from training on census-income's official 199,523-row train file, a
different and larger training set than any in this book, so they are a reference for the
level, never a baseline to test against.

Tasks use the book's names: ``income`` (income > 50K) and ``never_married`` (the sources'
"marital" task: marital status is "Never married").
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["PUBLISHED_CENSUS_AUC", "published_census_auc"]

#: One dict per published result: ``source``, ``model``, ``income`` and ``never_married`` test
#: AUCs (``nan`` where the source gives none) and the ``setting`` the source states.
PUBLISHED_CENSUS_AUC: tuple[dict[str, Any], ...] = (
    # PaddleRec, models/multitask/mmoe/README.md (commit 085f5a5): "mean_mmoe_test_auc_income 0.94465",
    # "max ... 0.94937", "mean_mmoe_test_auc_marital 0.99324", "max ... 0.99419"
    {"source": "PaddleRec MMoE README (mean of its runs)", "model": "MMoE", "income": 0.94465, "never_married": 0.99324,
     "setting": "official train file; test AUC; number of runs not stated"},
    {"source": "PaddleRec MMoE README (best run)", "model": "MMoE", "income": 0.94937, "never_married": 0.99419,
     "setting": "as above, the maximum over runs"},
    # PaddleRec, models/multitask/ple/README.md: "PLE | 0.99 | 32 | 100" (auc_marital, batch size, epochs)
    {"source": "PaddleRec PLE README", "model": "PLE", "income": math.nan, "never_married": 0.99,
     "setting": "batch 32, 100 epochs; only the marital AUC, to two decimals"},
    # torch-rechub, examples/ranking/README.md (commit 1dcf493): Census-Income (CVR) = income, (CTR) = marital
    # (run_census.py renames income to cvr_label and marital status to ctr_label)
    {"source": "torch-rechub examples/ranking README", "model": "Shared-Bottom", "income": 0.9560, "never_married": 0.9948,
     "setting": "official train file; test file split 1:1 into val/test; one run"},
    {"source": "torch-rechub examples/ranking README", "model": "MMoE", "income": 0.9579, "never_married": 0.9950,
     "setting": "as above"},
    {"source": "torch-rechub examples/ranking README", "model": "PLE (1 level)", "income": 0.9583, "never_married": 0.9951,
     "setting": "as above"},
    {"source": "torch-rechub examples/ranking README", "model": "PLE (2 levels)", "income": 0.9593, "never_married": 0.9950,
     "setting": "as above"},
)  # fmt: skip


def published_census_auc(model: str | None = None):
    """:data:`PUBLISHED_CENSUS_AUC` as a ``pandas.DataFrame`` (only ``model``'s rows if given)."""
    import pandas as pd

    frame = pd.DataFrame(list(PUBLISHED_CENSUS_AUC))
    if model is None:
        return frame
    if not isinstance(model, str) or model not in set(frame["model"]):
        raise ValueError(f"model must be one of {sorted(set(frame['model']))}, got {model!r}")
    return frame.loc[frame["model"] == model].reset_index(drop=True)
