"""Explorers that keep working in the static HTML book, plus a live one for a running kernel.

The static explorers precompute one PNG frame per parameter value, wrap each frame in an
``ipywidgets.Image``, put the images in an ``ipywidgets.Stack`` and link a slider to the
stack's ``selected_index`` with ``jslink``. A ``jslink`` runs in the browser, so the page
needs no kernel: moving the slider only switches which precomputed image is visible. The
slider is a ``SelectionSlider`` whose options are ``(label, index)`` pairs and the link goes
through its ``index`` trait, so the readout shows the real parameter value while the stack
receives an integer.

A ``jslink`` can copy a value but cannot compute one, so two parameters cannot be combined
into a single flat index ``i * n2 + j`` in the browser. :func:`frame_explorer_2d` nests
instead: an outer stack holds one inner stack per value of the first parameter, the first
slider selects the inner stack and the second slider is linked to every inner stack.

Every static explorer carries the CSS class ``mtlbook-explorer`` (the browser tests look for
it) and exposes its parts as Python attributes for inspection: ``sliders``, ``stack``,
``links``, ``values`` and ``images``.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from .frames import figure_to_png

__all__ = ["EXPLORER_CLASS", "LIVE_EXPLORER_CLASS", "frame_explorer", "frame_explorer_2d", "live_explorer"]

#: CSS class put on every static explorer's outer box.
EXPLORER_CLASS = "mtlbook-explorer"
#: CSS class of a live explorer's outer box (its picture changes only with a running kernel).
LIVE_EXPLORER_CLASS = "mtlbook-live-explorer"
#: What a live explorer says above its controls, so that the static page does not look broken.
LIVE_NOTE = ("<b>Live explorer:</b> the picture is redrawn by a running Python kernel. Open this chapter in "
             "Jupyter, Colab or Binder (launch buttons at the top) to use it; in the static page the controls "
             "move but the picture stays as it was computed.")


def _labels(values: Sequence[Any], readout_format: str | None, name: str) -> list[str]:
    labels = []
    for value in values:
        if readout_format is not None and isinstance(value, numbers.Real) and not isinstance(value, bool):
            labels.append(format(value, readout_format))
        else:
            labels.append(str(value))
    if len(set(labels)) != len(labels):
        raise ValueError(
            f"{name} give duplicate slider labels {labels}; pass a finer readout_format"
        )
    return labels


def _check_values(values: Any, name: str) -> list[Any]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of parameter values, got {type(values).__name__}")
    values = list(values)
    if not values:
        raise ValueError(f"{name} must hold at least one value")
    return values


def _initial_index(values: list[Any], initial: Any, name: str) -> int:
    if initial is None:
        return 0
    for i, value in enumerate(values):
        if value == initial:
            return i
    raise ValueError(f"{name} initial value {initial!r} is not one of {values}")


def _render_image(render: Callable[..., Figure], colors: int | None, *args: Any) -> widgets.Image:
    fig = render(*args)
    if not isinstance(fig, Figure):
        raise TypeError(f"render must return a matplotlib Figure, got {type(fig).__name__}")
    # scale down (never up) to the page's text column, keeping the aspect ratio
    layout = widgets.Layout(max_width="100%", height="auto")
    return widgets.Image(value=figure_to_png(fig, colors=colors), format="png", layout=layout)


def _slider(labels: list[str], description: str, index: int) -> widgets.SelectionSlider:
    return widgets.SelectionSlider(
        options=[(label, i) for i, label in enumerate(labels)],
        value=index,
        description=description,
        continuous_update=True,
        # one fixed label width, so that stacked sliders line up and long labels are not cut
        style={"description_width": "120px"},
        # as wide as the column allows, up to 480 px: the readout stays on screen on a phone
        layout=widgets.Layout(width="100%", max_width="480px"),
    )


def frame_explorer(
    render: Callable[[Any], Figure],
    values: Sequence[Any],
    description: str,
    readout_format: str | None = ".3g",
    initial: Any = None,
    colors: int | None = 64,
) -> widgets.VBox:
    """A slider over ``values`` that flips through precomputed frames ``render(value)``.

    Args:
        render: maps one parameter value to a matplotlib ``Figure`` (closed after rendering).
            Keep it small, e.g. :func:`mtlbook.viz.frames.new_figure` (480x280 px at 100 dpi).
        values: the parameter grid; one frame each, in slider order.
        description: the slider's label, e.g. ``"ρ"``.
        readout_format: format spec for numeric values in the readout (``None``: ``str``).
        initial: the value shown first (default: the first value).
        colors: palette size for the PNG frames (``None``: full colour); 64 keeps a 480x280
            line plot at about 8 KB instead of about 25 KB.

    Returns:
        ``VBox([slider, stack])`` with CSS class ``mtlbook-explorer``; attributes
        ``sliders`` (1-tuple), ``stack``, ``links`` (the one ``jslink``: slider ``index`` to
        stack ``selected_index``), ``values`` and ``images`` (one ``Image`` per value).
    """
    values = _check_values(values, "values")
    labels = _labels(values, readout_format, "values")
    index = _initial_index(values, initial, "values")
    images = [_render_image(render, colors, value) for value in values]
    stack = widgets.Stack(children=images, selected_index=index)
    slider = _slider(labels, description, index)
    link = widgets.jslink((slider, "index"), (stack, "selected_index"))
    box = widgets.VBox([slider, stack])
    box.add_class(EXPLORER_CLASS)
    box.sliders, box.stack, box.links = (slider,), stack, (link,)
    box.values, box.images = tuple(values), tuple(images)
    return box


def frame_explorer_2d(
    render: Callable[[Any, Any], Figure],
    values1: Sequence[Any],
    values2: Sequence[Any],
    description1: str,
    description2: str,
    readout_format1: str | None = ".3g",
    readout_format2: str | None = ".3g",
    initial1: Any = None,
    initial2: Any = None,
    colors: int | None = 64,
) -> widgets.VBox:
    """Two sliders over a grid of precomputed frames ``render(value1, value2)``.

    The outer stack holds one inner stack per entry of ``values1`` (selected by the first
    slider); each inner stack holds one frame per entry of ``values2`` and all inner stacks
    are linked to the second slider. ``len(values1) * len(values2)`` frames are rendered.

    Returns:
        ``VBox([slider1, slider2, outer_stack])`` with CSS class ``mtlbook-explorer`` and
        attributes ``sliders`` (2-tuple), ``stack`` (outer), ``inner_stacks``, ``links``
        (``1 + len(values1)`` jslinks, the outer one first), ``values`` (pair of tuples) and
        ``images`` (nested tuple, ``images[i][j]`` = frame of ``(values1[i], values2[j])``).
    """
    values1, values2 = _check_values(values1, "values1"), _check_values(values2, "values2")
    labels1 = _labels(values1, readout_format1, "values1")
    labels2 = _labels(values2, readout_format2, "values2")
    index1 = _initial_index(values1, initial1, "values1")
    index2 = _initial_index(values2, initial2, "values2")
    images = tuple(tuple(_render_image(render, colors, v1, v2) for v2 in values2) for v1 in values1)
    inner_stacks = tuple(widgets.Stack(children=row, selected_index=index2) for row in images)
    outer = widgets.Stack(children=inner_stacks, selected_index=index1)
    slider1 = _slider(labels1, description1, index1)
    slider2 = _slider(labels2, description2, index2)
    links = [widgets.jslink((slider1, "index"), (outer, "selected_index"))]
    links += [widgets.jslink((slider2, "index"), (inner, "selected_index")) for inner in inner_stacks]
    box = widgets.VBox([slider1, slider2, outer])
    box.add_class(EXPLORER_CLASS)
    box.sliders, box.stack, box.inner_stacks, box.links = (slider1, slider2), outer, inner_stacks, tuple(links)
    box.values, box.images = (tuple(values1), tuple(values2)), images
    return box


def live_explorer(
    plot: Callable[..., Figure | None],
    controls: Mapping[str, widgets.ValueWidget],
) -> widgets.VBox:
    """Controls that redraw ``plot(**values)`` in a live kernel (``interactive_output``).

    ``plot`` receives one keyword per entry of ``controls`` (the widget's current value) and
    returns a ``Figure`` (a pyplot-free one from ``new_figure`` is best, and one reused across
    calls is fastest; a pyplot one works too) or ``None`` after drawing with pyplot itself. The
    figure is rendered to PNG once, shown in the output area and closed if pyplot manages it,
    so nothing leaks between redraws. In the static HTML book the controls
    render but nothing recomputes: use :func:`frame_explorer` there. Budget: one redraw
    should take < 100 ms (check with :func:`mtlbook.viz.frames.measure_redraw`).

    Returns:
        ``VBox([note, HBox(controls), output])`` with the CSS class ``mtlbook-live-explorer``
        and attributes ``controls`` (the mapping), ``output``, ``note`` (an HTML widget saying
        that the picture needs a running kernel) and ``redraw`` (the wrapped callback,
        callable with keyword values).
    """
    if not isinstance(controls, Mapping) or not controls:
        raise ValueError("controls must be a non-empty mapping of keyword name -> widget")
    for name, control in controls.items():
        if not isinstance(control, widgets.ValueWidget):
            raise TypeError(f"controls[{name!r}] must be an ipywidgets value widget, got {type(control).__name__}")

    from IPython.display import Image, display

    def redraw(**kwargs: Any) -> None:
        fig = plot(**kwargs)
        if fig is None:  # drew on pyplot's current figure
            fig = plt.gcf()
        # Send our own PNG: one draw, where displaying the figure object would let the inline
        # backend draw it twice (bbox_inches="tight"). figure_to_png closes pyplot figures.
        display(Image(data=figure_to_png(fig), format="png"))

    output = widgets.interactive_output(redraw, dict(controls))
    row = widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap"))
    note = widgets.HTML(value=f'<p class="mtlbook-live-note">{LIVE_NOTE}</p>', layout=widgets.Layout(max_width="100%"))
    box = widgets.VBox([note, row, output], layout=widgets.Layout(max_width="100%"))
    box.add_class(LIVE_EXPLORER_CLASS)
    box.controls, box.output, box.redraw, box.note = dict(controls), output, redraw, note
    return box
