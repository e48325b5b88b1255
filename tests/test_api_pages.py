"""The API reference (scripts/api_pages.py) and the site fixes (_ext/mtlbook_site.py), no build.

The pages are committed; these tests fail when a module was added, renamed or removed without
rerunning ``python scripts/api_pages.py``, and check the HTML/autodoc fixes on small inputs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


api_pages = _load("api_pages", ROOT / "scripts" / "api_pages.py")
site = _load("mtlbook_site", ROOT / "_ext" / "mtlbook_site.py")


def test_api_pages_are_up_to_date():
    stale = api_pages.stale_files(ROOT)
    assert not stale, f"stale API pages, run `python scripts/api_pages.py`: {[str(p.relative_to(ROOT)) for p in stale]}"


def test_every_public_module_has_a_page_in_the_toc():
    toc = (ROOT / "_toc.yml").read_text()
    for path in (ROOT / "mtlbook").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if path.name == "__init__.py" or any(p.startswith("_") for p in parts):
            continue
        docname = "book/api_" + "_".join(parts[1:])
        assert f"- file: {docname}\n" in toc, f"{'.'.join(parts)} has no API page in _toc.yml"
        assert (ROOT / f"{docname}.md").exists()


def test_generator_adds_and_removes_pages(tmp_path):
    """On a copy: a new module gets a page and a toc entry, a deleted one loses both."""
    for name in ("mtlbook", "book"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("*.ipynb", "__pycache__", "_vendor"))
    shutil.copy(ROOT / "_toc.yml", tmp_path / "_toc.yml")
    assert api_pages.stale_files(tmp_path) == []
    (tmp_path / "mtlbook" / "viz" / "new_thing.py").write_text('"""A new module :math:`x`."""\n')
    (tmp_path / "mtlbook" / "viz" / "source.py").unlink()
    stale = {p.relative_to(tmp_path).as_posix() for p in api_pages.stale_files(tmp_path)}
    assert {"book/api_viz_new_thing.md", "book/api_viz_source.md", "book/api.md", "_toc.yml"} <= stale
    for path, text in api_pages.expected_files(tmp_path).items():
        path.write_text(text)
    toc = (tmp_path / "_toc.yml").read_text()
    assert "book/api_viz_new_thing\n" in toc and "book/api_viz_source\n" not in toc
    assert ":doc:`mtlbook.viz.new_thing <api_viz_new_thing>`: A new module :math:`x`." in (tmp_path / "book" / "api.md").read_text()
    # what the script would still do is delete the page of the removed module
    assert [p.name for p in api_pages.stale_files(tmp_path)] == ["api_viz_source.md"]
    # the rest of the toc is untouched
    assert toc.replace("          - file: book/api_viz_new_thing\n", "") == (ROOT / "_toc.yml").read_text().replace(
        "          - file: book/api_viz_source\n", ""
    )


def test_toc_without_api_entry_is_an_error():
    with pytest.raises(ValueError, match="book/api"):
        api_pages.toc_text(api_pages.find_modules(ROOT), "format: jb-book\nroot: book/preface\n")


@dataclasses.dataclass
class _Config:
    name: str
    table: dict = dataclasses.field(default_factory=dict)
    items: list = dataclasses.field(default_factory=list)


def test_dataclass_factory_defaults_are_shown_as_values():
    sig = "(name, table=<factory>, items=<factory>)"
    new_sig, ret = site.readable_dataclass_defaults(None, "class", "_Config", _Config, {}, sig, None)
    assert new_sig == "(name, table={}, items=[])" and ret is None
    assert site.readable_dataclass_defaults(None, "function", "f", len, {}, sig, None) is None


def test_unreadable_values_are_detected():
    assert site._unreadable_value({"mse": len})  # <built-in function len>
    assert site._unreadable_value({"a": _Config})  # <class ...>
    assert not site._unreadable_value(("exact", "cheap"))
    assert not site._unreadable_value({"auto": None, "min": 1.5})


def test_scripts_are_emitted_once():
    from sphinx.builders.html._assets import _JavaScript

    thebe = "const THEBE_JS_URL = 1"
    scripts = [
        _JavaScript("_static/a.js"),
        _JavaScript(None, body=thebe),
        _JavaScript("", body=thebe),
        _JavaScript("_static/a.js"),
        _JavaScript(None, body="other"),
    ]
    context = {"script_files": scripts}
    site.dedupe_scripts(None, "p", "page.html", context, None)
    assert context["script_files"] is scripts  # edited in place
    assert [(s.filename, s.attributes.get("body")) for s in scripts] == [
        ("_static/a.js", None), (None, thebe), (None, "other")
    ]


def test_print_button_is_dropped_and_downloads_kept():
    context = {"header_buttons": [{
        "type": "group", "label": "download-buttons",
        "buttons": [{"label": "download-notebook-button"}, {"label": "download-pdf-button"}],
    }]}
    site.drop_print_button(None, "p", "page.html", context, None)
    assert context["header_buttons"][0]["buttons"] == [{"label": "download-notebook-button"}]


def test_bibliography_labels_read_like_author_year_citations():
    from pybtex.database import parse_string

    bib = parse_string(
        r"""
        @article{one, author={Michael Crawshaw}, title={A}, year={2020}}
        @article{two, author={Alain, Guillaume and Bengio, Yoshua}, title={B}, year={2017}}
        @article{many, author={Yu, T. and Kumar, S. and Gupta, A.}, title={C}, year={2020}}
        @article{von, author={van den Oord, Aaron and Li, Y. and Vinyals, O.}, title={D}, year={2018}}
        @article{twinA, author={Li, A. and Zhang, B. and Wu, C.}, title={E}, year={2023}}
        @article{twinB, author={Li, A. and Ma, D. and Wu, C.}, title={F}, year={2023}}
        @book{org, editor={{Stan Team}}, title={G}, year={2013}}
        """,
        "bibtex",
    )
    labels = list(site.AuthorYearLabelStyle().format_labels(bib.entries.values()))
    assert labels == [
        "Crawshaw, 2020", "Alain and Bengio, 2017", "Yu et al., 2020", "van den Oord et al., 2018",
        "Li et al., 2023a", "Li et al., 2023b", "Stan Team, 2013",
    ]

