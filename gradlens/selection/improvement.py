"""Improvement of A over the B models, and the deterministic top-K.

Improvement = quality(A) − quality(B); with several B models the minimum over
them (A must beat every baseline). Ranking is by improvement, largest first,
ties to the smaller image id, so the same scores always give the same selection.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from gradlens.errors import GradlensError

DEFAULT_TOP = 1000


def quality_column(role: str) -> str:
    return f"quality_{role}"


def b_roles(count: int) -> list[str]:
    """Role names of the baselines: ``b`` for one, ``b1``, ``b2``, … for several."""
    return ["b"] if count == 1 else [f"b{i}" for i in range(1, count + 1)]


def select_images(
    images_a: pd.DataFrame,
    images_b: Mapping[str, pd.DataFrame] | list[pd.DataFrame] | pd.DataFrame,
    top: int | None = DEFAULT_TOP,
) -> pd.DataFrame:
    """Rank images by the improvement of A over the B models and keep the top ``top`` (all if None).

    Each input is a per-image quality table (columns ``image_id``, ``quality``),
    such as ``quality_scores(...).images``. Only images scored for every model
    are ranked. Returns ``rank, image_id, quality_a, quality_b…, improvement``
    and, with several B models, ``improvement_b1…`` and ``closest_b`` (the
    baseline that set the minimum).
    """
    if isinstance(images_b, pd.DataFrame):
        images_b = [images_b]
    if not isinstance(images_b, Mapping):
        images_b = dict(zip(b_roles(len(images_b)), images_b))
    if not images_b:
        raise GradlensError("Selection needs at least one B model to compare A against.")
    if top is not None and top < 1:
        raise GradlensError(f"--top must be at least 1 (got {top}).")

    def column(table: pd.DataFrame, role: str) -> pd.DataFrame:
        if table["image_id"].duplicated().any():
            raise GradlensError(f"The quality table of model {role} has duplicate image ids.")
        return table[["image_id", "quality"]].rename(columns={"quality": quality_column(role)})

    merged = column(images_a, "a")
    for role, table in images_b.items():
        merged = merged.merge(column(table, role), on="image_id", how="inner", validate="one_to_one")

    roles = list(images_b)
    qa = merged[quality_column("a")].to_numpy(np.float64)
    per_b = np.stack([qa - merged[quality_column(r)].to_numpy(np.float64) for r in roles], axis=1)
    merged["improvement"] = per_b.min(axis=1)
    if len(roles) > 1:
        for i, role in enumerate(roles):
            merged[f"improvement_{role}"] = per_b[:, i]
        merged["closest_b"] = [roles[i] for i in per_b.argmin(axis=1)]

    # lexsort: last key is primary -> improvement descending, then image id ascending.
    order = np.lexsort((merged["image_id"].to_numpy(), -merged["improvement"].to_numpy()))
    ranked = merged.iloc[order].reset_index(drop=True)
    if top is not None:
        ranked = ranked.head(top)
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1, dtype=np.int64))
    return ranked
