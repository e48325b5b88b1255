"""Figures as PNG bytes: the raw material of the static explorers.

Explorers precompute one small PNG per parameter value. Figures made with :func:`new_figure`
are plain :class:`matplotlib.figure.Figure` objects that pyplot does not track, so they never
show up as stray inline outputs or leak; :func:`figure_to_png` also closes pyplot figures
handed to it, so either kind can be rendered in a loop without piling up open figures.
"""

from __future__ import annotations

import io
import time
from typing import Any, Callable

import matplotlib.pyplot as plt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["FRAME_DPI", "FRAME_SIZE_PX", "new_figure", "figure_to_png", "measure_redraw"]

#: Default frame size in pixels (width, height) and resolution: small enough that a dozen
#: frames add only a few hundred KB to a page. The resolution sets how many pixels a point
#: is: under the book style (8 pt text, :mod:`mtlbook.viz.style`) 100 dpi gives 11 px text
#: in a 480 px frame, which a phone's column (about 350 px) still shows at 8 px or more.
FRAME_SIZE_PX: tuple[int, int] = (480, 280)
FRAME_DPI: int = 100

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def new_figure(
    width_px: int = FRAME_SIZE_PX[0],
    height_px: int = FRAME_SIZE_PX[1],
    dpi: int = FRAME_DPI,
    layout: str | None = None,
    **subplots_kw: Any,
) -> tuple[Figure, Any]:
    """A pyplot-free figure of ``width_px x height_px`` pixels and its axes.

    ``subplots_kw`` goes to :meth:`Figure.subplots` (``nrows``, ``ncols``, ``sharex``...).
    Returns ``(figure, axes)`` like ``plt.subplots``. ``layout`` is matplotlib's layout
    engine; the default ``None`` (fixed margins, set with ``fig.subplots_adjust``) draws about
    twice as fast as ``"constrained"``, which matters for live redraws.
    """
    for name, value in (("width_px", width_px), ("height_px", height_px), ("dpi", dpi)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    axes = fig.subplots(**subplots_kw)
    return fig, axes


def figure_to_png(
    fig: Figure, dpi: int | None = None, close: bool = True, colors: int | None = None
) -> bytes:
    """Render ``fig`` to PNG bytes (at ``dpi``, default the figure's own) and close it.

    Closing removes a pyplot-managed figure from pyplot's registry; for figures made by
    :func:`new_figure` it is a no-op. ``colors`` (2-256) quantizes the image to a palette of
    that many colours: line plots look the same at 64 colours and the file is 3-4 times
    smaller, which is what keeps pages with many precomputed frames light.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    if colors is not None and (not isinstance(colors, int) or isinstance(colors, bool) or not 2 <= colors <= 256):
        raise ValueError(f"colors must be None or an int in [2, 256], got {colors!r}")
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=fig.dpi if dpi is None else dpi)
    finally:
        if close:
            plt.close(fig)
    if colors is None:
        return buffer.getvalue()
    from PIL import Image  # matplotlib depends on Pillow

    buffer.seek(0)
    with Image.open(buffer) as image:
        # the fast octree quantizer is ~5x quicker than median cut at the same quality for plots
        quantized = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    quantized.save(out, format="PNG")
    return out.getvalue()


def measure_redraw(
    plot: Callable[..., Figure], repeat: int = 5, clock: str = "wall", **kwargs: Any
) -> float:
    """Median time in seconds of ``figure_to_png(plot(**kwargs))``.

    This is what one slider move costs in a live kernel: recompute, draw, encode the PNG that
    the live explorer sends to the browser. One untimed warm-up call comes first.
    ``clock="wall"`` measures elapsed time (what a reader waits); ``clock="cpu"`` measures
    this process's CPU time, which does not grow when other processes compete for the cores.
    """
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    if clock not in clocks:
        raise ValueError(f"clock must be one of {tuple(clocks)}, got {clock!r}")
    now = clocks[clock]
    figure_to_png(plot(**kwargs))
    times = []
    for _ in range(repeat):
        start = now()
        figure_to_png(plot(**kwargs))
        times.append(now() - start)
    times.sort()
    return times[len(times) // 2]
