"""Small fixes to the HTML pages that the themes and extensions produce (a local Sphinx extension).

Loaded through ``sphinx.local_extensions`` in ``_config.yml``. Each fix is one
``html-page-context`` handler that runs after the themes' own handlers:

- the same inline script is emitted only once (sphinx-thebe and sphinx-togglebutton register
  their configuration twice, once as ``filename=None`` and once as ``filename=''``; the second
  ``const THEBE_JS_URL`` is a JavaScript error on every page);
- the download menu keeps the ``.ipynb`` and source links but loses the ``.pdf`` entry, which
  only opened the browser's print dialog.
"""

from __future__ import annotations

from typing import Any

__all__ = ["dedupe_scripts", "drop_print_button", "setup"]


def _script_key(script: Any) -> tuple:
    filename = getattr(script, "filename", script) or ""
    attributes = getattr(script, "attributes", {}) or {}
    return (str(filename), tuple(sorted((k, str(v)) for k, v in attributes.items())))


def dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    """Remove repeated ``<script>`` entries (same file or same inline body), keeping the first."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    kept = []
    for script in scripts:
        key = _script_key(script)
        if key in seen:
            continue
        seen.add(key)
        kept.append(script)
    scripts[:] = kept  # in place: the builder restores its own list after each page


def drop_print_button(app, pagename, templatename, context, doctree) -> None:
    """Remove the ``.pdf`` entry (``window.print()``) from sphinx-book-theme's download menu."""
    for button in context.get("header_buttons") or []:
        if button.get("type") == "group" and button.get("label") == "download-buttons":
            button["buttons"] = [b for b in button["buttons"] if b.get("label") != "download-pdf-button"]


def setup(app):
    # sphinx-book-theme fills header_buttons at priority 501; MathJax and myst-nb add their
    # scripts at the default 500: run after all of them.
    app.connect("html-page-context", dedupe_scripts, priority=900)
    app.connect("html-page-context", drop_print_button, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
