"""Figures and explorers shared by the chapters.

- :mod:`mtlbook.viz.frames`: pyplot-free figures and PNG bytes (``new_figure``,
  ``figure_to_png``, ``measure_redraw``).
- :mod:`mtlbook.viz.widgets`: explorers that keep working in the static HTML book
  (``frame_explorer``, ``frame_explorer_2d``) and a live one (``live_explorer``).
- :mod:`mtlbook.viz.source`: ``show_source`` displays the package's own code in a chapter.
- :mod:`mtlbook.viz.toy_plots`: plots for the toy simulator (chapter 1).
- :mod:`mtlbook.viz.style`: the book's figure style (``use_book_style``, ``figsize``).
"""

from .frames import FRAME_DPI, FRAME_SIZE_PX, figure_to_png, measure_redraw, new_figure
from .source import show_source
from .style import figsize, use_book_style
from .widgets import EXPLORER_CLASS, frame_explorer, frame_explorer_2d, live_explorer

__all__ = [
    "FRAME_DPI",
    "FRAME_SIZE_PX",
    "EXPLORER_CLASS",
    "new_figure",
    "figure_to_png",
    "measure_redraw",
    "show_source",
    "figsize",
    "use_book_style",
    "frame_explorer",
    "frame_explorer_2d",
    "live_explorer",
]
