"""Chapter 3's figures: block diagrams of Shared-Bottom, MMoE and PLE, and a gate heatmap.

pandas and matplotlib are imported inside the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["draw_architectures", "plot_gate_utilisation"]


def plot_gate_utilisation(table: "pd.DataFrame", ax: "Axes", *, title: str | None = None, annotate: bool = True) -> "Axes":
    """Heatmap of a :func:`gate_utilisation` table: one row per gate, one column per expert.

    Experts a gate cannot see (a task gate in PLE sees only the shared experts and its own)
    are left blank, so the picture also shows each architecture's wiring.
    """
    if not {"gate", "expert", "weight"} <= set(getattr(table, "columns", ())):
        raise ValueError("table must be a DataFrame with columns gate, expert, weight (see gate_utilisation)")
    gates = list(dict.fromkeys(table["gate"]))
    experts = list(dict.fromkeys(table["expert"]))
    # shared experts first, then the others in order of appearance
    experts = [e for e in experts if e.startswith("shared")] + [e for e in experts if not e.startswith("shared")]
    grid = np.full((len(gates), len(experts)), np.nan)
    for gate, expert, weight in zip(table["gate"], table["expert"], table["weight"]):
        grid[gates.index(gate), experts.index(expert)] = weight
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(experts)), experts, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(gates)), gates, fontsize=8)
    if annotate:
        for i in range(len(gates)):
            for j in range(len(experts)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if grid[i, j] > 0.6 else "white")  # fmt: skip
    if title:
        ax.set_title(title, fontsize=10)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    return ax


_COLORS = {"input": "#d9d9d9", "shared": "#9ecae1", "task_a": "#fdae6b", "task_b": "#a1d99b", "gate": "#fff7bc"}


def _box(ax: "Axes", x: float, y: float, w: float, h: float, text: str, kind: str) -> None:
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.05",
                                facecolor=_COLORS[kind], edgecolor="black", linewidth=0.8))  # fmt: skip
    ax.text(x, y, text, ha="center", va="center", fontsize=8)


def _arrow(ax: "Axes", start: tuple[float, float], end: tuple[float, float], dashed: bool = False) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={
        "arrowstyle": "->", "linewidth": 0.7, "color": "0.3", "linestyle": "--" if dashed else "-",
        "shrinkA": 2, "shrinkB": 2,
    })  # fmt: skip


def _draw_shared_bottom(ax: "Axes") -> None:
    _box(ax, 2.0, 0.5, 1.6, 0.5, "input x", "input")
    _box(ax, 2.0, 2.0, 2.2, 0.6, "shared bottom B", "shared")
    for x, kind, label in ((1.2, "task_a", "A"), (2.8, "task_b", "B")):
        _arrow(ax, (2.0, 2.3), (x, 4.1))
        _box(ax, x, 4.4, 1.0, 0.6, f"tower {label}", kind)
        _box(ax, x, 5.6, 0.8, 0.45, f"$y_{label}$", kind)
        _arrow(ax, (x, 4.7), (x, 5.38))
    _arrow(ax, (2.0, 0.75), (2.0, 1.7))


def _draw_mmoe(ax: "Axes") -> None:
    _box(ax, 2.0, 0.5, 1.6, 0.5, "input x", "input")
    for i, x in enumerate((0.9, 1.65, 2.4, 3.15)):
        _box(ax, x, 2.0, 0.62, 0.6, f"$E_{i + 1}$", "shared")
        _arrow(ax, (2.0, 0.75), (x, 1.7))
    for x, kind, label in ((1.2, "task_a", "A"), (2.8, "task_b", "B")):
        _box(ax, x, 3.2, 1.1, 0.45, f"gate $g_{label}$", "gate")
        _arrow(ax, (2.0, 0.75), (x + (0.6 if x < 2 else -0.6), 2.98), dashed=True)
        _box(ax, x, 4.4, 1.0, 0.6, f"tower {label}", kind)
        _box(ax, x, 5.6, 0.8, 0.45, f"$y_{label}$", kind)
        _arrow(ax, (x, 3.42), (x, 4.1))
        _arrow(ax, (x, 4.7), (x, 5.38))
    for x in (0.9, 1.65, 2.4, 3.15):
        for gx in (1.2, 2.8):
            _arrow(ax, (x, 2.3), (gx, 2.98))


def _draw_ple(ax: "Axes") -> None:
    _box(ax, 2.0, 0.35, 1.6, 0.4, "input x", "input")
    columns = ((0.75, "task_a", "$T_A$"), (2.0, "shared", "$S$"), (3.25, "task_b", "$T_B$"))
    for level, y in enumerate((1.45, 3.25)):
        for x, kind, label in columns:
            _box(ax, x, y, 0.8, 0.5, f"{label}$^{{({level})}}$", kind)
        gates = (("$g_A$", 0.75), ("$g_S$", 2.0), ("$g_B$", 3.25)) if level == 0 else (("$g_A$", 0.75), ("$g_B$", 3.25))
        for label, x in gates:
            _box(ax, x, y + 0.8, 0.7, 0.36, label, "gate")
        # task gate: own experts + shared; shared gate: every expert of the level
        _arrow(ax, (0.75, y + 0.25), (0.75, y + 0.62))
        _arrow(ax, (2.0, y + 0.25), (0.95, y + 0.62))
        _arrow(ax, (3.25, y + 0.25), (3.25, y + 0.62))
        _arrow(ax, (2.0, y + 0.25), (3.05, y + 0.62))
        if level == 0:
            for x in (0.75, 3.25):
                _arrow(ax, (x, y + 0.25), (2.0 + (x - 2.0) * 0.15, y + 0.62))
            _arrow(ax, (2.0, y + 0.25), (2.0, y + 0.62))
            for x, _, _ in columns:
                _arrow(ax, (x, y + 0.98), (x, 3.0))
        else:
            for x, kind, label in ((0.75, "task_a", "A"), (3.25, "task_b", "B")):
                _box(ax, x, 4.95, 1.0, 0.5, f"tower {label}", kind)
                _box(ax, x, 5.8, 0.8, 0.4, f"$y_{label}$", kind)
                _arrow(ax, (x, y + 0.98), (x, 4.7))
                _arrow(ax, (x, 5.2), (x, 5.6))
    for x, _, _ in columns:
        _arrow(ax, (2.0, 0.55), (x, 1.2))


def draw_architectures(fig: "Figure | None" = None) -> "Figure":
    """Block diagrams of Shared-Bottom, MMoE and a two-level PLE for two tasks A and B.

    Blue boxes are shared experts (their parameters are :math:`\\theta_s`), orange and green
    boxes belong to one task, yellow boxes are softmax gates (dashed arrow: the gate's input).
    Returns the figure (a new 3-panel one unless ``fig`` is given).
    """
    if fig is None:
        from mtlbook.viz.frames import new_figure

        fig, _ = new_figure(900, 380, ncols=3)
    axes = fig.axes if fig.axes else fig.subplots(1, 3)
    if len(axes) < 3:
        raise ValueError("fig must have at least three axes (or none)")
    for ax, draw, title in zip(axes, (_draw_shared_bottom, _draw_mmoe, _draw_ple), ("Shared-Bottom", "MMoE", "PLE (2 levels)")):
        draw(ax)
        ax.set_xlim(0.0, 4.0)
        ax.set_ylim(0.0, 6.2)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.92, bottom=0.01, wspace=0.05)
    return fig
