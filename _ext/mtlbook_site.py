"""Small fixes to the HTML pages that the themes and extensions produce (a local Sphinx extension).

Loaded through ``sphinx.local_extensions`` in ``_config.yml``. Each fix is one
``html-page-context`` handler that runs after the themes' own handlers:

- the same inline script is emitted only once (sphinx-thebe and sphinx-togglebutton register
  their configuration twice, once as ``filename=None`` and once as ``filename=''``; the second
  ``const THEBE_JS_URL`` is a JavaScript error on every page);
- the download menu keeps the ``.ipynb`` and source links but loses the ``.pdf`` entry, which
  only opened the browser's print dialog.

and two autodoc fixes for the API pages, so that no raw Python repr reaches the reader:

- a dataclass field with ``default_factory`` shows the value the factory makes (``{}``)
  instead of ``<factory>``;
- a module or class constant whose repr is not readable source (a dict of functions or
  classes: ``<function ...>``, ``<class ...>``) is documented without its value; its
  docstring says what it holds.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from sphinx.ext.autodoc import AttributeDocumenter, DataDocumenter
from sphinx.util.inspect import object_description

__all__ = [
    "dedupe_scripts",
    "drop_print_button",
    "readable_dataclass_defaults",
    "ReadableDataDocumenter",
    "ReadableAttributeDocumenter",
    "setup",
]

_UNREADABLE = re.compile(r"<(function|class|built-in|bound method|module|factory|lambda)\b|object at 0x")


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


def _factory_text(factory) -> str:
    try:
        text = repr(factory())
    except Exception:  # a factory that needs arguments or fails: name it instead
        text = ""
    if not text or len(text) > 60 or _UNREADABLE.search(text):
        text = f"{getattr(factory, '__qualname__', 'factory')}()"
    return text


def readable_dataclass_defaults(app, what, name, obj, options, signature, return_annotation):
    """``field=<factory>`` in a dataclass signature becomes ``field={}`` (what the factory makes)."""
    if what != "class" or not signature or "<factory>" not in signature or not dataclasses.is_dataclass(obj):
        return None
    for f in dataclasses.fields(obj):
        if f.default_factory is not dataclasses.MISSING:
            signature = signature.replace(f"{f.name}=<factory>", f"{f.name}={_factory_text(f.default_factory)}")
    return signature, return_annotation


def _unreadable_value(obj: Any) -> bool:
    try:
        return bool(_UNREADABLE.search(object_description(obj)))
    except ValueError:
        return True


class ReadableDataDocumenter(DataDocumenter):
    """Module-level data, without a value whose repr is not readable source."""

    def should_suppress_value_header(self) -> bool:
        return super().should_suppress_value_header() or _unreadable_value(self.object)


class ReadableAttributeDocumenter(AttributeDocumenter):
    """Class attributes, without a value whose repr is not readable source."""

    def should_suppress_value_header(self) -> bool:
        return super().should_suppress_value_header() or _unreadable_value(self.object)


def setup(app):
    app.setup_extension("sphinx.ext.autodoc")
    app.add_autodocumenter(ReadableDataDocumenter, override=True)
    app.add_autodocumenter(ReadableAttributeDocumenter, override=True)
    app.connect("autodoc-process-signature", readable_dataclass_defaults)
    # sphinx-book-theme fills header_buttons at priority 501; MathJax and myst-nb add their
    # scripts at the default 500: run after all of them.
    app.connect("html-page-context", dedupe_scripts, priority=900)
    app.connect("html-page-context", drop_print_button, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
