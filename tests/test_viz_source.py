"""show_source without raw reStructuredText: docstrings stripped, API entries linked."""

from __future__ import annotations

import ast
import re

import pytest

from mtlbook import toy
from mtlbook.adatt.transfer import AdaptiveTaskTransfer
from mtlbook.models.gates import SoftmaxGate
from mtlbook.train.trainer import Trainer
from mtlbook.viz import source
from mtlbook.viz.source import api_href, show_source, source_text, strip_docstrings

RST = (":math:", ".. math::", ":cite:", ":class:", ":func:")


def test_keep_is_the_unchanged_listing():
    assert show_source(toy.fixed_point).data == "```python\n" + source_text(toy.fixed_point) + "\n```"
    assert show_source(toy.fixed_point, docstrings="keep").data == show_source(toy.fixed_point).data


def test_strip_removes_every_rst_docstring_and_keeps_the_code():
    objects = [toy.fixed_point, toy.simulate, SoftmaxGate, AdaptiveTaskTransfer.transfer_weights, Trainer._train_batch, toy]
    raw = source_text(*objects)
    assert any(mark in raw for mark in RST), "the test needs docstrings with markup"
    text = show_source(*objects, docstrings="strip").data
    code = text.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert not any(mark in code for mark in RST)
    for obj in objects:  # each listing is still valid Python with the same code
        stripped = strip_docstrings(source_text(obj))
        ast.parse(stripped)
        assert ast.dump(ast.parse(stripped)).count("FunctionDef") == ast.dump(ast.parse(source_text(obj))).count("FunctionDef")
    assert "(rho - 1.0) / (rho + 1.0)" in code
    # one link per object, to the page and anchor autodoc writes
    links = re.findall(r'<a href="([^"]+)"><code>([^<]+)</code></a>', text)
    assert [name for _, name in links] == [
        "mtlbook.toy.fixed_point", "mtlbook.toy.simulate", "mtlbook.models.gates.SoftmaxGate",
        "mtlbook.adatt.transfer.AdaptiveTaskTransfer.transfer_weights", "mtlbook.train.trainer.Trainer._train_batch",
        "mtlbook.toy",
    ]
    assert [href for href, _ in links] == [
        "api_toy.html#mtlbook.toy.fixed_point", "api_toy.html#mtlbook.toy.simulate",
        "api_models_gates.html#mtlbook.models.gates.SoftmaxGate",
        "api_adatt_transfer.html#mtlbook.adatt.transfer.AdaptiveTaskTransfer.transfer_weights",
        "api_train_trainer.html#mtlbook.train.trainer.Trainer",  # private method: its class
        "api_toy.html#module-mtlbook.toy",
    ]


def test_strip_docstrings_cases():
    src = (
        'def f(x):\n'
        '    """Doc :math:`x`.\n\n    .. math::\n\n        y = x\n    """\n'
        '\n'
        '    # keep this comment\n'
        '    return x\n'
        '\n'
        '#: Names for :func:`f` and :class:`~pkg.C`.\n'
        'NAMES = ("f",)  # see :func:`f`\n'
        'class C:\n'
        '    """Only a docstring."""\n'
        '\n'
        'def g():\n'
        "    'single quoted'\n"
        '    s = """not a docstring"""\n'
        '    return s\n'
    )
    out = strip_docstrings(src)
    assert out == (
        'def f(x):\n'
        '    # keep this comment\n'
        '    return x\n'
        '\n'
        '# Names for f and pkg.C.\n'
        'NAMES = ("f",)  # see :func:`f`\n'
        'class C:\n'
        '    ...\n'
        '\n'
        'def g():\n'
        '    s = """not a docstring"""\n'
        '    return s'
    )
    with pytest.raises(ValueError, match="valid Python"):
        strip_docstrings("def broken(:\n")
    with pytest.raises(TypeError, match="source"):
        strip_docstrings(b"x = 1")


def test_api_href_outside_the_package_is_none():
    assert api_href(len) is None
    assert api_href(ast.parse) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="docstrings"):
        show_source(toy.fixed_point, docstrings="render")
    with pytest.raises(ValueError, match="at least one"):
        show_source(docstrings="strip")
    with pytest.raises(ValueError, match="at least one"):
        source.source_text()


def test_long_listings_are_folded():
    """No listing over MAX_UNFOLDED_LINES lines shows unfolded; shorter ones are plain blocks."""
    from mtlbook.experiments.study import run_grid
    from mtlbook.viz.source import MAX_UNFOLDED_LINES

    long_text = show_source(run_grid).data
    assert source_text(run_grid).count("\n") + 1 > MAX_UNFOLDED_LINES
    assert long_text.startswith('<details class="mtlbook-listing">') and long_text.rstrip().endswith("</details>")
    assert "run_grid" in long_text.split("</summary>")[0] and "lines)" in long_text.split("</summary>")[0]
    assert "```python\n" in long_text  # the listing itself is still a highlighted block
    short = show_source(toy.fixed_point, docstrings="strip").data
    assert "<details" not in short
    assert "<details" not in show_source(Trainer.fit, fold_over=None).data
    with pytest.raises(ValueError, match="fold_over"):
        show_source(toy.fixed_point, fold_over=0)
