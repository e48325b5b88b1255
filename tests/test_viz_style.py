"""mtlbook.viz.style: the book's figures fit the column at a readable scale."""

from __future__ import annotations

import matplotlib as mpl
import pytest

from mtlbook.viz import style


def test_full_width_figures_display_above_the_minimum_scale():
    assert style.displayed_scale(style.FULL_WIDTH_IN) >= style.MIN_SCALE
    assert style.displayed_scale(style.MAX_WIDTH_IN) == pytest.approx(style.MIN_SCALE)
    assert style.displayed_scale(13.0, dpi=80) < style.MIN_SCALE  # the old 13-inch, 80 dpi figures
    # text as displayed: 8 pt at 150 dpi in a full-width figure is at least 12 px
    assert style.BOOK_RC["font.size"] / 72 * style.DPI * style.displayed_scale(style.FULL_WIDTH_IN) >= 12


def test_use_book_style_sets_the_rc():
    with mpl.rc_context():
        style.use_book_style()
        assert mpl.rcParams["figure.dpi"] == style.DPI and mpl.rcParams["savefig.dpi"] == style.DPI
        assert mpl.rcParams["font.size"] == style.BOOK_RC["font.size"]


def test_figsize_grows_taller_not_wider():
    assert style.figsize(1) == (style.FULL_WIDTH_IN, 2.6)
    assert style.figsize(3, 2.0) == (style.FULL_WIDTH_IN, 6.0)
    with pytest.raises(ValueError, match="width_in must be in"):
        style.figsize(1, width_in=9.0)
    with pytest.raises(ValueError, match="rows must be an int"):
        style.figsize(0)
    with pytest.raises(ValueError, match="row_height_in"):
        style.figsize(1, row_height_in=0)
