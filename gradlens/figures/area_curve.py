"""Figure A2: mean important-region area against the gradient threshold, one curve per detector.

With bootstrap columns in the table each curve carries its band; with a
paired table a second panel shows A minus each baseline with its interval.
"""

from __future__ import annotations

import os

import pandas as pd

from gradlens.figures import style


def plot_area_curve(table: pd.DataFrame, scale: str = "linear", title: str | None = None, ax=None):
    """Draw the normalised curves of an ``area_curve`` table (one line per ``label``) on ``ax``.

    Axes follow DESIGN: the threshold divided by the grid's largest
    threshold, the area divided by the largest mean area among the curves.
    Returns the figure.
    """
    with style.plain_text():  # labels are drawn as written, never as math text or LaTeX
        return _plot_area_curve(table, scale, title, ax)


def _plot_area_curve(table, scale, title, ax):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.9))
    else:
        fig = ax.figure
    for k, (label, rows) in enumerate(table.groupby("label", sort=False)):
        rows = rows.sort_values("threshold")
        colour = style.CURVE_COLOURS[k % len(style.CURVE_COLOURS)]
        ax.plot(rows["threshold_normalized"], rows["area_normalized"], label=style.literal(label), color=colour, linewidth=1.8)
        if "area_low_normalized" in rows and rows["area_low_normalized"].notna().any():
            ax.fill_between(rows["threshold_normalized"], rows["area_low_normalized"], rows["area_high_normalized"],
                            color=colour, alpha=0.2, linewidth=0)
    if scale == "log":
        ax.set_xscale("log")
    else:
        ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("gradient threshold t (normalised)")
    ax.set_ylabel("mean important-region area (normalised)")
    n = int(table["num_images"].iloc[0]) if len(table) else 0
    ax.set_title(style.literal(title) if title else f"Important-region area vs threshold ({n} images)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def plot_paired_difference(paired: pd.DataFrame, table: pd.DataFrame, scale: str = "linear", ax=None):
    """A minus each baseline per threshold, in the same normalisation as the curves, with its interval."""
    with style.plain_text():
        return _plot_paired_difference(paired, table, scale, ax)


def _plot_paired_difference(paired, table, scale, ax):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.9))
    else:
        fig = ax.figure
    peak = float(table["area"].max()) or 1.0
    t_top = float(table["threshold"].max()) or 1.0
    rows_all = paired[paired["quantity"] == "area"]
    roles = list(dict.fromkeys(table["role"]))  # the curves' order, so each baseline keeps its colour
    for versus, rows in rows_all.groupby("versus", sort=False):
        k = roles.index(versus) if versus in roles else 1
        colour = style.CURVE_COLOURS[k % len(style.CURVE_COLOURS)]
        rows = rows.sort_values("threshold")
        t = rows["threshold"] / t_top
        ax.plot(t, rows["difference"] / peak, color=colour, linewidth=1.6,
                label=style.literal(f"{rows['label'].iloc[0]} − {rows['versus_label'].iloc[0]}"))
        if rows["low"].notna().any():
            ax.fill_between(t, rows["low"] / peak, rows["high"] / peak, color=colour, alpha=0.2, linewidth=0)
    ax.axhline(0.0, color="black", linewidth=0.8)
    if scale == "log":
        ax.set_xscale("log")
    else:
        ax.set_xlim(0, 1)
    ax.set_xlabel("gradient threshold t (normalised)")
    ax.set_ylabel("paired difference of areas (normalised)")
    ax.set_title("A minus baseline, paired per image (bootstrap band)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def save_area_curve_figure(table: pd.DataFrame, stem: str | os.PathLike, scale: str = "linear", title: str | None = None,
                           paired: pd.DataFrame | None = None) -> list:
    """Write ``stem.png`` and ``stem.pdf``: the curves, and beside them the paired differences when given."""
    import matplotlib.pyplot as plt

    if paired is not None and len(paired) and (paired["quantity"] == "area").any():
        with style.plain_text():
            fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 3.9))
        plot_area_curve(table, scale=scale, title=title, ax=left)
        plot_paired_difference(paired, table, scale=scale, ax=right)
    else:
        fig = plot_area_curve(table, scale=scale, title=title)
    try:
        return style.save(fig, stem)
    finally:
        plt.close(fig)

