"""NASA C-MAPSS turbofan run-to-failure data :cite:`saxena2008damage`, as pandas frames.

Each subset ``FDxxx`` has three whitespace-separated text files without header:

* ``train_FDxxx.txt``: one row per engine ``unit`` and ``cycle``, run until failure;
* ``test_FDxxx.txt``: the same columns, each unit cut off some cycles before failure;
* ``RUL_FDxxx.txt``: one integer per test unit (in unit order), the remaining useful life
  after its last test cycle.

Columns: ``unit, cycle, setting_1..setting_3, s_1..s_21`` (26 numbers per row). The remaining
useful life (RUL) added as column ``rul`` is

* train: ``rul = max cycle of the unit - cycle`` (the last row of a unit has ``rul = 0``);
* test: ``rul = RUL_file[unit] + (last test cycle of the unit - cycle)``.

FD001 (one operating condition, one fault mode) has 20,631 train rows from 100 units and
13,096 test rows from 100 units; its three files are SHA-256 checked. The other subsets load
the same way but unchecked (no published hash is recorded here).

The original is the zip ``6. Turbofan Engine Degradation Simulation Data Set`` from the NASA
Prognostics Center of Excellence data repository (about 12 MB); the download keeps that zip in
the user cache and extracts the requested files from it (from the ``CMAPSSData.zip`` inside,
if nested), each checked against its SHA-256 where one is known.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtlbook.data._files import DataFile, DataFileFormatError, resolve_data_file
from mtlbook.data.batch import MultiTaskDataset, TaskSpec

__all__ = [
    "CMAPSS",
    "CMAPSSTasks",
    "CMAPSS_COLUMNS",
    "CMAPSS_URL",
    "cmapss_files",
    "cmapss_tasks",
    "load_cmapss",
]

CMAPSS_URL = "https://phm-datasets.s3.amazonaws.com/NASA/6.+Turbofan+Engine+Degradation+Simulation+Data+Set.zip"
CMAPSS_COLUMNS: tuple[str, ...] = (
    ("unit", "cycle")
    + tuple(f"setting_{i}" for i in range(1, 4))
    + tuple(f"s_{i}" for i in range(1, 22))
)
CMAPSS_SUBSETS = ("FD001", "FD002", "FD003", "FD004")
_SHA256 = {
    "train_FD001.txt": "963b5e22825b34d8b21c69e1aeb4af3e647050eb672ee8834ba4b5d91d2de0f8",
    "test_FD001.txt": "3cda7109ce17bafb5443f2ac926cfcf88154b941b8c4cf95eb55d1ddd6f52851",
    "RUL_FD001.txt": "a19c8ec94931949d0485bdc35118206e9c81c4547b422efb9cf86f4ceddbceca",
}


def cmapss_files(subset: str = "FD001") -> dict[str, DataFile]:
    """The three files of ``subset``: keys ``"train"``, ``"test"``, ``"rul"``."""
    if subset not in CMAPSS_SUBSETS:
        raise ValueError(f"subset must be one of {CMAPSS_SUBSETS}, got {subset!r}")
    names = {"train": f"train_{subset}.txt", "test": f"test_{subset}.txt", "rul": f"RUL_{subset}.txt"}
    return {
        key: DataFile("cmapss", name, _SHA256.get(name), CMAPSS_URL, in_archive=True)
        for key, name in names.items()
    }


@dataclass
class CMAPSS:
    """One C-MAPSS subset.

    Attributes:
        train: DataFrame with :data:`CMAPSS_COLUMNS` plus ``rul`` (int), sorted by unit, cycle.
        test: the same layout; ``rul`` from the RUL file.
        final_rul: Series indexed by test unit: the RUL after its last test cycle (the file).
        subset: ``"FD001"`` ... ``"FD004"``.
        paths: the files read, keys ``"train"``, ``"test"``, ``"rul"``.
    """

    train: "pd.DataFrame"  # noqa: F821 (pandas is imported lazily)
    test: "pd.DataFrame"  # noqa: F821
    final_rul: "pd.Series"  # noqa: F821
    subset: str
    paths: dict[str, Path]


def _read_table(path: Path, n_fields: int) -> np.ndarray:
    """Whitespace-separated numbers, ``n_fields`` per non-blank line, as float64 ``[rows, n_fields]``."""
    with open(path, "r", encoding="latin-1") as handle:
        lines = handle.read().splitlines()
    rows: list[list[str]] = []
    line_numbers: list[int] = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != n_fields:
            raise DataFileFormatError(
                f"{path}, line {number}: expected {n_fields} whitespace-separated numbers, found {len(fields)}"
            )
        rows.append(fields)
        line_numbers.append(number)
    if not rows:
        raise DataFileFormatError(f"{path}: the file holds no rows")
    try:
        values = np.array(rows, dtype=np.float64)
    except ValueError:
        values = None
    if values is not None and np.isfinite(values).all():
        return values
    for fields, number in zip(rows, line_numbers):  # slow path, only to name the bad line
        try:
            ok = all(np.isfinite(float(v)) for v in fields)
        except ValueError:
            ok = False
        if not ok:
            raise DataFileFormatError(f"{path}, line {number}: not all fields are finite numbers: {' '.join(fields)!r}")
    raise DataFileFormatError(f"{path}: a field is not a finite number")  # unreachable in practice


def _frame(values: np.ndarray, path: Path):
    import pandas as pd

    frame = pd.DataFrame(values, columns=list(CMAPSS_COLUMNS))
    for column in ("unit", "cycle"):
        as_int = frame[column].to_numpy()
        if not np.all(as_int == np.round(as_int)) or as_int.min() < 1:
            raise DataFileFormatError(f"{path}: column {column!r} must hold integers >= 1")
        frame[column] = as_int.astype(np.int64)
    return frame.sort_values(["unit", "cycle"], kind="stable").reset_index(drop=True)


def load_cmapss(
    subset: str = "FD001",
    path: str | os.PathLike | None = None,
    *,
    rul_cap: int | None = None,
    download: bool = True,
    verify_checksum: bool = True,
) -> CMAPSS:
    """Load a C-MAPSS subset as pandas DataFrames with a computed ``rul`` column.

    Args:
        subset: ``"FD001"`` (default; SHA-256 checked), ``"FD002"``, ``"FD003"``, ``"FD004"``.
        path: a directory holding the three files (directly or in ``cmapss/``); ``None``
            searches ``$MTLBOOK_DATA/cmapss``, the user cache, then downloads the NASA zip.
        rul_cap: if given, ``rul`` is clipped to at most this many cycles (the usual
            "piecewise-linear" target, e.g. 125); the raw value is kept in ``final_rul``.
        download: allow the download when files are not found locally.
        verify_checksum: check SHA-256 where a hash is known.

    Returns:
        :class:`CMAPSS` with ``train``, ``test`` (columns :data:`CMAPSS_COLUMNS` + ``rul``)
        and ``final_rul``.

    Raises:
        DataFileNotFoundError, DataFileChecksumError: see :func:`resolve_data_file`.
        DataFileFormatError: a row without 26 numbers (file and line named), or a RUL file
            whose length differs from the number of test units.
    """
    import pandas as pd

    if rul_cap is not None and (isinstance(rul_cap, bool) or not isinstance(rul_cap, (int, np.integer)) or rul_cap < 1):
        raise ValueError(f"rul_cap must be None or an int >= 1, got {rul_cap!r}")
    files = cmapss_files(subset)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike directory, got {type(path).__name__}")
    if path is not None and Path(path).expanduser().is_file():
        raise ValueError(f"path must be a directory holding the {subset} files, got the file {path}")
    paths = {k: resolve_data_file(f, path, download=download, verify=verify_checksum) for k, f in files.items()}

    n_fields = len(CMAPSS_COLUMNS)
    train = _frame(_read_table(paths["train"], n_fields), paths["train"])
    test = _frame(_read_table(paths["test"], n_fields), paths["test"])
    rul_values = _read_table(paths["rul"], 1)[:, 0]
    for key, frame in (("train", train), ("test", test)):
        duplicated = frame.duplicated(["unit", "cycle"])
        if bool(duplicated.any()):
            first = frame[duplicated].iloc[0]
            raise DataFileFormatError(
                f"{paths[key]}: {int(duplicated.sum())} duplicate (unit, cycle) row(s), first unit "
                f"{int(first['unit'])} cycle {int(first['cycle'])}; each cycle of a unit must appear once"
            )
    negative = np.flatnonzero((rul_values < 0) | (rul_values != np.round(rul_values)))
    if negative.size:
        raise DataFileFormatError(
            f"{paths['rul']}, line {int(negative[0]) + 1}: RUL must be a whole number of cycles >= 0, "
            f"got {rul_values[negative[0]]:g}"
        )

    train["rul"] = train.groupby("unit")["cycle"].transform("max") - train["cycle"]
    test_units = np.sort(test["unit"].unique())
    if len(rul_values) != len(test_units) or not np.array_equal(test_units, np.arange(1, len(test_units) + 1)):
        raise DataFileFormatError(
            f"{paths['rul']}: holds {len(rul_values)} values but {paths['test']} has units "
            f"{test_units.min()}..{test_units.max()} ({len(test_units)} units); expected one value per unit 1..N"
        )
    final_rul = pd.Series(rul_values.astype(np.int64), index=pd.Index(test_units, name="unit"), name="rul")
    last_cycle = test.groupby("unit")["cycle"].transform("max")
    test["rul"] = test["unit"].map(final_rul).to_numpy() + (last_cycle - test["cycle"]).to_numpy()
    for frame in (train, test):
        frame["rul"] = frame["rul"].astype(np.int64)
        if rul_cap is not None:
            frame["rul"] = frame["rul"].clip(upper=int(rul_cap))
    return CMAPSS(train=train, test=test, final_rul=final_rul, subset=subset, paths=paths)


@dataclass
class CMAPSSTasks:
    """C-MAPSS as a two-task problem (see :func:`cmapss_tasks`).

    Attributes:
        train, test: datasets with tasks ``rul`` (regression, cycles) and ``fails_soon``
            (binary); ``extras["unit"]`` and ``extras["cycle"]`` per row.
        feature_names: the input columns (settings and sensors that vary in train).
        feature_mean, feature_std: train statistics used to standardise the inputs.
    """

    train: MultiTaskDataset
    test: MultiTaskDataset
    feature_names: tuple[str, ...]
    feature_mean: torch.Tensor
    feature_std: torch.Tensor


CMAPSS_TASKS = (TaskSpec("rul", "regression"), TaskSpec("fails_soon", "binary"))


def cmapss_tasks(data: CMAPSS, horizon: int = 30, *, min_std: float = 1e-6) -> CMAPSSTasks:
    """Turn a loaded subset into per-cycle multi-task datasets.

    Inputs are the settings and sensors whose train standard deviation exceeds ``min_std``
    (in FD001 seven columns are constant and dropped), standardised with the train mean and
    standard deviation. Tasks: ``rul`` (regression on the raw number of cycles: its targets
    are in the tens to hundreds, which is what makes its loss dwarf a classifier's) and
    ``fails_soon`` = ``rul <= horizon`` (binary).
    """
    if not isinstance(data, CMAPSS):
        raise TypeError(f"data must be a CMAPSS (from load_cmapss), got {type(data).__name__}")
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
    candidates = [c for c in CMAPSS_COLUMNS if c not in ("unit", "cycle")]
    train_values = data.train[candidates].to_numpy(dtype=np.float64)
    std = train_values.std(axis=0)
    keep = [i for i, s in enumerate(std) if s > min_std]
    names = tuple(candidates[i] for i in keep)
    mean, std = train_values[:, keep].mean(axis=0), std[keep]

    def build(frame) -> MultiTaskDataset:
        x = (frame[list(names)].to_numpy(dtype=np.float64) - mean) / std
        rul = frame["rul"].to_numpy(dtype=np.float32, copy=True)
        return MultiTaskDataset(
            torch.from_numpy(x.astype(np.float32)),
            {"rul": torch.from_numpy(rul), "fails_soon": torch.from_numpy((rul <= horizon).astype(np.float32))},
            CMAPSS_TASKS,
            extras={
                "unit": torch.tensor(frame["unit"].to_numpy(dtype=np.int64)),  # copies: pandas may hand
                "cycle": torch.tensor(frame["cycle"].to_numpy(dtype=np.int64)),  # out read-only views
            },
        )

    return CMAPSSTasks(
        train=build(data.train),
        test=build(data.test),
        feature_names=names,
        feature_mean=torch.from_numpy(mean.astype(np.float32)),
        feature_std=torch.from_numpy(std.astype(np.float32)),
    )
