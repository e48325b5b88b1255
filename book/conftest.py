"""Strict nbval, with numbers compared to a tolerance.

nbval compares every stored output of a chapter with the output of a fresh run, as text. Text
stays exact here, but the numbers inside it are compared to a tolerance: float kernels round
differently on different CPUs (an AMD and an Intel machine part in the 7th digit after a few
hundred training steps, and a few epochs of training carry that to the 4th), and no setting
of torch, MKL or oneDNN makes two CPU vendors round alike. Two outputs match when they are
the same text around the same number of numbers, every integer is equal, and every pair of
floats satisfies

    |test - reference| <= max(ATOL + RTOL * max(|test|, |reference|), unit),

where unit is one unit in the last printed place of the coarser of the two (a table printed
to three decimals may show 0.929 on one machine and 0.930 on another), counted only where it
is at most UNIT_LIMIT of the number (0.5 against 0.6 is a change). Runs of white space
count as one space (a table pads its columns to its widest number). RTOL covers what a few
hundred training steps do to rounding; ATOL covers quantities that are themselves rounding
noise (a difference of 1e-7 between two exact formulas). A cell whose numbers come out of
longer training, where a last-bit difference grows into the third digit, states its own
tolerance with a tag ``nbval-rtol=<value>``, and the text around it claims nothing finer. Set
``MTLBOOK_NBVAL_REPORT=<file>`` to append every tolerated difference to a file.
"""

from __future__ import annotations

import os
import re

from nbval.plugin import IPyNbCell

RTOL = 1e-3
ATOL = 1e-6
UNIT_LIMIT = 1e-2  # a last-place flip counts only where the place is this fine

# a float (with a point or an exponent) or an integer; "nan" and "inf" are words, compared as text
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+)(?![\w.])")


def _split(text: str) -> tuple[list[str], list[str]]:
    """The text between the numbers (white space runs as one space), and the numbers."""
    return [re.sub(r"\s+", " ", part) for part in _NUMBER.split(text)], _NUMBER.findall(text)


def _is_integer(token: str) -> bool:
    return re.fullmatch(r"[-+]?\d+", token) is not None


def _last_place(token: str) -> float:
    """One unit in the last printed place of a float token: 0.001 for "0.929", 0 for "1e-07"."""
    match = re.fullmatch(r"[-+]?\d*\.(\d+)", token)
    return 10.0 ** -len(match.group(1)) if match else 0.0


def numbers_close(reference: str, test: str, rtol: float = RTOL) -> bool:
    """Whether two number tokens agree: integers exactly, floats to tolerance."""
    if _is_integer(reference) and _is_integer(test):
        return int(reference) == int(test)
    a, b = float(reference), float(test)
    unit = max(_last_place(reference), _last_place(test))
    if unit > UNIT_LIMIT * max(abs(a), abs(b)):
        unit = 0.0  # "0.5" against "0.6" is a change, not a rounding flip
    return abs(a - b) <= max(ATOL + rtol * max(abs(a), abs(b)), unit * (1 + 1e-9))


def outputs_match(reference: str, test: str, rtol: float = RTOL) -> bool:
    """Same text around the same numbers, each pair of numbers close."""
    ref_text, ref_numbers = _split(reference)
    test_text, test_numbers = _split(test)
    if ref_text != test_text or len(ref_numbers) != len(test_numbers):
        return False
    return all(numbers_close(r, t, rtol) for r, t in zip(ref_numbers, test_numbers))


def cell_rtol(cell) -> float:
    """The cell's own tolerance from a tag nbval-rtol=<value>, else RTOL."""
    for tag in cell.metadata.get("tags", []):
        if tag.startswith("nbval-rtol="):
            return float(tag.partition("=")[2])
    return RTOL


def _report(cell: IPyNbCell, reference: str, test: str) -> None:
    path = os.environ.get("MTLBOOK_NBVAL_REPORT")
    if not path:
        return
    worst = 0.0
    for r, t in zip(_split(reference)[1], _split(test)[1]):
        if r != t:
            a, b = float(r), float(t)
            worst = max(worst, abs(a - b) / max(abs(a), abs(b), 1e-300))
    with open(path, "a") as handle:
        handle.write(f"{cell.fspath.basename} cell {cell.cell_num}: worst relative {worst:.2e}: "
                     f"{reference[:80]!r} vs {test[:80]!r}\n")


def _align(reference_outputs, test_outputs, cell: IPyNbCell) -> None:
    """Give a test string its reference's text when the two match to tolerance."""
    rtol = cell_rtol(cell.cell)
    for ref, test in zip(reference_outputs, test_outputs):
        fields = [(ref, test, "text")] if "text" in ref and "text" in test else []
        if "data" in ref and "data" in test:
            fields += [(ref["data"], test["data"], mime) for mime in ref["data"] if mime in test["data"]]
        for ref_holder, test_holder, field in fields:
            r, t = ref_holder[field], test_holder[field]
            r = "".join(r) if isinstance(r, list) else r
            t = "".join(t) if isinstance(t, list) else t
            if isinstance(r, str) and isinstance(t, str) and r != t and outputs_match(r, t, rtol):
                _report(cell, r, t)
                test_holder[field] = ref_holder[field]


_exact_compare = IPyNbCell.compare_outputs


def _compare_to_tolerance(self, test, ref, skip_compare=None):
    _align(ref, test, self)
    return _exact_compare(self, test, ref, skip_compare)


IPyNbCell.compare_outputs = _compare_to_tolerance
