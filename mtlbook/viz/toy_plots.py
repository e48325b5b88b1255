"""Plots for the toy two-task simulator of chapter 1 (:mod:`mtlbook.toy`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .. import toy
from .frames import new_figure

__all__ = ["plot_theta", "plot_fixed_point_vs_rho", "ToyFrame", "toy_frame"]

# Fixed axis ranges so that frames for different settings can be compared by eye.
THETA_LIMITS = (-1.3, 1.7)
LOSS_LIMITS = (1e-5, 1e4)
TASK_COLORS = ("tab:blue", "tab:orange")
_SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _power_of_ten_label(value: float, _position: int) -> str:
    """'10⁻³' in Unicode: log-axis labels without mathtext, which is slow to parse."""
    exponent = int(round(np.log10(value))) if value > 0 else 0
    return "10" + str(exponent).translate(_SUPERSCRIPTS)


def plot_theta(ax: Axes, result: toy.ToyResult, label: str | None = None, color: str | None = None,
               show_fixed_point: bool = True, mark_divergence: bool = True) -> None:
    """theta against the step for one run (fixed y-range ``THETA_LIMITS``), with the fixed
    point as a dashed line; with ``mark_divergence`` a diverged run is labelled with the step
    where it left the bound (turn it off when several runs share the axes)."""
    steps = np.arange(result.n_steps + 1)
    (line,) = ax.plot(steps, result.theta, color=color, label=label, lw=1.6)
    if show_fixed_point:
        ax.axhline(result.fixed_point, color="k", ls="--", lw=0.9, label="θ*")
    if result.diverged and mark_divergence:
        ax.text(0.97, 0.04, f"diverged at step {result.diverged_at}", transform=ax.transAxes,
                ha="right", va="bottom", color="tab:red", fontsize=8)
    ax.set_xlim(0, result.n_steps)
    ax.set_ylim(*THETA_LIMITS)
    ax.set_xlabel("step")
    ax.set_ylabel("θ")


class ToyFrame:
    """Draws explorer frames for the toy: trajectory (left), both task losses (right).

    The figure and its artists are built once; each call runs
    ``toy.simulate(rho, optimizer, lr, n_steps, theta0)`` and only updates line data and
    texts, which roughly halves the cost of a redraw compared with building a new figure (the
    live explorer's budget is 100 ms). Every call returns the same pyplot-free figure, so
    render it (e.g. ``figure_to_png``) before the next call. Dashed lines mark the fixed point
    and both losses there; axis ranges are fixed so that frames compare by eye.
    """

    def __init__(self, width_px: int = 480, height_px: int = 280, dpi: int = 80) -> None:
        fig, (ax_theta, ax_loss) = new_figure(width_px, height_px, dpi, ncols=2)
        fig.subplots_adjust(left=0.12, right=0.98, bottom=0.15, top=0.88, wspace=0.32)
        (self._theta_line,) = ax_theta.plot([], [], color="tab:green", lw=1.6)
        self._theta_star = ax_theta.axhline(0.0, color="k", ls="--", lw=0.9, label="θ*")
        self._diverged = ax_theta.text(0.97, 0.04, "", transform=ax_theta.transAxes, ha="right",
                                       va="bottom", color="tab:red", fontsize=8)
        self._loss_stars = [ax_loss.axhline(1.0, color=c, ls="--", lw=0.8) for c in TASK_COLORS]
        self._loss_lines = [ax_loss.plot([], [], color=c, lw=1.6, label=name)[0]
                            for c, name in zip(TASK_COLORS, ("L₁", "L₂"))]
        ax_theta.set_ylim(*THETA_LIMITS)
        ax_theta.set_xlabel("step")
        ax_theta.set_ylabel("θ")
        ax_theta.legend(loc="upper left", fontsize=8, frameon=False)
        ax_loss.set_yscale("log")
        ax_loss.yaxis.set_major_formatter(FuncFormatter(_power_of_ten_label))
        ax_loss.set_ylim(*LOSS_LIMITS)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_loss.legend(loc="upper right", fontsize=8, frameon=False, ncols=2)
        # Unicode instead of mathtext in every text that changes: mathtext parsing is the
        # slowest part of a redraw.
        self._title = fig.suptitle("", fontsize=9)
        self.figure, self.axes = fig, (ax_theta, ax_loss)

    def __call__(self, rho: float, optimizer: str = "sgd", lr: float = 0.05, n_steps: int = 150,
                 theta0: float = 0.0) -> Figure:
        result = toy.simulate(rho, optimizer, lr, n_steps, theta0)
        steps = np.arange(result.n_steps + 1)
        self._theta_line.set_data(steps, result.theta)
        self._theta_star.set_ydata([result.fixed_point] * 2)
        self._diverged.set_text(f"diverged at step {result.diverged_at}" if result.diverged else "")
        loss_stars = toy.losses(result.fixed_point, result.rho)
        for line, star_line, values, star in zip(self._loss_lines, self._loss_stars,
                                                 (result.loss1, result.loss2), loss_stars):
            line.set_data(steps, values)
            star_line.set_ydata([star] * 2)
        for ax in self.axes:
            ax.set_xlim(0, result.n_steps)
        final = "diverged" if result.diverged else f"θ after {result.n_steps} steps = {result.final_theta:.3f}"
        self._title.set_text(f"ρ = {result.rho:g}, {optimizer}, lr = {result.lr:g}: {final}"
                             f"  (θ* = {result.fixed_point:.3f})")
        return self.figure


def toy_frame(rho: float, optimizer: str = "sgd", lr: float = 0.05, n_steps: int = 150,
              theta0: float = 0.0, width_px: int = 480, height_px: int = 280, dpi: int = 80) -> Figure:
    """One explorer frame in a new pyplot-free figure (see :class:`ToyFrame`; for repeated
    redraws, reuse one ``ToyFrame`` instead)."""
    return ToyFrame(width_px, height_px, dpi)(rho, optimizer, lr, n_steps, theta0)


def plot_fixed_point_vs_rho(ax: Axes, rhos: Sequence[float] | np.ndarray | None = None) -> dict[str, Any]:
    """theta*, L1(theta*) and L2(theta*) against rho on a log x-axis.

    Returns the plotted arrays (``rho``, ``theta_star``, ``loss1``, ``loss2``)."""
    rho = np.geomspace(1.0, 2000.0, 200) if rhos is None else np.asarray(rhos, dtype=float)
    if rho.ndim != 1 or rho.size == 0 or not np.all(np.isfinite(rho) & (rho > 0)):
        raise ValueError("rhos must be a non-empty 1-D array of finite numbers > 0")
    theta_star = (rho - 1.0) / (rho + 1.0)
    loss1, loss2 = toy.losses(theta_star, rho)
    ax.plot(rho, theta_star, color="k", lw=1.8, label=r"$\theta^\star$")
    ax.plot(rho, loss1, color=TASK_COLORS[0], lw=1.6, label=r"$L_1(\theta^\star)$")
    ax.plot(rho, loss2, color=TASK_COLORS[1], lw=1.6, label=r"$L_2(\theta^\star)$")
    ax.axhline(0.5, color="0.5", ls=":", lw=1.0, label=r"$L_1 = L_2$ at $\rho=1$")
    ax.set_xscale("log")
    ax.set_xlabel(r"$\rho$ (task-1 weight)")
    ax.legend(fontsize=8, frameon=False)
    return {"rho": rho, "theta_star": theta_star, "loss1": loss1, "loss2": loss2}
