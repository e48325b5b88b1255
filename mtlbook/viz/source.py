"""Show the package's own code in a chapter (one source of truth, never a second copy).

Docstrings are written in reStructuredText for the API pages (``:math:``, ``.. math::``,
``:cite:``), which a code listing would show raw. ``show_source(..., docstrings="strip")``
prints the code without its docstrings and links each object to its API entry, where the
same docstring is typeset.
"""

from __future__ import annotations

import ast
import html
import inspect
import re
import textwrap
from typing import Any

__all__ = ["source_text", "strip_docstrings", "api_href", "show_source"]

DOCSTRING_MODES = ("keep", "strip")
#: Listings longer than this many lines are shown folded (a "show" summary opens them).
MAX_UNFOLDED_LINES = 60


def source_text(*objects: Any) -> str:
    """The source code of each object (function, class, method, module), dedented and joined
    by a blank line."""
    if not objects:
        raise ValueError("source_text needs at least one object")
    parts = []
    for obj in objects:
        try:
            parts.append(textwrap.dedent(inspect.getsource(obj)).rstrip())
        except (TypeError, OSError) as error:
            raise TypeError(f"cannot get the source of {obj!r}: {error}") from error
    return "\n\n\n".join(parts)


def strip_docstrings(source: str) -> str:
    """``source`` (dedented Python) without the docstrings of its module, classes and functions.

    A docstring that is the whole body of its function or class becomes ``...``; the blank line
    that followed a removed docstring goes with it. In comment lines, reStructuredText roles
    keep only their text (``:func:`simulate``` becomes ``simulate``) and autodoc's ``#:``
    marker becomes ``#``. Everything else is kept character for character.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise ValueError(f"source is not valid Python: {error}") from error
    lines = source.splitlines()
    replace: dict[int, str | None] = {}  # 0-based line -> replacement (None: drop)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if not (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            continue
        first, last = body[0].lineno - 1, body[0].end_lineno - 1
        indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
        for k in range(first, last + 1):
            replace[k] = None
        if len(body) == 1:
            replace[first] = indent + "..."
        elif last + 1 < len(lines) and not lines[last + 1].strip():
            replace[last + 1] = None
    out = [replace.get(k, line) for k, line in enumerate(lines)]
    return "\n".join(_plain_comment(line) for line in out if line is not None)


_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]*)`")


def _plain_comment(line: str) -> str:
    stripped = line.lstrip()
    if not stripped.startswith("#"):
        return line
    indent = line[: len(line) - len(stripped)]
    if stripped.startswith("#:"):
        stripped = "#" + stripped[2:]
    return indent + _ROLE.sub(r"\1", stripped)


def _documented(obj: Any) -> Any:
    if isinstance(obj, property):
        return obj.fget
    if isinstance(obj, (staticmethod, classmethod)):
        return obj.__func__
    return inspect.unwrap(obj) if callable(obj) else obj


def api_href(obj: Any) -> str | None:
    """Where ``obj`` is documented in the book, relative to a chapter page: the page of its
    module (``api_<module>.html``, see ``scripts/api_pages.py``) and the anchor of the object,
    or of its nearest public parent for a private method. ``None`` outside the package or for
    a private module."""
    obj = _documented(obj)
    if inspect.ismodule(obj):
        module, qualname = obj.__name__, ""
    else:
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or not module.startswith("mtlbook.") or any(p.startswith("_") for p in module.split(".")):
        return None
    page = "api_" + module.removeprefix("mtlbook.").replace(".", "_") + ".html"
    public = []
    for part in qualname.split("."):
        if not part or part.startswith("_") or part == "<locals>":
            break
        public.append(part)
    anchor = f"{module}.{'.'.join(public)}" if public else f"module-{module}"
    return f"{page}#{anchor}"


def _name(obj: Any) -> str:
    obj = _documented(obj)
    if inspect.ismodule(obj):
        return obj.__name__
    return f"{obj.__module__}.{obj.__qualname__}"


def show_source(*objects: Any, docstrings: str = "keep", fold_over: int | None = MAX_UNFOLDED_LINES) -> Any:
    """A syntax-highlighted code block of the objects' source, for display in a notebook.

    Returns an :class:`IPython.display.Markdown` object (a fenced ``python`` block), which
    Jupyter and the built book both render with highlighting; make it the cell's last
    expression or pass it to ``display``.

    Args:
        objects: functions, classes, methods or modules of the package.
        docstrings: ``"keep"`` prints the source as it is; ``"strip"`` prints it without
            docstrings (their reStructuredText would show raw) and adds, under the listing,
            links to the API entries where the docstrings are typeset.
        fold_over: a listing with more lines than this is folded in a ``<details>`` element
            whose summary names the objects and the line count (``None``: never folded), so
            that a long listing does not push the argument off the page.
    """
    from IPython.display import Markdown

    if docstrings not in DOCSTRING_MODES:
        raise ValueError(f"docstrings must be one of {DOCSTRING_MODES}, got {docstrings!r}")
    if not objects:
        raise ValueError("show_source needs at least one object")
    if fold_over is not None and (not isinstance(fold_over, int) or isinstance(fold_over, bool) or fold_over < 1):
        raise ValueError(f"fold_over must be None or an int >= 1, got {fold_over!r}")
    if docstrings == "keep":
        return Markdown(_listing(source_text(*objects), objects, fold_over))
    code = "\n\n\n".join(strip_docstrings(source_text(obj)) for obj in objects)
    links = []
    for obj in objects:
        href, name = api_href(obj), html.escape(_name(obj))
        links.append(f'<a href="{href}"><code>{name}</code></a>' if href else f"<code>{name}</code>")
    note = "Docstrings, with the math typeset: " + ", ".join(links) + "."
    return Markdown(_listing(code, objects, fold_over) + "\n\n" + note)


def _listing(code: str, objects: tuple, fold_over: int | None) -> str:
    """A fenced python block, inside ``<details>`` when longer than ``fold_over`` lines."""
    block = "```python\n" + code + "\n```"
    n_lines = code.count("\n") + 1
    if fold_over is None or n_lines <= fold_over:
        return block
    names = ", ".join(f"<code>{html.escape(_name(obj))}</code>" for obj in objects)
    return (f'<details class="mtlbook-listing">\n<summary>Show the source of {names} ({n_lines} lines)</summary>\n\n'
            + block + "\n\n</details>")
