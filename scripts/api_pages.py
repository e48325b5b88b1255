"""Write the API reference: one page per public module of ``mtlbook`` (autodoc), an index page,
and the matching entries of ``_toc.yml``.

    python scripts/api_pages.py           # (re)write book/api.md, book/api_*.md and _toc.yml
    python scripts/api_pages.py --check   # exit 1, naming the files, when they are out of date

Modules are found by walking ``mtlbook/`` (no import): every ``.py`` file whose dotted name
has no part starting with ``_`` gets ``book/api_<dotted name without 'mtlbook.', '.' -> '_'>.md``.
Packages (``__init__.py``) have no page of their own; their docstring introduces their group on
the index page. Run it after adding, renaming or removing a module; tests/test_api_pages.py
fails while the pages are stale.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mtlbook"
BOOK = ROOT / "book"
TOC = ROOT / "_toc.yml"
INDEX = BOOK / "api.md"
GENERATED = "<!-- written by scripts/api_pages.py: edit the script or the docstrings, not this file -->"

# Groups on the index page, in the order of the book; modules not covered go last.
GROUP_ORDER = [
    "mtlbook.toy",
    "mtlbook.data",
    "mtlbook.diagnostics",
    "mtlbook.models",
    "mtlbook.adatt",
    "mtlbook.losses",
    "mtlbook.balancer_base",
    "mtlbook.balancing",
    "mtlbook.balancers_combine",
    "mtlbook.balancers_random",
    "mtlbook.balancers_torchjd",
    "mtlbook.train",
    "mtlbook.experiments",
    "mtlbook.viz",
]


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. mtlbook.data.batch
    path: Path
    is_package: bool
    summary: str  # first paragraph of the docstring (reStructuredText), "" when none

    @property
    def docname(self) -> str:
        """The page, relative to the repository root and without suffix."""
        return "book/api_" + self.name.removeprefix(PACKAGE + ".").replace(".", "_")

    @property
    def group(self) -> str:
        parts = self.name.split(".")
        return ".".join(parts[:2])


def _summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    first = doc.strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in first.splitlines())


def find_modules(root: Path = ROOT) -> list[Module]:
    """Every public module and package under ``mtlbook/``, sorted by dotted name."""
    found = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts):
            continue
        found.append(Module(".".join(parts), path, is_package, _summary(path)))
    return sorted(found, key=lambda m: m.name)


def module_page(module: Module) -> str:
    return (
        f"{GENERATED}\n\n"
        f"# {module.name}\n\n"
        "```{eval-rst}\n"
        f".. automodule:: {module.name}\n"
        "```\n"
    )


def _groups(modules: list[Module]) -> list[tuple[str, list[Module]]]:
    names = {m.group for m in modules if m.name != PACKAGE}
    ordered = [g for g in GROUP_ORDER if g in names] + sorted(names - set(GROUP_ORDER))
    return [(g, [m for m in modules if m.group == g]) for g in ordered]


def index_page(modules: list[Module]) -> str:
    lines = [
        GENERATED,
        "",
        "# API reference",
        "",
        "Generated from the docstrings of the `mtlbook` package, one page per module. The",
        "chapters show the same code; these pages are the place to look up a signature.",
        "",
    ]
    for group, members in _groups(modules):
        package = next((m for m in members if m.is_package and m.name == group), None)
        pages = [m for m in members if not m.is_package]
        lines += [f"## {group}", ""]
        rst = []
        if package is not None and package.summary:
            rst += [package.summary, ""]
        rst += [f"* :doc:`{m.name} <{Path(m.docname).name}>`: {m.summary}" for m in pages]
        lines += ["```{eval-rst}", *rst, "```", ""]
    return "\n".join(lines)


def toc_text(modules: list[Module], toc: str) -> str:
    """``toc`` with the sections of the ``book/api`` entry replaced by one entry per page."""
    match = re.search(r"^(?P<indent>[ \t]*)- file: book/api[ \t]*\n", toc, flags=re.MULTILINE)
    if match is None:
        raise ValueError(f"{TOC} has no '- file: book/api' entry")
    indent = match.group("indent")
    start, end = match.end(), match.end()
    # drop an existing sections block (lines indented deeper than the entry)
    rest = toc[end:].splitlines(keepends=True)
    consumed = 0
    for line in rest:
        if line.strip() and not line.startswith(indent + "  "):
            break
        consumed += len(line)
    pages = [m for _, members in _groups(modules) for m in members if not m.is_package]
    block = f"{indent}  sections:\n" + "".join(f"{indent}    - file: {m.docname}\n" for m in pages)
    return toc[:start] + block + toc[end + consumed:]


def expected_files(root: Path = ROOT) -> dict[Path, str]:
    modules = find_modules(root)
    files = {root / "book" / (Path(m.docname).name + ".md"): module_page(m) for m in modules if not m.is_package}
    files[root / "book" / "api.md"] = index_page(modules)
    files[root / "_toc.yml"] = toc_text(modules, (root / "_toc.yml").read_text(encoding="utf-8"))
    return files


def stale_files(root: Path = ROOT) -> list[Path]:
    """Files that differ from what the script writes, plus generated pages of removed modules."""
    files = expected_files(root)
    stale = [p for p, text in files.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
    for page in sorted((root / "book").glob("api_*.md")):
        if page not in files and page.read_text(encoding="utf-8").startswith(GENERATED):
            stale.append(page)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    args = parser.parse_args(argv)
    stale = stale_files(ROOT)
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run python scripts/api_pages.py)")
        return 1 if stale else 0
    files = expected_files(ROOT)
    for path in stale:
        if path in files:
            path.write_text(files[path], encoding="utf-8")
        else:
            path.unlink()
        print(f"wrote {path.relative_to(ROOT)}" if path in files else f"removed {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
