"""UCI Census-Income (KDD) as a two-task problem: income > 50K and never married.

The file is ``census-income.test.gz`` from the UCI archive: 99,762 rows of the 1994/95
Current Population Survey, 42 comma-separated columns, no header. Only this one file is used
(it is the data set's *test* file); :func:`load_census_income` splits **it** into
train/validation/test with a seeded permutation. Numbers obtained this way are therefore not
comparable with results on the official train file.

Tasks (both ``binary``, float targets in {0, 1}):

* ``income``: the last column is ``50000+.`` (income above 50K) rather than ``- 50000.``;
* ``never_married``: marital status (column 7) is ``Never married``.

Features: the 7 continuous columns (age, wage per hour, capital gains, capital losses,
dividends, persons worked for employer, weeks worked), standardised with the train split's mean
and standard deviation (the four money columns pass through ``log1p`` first, since they are
zero for most rows with a long right tail), and every nominal column one-hot encoded with the
categories seen in the train split (a category seen only in val/test encodes as all zeros).
Excluded from the features: the income label, marital status (the second label) and the
survey's ``instance_weight`` (column 24, a sampling weight, not an attribute of the person; it
is kept per row in ``extras["instance_weight"]``).
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtlbook.data._files import DataFile, DataFileFormatError, resolve_data_file
from mtlbook.data.batch import MultiTaskDataset, TaskSpec

__all__ = [
    "CENSUS_COLUMNS",
    "CENSUS_FILE",
    "CENSUS_NUMERIC",
    "CENSUS_TASKS",
    "CensusIncome",
    "load_census_income",
]

CENSUS_FILE = DataFile(
    folder="census-income",
    name="census-income.test.gz",
    sha256="5ac4cacd3ca9f1ecb10de1a0a41e4ac68fdc419e3fec190f5c0c6cc03b2ea659",
    url="https://archive.ics.uci.edu/ml/machine-learning-databases/census-income-mld/census-income.test.gz",
)

# The 42 columns in file order (after the KDD census-income .names description).
CENSUS_COLUMNS: tuple[str, ...] = (
    "age",  # 0
    "class_of_worker",
    "industry_code",
    "occupation_code",
    "education",
    "wage_per_hour",  # 5
    "enrolled_in_edu_last_wk",
    "marital_status",  # 7: label source of never_married
    "major_industry",
    "major_occupation",
    "race",  # 10
    "hispanic_origin",
    "sex",
    "labor_union_member",
    "reason_for_unemployment",
    "employment_status",  # 15: full or part time
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "tax_filer_status",
    "region_of_previous_residence",  # 20
    "state_of_previous_residence",
    "household_family_status",
    "household_summary",
    "instance_weight",  # 24: survey weight, never a feature
    "migration_change_msa",  # 25
    "migration_change_region",
    "migration_move_within_region",
    "lived_in_house_1_year_ago",
    "migration_previous_in_sunbelt",
    "persons_worked_for_employer",  # 30
    "family_members_under_18",
    "father_birth_country",
    "mother_birth_country",
    "birth_country",
    "citizenship",  # 35
    "own_business_or_self_employed",
    "veterans_questionnaire",
    "veterans_benefits",
    "weeks_worked_in_year",
    "year",  # 40
    "income",  # 41: label, "- 50000." or "50000+."
)
CENSUS_NUMERIC: tuple[str, ...] = (
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "persons_worked_for_employer",
    "weeks_worked_in_year",
)
_MONEY = ("wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks")
_NOT_FEATURES = ("marital_status", "instance_weight", "income")
_INCOME_LABELS = {"- 50000.": 0.0, "50000+.": 1.0}
_NEVER_MARRIED = "Never married"
CENSUS_TASKS = (TaskSpec("income", "binary"), TaskSpec("never_married", "binary"))


@dataclass
class CensusIncome:
    """The loaded Census-Income problem.

    Attributes:
        train, val, test: the three splits (tasks ``income``, ``never_married``); each has
            ``extras["row"]`` (0-based row in the file) and ``extras["instance_weight"]``.
        feature_names: one name per input column: the numeric columns, then
            ``"<column>=<category>"`` for every one-hot column.
        numeric_features: the standardised columns (the first ``len(numeric_features)`` inputs).
        categorical_features: the one-hot encoded source columns.
        numeric_mean, numeric_std: the train-split statistics used to standardise
            (after ``log1p`` on the money columns when ``log_money``).
        task_specs: ``(income, never_married)``.
        path: the file that was read.
    """

    train: MultiTaskDataset
    val: MultiTaskDataset
    test: MultiTaskDataset
    feature_names: tuple[str, ...]
    numeric_features: tuple[str, ...]
    categorical_features: tuple[str, ...]
    numeric_mean: Tensor
    numeric_std: Tensor
    task_specs: tuple[TaskSpec, ...]
    path: Path

    @property
    def n_features(self) -> int:
        return len(self.feature_names)


def _read_census_rows(path: Path):
    """The file as a pandas frame of strings (leading blanks removed), one column per field."""
    import pandas as pd  # lazy: pandas is only needed by the loaders

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            text = handle.read().decode("latin-1")
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFileFormatError(f"{path}: cannot be read as {'gzip' if opener is gzip.open else 'text'}: {exc}") from exc
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataFileFormatError(f"{path}: the file holds no rows")
    expected_commas = len(CENSUS_COLUMNS) - 1
    for number, line in enumerate(lines, start=1):
        if line.count(",") != expected_commas:
            raise DataFileFormatError(
                f"{path}, line {number}: expected {len(CENSUS_COLUMNS)} comma-separated fields, "
                f"found {line.count(',') + 1}"
            )
    frame = pd.read_csv(
        io.StringIO("\n".join(lines)),
        header=None,
        names=list(CENSUS_COLUMNS),
        dtype=str,
        na_filter=False,
        skipinitialspace=True,
        skip_blank_lines=False,
        engine="c",
    )
    return frame


def _stripped_codes(frame, column: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes into the sorted list of distinct stripped values of ``column``.

    Factorising first and stripping only the distinct values is ~50x cheaper than stripping
    every cell (some values carry trailing blanks, e.g. ``"... of U S "``).
    """
    import pandas as pd

    raw_codes, uniques = pd.factorize(frame[column], sort=False)
    stripped = [str(u).strip() for u in uniques]
    categories = sorted(set(stripped))
    position = {c: i for i, c in enumerate(categories)}
    lookup = np.array([position[v] for v in stripped], dtype=np.int64)
    return lookup[raw_codes], categories


def _numeric_column(frame, column: str, path: Path) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0])
        raise DataFileFormatError(
            f"{path}, line {row + 1}: column {CENSUS_COLUMNS.index(column)} ({column}) should be a "
            f"number, got {frame[column].iloc[row]!r}"
        )
    return values


def _check_fractions(fractions) -> tuple[float, float, float]:
    try:
        parts = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"fractions must be three numbers (train, val, test), got {fractions!r}") from None
    if len(parts) != 3 or any(not np.isfinite(f) or f <= 0 for f in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three numbers > 0 that sum to 1 (train, val, test), got {fractions!r}")
    return parts  # type: ignore[return-value]


def load_census_income(
    path: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    log_money: bool = True,
    download: bool = True,
    verify_checksum: bool = True,
) -> CensusIncome:
    """Load Census-Income (KDD) ``census-income.test.gz`` as a two-task problem.

    The rows are permuted with ``numpy.random.default_rng(seed)`` and cut into train / val /
    test by ``fractions`` (the first ``floor(f_train * n)`` rows train, the next
    ``floor(f_val * n)`` validate, the rest test); with the full file that is 69,833 / 14,964 /
    14,965 rows. All feature statistics (means, standard deviations, category lists) come from
    the train split only. See the module docstring for columns, tasks and features.

    Args:
        path: the file itself or a directory holding it; ``None`` searches ``$MTLBOOK_DATA``,
            the user cache, then downloads from UCI (see :mod:`mtlbook.data._files`).
        seed: seed of the split permutation.
        fractions: (train, val, test), each > 0, summing to 1.
        log_money: apply ``log1p`` to wage, capital gains/losses and dividends before
            standardising.
        download: allow the download when the file is not found locally.
        verify_checksum: check the file's SHA-256 (turn off only for a file you made).

    Returns:
        :class:`CensusIncome` with ``train``, ``val``, ``test`` datasets and feature names.

    Raises:
        DataFileNotFoundError, DataFileChecksumError: see :func:`resolve_data_file`.
        DataFileFormatError: a row without 42 fields, a non-numeric value in a numeric column
            or an unknown income label (the message names file and line).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed}")
    parts = _check_fractions(fractions)
    file_path = resolve_data_file(CENSUS_FILE, path, download=download, verify=verify_checksum)
    frame = _read_census_rows(file_path)
    n = len(frame)

    income_codes, income_values = _stripped_codes(frame, "income")
    unknown = [v for v in income_values if v not in _INCOME_LABELS]
    if unknown:
        row = int(np.flatnonzero(income_codes == income_values.index(unknown[0]))[0])
        raise DataFileFormatError(
            f"{file_path}, line {row + 1}: income label must be '- 50000.' or '50000+.', got {unknown[0]!r}"
        )
    income = np.array([_INCOME_LABELS[v] for v in income_values], dtype=np.float32)[income_codes]
    marital_codes, marital_values = _stripped_codes(frame, "marital_status")
    never_married = (np.array(marital_values, dtype=object) == _NEVER_MARRIED).astype(np.float32)[marital_codes]
    weight = _numeric_column(frame, "instance_weight", file_path)

    order = np.random.default_rng(int(seed)).permutation(n)
    n_train, n_val = int(parts[0] * n), int(parts[1] * n)
    if min(n_train, n_val, n - n_train - n_val) < 1:
        raise ValueError(f"the file has {n} rows: too few for fractions {parts} (each split needs a row)")
    train_rows = np.sort(order[:n_train])
    split_rows = {
        "train": train_rows,
        "val": np.sort(order[n_train : n_train + n_val]),
        "test": np.sort(order[n_train + n_val :]),
    }

    numeric = np.stack([_numeric_column(frame, c, file_path) for c in CENSUS_NUMERIC], axis=1)
    if log_money:
        for c in _MONEY:
            j = CENSUS_NUMERIC.index(c)
            numeric[:, j] = np.log1p(np.clip(numeric[:, j], 0.0, None))
    mean = numeric[train_rows].mean(axis=0)
    std = numeric[train_rows].std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant column stays at 0 instead of dividing by 0

    categorical = tuple(c for c in CENSUS_COLUMNS if c not in CENSUS_NUMERIC and c not in _NOT_FEATURES)
    codes, names, width = [], [], len(CENSUS_NUMERIC)
    for column in categorical:
        column_codes, values = _stripped_codes(frame, column)
        in_train = np.zeros(len(values), dtype=bool)
        in_train[column_codes[train_rows]] = True
        # Only categories seen in the train split get a one-hot column; others encode as zeros.
        slot = np.where(in_train, np.cumsum(in_train) - 1 + width, -1)
        codes.append(slot[column_codes])
        names.extend(f"{column}={v}" for v, keep in zip(values, in_train) if keep)
        width += int(in_train.sum())

    standardised = ((numeric - mean) / std).astype(np.float32)
    income_t, never_married_t = torch.from_numpy(income), torch.from_numpy(never_married)
    weight_t = torch.from_numpy(weight.astype(np.float32))

    def build(rows: np.ndarray) -> MultiTaskDataset:
        # Built split by split so that the full one-hot matrix never exists in memory.
        inputs = torch.zeros(len(rows), width, dtype=torch.float32)
        inputs[:, : len(CENSUS_NUMERIC)] = torch.from_numpy(standardised[rows])
        local = np.arange(len(rows))
        for code in codes:
            code = code[rows]
            hit = code >= 0
            inputs[torch.from_numpy(local[hit]), torch.from_numpy(code[hit])] = 1.0
        index = torch.from_numpy(rows)
        return MultiTaskDataset(
            inputs,
            {"income": income_t[index], "never_married": never_married_t[index]},
            CENSUS_TASKS,
            extras={"row": index.clone(), "instance_weight": weight_t[index]},
        )

    splits = {k: build(v) for k, v in split_rows.items()}
    return CensusIncome(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        feature_names=tuple(list(CENSUS_NUMERIC) + names),
        numeric_features=CENSUS_NUMERIC,
        categorical_features=categorical,
        numeric_mean=torch.from_numpy(mean.astype(np.float32)),
        numeric_std=torch.from_numpy(std.astype(np.float32)),
        task_specs=CENSUS_TASKS,
        path=file_path,
    )
