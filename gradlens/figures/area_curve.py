"""Figure A2: mean important-region area against the gradient threshold, one curve per detector."""

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
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.9))
    else:
        fig = ax.figure
    for k, (label, rows) in enumerate(table.groupby("label", sort=False)):
        rows = rows.sort_values("threshold")
        ax.plot(rows["threshold_normalized"], rows["area_normalized"], label=label,
                color=style.CURVE_COLOURS[k % len(style.CURVE_COLOURS)], linewidth=1.8)
    if scale == "log":
        ax.set_xscale("log")
    else:
        ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("gradient threshold t (normalised)")
    ax.set_ylabel("mean important-region area (normalised)")
    n = int(table["num_images"].iloc[0]) if len(table) else 0
    ax.set_title(title or f"Important-region area vs threshold ({n} images)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def save_area_curve_figure(table: pd.DataFrame, stem: str | os.PathLike, scale: str = "linear", title: str | None = None) -> list:
    """Write ``stem.png`` and ``stem.pdf``."""
    import matplotlib.pyplot as plt

    fig = plot_area_curve(table, scale=scale, title=title)
    try:
        return style.save(fig, stem)
    finally:
        plt.close(fig)

