"""mtlbook.tables: the stored result tables ship as package data and are read by name."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from mtlbook import tables

ROOT = Path(__file__).resolve().parents[1]


def test_every_stored_table_reads_by_name():
    names = tables.table_names()
    assert {"ch2_horizon.csv", "census_two_task.csv", "adatt_cost.csv", "trainer_step.csv",
            "study_verdict.csv"} <= set(names)
    for name in names:
        frame = tables.read_table(name)
        assert isinstance(frame, pd.DataFrame) and len(frame) > 0, name
        assert tables.table_path(name).parent == tables.TABLES_DIR


def test_bad_names():
    with pytest.raises(ValueError, match="name must be one of"):
        tables.read_table("nope.csv")
    with pytest.raises(TypeError, match="name must be a str"):
        tables.read_table(3)


def test_tables_are_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"mtlbook\.tables" = \["\*\.csv"\]', text)


def test_writers_default_to_the_package_folder():
    """The benchmark scripts write where the package reads (no copy under book/)."""
    for script in ["census_results.py", "ch2_horizon.py", "trainer_step.py", "run_study.py", "study_throughput.py"]:
        text = (ROOT / "benchmarks" / script).read_text()
        assert '"mtlbook" / "tables"' in text, script
        assert '"book" / "data"' not in text, script


@pytest.mark.parametrize("chapter", sorted((ROOT / "book").glob("0*.ipynb")), ids=lambda p: p.stem)
def test_chapters_read_tables_through_the_package(chapter):
    """No chapter reads a CSV relative to the repository."""
    nb = nbformat.read(chapter, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not re.search(r"read_csv\(|Path\(\"data|/ \"data\"|DATA_DIR", code), chapter.name
