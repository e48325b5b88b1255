"""Show the package's own code in a chapter (one source of truth, never a second copy)."""

from __future__ import annotations

import inspect
import textwrap
from typing import Any

__all__ = ["source_text", "show_source"]


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


def show_source(*objects: Any) -> Any:
    """A syntax-highlighted code block of the objects' source, for display in a notebook.

    Returns an :class:`IPython.display.Markdown` object (a fenced ``python`` block), which
    Jupyter and the built book both render with highlighting; make it the cell's last
    expression or pass it to ``display``.
    """
    from IPython.display import Markdown

    return Markdown("```python\n" + source_text(*objects) + "\n```")
