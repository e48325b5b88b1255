"""mtlbook.experiments.published: the quoted census-income AUCs and the chapters that print them."""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import pytest

from mtlbook.experiments.published import PUBLISHED_CENSUS_AUC, published_census_auc

ROOT = Path(__file__).resolve().parents[1]


def test_every_row_is_a_plausible_auc_with_its_source_and_setting():
    assert len(PUBLISHED_CENSUS_AUC) >= 5
    for row in PUBLISHED_CENSUS_AUC:
        assert row["source"] and row["model"] and row["setting"]
        for task in ("income", "never_married"):
            value = row[task]
            assert math.isnan(value) or 0.5 < value <= 1.0, (row["source"], task)
    frame = published_census_auc()
    assert list(frame.columns) == ["source", "model", "income", "never_married", "setting"]
    mmoe = published_census_auc("MMoE")
    assert set(mmoe["model"]) == {"MMoE"} and len(mmoe) == 3
    with pytest.raises(ValueError, match="model must be one of"):
        published_census_auc("Transformer")


@pytest.mark.parametrize("chapter", ["03_shared_bottom_mmoe_ple.ipynb", "08_does_adatt_help.ipynb"])
def test_chapters_read_the_published_numbers_from_the_package(chapter):
    nb = nbformat.read(ROOT / "book" / chapter, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "published_census_auc(" in code
    assert "0.94465" not in code and "0.9593" not in code  # no number typed again in a chapter
