"""Tests for mtlbook.viz: PNG frames, static explorers (structure and links), live explorer."""

from __future__ import annotations

import struct

import matplotlib

matplotlib.use("Agg")

import ipywidgets as widgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from ipywidgets.widgets.widget_link import Link  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mtlbook import toy, viz  # noqa: E402
from mtlbook.viz import frames, toy_plots  # noqa: E402
from mtlbook.viz import widgets as viz_widgets  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _clean_figures():
    torch.manual_seed(0)
    plt.close("all")
    yield
    plt.close("all")


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a PNG file."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def sized_pyplot_figure(width_px: int, height_px: int) -> Figure:
    """A pyplot-managed figure whose pixel size encodes which frame it is."""
    fig, ax = plt.subplots(figsize=(width_px / 50, height_px / 50), dpi=50)
    ax.plot([0, 1], [0, 1])
    return fig


# ------------------------------------------------------------------ PNG frames


def test_new_figure_is_untracked_and_renders_at_the_requested_size():
    fig, axes = frames.new_figure(480, 280, 80, ncols=2)
    assert len(axes) == 2
    assert plt.get_fignums() == []
    assert png_size(frames.figure_to_png(fig)) == (480, 280)


def test_figure_to_png_closes_pyplot_figures():
    fig = sized_pyplot_figure(100, 60)
    assert plt.get_fignums() != []
    data = frames.figure_to_png(fig)
    assert png_size(data) == (100, 60)
    assert plt.get_fignums() == []
    with pytest.raises(TypeError, match="fig"):
        frames.figure_to_png("not a figure")


def test_measure_redraw_times_a_callback():
    calls = []

    def plot(x):
        calls.append(x)
        return frames.new_figure(60, 40, 20)[0]

    seconds = frames.measure_redraw(plot, repeat=3, x=7)
    assert seconds > 0 and calls == [7] * 4  # one warm-up, three timed
    assert frames.measure_redraw(plot, repeat=1, clock="cpu", x=8) >= 0 and calls[-1] == 8
    with pytest.raises(ValueError, match="repeat"):
        frames.measure_redraw(plot, repeat=0, x=1)
    with pytest.raises(ValueError, match="clock"):
        frames.measure_redraw(plot, clock="gpu", x=1)


# ------------------------------------------------------------------ 1-D explorer


def test_frame_explorer_structure_links_and_frames():
    values = [1.0, 2.5, 10.0, 40.0]
    rendered = []

    def render(value):
        rendered.append(value)
        return sized_pyplot_figure(100 + 20 * len(rendered), 60)  # frame k is 100 + 20 (k+1) wide

    box = viz.frame_explorer(render, values, "rho", readout_format=".3g", initial=10.0)
    assert rendered == values
    assert plt.get_fignums() == [], "frame_explorer left figures open"
    assert isinstance(box, widgets.VBox)
    slider, stack = box.children
    assert isinstance(slider, widgets.SelectionSlider) and isinstance(stack, widgets.Stack)
    assert box.sliders == (slider,) and box.stack is stack
    assert viz.EXPLORER_CLASS in box._dom_classes
    # one valid PNG image per value, in slider order
    assert len(stack.children) == len(values) == len(box.images)
    for k, image in enumerate(stack.children):
        assert isinstance(image, widgets.Image) and image.format == "png"
        assert png_size(image.value) == (100 + 20 * (k + 1), 60)
    # the readout shows the real values; the link carries the index to the stack
    assert [label for label, _ in slider.options] == ["1", "2.5", "10", "40"]
    assert [index for _, index in slider.options] == list(range(4))
    (link,) = box.links
    assert isinstance(link, Link)  # a browser-side jslink, not a kernel-side link
    assert link.source == (slider, "index")
    assert link.target == (stack, "selected_index")
    assert slider.index == stack.selected_index == 2  # initial=10.0


def test_frame_explorer_accepts_categorical_values():
    box = viz.frame_explorer(lambda name: frames.new_figure(40, 30, 10)[0], ["sgd", "adam"], "optimizer")
    assert [label for label, _ in box.sliders[0].options] == ["sgd", "adam"]
    assert box.stack.selected_index == 0


def test_frame_explorer_rejects_bad_input():
    def render(value):
        return frames.new_figure(40, 30, 10)[0]

    with pytest.raises(ValueError, match="values"):
        viz.frame_explorer(render, [], "x")
    with pytest.raises(ValueError, match="readout_format"):
        viz.frame_explorer(render, [1.001, 1.002], "x", readout_format=".2g")
    with pytest.raises(ValueError, match="initial"):
        viz.frame_explorer(render, [1.0, 2.0], "x", initial=3.0)
    with pytest.raises(TypeError, match="values"):
        viz.frame_explorer(render, "abc", "x")
    with pytest.raises(TypeError, match="render must return"):
        viz.frame_explorer(lambda value: None, [1.0], "x")


# ------------------------------------------------------------------ 2-D explorer


def test_frame_explorer_2d_nested_stacks_and_links():
    values1, values2 = [0.1, 1.0, 10.0], ["a", "b"]

    def render(v1, v2):
        i, j = values1.index(v1), values2.index(v2)
        return sized_pyplot_figure(100 + 20 * i, 50 + 10 * j)

    box = viz.frame_explorer_2d(render, values1, values2, "temperature", "mode", initial2="b")
    assert plt.get_fignums() == []
    slider1, slider2, outer = box.children
    assert box.sliders == (slider1, slider2) and box.stack is outer
    assert viz.EXPLORER_CLASS in box._dom_classes
    assert len(outer.children) == len(values1)
    for i, inner in enumerate(outer.children):
        assert isinstance(inner, widgets.Stack) and len(inner.children) == len(values2)
        for j, image in enumerate(inner.children):
            assert png_size(image.value) == (100 + 20 * i, 50 + 10 * j)
            assert box.images[i][j] is image
        assert inner.selected_index == 1  # initial2 = "b"
    assert len(box.links) == 1 + len(values1)
    assert box.links[0].source == (slider1, "index") and box.links[0].target == (outer, "selected_index")
    linked_inner = [link.target[0] for link in box.links[1:]]
    assert all(isinstance(link, Link) for link in box.links)
    assert all(link.source == (slider2, "index") for link in box.links[1:])
    assert all(link.target[1] == "selected_index" for link in box.links[1:])
    assert linked_inner == list(outer.children)


# ------------------------------------------------------------------ live explorer


def test_live_explorer_redraws_with_control_values_and_closes_figures():
    seen = []

    def plot(rho, optimizer):
        seen.append((rho, optimizer))
        fig, ax = plt.subplots()
        ax.plot([0, rho])
        return fig

    controls = {"rho": widgets.FloatLogSlider(value=10.0, min=0, max=3), "optimizer": widgets.Dropdown(options=["sgd", "adam"])}
    box = viz.live_explorer(plot, controls)
    note, row, output = box.children
    assert isinstance(output, widgets.Output)
    # the static page says plainly that the picture needs a kernel
    assert box.note is note and "running Python kernel" in note.value
    assert viz_widgets.LIVE_EXPLORER_CLASS in box._dom_classes
    assert list(row.children) == list(controls.values())
    assert box.controls == controls
    box.redraw(rho=3.0, optimizer="adam")
    assert seen[-1] == (3.0, "adam")
    assert plt.get_fignums() == []
    with pytest.raises(ValueError, match="controls"):
        viz.live_explorer(plot, {})
    with pytest.raises(TypeError, match="controls"):
        viz.live_explorer(plot, {"rho": 3.0})


# ------------------------------------------------------------------ toy plots and source


def test_toy_frame_size_and_no_leak():
    for optimizer, rho in (("sgd", 500.0), ("adam", 10.0)):
        fig = toy_plots.toy_frame(rho, optimizer, lr=0.05, n_steps=50)
        assert isinstance(fig, Figure)
        assert png_size(frames.figure_to_png(fig)) == (480, 280)
    assert plt.get_fignums() == []


def test_reused_toy_frame_draws_the_same_pixels_as_a_fresh_one():
    reused = toy_plots.ToyFrame()
    settings = [(500.0, "sgd", 0.05, 40), (10.0, "momentum", 0.05, 120), (2000.0, "adam", 0.01, 80)]
    for rho, optimizer, lr, n_steps in settings:  # the diverged frame first: its label must go away
        fig = reused(rho, optimizer, lr, n_steps)
        assert fig is reused.figure
        ax_theta, _ = reused.axes
        result = toy.simulate(rho, optimizer, lr, n_steps)
        np.testing.assert_array_equal(ax_theta.lines[0].get_ydata(), result.theta)
        assert ax_theta.get_xlim() == (0.0, float(n_steps))
        fresh = toy_plots.toy_frame(rho, optimizer, lr, n_steps)
        assert frames.figure_to_png(fig) == frames.figure_to_png(fresh)
    assert plt.get_fignums() == []


def test_plot_fixed_point_vs_rho_returns_the_closed_forms():
    fig, ax = frames.new_figure()
    data = toy_plots.plot_fixed_point_vs_rho(ax, [1.0, 10.0, 500.0])
    np.testing.assert_allclose(data["theta_star"], [toy.fixed_point(r) for r in (1.0, 10.0, 500.0)])
    np.testing.assert_allclose(data["loss2"], 0.5 * (data["theta_star"] + 1) ** 2)
    assert ax.get_xscale() == "log"
    with pytest.raises(ValueError, match="rhos"):
        toy_plots.plot_fixed_point_vs_rho(ax, [0.0])


def test_show_source_is_a_highlighted_copy_of_the_package_code():
    markdown = viz.show_source(toy.fixed_point)
    text = markdown.data
    assert text.startswith("```python\n") and text.rstrip().endswith("```")
    assert "def fixed_point(rho: float) -> float:" in text
    assert "(rho - 1.0) / (rho + 1.0)" in text


def test_widgets_module_exports():
    assert set(viz_widgets.__all__) >= {"frame_explorer", "frame_explorer_2d", "live_explorer"}


def test_palette_frames_are_smaller_valid_pngs():
    full = frames.figure_to_png(toy_plots.toy_frame(10.0, "momentum"))
    small = frames.figure_to_png(toy_plots.toy_frame(10.0, "momentum"), colors=64)
    assert png_size(small) == png_size(full) == (480, 280)
    assert len(small) < len(full) / 2
    from PIL import Image
    import io

    with Image.open(io.BytesIO(small)) as image:
        assert image.mode == "P" and len(image.getcolors()) <= 64
    with pytest.raises(ValueError, match="colors"):
        frames.figure_to_png(frames.new_figure()[0], colors=1)
