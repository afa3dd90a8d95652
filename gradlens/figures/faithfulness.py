"""Faithfulness in pictures: deletion and insertion curves, and the randomisation check.

The curves figure has two panels, deletion (left) and insertion (right): each model's mean quality over
the selected images against the fraction q of pixels deleted (or restored), solid when the pixels go in
the order of the model's own map, dashed in a random order, with bootstrap bands. A map the detector
needs makes the solid deletion curve fall below the dashed one, and the solid insertion curve rise above it.

The randomisation figure: each model's median Spearman correlation and SSIM between its trained maps and
the maps of its cascade of re-initialised copies (head first), with interquartile bands.
"""

from __future__ import annotations

import os

import pandas as pd

from gradlens.figures import style


def plot_faithfulness(curves: pd.DataFrame, axes=None, metric: str = "quality"):
    """Deletion and insertion curves of a ``<name>_curves`` table (``metric``: quality or loss)."""
    with style.plain_text():
        return _plot_faithfulness(curves, axes, metric)


def _plot_faithfulness(curves, axes, metric):
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.9), sharey=True)
    else:
        fig = axes[0].figure
    n = int(curves["num_images"].max()) if len(curves) else 0
    for ax, mode in zip(axes, ("deletion", "insertion")):
        for k, (label, rows) in enumerate(curves[curves["mode"] == mode].groupby("label", sort=False)):
            colour = style.CURVE_COLOURS[k % len(style.CURVE_COLOURS)]
            for order, dash in (("map", "-"), ("random", "--")):
                line = rows[rows["order"] == order].sort_values("q")
                if not len(line):
                    continue
                ax.plot(line["q"], line[metric], dash, color=colour, linewidth=1.8 if order == "map" else 1.3,
                        label=f"{style.literal(label)}, {'own map' if order == 'map' else 'random'} order")
                if line[f"{metric}_low"].notna().any():
                    ax.fill_between(line["q"], line[f"{metric}_low"], line[f"{metric}_high"], color=colour,
                                    alpha=0.15 if order == "map" else 0.08, linewidth=0)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, float(curves["q"].max()) if len(curves) else 1)
        ax.set_xlabel(f"fraction q of the pixels {'deleted' if mode == 'deletion' else 'restored'} (top first)")
        ax.set_title(f"{mode.capitalize()} ({n} images)", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("mean image quality" if metric == "quality" else "mean total detection loss")
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def save_faithfulness_figure(curves: pd.DataFrame, stem: str | os.PathLike) -> list:
    """Write ``stem.png`` and ``stem.pdf``: the deletion and insertion curves of quality."""
    return style.save_and_close(plot_faithfulness(curves), stem)


def plot_randomisation(summary: pd.DataFrame, axes=None):
    """Median Spearman correlation and SSIM against the number of re-initialised parts, per model."""
    with style.plain_text():
        return _plot_randomisation(summary, axes)


def _plot_randomisation(summary, axes):
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.9), sharey=True)
    else:
        fig = axes[0].figure
    for ax, measure, title in zip(axes, ("spearman", "ssim"), ("Spearman rank correlation", "SSIM")):
        names: dict[int, list[str]] = {}  # models' parts at each position (architectures differ in stages)
        for k, (label, rows) in enumerate(summary.groupby("label", sort=False)):
            rows = rows.sort_values("randomised")
            colour = style.CURVE_COLOURS[k % len(style.CURVE_COLOURS)]
            x = rows["randomised"].to_numpy()
            ax.plot(x, rows[f"{measure}_median"], "o-", color=colour, linewidth=1.6, label=style.literal(label))
            ax.fill_between(x, rows[f"{measure}_q25"], rows[f"{measure}_q75"], color=colour, alpha=0.15, linewidth=0)
            for position, step in zip(x, rows["step"]):
                names.setdefault(int(position), [])
                if step not in names[int(position)]:
                    names[int(position)].append(str(step))
        ax.axhline(0.0, color="black", linewidth=0.6)
        positions = sorted(names)
        ax.set_xticks(positions)
        ax.set_xticklabels([("+ " if p > 1 else "") + style.literal(" / ".join(names[p])) for p in positions],
                           rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("re-initialised, cumulatively from the top")
        ax.set_title(f"{title} with the trained model's map", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("median over images (band: quartiles)")
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def save_randomisation_figure(summary: pd.DataFrame, stem: str | os.PathLike) -> list:
    """Write ``stem.png`` and ``stem.pdf``: the randomisation check's medians per re-initialised part."""
    return style.save_and_close(plot_randomisation(summary), stem)
