"""The number tolerance that book/conftest.py adds to strict nbval."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tolerance():
    spec = importlib.util.spec_from_file_location("book_conftest", REPO / "book" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cross_cpu_differences_pass(tolerance):
    # pairs seen between an Intel and an AMD machine on the book's chapters
    assert tolerance.outputs_match("510.08318866889886", "510.0831342603881")
    assert tolerance.outputs_match("1.1920928955078125e-07", "5.364418029785156e-07")  # rounding noise
    assert tolerance.outputs_match("4.656612873077393e-10", "0.0")
    assert tolerance.outputs_match("<td>0.929</td>", "<td>0.930</td>")  # one unit in the last place
    assert tolerance.outputs_match("hts       641.170   398.323", "hts        641.17   398.323")


def test_real_changes_fail(tolerance):
    assert not tolerance.outputs_match("<td>0.929</td>", "<td>0.931</td>")  # two units
    assert not tolerance.outputs_match("0.8774193548387097", "0.8758064516129033")  # 1.8e-3 > RTOL
    assert not tolerance.outputs_match("0.5", "0.6")  # one unit, but of a coarse place
    assert not tolerance.outputs_match("<td>0.002</td>", "<td>0.003</td>")
    assert not tolerance.outputs_match("12 of 12 cells", "11 of 12 cells")  # integers are exact
    assert not tolerance.outputs_match("bit-identical", "NOT identical")  # text is exact
    assert not tolerance.outputs_match("0.5 0.5", "0.5")  # as many numbers
    assert not tolerance.outputs_match("nan", "0.0")
    assert not tolerance.outputs_match("1.0e-05", "3.0e-06")  # above ATOL, not noise


def test_words_with_digits_are_text(tolerance):
    # "t0_reg" and "fd001" are names, not numbers: a changed name must fail
    assert not tolerance.outputs_match("t0_reg 1.0", "t1_reg 1.0")
    assert tolerance.outputs_match("t0_reg 1.00000001", "t0_reg 1.00000002")


def test_a_cell_states_its_own_tolerance(tolerance):
    tagged = nbformat.v4.new_code_cell("x", metadata={"tags": ["hide-input", "nbval-rtol=0.05"]})
    plain = nbformat.v4.new_code_cell("x")
    assert tolerance.cell_rtol(tagged) == 0.05
    assert tolerance.cell_rtol(plain) == tolerance.RTOL
    assert tolerance.outputs_match("0.607", "0.589", rtol=0.05)
    assert not tolerance.outputs_match("0.607", "0.589", rtol=tolerance.cell_rtol(plain))


def test_align_rewrites_only_matching_outputs(tolerance):
    cell = SimpleNamespace(cell=nbformat.v4.new_code_cell("x"), fspath=Path("ch.ipynb"), cell_num=1)
    ref = [nbformat.from_dict({"output_type": "stream", "name": "stdout", "text": "rmse 15.430325\n"}),
           nbformat.from_dict({"output_type": "display_data", "data": {"text/plain": "0.5"}, "metadata": {}})]
    test = [nbformat.from_dict({"output_type": "stream", "name": "stdout", "text": "rmse 15.430242\n"}),
            nbformat.from_dict({"output_type": "display_data", "data": {"text/plain": "0.6"}, "metadata": {}})]
    tolerance._align(ref, test, cell)
    assert test[0]["text"] == "rmse 15.430325\n"  # within tolerance: takes the reference's text
    assert test[1]["data"]["text/plain"] == "0.6"  # a real difference stays for nbval to report


def test_nbval_compares_through_the_tolerance(tolerance):
    from nbval.plugin import IPyNbCell

    assert IPyNbCell.compare_outputs.__name__ == "_compare_to_tolerance"
