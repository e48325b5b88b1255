"""What a reader meets in every chapter: one exercise format, no long listing unfolded,
numbered figures with captions and alt text that the text refers to."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))
STYLED = CHAPTERS
MAX_UNFOLDED_LINES = 60


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_one_exercise_format(chapter):
    """Every chapter numbers its exercises the same way: a bold "N. Title." (or "N. Question?")
    at the start of a paragraph, solutions in folded admonitions."""
    nb = nbformat.read(chapter, as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    if "## Exercises" not in text:
        return
    section = text.split("## Exercises", 1)[1].split("\n## ", 1)[0]
    heads = re.findall(r"(?m)^\*\*[^*\n]*\*\*", section)
    numbered = [h for h in heads if re.match(r"\*\*(Exercise )?\d", h)]
    assert numbered, f"{chapter.name}: no numbered exercise"
    odd = [h for h in numbered if not re.fullmatch(r"\*\*\d+\. [A-Z$`][^*]*[.?]\*\*", h)]
    assert not odd, f"{chapter.name}: exercise headings not in the book's format '**N. Title.**': {odd}"
    assert [int(re.match(r"\*\*(\d+)", h).group(1)) for h in numbered] == list(range(1, len(numbered) + 1))
    for admonition in re.findall(r"```\{admonition\} Solution\n(:[^\n]*\n)*", section):
        assert ":class: dropdown" in admonition, f"{chapter.name}: a solution that is not folded"



@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_no_long_code_cell_unfolded(chapter):
    nb = nbformat.read(chapter, as_version=4)
    long = [c.get("id") for c in nb.cells if c.cell_type == "code" and c.source.count("\n") + 1 > MAX_UNFOLDED_LINES
            and not {"hide-input", "remove-input", "hide-cell", "remove-cell"} & set(c.metadata.get("tags", []))]
    assert not long, f"{chapter.name}: code cells over {MAX_UNFOLDED_LINES} lines shown unfolded: {long}"


@pytest.mark.parametrize("chapter", STYLED, ids=lambda p: p.stem)
def test_figures_are_numbered_captioned_and_referenced(chapter):
    """Every cell that draws a figure carries a caption, a name and alt text (myst-nb cell
    metadata), and the text refers to the figure by its number ({numref})."""
    nb = nbformat.read(chapter, as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for cell in nb.cells:
        images = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        in_widget = any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in cell.get("outputs", []))
        if not images or in_widget:
            continue
        assert len(images) == 1, f"{chapter.name} cell {cell.get('id')}: one figure per cell (a caption names one)"
        meta = cell.metadata.get("mystnb", {})
        figure, image = meta.get("figure", {}), meta.get("image", {})
        assert len(figure.get("caption", "")) > 30, f"{chapter.name} cell {cell.get('id')}: no caption"
        assert figure.get("name", "").startswith("fig-"), f"{chapter.name} cell {cell.get('id')}: no figure name"
        assert len(image.get("alt", "")) > 30, f"{chapter.name} cell {cell.get('id')}: no alt text"
        assert "{numref}`" + figure["name"] + "`" in text, f"{chapter.name}: the text never refers to {figure['name']}"


@pytest.mark.parametrize("chapter", STYLED, ids=lambda p: p.stem)
def test_setup_cell_is_folded_and_applies_the_book_style(chapter):
    """The imports and settings at the top of a chapter fold away; they apply the book's
    figure style (mtlbook.viz.style)."""
    nb = nbformat.read(chapter, as_version=4)
    setup = [c for c in nb.cells if c.cell_type == "code" and "use_book_style()" in c.source]
    assert len(setup) == 1, f"{chapter.name}: the setup cell must call use_book_style() once"
    assert "hide-input" in setup[0].metadata.get("tags", [])


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_no_tex_command_eaten_by_an_escape(chapter):
    """A tab in the prose is a \\t of TeX (\\text, \\tau, \\theta) that a Python string turned
    into a control character: MathJax then shows "extadaTT"."""
    nb = nbformat.read(chapter, as_version=4)
    bad = [c.source[max(0, k - 20):k + 10] for c in nb.cells if c.cell_type == "markdown"
           for k in [c.source.find("\t")] if k >= 0]
    assert not bad, f"{chapter.name}: tab characters in the text: {bad[:3]}"
