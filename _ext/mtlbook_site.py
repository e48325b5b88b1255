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

It also registers the bibliography style ``mtlbook`` (``bibtex_default_style``): entries
sorted by author and year and labelled the way the text cites them (``bibtex_reference_style:
author_year``), e.g. ``[Crawshaw, 2020]`` and ``[Yu et al., 2020]``, instead of ``[Cra20]``.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle

from sphinx.ext.autodoc import AttributeDocumenter, DataDocumenter
from sphinx.util.inspect import object_description

__all__ = [
    "AuthorYearLabelStyle",
    "AuthorYearStyle",
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


class AuthorYearLabelStyle(BaseLabelStyle):
    """Labels as the text cites: ``Last, 2020``, ``A and B, 2020``, ``A et al., 2020``; a
    letter (``2020a``, ``2020b``) separates equal labels."""

    def _base(self, entry) -> str:
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [Text.from_latex(" ".join(p.prelast_names + p.last_names)).render_as("text") for p in people]
        if not names:
            who = entry.fields.get("organization") or entry.key
        elif len(names) == 1:
            who = names[0]
        elif len(names) == 2:
            who = f"{names[0]} and {names[1]}"
        else:
            who = f"{names[0]} et al."
        return f"{who}, {entry.fields.get('year', 'n.d.')}"

    def format_labels(self, sorted_entries):
        entries = list(sorted_entries)
        bases = [self._base(e) for e in entries]
        counts = Counter(bases)
        seen: Counter = Counter()
        for base in bases:
            if counts[base] == 1:
                yield base
            else:
                yield base + "abcdefghijklmnopqrstuvwxyz"[seen[base]]
                seen[base] += 1


class AuthorYearStyle(UnsrtStyle):
    """pybtex's unsrt entries, sorted by author, year and title, with author-year labels."""

    default_sorting_style = "author_year_title"
    default_label_style = "mtlbook_author_year"


def setup(app):
    register_plugin("pybtex.style.labels", "mtlbook_author_year", AuthorYearLabelStyle, force=True)
    register_plugin("pybtex.style.formatting", "mtlbook", AuthorYearStyle, force=True)
    app.setup_extension("sphinx.ext.autodoc")
    app.add_autodocumenter(ReadableDataDocumenter, override=True)
    app.add_autodocumenter(ReadableAttributeDocumenter, override=True)
    app.connect("autodoc-process-signature", readable_dataclass_defaults)
    # sphinx-book-theme fills header_buttons at priority 501; MathJax and myst-nb add their
    # scripts at the default 500: run after all of them.
    app.connect("html-page-context", dedupe_scripts, priority=900)
    app.connect("html-page-context", drop_print_button, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
