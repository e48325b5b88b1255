"""Reading the book's stored result tables, shipped as package data in ``mtlbook/tables/``.

The chapters read the tables that the benchmark scripts write (a study grid, a census run,
timings) through :func:`read_table`, so a chapter finds them wherever the package is installed
(a wheel in Colab or Binder, an editable checkout), not relative to the repository. The
writers (``benchmarks/*.py``) write into :data:`TABLES_DIR`, the folder of this module, so in
an editable checkout a rerun refreshes exactly the files the wheel will ship.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pandas as pd

#: Folder of the tables in the source tree; the writers' default output location.
TABLES_DIR = Path(__file__).resolve().parent
#: The package whose data files the tables are.
PACKAGE = "mtlbook.tables"


def table_names() -> list[str]:
    """Names of the stored tables (``"study_verdict.csv"``, ...), sorted."""
    files = importlib.resources.files(PACKAGE)
    return sorted(f.name for f in files.iterdir() if f.name.endswith(".csv"))


def table_path(name: str) -> Path:
    """Filesystem path of the stored table ``name`` (e.g. ``"ch2_horizon.csv"``).

    Raises ``ValueError`` naming the stored tables when ``name`` is not one of them.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str such as 'ch2_horizon.csv', got {type(name).__name__}")
    names = table_names()
    if name not in names:
        raise ValueError(f"name must be one of the stored tables {names}, got {name!r}")
    resource = importlib.resources.files(PACKAGE) / name
    # wheels and editable installs keep package data as plain files
    return Path(str(resource))


def read_table(name: str, **read_csv_kwargs) -> pd.DataFrame:
    """The stored table ``name`` as a DataFrame (keyword arguments go to ``pandas.read_csv``)."""
    with importlib.resources.as_file(importlib.resources.files(PACKAGE) / _checked(name)) as path:
        return pd.read_csv(path, **read_csv_kwargs)


def _checked(name: str) -> str:
    table_path(name)
    return name


__all__ = ["PACKAGE", "TABLES_DIR", "read_table", "table_names", "table_path"]
