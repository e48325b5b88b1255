"""The book's figure style: sizes chosen for the column the figures are read in.

The HTML book shows a chapter in a column :data:`COLUMN_PX` CSS pixels wide at a 1280 px
window. A figure ``w`` inches wide saved at :data:`DPI` has ``w * DPI`` pixels; wider than the
column, it is shrunk by ``scale = COLUMN_PX / (w * DPI)`` and its text with it: a ``f``-point
label is displayed ``f / 72 * DPI * scale`` pixels tall. The style fixes

* :data:`DPI` = 150: sharp lines on high-density screens and in print;
* :data:`FULL_WIDTH_IN` (5.6 in, 840 px): a full-width figure is displayed at
  ``688 / 840 = 0.82x``, above the :data:`MIN_SCALE` of 0.75 the browser test asks for;
* 8 pt text (7.5 pt ticks and legends): about 13.6 px (12.8 px) as displayed, the body text
  being 16 px;
* panels stacked in rows rather than side by side (:func:`figsize`), so a figure with many
  panels grows taller, not wider.

:func:`use_book_style` applies it (every chapter's setup cell calls it).
"""

from __future__ import annotations

from typing import Any

import matplotlib as mpl

#: Width of the chapter column at a 1280 px window, in CSS pixels.
COLUMN_PX = 688
#: Resolution of the book's figures (dots per inch).
DPI = 150
#: Smallest displayed scale (displayed width / pixel width) a figure may have at 1280 px.
MIN_SCALE = 0.75
#: Width of a full-width figure, in inches (``FULL_WIDTH_IN * DPI`` pixels).
FULL_WIDTH_IN = 5.6
#: Widest a figure may be so that it is displayed at ``MIN_SCALE`` or more, in inches.
MAX_WIDTH_IN = COLUMN_PX / (MIN_SCALE * DPI)

BOOK_RC: dict[str, Any] = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "figure.figsize": (FULL_WIDTH_IN, 2.8),
    "font.size": 8.0,
    "axes.titlesize": 8.5,
    "axes.labelsize": 8.0,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "legend.fontsize": 7.5,
    "legend.frameon": False,
    "lines.linewidth": 1.3,
    "lines.markersize": 4.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def use_book_style() -> None:
    """Apply :data:`BOOK_RC` to matplotlib's defaults (what pyplot figures are drawn with)."""
    mpl.rcParams.update(BOOK_RC)


def figsize(rows: int = 1, row_height_in: float = 2.6, width_in: float = FULL_WIDTH_IN) -> tuple[float, float]:
    """``(width, height)`` in inches of a figure with ``rows`` rows of panels.

    ``width_in`` must be at most :data:`MAX_WIDTH_IN` (the figure would be shrunk below
    :data:`MIN_SCALE` in the column); ``rows`` and ``row_height_in`` must be positive.
    """
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"rows must be an int >= 1, got {rows!r}")
    if not row_height_in > 0:
        raise ValueError(f"row_height_in must be > 0, got {row_height_in!r}")
    if not 0 < width_in <= MAX_WIDTH_IN:
        raise ValueError(f"width_in must be in (0, {MAX_WIDTH_IN:.2f}] (the column at scale {MIN_SCALE}), got {width_in!r}")
    return (float(width_in), float(rows * row_height_in))


def displayed_scale(width_in: float, dpi: float = DPI, column_px: int = COLUMN_PX) -> float:
    """Scale at which a figure ``width_in`` inches wide saved at ``dpi`` is shown in the column."""
    if not width_in > 0 or not dpi > 0:
        raise ValueError(f"width_in and dpi must be > 0, got {width_in!r} and {dpi!r}")
    return min(1.0, column_px / (width_in * dpi))


__all__ = ["BOOK_RC", "COLUMN_PX", "DPI", "FULL_WIDTH_IN", "MAX_WIDTH_IN", "MIN_SCALE", "displayed_scale",
           "figsize", "use_book_style"]
