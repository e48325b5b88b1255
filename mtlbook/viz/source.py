"""Show the package's own code inside a chapter (one source of truth)."""

from __future__ import annotations

import inspect
import textwrap

from IPython.display import Markdown


def show_source(obj: object, *, start: str | None = None) -> Markdown:
    """Return the source of ``obj`` as a highlighted Python block for a notebook cell.

    Args:
        obj: a function, class, method or module of :mod:`mtlbook`.
        start: optional line prefix; when given, the listing starts at the first line that
            begins with it (after dedenting), e.g. ``"def forward"``.
    """
    try:
        src = textwrap.dedent(inspect.getsource(obj))
    except (TypeError, OSError) as exc:
        raise TypeError(f"show_source needs a function, class or module, got {type(obj).__name__}") from exc
    if start is not None:
        lines = src.splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith(start):
                src = textwrap.dedent("\n".join(lines[i:]))
                break
        else:
            raise ValueError(f"start={start!r} does not begin any line of {getattr(obj, '__qualname__', obj)}")
    return Markdown(f"```python\n{src.rstrip()}\n```")
