"""Multi-task data: the batch format, synthetic generators and real-data loaders.

* :mod:`mtlbook.data.batch`: :class:`TaskSpec`, :class:`Batch`, :class:`MultiTaskDataset`,
  :func:`make_loader`.
* :mod:`mtlbook.data.synthetic`: :func:`make_mmoe_synthetic` (two tasks, cosine ``p``) and
  :func:`make_task_suite` / :func:`make_suite_regime` (many grouped tasks, known truth).
* :mod:`mtlbook.data.census`: :func:`load_census_income` (UCI Census-Income KDD; two tasks by
  default, a catalogue of more in :mod:`mtlbook.data.census_tasks`, checks in
  :mod:`mtlbook.data.census_audit`).
* :mod:`mtlbook.data.cmapss`: :func:`load_cmapss` (NASA C-MAPSS frames with ``rul``) and
  :func:`cmapss_tasks` (per-cycle ``rul`` + ``fails_soon`` datasets).
* :mod:`mtlbook.data._files`: where data files are looked for (path, ``$MTLBOOK_DATA``, user
  cache, checked download) and the :class:`DataFileError` family.

pandas is imported only when a loader runs.
"""

from mtlbook.data._files import (
    DataFileChecksumError,
    DataFileError,
    DataFileFormatError,
    DataFileNotFoundError,
    cache_dir,
)
from mtlbook.data.batch import Batch, MultiTaskDataset, TaskSpec, check_task_specs, iterate_batches, make_loader
from mtlbook.data.census import CensusIncome, load_census_income
from mtlbook.data.census_audit import duplicate_report, label_association, leakage_audit, task_groups
from mtlbook.data.census_tasks import ALL_TASKS, TASK_CATALOGUE
from mtlbook.data.cmapss import CMAPSS, CMAPSSTasks, cmapss_tasks, load_cmapss
from mtlbook.data.synthetic import (
    SUITE_REGIMES,
    MMoESyntheticTruth,
    TaskSuiteTruth,
    make_mmoe_synthetic,
    make_suite_regime,
    make_task_suite,
)

__all__ = [
    "Batch",
    "MultiTaskDataset",
    "TaskSpec",
    "check_task_specs",
    "iterate_batches",
    "make_loader",
    "SUITE_REGIMES",
    "MMoESyntheticTruth",
    "TaskSuiteTruth",
    "make_mmoe_synthetic",
    "make_suite_regime",
    "make_task_suite",
    "CensusIncome",
    "load_census_income",
    "ALL_TASKS",
    "TASK_CATALOGUE",
    "duplicate_report",
    "label_association",
    "leakage_audit",
    "task_groups",
    "CMAPSS",
    "CMAPSSTasks",
    "cmapss_tasks",
    "load_cmapss",
    "DataFileError",
    "DataFileNotFoundError",
    "DataFileChecksumError",
    "DataFileFormatError",
    "cache_dir",
]
