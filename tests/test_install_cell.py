"""scripts/install_cell.py on temporary copies of a chapter: idempotent, driven by _config.yml,
and the cell installs only where mtlbook is missing."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("install_cell", ROOT / "scripts" / "install_cell.py")
install_cell = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_cell)

CHAPTER = ROOT / "book" / "01_toy_simulator.ipynb"


@pytest.fixture()
def copy(tmp_path):
    nb = tmp_path / CHAPTER.name
    shutil.copy(CHAPTER, nb)
    # the chapter as it was before the install cell
    book = nbformat.read(nb, as_version=4)
    book.cells = [c for c in book.cells if c.get("id") != install_cell.CELL_ID]
    nbformat.write(book, nb)
    config = tmp_path / "_config.yml"
    config.write_text("title: t\nrepository:\n  url: https://example.org/owner/book/\n  branch: dev\n")
    return nb, config


def _install_cells(path):
    nb = nbformat.read(path, as_version=4)
    return nb, [c for c in nb.cells if c.get("id") == install_cell.CELL_ID]


def test_insert_once_before_the_first_code_cell(copy):
    nb_path, config = copy
    before = nbformat.read(nb_path, as_version=4)
    assert install_cell.main([str(nb_path), "--config", str(config), "--check"]) == 1
    assert nbformat.read(nb_path, as_version=4) == before, "--check must not write"
    assert install_cell.main([str(nb_path), "--config", str(config)]) == 0
    text = nb_path.read_text()
    assert install_cell.main([str(nb_path), "--config", str(config)]) == 0
    assert nb_path.read_text() == text, "a second run must change nothing"
    assert install_cell.main([str(nb_path), "--config", str(config), "--check"]) == 0
    nb, cells = _install_cells(nb_path)
    assert len(cells) == 1
    cell = cells[0]
    first_code = next(k for k, c in enumerate(nb.cells) if c.cell_type == "code")
    assert nb.cells[first_code] is cell and nb.cells[0].cell_type == "markdown", "the title must stay on top"
    assert cell.metadata["tags"] == ["hide-input"] and cell.outputs == []
    assert "mtlbook[book] @ git+https://example.org/owner/book@dev" in cell.source
    # everything else is untouched
    others = [c for c in nb.cells if c is not cell]
    assert [c.source for c in others] == [c.source for c in before.cells]
    nbformat.validate(nb)


def test_a_new_url_rewrites_the_cell_in_place(copy):
    nb_path, config = copy
    install_cell.main([str(nb_path), "--config", str(config)])
    config.write_text("repository:\n  url: https://example.org/other/repo\n")
    assert install_cell.main([str(nb_path), "--config", str(config), "--check"]) == 1
    install_cell.main([str(nb_path), "--config", str(config)])
    _, cells = _install_cells(nb_path)
    assert len(cells) == 1 and "git+https://example.org/other/repo@main" in cells[0].source


def test_the_book_uses_the_url_of_its_config():
    url, branch = install_cell.repository()
    assert f"git+{url}@{branch}" in install_cell.cell_source(url, branch)


@pytest.mark.parametrize("installed", [True, False])
def test_cell_installs_only_when_mtlbook_is_missing(monkeypatch, installed):
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda args: calls.append(args))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real_find_spec(name, *a) if installed else None) if name == "mtlbook" else real_find_spec(name, *a))
    exec(compile(install_cell.cell_source("https://example.org/o/r", "main"), "cell", "exec"), {})
    if installed:
        assert calls == []
    else:
        assert calls == [[sys.executable, "-m", "pip", "install", "--quiet", "mtlbook[book] @ git+https://example.org/o/r@main"]]


def test_bad_config(tmp_path):
    config = tmp_path / "_config.yml"
    config.write_text("repository:\n  url: github.com/no/scheme\n")
    with pytest.raises(ValueError, match="repository.url"):
        install_cell.repository(config)


CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_opens_with_the_install_cell_of_the_config(chapter):
    """The first code cell of every chapter is the install cell built from _config.yml's
    repository (so Colab and Binder launches can run), folded, and prints nothing here."""
    url, branch = install_cell.repository()
    nb = nbformat.read(chapter, as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code.get("id") == install_cell.CELL_ID, f"{chapter.name}: run scripts/install_cell.py"
    assert first_code.source == install_cell.cell_source(url, branch), f"{chapter.name}: stale install cell"
    assert "hide-input" in first_code.metadata.get("tags", [])
    assert not first_code.get("outputs"), "where mtlbook is importable the cell must print nothing"


def test_no_repository_url_is_written_anywhere_but_the_config():
    """Install commands and links name the repository only through _config.yml: no chapter,
    page or script spells another github URL or a git+ requirement of its own."""
    url, branch = install_cell.repository()
    allowed = install_cell.cell_source(url, branch)
    offenders = []
    for path in [*CHAPTERS, *(ROOT / "book").glob("*.md"), ROOT / "README.md", ROOT / "CONTRIBUTING.md"]:
        if path.suffix == ".ipynb":
            nb = nbformat.read(path, as_version=4)
            texts = [c.source for c in nb.cells if c.source != allowed]
        else:
            texts = [path.read_text(encoding="utf-8")]
        for text in texts:
            for hit in re.findall(r"(?:git\+https?://\S+|https?://github\.com/[\w.-]+/[\w.-]+)", text):
                offenders.append(f"{path.name}: {hit}")
    assert not offenders, f"repository URLs outside _config.yml: {offenders}"

