"""UCI Census-Income (KDD) as a multi-task problem (default: income > 50K and never married).

The file is ``census-income.test.gz`` from the UCI archive: 99,762 rows of the 1994/95
Current Population Survey, 42 comma-separated columns, no header. Only this one file is used
(it is the data set's *test* file); :func:`load_census_income` splits **it** into
train/validation/test with a seeded permutation. Numbers obtained this way are therefore not
comparable with results on the official train file.

Default tasks (both ``binary``, float targets in {0, 1}), the MMoE/PLE papers' pair:

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

import functools
import gzip
import io
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mtlbook.data._files import DataFile, DataFileFormatError, resolve_data_file
from mtlbook.data.batch import MultiTaskDataset, TaskSpec
from mtlbook.data.census_tasks import DEFAULT_TASKS, resolve_tasks

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
        task_specs: the selected tasks, in selection order (default ``(income, never_married)``).
        path: the file that was read.
        feature_columns: the source column of every input (same length as ``feature_names``).
        excluded_columns: the file's columns that are not inputs (labels, proxies, the weight).
        leak_free: whether the selected tasks' proxy columns were dropped.
        dedupe: whether identical rows were kept in one split.
        target_mean, target_std: train-split statistics used to standardise regression targets.

    Every split has ``extras["row"]`` (0-based row in the file), ``extras["instance_weight"]``
    and ``extras["duplicate_group"]`` (rows identical in every column but the weight share it).
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
    feature_columns: tuple[str, ...] = ()
    excluded_columns: tuple[str, ...] = ()
    leak_free: bool = False
    dedupe: bool = False
    target_mean: dict[str, float] = field(default_factory=dict)
    target_std: dict[str, float] = field(default_factory=dict)

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


def _stripped_codes_of(series) -> tuple[np.ndarray, list[str]]:
    """Integer codes into the sorted list of distinct stripped values of a column of strings.

    Factorising first and stripping only the distinct values is ~50x cheaper than stripping
    every cell (some values carry trailing blanks, e.g. ``"... of U S "``).
    """
    import pandas as pd

    raw_codes, uniques = pd.factorize(series, sort=False)
    stripped = [str(u).strip() for u in uniques]
    categories = sorted(set(stripped))
    position = {c: i for i, c in enumerate(categories)}
    lookup = np.array([position[v] for v in stripped], dtype=np.int64)
    return lookup[raw_codes], categories


@dataclass(frozen=True)
class _ParsedCensus:
    """The file as integer codes per column (about 35 MB instead of a frame of 4 million strings)."""

    n_rows: int
    codes: dict[str, np.ndarray]
    categories: dict[str, list[str]]
    groups: np.ndarray  # duplicate-group id per row (see _duplicate_groups)


@functools.lru_cache(maxsize=2)
def _parse_cached(path: str, mtime_ns: int, size: int) -> _ParsedCensus:
    frame = _read_census_rows(Path(path))
    codes, categories = {}, {}
    for column in CENSUS_COLUMNS:
        codes[column], categories[column] = _stripped_codes_of(frame[column])
    return _ParsedCensus(len(frame), codes, categories, _duplicate_groups(codes))


def _parse(path: Path) -> _ParsedCensus:
    """Parse ``path`` once per (path, modification time, size); later loads reuse the codes."""
    stat = Path(path).stat()
    return _parse_cached(str(path), stat.st_mtime_ns, stat.st_size)


def _stripped_codes(parsed: _ParsedCensus, column: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes of ``column`` into its sorted list of distinct stripped values."""
    return parsed.codes[column], parsed.categories[column]


def _numeric_column(parsed: _ParsedCensus, column: str, path: Path) -> np.ndarray:
    import pandas as pd

    codes, categories = _stripped_codes(parsed, column)
    values = pd.to_numeric(pd.Series(categories, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(np.flatnonzero(np.isin(codes, bad))[0])
        raise DataFileFormatError(
            f"{path}, line {row + 1}: column {CENSUS_COLUMNS.index(column)} ({column}) should be a "
            f"number, got {categories[codes[row]]!r}"
        )
    return values[codes]


def _check_fractions(fractions) -> tuple[float, float, float]:
    try:
        parts = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"fractions must be three numbers (train, val, test), got {fractions!r}") from None
    if len(parts) != 3 or any(not np.isfinite(f) or f <= 0 for f in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three numbers > 0 that sum to 1 (train, val, test), got {fractions!r}")
    return parts  # type: ignore[return-value]


def _grouped_split(groups: np.ndarray, seed: int, n_train: int, n_val: int) -> np.ndarray:
    """Split code per row (0 train, 1 val, 2 test) that keeps every duplicate group together.

    The groups are put in a random order (``default_rng(seed)``) and laid end to end; a group
    goes to the split in which its first row lands when train takes the first ``n_train`` row
    positions and validation the next ``n_val``. Every group, large or small, thus lands in
    each split with the split's share of probability, so the splits keep the file's mix of
    duplicated and unique rows in expectation.
    """
    sizes = np.bincount(groups)
    order = np.random.default_rng(int(seed)).permutation(len(sizes))
    start = np.empty(len(sizes), dtype=np.int64)
    start[order] = np.cumsum(sizes[order]) - sizes[order]
    split_of_group = np.where(start < n_train, 0, np.where(start < n_train + n_val, 1, 2))
    return split_of_group[groups]


def _duplicate_groups(codes: dict[str, np.ndarray]) -> np.ndarray:
    """Group id per row: rows equal in every column except ``instance_weight`` share an id.

    Each row's codes are folded into one 64-bit polynomial hash (a collision between two of
    the ~10^5 distinct rows has probability about 10^-9), then factorised.
    """
    import pandas as pd

    hashed = np.zeros(len(codes["age"]), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in CENSUS_COLUMNS:
            if column != "instance_weight":
                hashed = hashed * np.uint64(0x9E3779B97F4A7C15) + codes[column].astype(np.uint64) + np.uint64(1)
    return pd.factorize(hashed, sort=False)[0].astype(np.int64)


class _Columns(dict):
    """``{column: stripped strings}``, computed on first access."""

    def __init__(self, frame) -> None:
        super().__init__()
        self._frame = frame

    def __missing__(self, column: str) -> np.ndarray:
        codes, values = _stripped_codes(self._frame, column)
        self[column] = np.array(values, dtype=object)[codes]
        return self[column]


def load_census_income(
    path: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    tasks: str | Sequence[str] | None = None,
    leak_free: bool | None = None,
    dedupe: bool = False,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    log_money: bool = True,
    download: bool = True,
    verify_checksum: bool = True,
) -> CensusIncome:
    """Load Census-Income (KDD) ``census-income.test.gz`` as a multi-task problem.

    The rows are permuted with ``numpy.random.default_rng(seed)`` and cut into train / val /
    test by ``fractions`` (the first ``floor(f_train * n)`` rows train, the next
    ``floor(f_val * n)`` validate, the rest test); with the full file that is 69,833 / 14,964 /
    14,965 rows. All feature statistics (means, standard deviations, category lists) and the
    scaling of regression targets come from the train split only. See the module docstring
    for columns and features, and :mod:`mtlbook.data.census_tasks` for the task catalogue.

    Args:
        path: the file itself or a directory holding it; ``None`` searches ``$MTLBOOK_DATA``,
            the user cache, then downloads from UCI (see :mod:`mtlbook.data._files`).
        seed: seed of the split permutation.
        tasks: ``None`` (the papers' two tasks ``income`` and ``never_married``), ``"all"``
            (every task the catalogue marks as included) or a sequence of catalogue names.
        leak_free: also drop every selected task's *proxy* columns (columns that spell the
            target out, e.g. ``household_family_status`` for ``never_married``). ``None``
            means ``False`` for the default two tasks (the papers' inputs, the book's
            historical results) and ``True`` for any other selection.
        dedupe: keep rows that are identical in every column but ``instance_weight`` in one
            split: whole groups of identical rows are shuffled and cut by ``fractions``, so split sizes differ slightly from the plain split's.
            ``False`` gives the plain row split.
        fractions: (train, val, test), each > 0, summing to 1.
        log_money: apply ``log1p`` to wage, capital gains/losses and dividends before
            standardising.
        download: allow the download when the file is not found locally.
        verify_checksum: check the file's SHA-256 (turn off only for a file you made).

    Returns:
        :class:`CensusIncome` with ``train``, ``val``, ``test`` datasets and feature names.

    Raises:
        ValueError: unknown, repeated or no task names; bad ``fractions`` or ``seed``.
        DataFileNotFoundError, DataFileChecksumError: see :func:`resolve_data_file`.
        DataFileFormatError: a row without 42 fields, a non-numeric value in a numeric column
            or an unknown income label (the message names file and line).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed}")
    for flag, value in (("dedupe", dedupe), ("log_money", log_money)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if leak_free is not None and not isinstance(leak_free, bool):
        raise TypeError(f"leak_free must be True, False or None, got {leak_free!r}")
    selected = resolve_tasks(tasks)
    names = tuple(t.name for t in selected)
    if leak_free is None:
        leak_free = names != DEFAULT_TASKS
    parts = _check_fractions(fractions)
    file_path = resolve_data_file(CENSUS_FILE, path, download=download, verify=verify_checksum)
    frame = _parse(file_path)
    n = frame.n_rows

    income_codes, income_values = _stripped_codes(frame, "income")
    unknown = [v for v in income_values if v not in _INCOME_LABELS]
    if unknown:
        row = int(np.flatnonzero(income_codes == income_values.index(unknown[0]))[0])
        raise DataFileFormatError(
            f"{file_path}, line {row + 1}: income label must be '- 50000.' or '50000+.', got {unknown[0]!r}"
        )
    for task in selected:
        for column in task.columns + task.proxies:
            if column in CENSUS_NUMERIC:
                _numeric_column(frame, column, file_path)  # a bad number fails here, naming the line
    columns = _Columns(frame)
    labels = {t.name: t.label(columns) for t in selected}
    weight = _numeric_column(frame, "instance_weight", file_path)
    groups = frame.groups

    order = np.random.default_rng(int(seed)).permutation(n)
    n_train, n_val = int(parts[0] * n), int(parts[1] * n)
    if min(n_train, n_val, n - n_train - n_val) < 1:
        raise ValueError(f"the file has {n} rows: too few for fractions {parts} (each split needs a row)")
    if dedupe:
        split_of = _grouped_split(groups, int(seed), n_train, n_val)
        split_rows = {k: np.flatnonzero(split_of == i) for i, k in enumerate(("train", "val", "test"))}
    else:
        split_rows = {
            "train": np.sort(order[:n_train]),
            "val": np.sort(order[n_train : n_train + n_val]),
            "test": np.sort(order[n_train + n_val :]),
        }
    train_rows = split_rows["train"]

    excluded = {"instance_weight"}  # a sampling weight, not an attribute of the person
    for task in selected:
        excluded.update(task.columns)
        if leak_free:
            excluded.update(task.proxies)
    numeric_features = tuple(c for c in CENSUS_NUMERIC if c not in excluded)
    numeric = np.stack([_numeric_column(frame, c, file_path) for c in numeric_features], axis=1) if numeric_features else np.zeros((n, 0))
    if log_money:
        for c in _MONEY:
            if c in numeric_features:
                j = numeric_features.index(c)
                numeric[:, j] = np.log1p(np.clip(numeric[:, j], 0.0, None))
    mean = numeric[train_rows].mean(axis=0)
    std = numeric[train_rows].std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant column stays at 0 instead of dividing by 0

    categorical = tuple(c for c in CENSUS_COLUMNS if c not in CENSUS_NUMERIC and c not in excluded)
    codes, feature_names, width = [], [], len(numeric_features)
    for column in categorical:
        column_codes, values = _stripped_codes(frame, column)
        in_train = np.zeros(len(values), dtype=bool)
        in_train[column_codes[train_rows]] = True
        # Only categories seen in the train split get a one-hot column; others encode as zeros.
        slot = np.where(in_train, np.cumsum(in_train) - 1 + width, -1)
        codes.append(slot[column_codes])
        feature_names.extend(f"{column}={v}" for v, keep in zip(values, in_train) if keep)
        width += int(in_train.sum())

    # Targets: float32 for binary, long for multiclass, regression standardised with train statistics.
    specs, targets, present, target_mean, target_std = [], {}, {}, {}, {}
    for task in selected:
        values, mask = labels[task.name]
        if task.kind == "regression":
            fit = values[train_rows][mask[train_rows]].astype(np.float64)
            mu, sd = float(fit.mean()), float(fit.std())
            sd = sd if sd > 1e-12 else 1.0
            target_mean[task.name], target_std[task.name] = mu, sd
            values = ((values.astype(np.float64) - mu) / sd).astype(np.float32)
        if task.kind == "multiclass":
            targets[task.name] = torch.from_numpy(values.astype(np.int64))
        else:
            targets[task.name] = torch.from_numpy(values.astype(np.float32))
        present[task.name] = torch.from_numpy(mask.astype(bool))
        specs.append(TaskSpec(task.name, task.kind, task.n_classes))
    task_specs = tuple(specs)

    standardised = ((numeric - mean) / std).astype(np.float32)
    weight_t = torch.from_numpy(weight.astype(np.float32))
    groups_t = torch.from_numpy(groups)

    def build(rows: np.ndarray) -> MultiTaskDataset:
        # Built split by split so that the full one-hot matrix never exists in memory.
        inputs = torch.zeros(len(rows), width, dtype=torch.float32)
        inputs[:, : len(numeric_features)] = torch.from_numpy(standardised[rows])
        if codes:
            slots = np.stack([code[rows] for code in codes], axis=1)  # [rows, categorical columns]
            flat = (np.arange(len(rows), dtype=np.int64)[:, None] * width + slots)[slots >= 0]
            inputs.view(-1)[torch.from_numpy(flat)] = 1.0
        index = torch.from_numpy(rows)
        return MultiTaskDataset(
            inputs,
            {name: targets[name][index] for name in names},
            task_specs,
            present={name: present[name][index] for name in names},
            extras={"row": index.clone(), "instance_weight": weight_t[index], "duplicate_group": groups_t[index]},
        )

    splits = {k: build(v) for k, v in split_rows.items()}
    feature_columns = tuple(list(numeric_features) + [name.split("=", 1)[0] for name in feature_names])
    return CensusIncome(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        feature_names=tuple(list(numeric_features) + feature_names),
        numeric_features=numeric_features,
        categorical_features=categorical,
        numeric_mean=torch.from_numpy(mean.astype(np.float32)),
        numeric_std=torch.from_numpy(std.astype(np.float32)),
        task_specs=task_specs,
        path=file_path,
        feature_columns=feature_columns,
        excluded_columns=tuple(c for c in CENSUS_COLUMNS if c in excluded),
        leak_free=bool(leak_free),
        dedupe=dedupe,
        target_mean=target_mean,
        target_std=target_std,
    )
