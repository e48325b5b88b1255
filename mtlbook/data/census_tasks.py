"""The catalogue of candidate tasks in Census-Income (KDD), and what each one must hide.

Every task is a column (or a few columns) of the survey turned into a target. All tasks of a
problem share one input matrix, so a column that *defines* a selected task's target (the
marital-status column for ``never_married``) must leave the inputs of **every** task, and so
must a column that *spells out* the target under another name (a proxy, e.g.
``household_family_status = "Child <18 never marr not in subfamily"``). The loader
(:func:`mtlbook.data.census.load_census_income`) drops the union of both over the selected
tasks; :func:`mtlbook.data.census_audit.leakage_audit` then measures what the strongest
remaining single column still predicts.

The catalogue (``kind``, the rows that carry a target, why a task is in :data:`ALL_TASKS` or
left out; base rates are for the whole file):

=================== ========== ====================================== ======= ==============================
task                kind       target                                 rate    in / out
=================== ========== ====================================== ======= ==============================
income              binary     income > 50K                           6.2%    in (the papers' task 1)
never_married       binary     marital status "Never married"         43.2%   in (the papers' task 2)
education           multiclass 4 levels, adults (age >= 15) only      --      in (the only multi-class one)
weeks_worked        regression weeks worked in the year, standardised --      in (the only regression one)
investment_income   binary     capital gains > 0 or dividends > 0     ~12%    in
self_employed       binary     class of worker "Self-employed-..."    5.9%    in
foreign_born        binary     citizenship "Foreign born- ..."        9.7%    in
moved_last_year     binary     did not live in this house a year ago  15.7%   in (asked in 1994 only)
full_time           binary     employment status "Full-time ..."      20.5%   out: same concept as weeks_worked
union_member        binary     labour-union member, workers asked     15.2%   out: 9,479 rows asked, 1,445 yes
veteran             binary     receives veterans' benefits            1.3%    out: too rare (~1,000 positives)
unemployed          binary     has a reason for unemployment          3.1%    out: rare, overlaps full_time
sex                 binary     female                                 51.9%   out: a demographic, not an outcome
age_group           multiclass age in 4 bands                         --      out: age is every task's key input
=================== ========== ====================================== ======= ==============================

A task "out" can still be selected by name; ``tasks="all"`` means the tasks marked "in".
Rows without a target (children for ``education``, the 1995 wave for ``moved_last_year``,
people not asked for ``union_member`` / ``veteran``) keep ``present[task] = False``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

__all__ = ["ALL_TASKS", "CensusTask", "DEFAULT_TASKS", "EDUCATION_LEVELS", "TASK_CATALOGUE", "resolve_tasks"]

# A label function gets {column: array of stripped strings} (every column of the file) and
# returns (target values, present mask), both with one entry per row.
LabelFn = Callable[[Mapping[str, np.ndarray]], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class CensusTask:
    """One candidate task.

    Attributes:
        name: the task name (key in targets).
        kind: ``"binary"``, ``"regression"`` or ``"multiclass"``.
        target: what is predicted, in words.
        columns: the columns that define the target (always removed from the inputs).
        proxies: columns that spell the target out under another name (removed when the
            problem is loaded with ``leak_free=True``).
        included: whether the task is part of ``tasks="all"``.
        reason: why it is in or out.
        label: the function that makes the target (see ``LabelFn``).
        n_classes: classes of a multiclass task, else ``None``.
        classes: class names of a multiclass task.
    """

    name: str
    kind: str
    target: str
    columns: tuple[str, ...]
    proxies: tuple[str, ...]
    included: bool
    reason: str
    label: LabelFn = field(repr=False, compare=False)
    n_classes: int | None = None
    classes: tuple[str, ...] = ()


def _binary(values: np.ndarray, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    present = np.ones(len(values), dtype=bool) if present is None else present
    return np.where(present, values, False).astype(np.float32), present


def _number(col: np.ndarray) -> np.ndarray:
    return col.astype(np.float64)


_INCOME = {"- 50000.": 0.0, "50000+.": 1.0}

#: The four education levels of the ``education`` task (children, ``education == "Children"``,
#: exactly the rows with age < 15, have no target).
EDUCATION_LEVELS: dict[str, tuple[str, ...]] = {
    "no_diploma": (
        "Less than 1st grade", "1st 2nd 3rd or 4th grade", "5th or 6th grade", "7th and 8th grade",
        "9th grade", "10th grade", "11th grade", "12th grade no diploma",
    ),
    "high_school": ("High school graduate",),
    "some_college": (
        "Some college but no degree", "Associates degree-occup /vocational", "Associates degree-academic program",
    ),
    "bachelor_or_more": (
        "Bachelors degree(BA AB BS)", "Masters degree(MA MS MEng MEd MSW MBA)",
        "Prof school degree (MD DDS DVM LLB JD)", "Doctorate degree(PhD EdD)",
    ),
}
_EDUCATION_CLASS = {v: i for i, values in enumerate(EDUCATION_LEVELS.values()) for v in values}


def _income(c):
    return _binary(np.vectorize(_INCOME.__getitem__, otypes=[np.float64])(c["income"]) > 0.5)


def _education(c):
    codes = np.array([_EDUCATION_CLASS.get(v, -1) for v in c["education"]], dtype=np.int64)
    present = codes >= 0
    return np.where(present, codes, 0), present


def _asked(col: np.ndarray, yes: str, no: str) -> tuple[np.ndarray, np.ndarray]:
    return _binary(col == yes, (col == yes) | (col == no))


def _age_group(c):
    age = _number(c["age"])
    return np.digitize(age, [18.0, 40.0, 65.0]).astype(np.int64), np.ones(len(age), dtype=bool)


_MIGRATION = (
    "lived_in_house_1_year_ago", "migration_change_msa", "migration_change_region",
    "migration_move_within_region", "migration_previous_in_sunbelt",
    "region_of_previous_residence", "state_of_previous_residence",
)

_CATALOGUE: tuple[CensusTask, ...] = (
    CensusTask(
        "income", "binary", "income above 50K (the last column is '50000+.')", ("income",), (), True,
        "the papers' first task; 6.2% positives", _income,
    ),
    CensusTask(
        "never_married", "binary", "marital status is 'Never married'", ("marital_status",),
        ("household_family_status", "household_summary"), True,
        "the papers' second task; 43% positives; two household columns spell marital status out",
        lambda c: _binary(c["marital_status"] == "Never married"),
    ),
    CensusTask(
        "education", "multiclass", "highest education level of an adult (4 levels)", ("education",),
        ("enrolled_in_edu_last_wk",), True,
        "the only multi-class target; children (age < 15, education 'Children') have none",
        _education, n_classes=4, classes=tuple(EDUCATION_LEVELS),
    ),
    CensusTask(
        "weeks_worked", "regression", "weeks worked in the year (standardised on the train split)",
        ("weeks_worked_in_year",), ("persons_worked_for_employer",), True,
        "the only regression target; persons_worked_for_employer is 0 exactly when weeks worked is 0",
        lambda c: (_number(c["weeks_worked_in_year"]).astype(np.float32), np.ones(len(c["age"]), dtype=bool)),
    ),
    CensusTask(
        "investment_income", "binary", "capital gains > 0 or dividends > 0",
        ("capital_gains", "dividends_from_stocks"), ("capital_losses",), True,
        "about 12% positives; capital losses only occur for people who sell investments",
        lambda c: _binary((_number(c["capital_gains"]) > 0) | (_number(c["dividends_from_stocks"]) > 0)),
    ),
    CensusTask(
        "self_employed", "binary", "class of worker is 'Self-employed-(not) incorporated'",
        ("class_of_worker",), ("own_business_or_self_employed",), True,
        "5.9% positives; own_business_or_self_employed is a second coding of the same fact",
        lambda c: _binary(np.char.startswith(c["class_of_worker"].astype(str), "Self-employed")),
    ),
    CensusTask(
        "foreign_born", "binary", "citizenship starts with 'Foreign born'", ("citizenship", "birth_country"),
        ("father_birth_country", "mother_birth_country"), True,
        "9.7% positives; the parents' birth countries nearly determine it",
        lambda c: _binary(np.char.startswith(c["citizenship"].astype(str), "Foreign born")),
    ),
    CensusTask(
        "moved_last_year", "binary", "did not live in the same house one year ago", _MIGRATION, (), True,
        "15.7% positives among the 1994 rows; the 1995 wave was not asked, so its rows have no target",
        lambda c: _asked(c["lived_in_house_1_year_ago"], "No", "Yes"),
    ),
    CensusTask(
        "full_time", "binary", "employment status is 'Full-time schedules'", ("employment_status",),
        ("reason_for_unemployment",), False,
        "out: it measures the same thing as weeks_worked (a regression target is the more informative of the two)",
        lambda c: _binary(c["employment_status"] == "Full-time schedules"),
    ),
    CensusTask(
        "union_member", "binary", "member of a labour union (only workers were asked)", ("labor_union_member",),
        (), False,
        "out: only 9,479 rows were asked and 1,445 said yes, about 1,000 positives in a train split",
        lambda c: _asked(c["labor_union_member"], "Yes", "No"),
    ),
    CensusTask(
        "veteran", "binary", "receives veterans' benefits (code 1 of veterans_benefits; 0 = not asked)",
        ("veterans_benefits",), ("veterans_questionnaire",), False,
        "out: 1.3% positives (about 700 in a train split)",
        lambda c: _asked(c["veterans_benefits"], "1", "2"),
    ),
    CensusTask(
        "unemployed", "binary", "gives a reason for unemployment", ("reason_for_unemployment",),
        ("employment_status",), False,
        "out: 3.1% positives and spelled out by employment_status ('Unemployed full-time')",
        lambda c: _binary(c["reason_for_unemployment"] != "Not in universe"),
    ),
    CensusTask(
        "sex", "binary", "sex is 'Female'", ("sex",), (), False,
        "out: a demographic attribute, not an outcome anyone should want a model to infer",
        lambda c: _binary(c["sex"] == "Female"),
    ),
    CensusTask(
        "age_group", "multiclass", "age band: < 18, 18-39, 40-64, 65+", ("age",), ("education",), False,
        "out: age is the strongest input of every other task; as a target it would leave all of their inputs",
        _age_group, n_classes=4, classes=("under_18", "18_39", "40_64", "65_plus"),
    ),
)

#: Every candidate task, by name, in catalogue order.
TASK_CATALOGUE: dict[str, CensusTask] = {t.name: t for t in _CATALOGUE}
#: The tasks of ``tasks="all"``.
ALL_TASKS: tuple[str, ...] = tuple(t.name for t in _CATALOGUE if t.included)
#: The two tasks of the MMoE/PLE papers, the loader's default.
DEFAULT_TASKS: tuple[str, ...] = ("income", "never_married")


def resolve_tasks(tasks) -> tuple[CensusTask, ...]:
    """The catalogue entries of ``tasks`` (``None``: :data:`DEFAULT_TASKS`; ``"all"``: :data:`ALL_TASKS`).

    Raises:
        TypeError: ``tasks`` is neither a string nor a sequence of strings.
        ValueError: an unknown name, a repeated name or an empty selection.
    """
    if tasks is None:
        names: tuple = DEFAULT_TASKS
    elif isinstance(tasks, str):
        names = ALL_TASKS if tasks == "all" else (tasks,)
    else:
        try:
            names = tuple(tasks)
        except TypeError as exc:
            raise TypeError(f"tasks must be 'all', a task name or a sequence of task names, got {tasks!r}") from exc
    if not names:
        raise ValueError(f"tasks must select at least one task from {tuple(TASK_CATALOGUE)}, got an empty selection")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"tasks must hold task names (str), got {type(name).__name__}")
    unknown = [n for n in names if n not in TASK_CATALOGUE]
    if unknown:
        raise ValueError(f"tasks has unknown task names {unknown}; the catalogue has {tuple(TASK_CATALOGUE)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tasks must not repeat a task, got {repeated} more than once")
    return tuple(TASK_CATALOGUE[n] for n in names)
