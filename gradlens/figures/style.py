"""Matplotlib set-up shared by the figures: a file backend (no screen needed) and the paper's colours."""

from __future__ import annotations

import contextlib
import os
import sys

import matplotlib


def _interactive_session() -> bool:
    """In IPython/Jupyter the user's backend (e.g. inline) must stay; elsewhere figures are only files."""
    shell = sys.modules.get("IPython")
    return bool(shell and getattr(shell, "get_ipython", lambda: None)())


if "MPLBACKEND" not in os.environ and not _interactive_session():
    matplotlib.use("Agg")  # no screen needed, and no window ever opens from a command

GT_COLOUR = "#e41a1c"  # red: human-annotated boxes (Figure A1)
DET_COLOUR = "#1f5bff"  # blue: each object's matched detection
CURVE_COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def literal(text) -> str:
    """``text`` (a label, a file name: anything read from a file) for matplotlib, drawn exactly as written.

    Matplotlib reads text between two ``$`` as math (``A $x^2$ \\frac`` would be parsed, and fail), so
    every ``$`` is escaped; an escaped ``$`` never starts math text, and a ``\\`` outside math is plain.
    """
    return str(text).replace("$", r"\$")


@contextlib.contextmanager
def plain_text():
    """Draw and save with matplotlib's own text engine: a user's ``text.usetex`` would hand labels to LaTeX."""
    with matplotlib.rc_context({"text.usetex": False}):
        yield


def save(fig, stem, formats=("png", "pdf"), dpi: int = 150) -> list:
    """Save ``fig`` as ``stem.<fmt>`` for each format, atomically; returns the paths."""
    from pathlib import Path

    from gradlens.fileio import atomic_path

    stem = Path(stem)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(path) as tmp, plain_text():
            # no creation date in the file: the same inputs give byte-identical figures
            metadata = {"CreationDate": None} if fmt == "pdf" else None
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
        paths.append(path)
    return paths


def save_and_close(fig, stem, formats=("png", "pdf")) -> list:
    """:func:`save`, then close the figure (a command draws many; each would stay in pyplot's memory)."""
    import matplotlib.pyplot as plt

    try:
        return save(fig, stem, formats)
    finally:
        plt.close(fig)
