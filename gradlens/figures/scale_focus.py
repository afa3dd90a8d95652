"""Scale and focus in pictures: Figure A2's companion (how concentrated each detector's maps are, whatever their
scale, and what the paper's area difference is made of) and the report's scale-against-improvement scatter.

The companion, left: the mean mass-area curve of each detector (the fraction of pixels, largest first, that holds a
fraction p of a map's gradient mass) with its bootstrap band; a lower curve is a more concentrated map,
and multiplying a map by any constant leaves it unchanged. Right: A minus each baseline, the paper's
difference in area under the curve and its scale, focus and outside-the-grid parts with their intervals.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from gradlens.figures import style

PARTS = [("paper_auc", "ΔAUC (paper)"), ("scale_term", "scale"), ("focus_term", "focus"), ("outside_grid", "outside grid")]


def plot_mass_area(table: pd.DataFrame, ax=None):
    """The mean mass-area curves of a ``<name>_mass_area`` table, one line (and band) per ``label``."""
    with style.plain_text():
        return _plot_mass_area(table, ax)


def _plot_mass_area(table, ax):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.9))
    else:
        fig = ax.figure
    for k, (label, rows) in enumerate(table.groupby("label", sort=False)):
        rows = rows.sort_values("fraction")
        colour = style.CURVE_COLOURS[k % len(style.CURVE_COLOURS)]
        ax.plot(rows["fraction"], rows["mass_area"], color=colour, linewidth=1.8, label=style.literal(label))
        if rows["low"].notna().any():
            ax.fill_between(rows["fraction"], rows["low"], rows["high"], color=colour, alpha=0.2, linewidth=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction p of the gradient mass")
    ax.set_ylabel("fraction of pixels holding it (largest first)")
    n = int(table["num_images"].max()) if len(table) else 0
    ax.set_title(f"Mass-area curves, free of scale ({n} images)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def plot_decomposition(decomposition: pd.DataFrame, ax=None):
    """Bars of the paper's difference and its parts, one group per baseline, with their intervals."""
    with style.plain_text():
        return _plot_decomposition(decomposition, ax)


def _plot_decomposition(decomposition, ax):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.9))
    else:
        fig = ax.figure
    pairs = list(dict.fromkeys(decomposition["versus"]))
    width = 0.8 / max(1, len(pairs))
    x = np.arange(len(PARTS))
    for k, versus in enumerate(pairs):
        rows = decomposition[decomposition["versus"] == versus].set_index("quantity")
        values = np.array([rows.loc[q, "estimate"] if q in rows.index else np.nan for q, _ in PARTS], dtype=float)
        low = np.array([rows.loc[q, "low"] if q in rows.index else np.nan for q, _ in PARTS], dtype=float)
        high = np.array([rows.loc[q, "high"] if q in rows.index else np.nan for q, _ in PARTS], dtype=float)
        errors = np.vstack([values - low, high - values])
        errors = np.where(np.isfinite(errors), np.maximum(errors, 0.0), 0.0)
        first = rows.iloc[0]
        ax.bar(x + (k - (len(pairs) - 1) / 2) * width, values, width, yerr=errors, capsize=3,
               color=style.CURVE_COLOURS[(k + 1) % len(style.CURVE_COLOURS)],
               label=style.literal(f"{first['label']} − {first['versus_label']}"))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, [name for _, name in PARTS])
    ax.set_ylabel("difference of area under the log curve")
    ax.set_title("ΔAUC = scale + focus + outside grid (per image, paired)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def save_mass_area_figure(table: pd.DataFrame, stem: str | os.PathLike, decomposition: pd.DataFrame | None = None) -> list:
    """Write ``stem.png`` and ``stem.pdf``: the mass-area curves, and beside them the decomposition when given."""
    import matplotlib.pyplot as plt

    if decomposition is not None and len(decomposition):
        with style.plain_text():
            fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 3.9))
        plot_mass_area(table, ax=left)
        plot_decomposition(decomposition, ax=right)
    else:
        fig = plot_mass_area(table)
    try:
        return style.save(fig, stem)
    finally:
        plt.close(fig)


def plot_scale_against_improvement(points: pd.DataFrame, ax=None):
    """Each image's scale ratio A / baseline (mean magnitudes, log axis) against its quality improvement.

    ``points`` has ``improvement``, ``scale_ratio`` and ``versus_label`` (one colour per baseline). The
    selection picks images where A's detections are better, so A's loss, and with it its gradients, tend
    to be smaller there: points below 1 on the right are that effect.
    """
    with style.plain_text():
        return _plot_scale_against_improvement(points, ax)


def _plot_scale_against_improvement(points, ax):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.9))
    else:
        fig = ax.figure
    for k, (label, rows) in enumerate(points.groupby("versus_label", sort=False)):
        rows = rows[np.isfinite(rows["scale_ratio"]) & (rows["scale_ratio"] > 0) & np.isfinite(rows["improvement"])]
        ax.scatter(rows["improvement"], rows["scale_ratio"], s=18, alpha=0.8,
                   color=style.CURVE_COLOURS[(k + 1) % len(style.CURVE_COLOURS)], label=style.literal(f"A / {label}"))
    from matplotlib.ticker import FuncFormatter

    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, not 5x10^-1: a ratio reads as a number
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("quality improvement of A (selection)")
    ax.set_ylabel("scale ratio: A's mean |gradient| / baseline's")
    ax.set_title("Gradient scale against improvement, per image", fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(points):
        ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def save_scale_against_improvement(points: pd.DataFrame, stem: str | os.PathLike) -> list:
    """Write ``stem.png``: :func:`plot_scale_against_improvement`."""
    import matplotlib.pyplot as plt

    fig = plot_scale_against_improvement(points)
    try:
        return style.save(fig, stem, formats=("png",))
    finally:
        plt.close(fig)
