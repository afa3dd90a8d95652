"""Deletion and insertion curves over the selection, their areas, and the paired comparisons.

From the per-image rows (:data:`TABLE_COLUMNS`, one per image, model, mode, order and q):

- **curves**: per model, mode, order and q, the mean quality and mean loss over the images, with a
  percentile bootstrap band (the images resampled; the same resamples for every curve);
- **areas** (:func:`faithfulness_areas`): each model's mean area with its band;
- **area under a curve** of an image: the trapezoidal area under its quality (or loss) against q, divided
  by the grid's span (so it is the mean over q in [0, q_max], in the quality's own units). Deletion by a
  faithful map *lowers* the quality fast (a small area); insertion *raises* it fast (a large area);
- **paired comparisons** (:data:`PAIRED_COLUMNS`): for each model, its own map's order minus the random
  order, image by image, at every q and on the areas (the test of faithfulness: does the model need the
  pixels its map ranks first more than any pixels?); and A minus each baseline at every q and on the
  areas, for each order. Each has its bootstrap interval and the two-sided Wilcoxon signed-rank p-value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradlens.regions.statistics import bootstrap_mean, paired_difference, resample_counts

TABLE_COLUMNS = ["image_id", "rank", "role", "label", "mode", "order", "q", "quality", "loss", "detections"]
CURVE_COLUMNS = ["role", "label", "mode", "order", "q", "quality", "quality_low", "quality_high", "loss", "loss_low",
                 "loss_high", "num_images"]
PAIRED_COLUMNS = ["comparison", "role", "label", "versus", "versus_label", "mode", "order", "metric", "q", "estimate",
                  "low", "high", "p_value", "num_images"]
METRICS = ("quality", "loss")
HEADLINE_Q = 0.1  # the sentence's point: the top 10 % of the pixels by the map against a random 10 %
ALPHA = 0.05  # without intervals (--bootstrap 0), a difference counts when its Wilcoxon p-value is below this
AREA_COLUMNS = ["role", "label", "mode", "order", "metric", "area", "low", "high", "num_images"]


def per_image(table: pd.DataFrame, role: str, mode: str, order: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``[images, q]`` values of one model, mode and order (images in selection order), and the q grid."""
    rows = table[(table["role"] == role) & (table["mode"] == mode) & (table["order"] == order)]
    wide = rows.pivot(index="rank", columns="q", values=metric).sort_index()
    return wide.to_numpy(np.float64), wide.columns.to_numpy(np.float64)


def area_under(values: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Trapezoidal area under each row against ``q``, divided by the span of ``q``."""
    span = q[-1] - q[0]
    return ((values[:, 1:] + values[:, :-1]) / 2 * np.diff(q)).sum(axis=1) / span


def faithfulness_curves(table: pd.DataFrame, bootstrap: int, seed: int, level: float) -> pd.DataFrame:
    """Mean quality and loss per model, mode, order and q, with bootstrap bands (:data:`CURVE_COLUMNS`)."""
    frames = []
    counts = None
    for (role, label), _ in table.groupby(["role", "label"], sort=False):
        for mode in table["mode"].unique():
            for order in table["order"].unique():
                bands = {}
                for metric in METRICS:
                    values, q = per_image(table, role, mode, order, metric)
                    if counts is None and bootstrap > 0 and len(values) >= 2:
                        counts = resample_counts(len(values), bootstrap, seed)
                    bands[metric] = bootstrap_mean(values, bootstrap, seed, level, counts=counts)
                frames.append(pd.DataFrame({
                    "role": role, "label": label, "mode": mode, "order": order, "q": q,
                    "quality": bands["quality"].mean, "quality_low": bands["quality"].low,
                    "quality_high": bands["quality"].high, "loss": bands["loss"].mean, "loss_low": bands["loss"].low,
                    "loss_high": bands["loss"].high, "num_images": bands["quality"].num_images,
                }))  # fmt: skip
    return pd.concat(frames, ignore_index=True).reindex(columns=CURVE_COLUMNS)


def faithfulness_areas(table: pd.DataFrame, bootstrap: int, seed: int, level: float) -> pd.DataFrame:
    """Each model's mean area under its curves (per mode, order and metric) with a bootstrap band
    (:data:`AREA_COLUMNS`): how fast its quality falls (deletion) or rises (insertion) over the whole grid."""
    rows = []
    counts = None
    for (role, label), _ in table.groupby(["role", "label"], sort=False):
        for mode in table["mode"].unique():
            for order in table["order"].unique():
                for metric in METRICS:
                    values, q = per_image(table, role, mode, order, metric)
                    areas = area_under(values, q)
                    if counts is None and bootstrap > 0 and len(areas) >= 2:
                        counts = resample_counts(len(areas), bootstrap, seed)
                    band = bootstrap_mean(areas[:, None], bootstrap, seed, level,
                                          counts=counts if counts is not None and len(areas) == counts.shape[1] else None)
                    rows.append({"role": role, "label": label, "mode": mode, "order": order, "metric": metric,
                                 "area": float(band.mean[0]), "low": float(band.low[0]), "high": float(band.high[0]),
                                 "num_images": band.num_images})
    return pd.DataFrame(rows, columns=AREA_COLUMNS)


def _paired_rows(base: dict, a: np.ndarray, b: np.ndarray, q: np.ndarray, bootstrap: int, seed: int,
                 level: float) -> list[dict]:
    rows = []
    for position, (x, y) in enumerate([(a, b), (area_under(a, q)[:, None], area_under(b, q)[:, None])]):
        d = paired_difference(x, y, bootstrap, seed, level)
        grid = q if position == 0 else [np.nan]
        for k, point in enumerate(grid):
            rows.append({**base, "q": float(point), "estimate": float(d.band.mean[k]), "low": float(d.band.low[k]),
                         "high": float(d.band.high[k]), "p_value": float(d.p_value[k]), "num_images": d.band.num_images})
    return rows


def faithfulness_paired(table: pd.DataFrame, bootstrap: int, seed: int, level: float) -> pd.DataFrame:
    """Map order minus random order per model, and A minus each baseline per order (:data:`PAIRED_COLUMNS`);
    ``q`` NaN marks the area under the curve."""
    models = list(dict.fromkeys(zip(table["role"], table["label"])))
    modes = list(table["mode"].unique())
    rows = []
    for role, label in models:
        for mode in modes:
            for metric in METRICS:
                a, q = per_image(table, role, mode, "map", metric)
                b, _ = per_image(table, role, mode, "random", metric)
                base = {"comparison": "map - random", "role": role, "label": label, "versus": role,
                        "versus_label": label, "mode": mode, "order": "map", "metric": metric}
                rows += _paired_rows(base, a, b, q, bootstrap, seed, level)
    (role_a, label_a), baselines = models[0], models[1:]
    for role_b, label_b in baselines:
        for mode in modes:
            for order in ("map", "random"):
                for metric in METRICS:
                    a, q = per_image(table, role_a, mode, order, metric)
                    b, _ = per_image(table, role_b, mode, order, metric)
                    base = {"comparison": "a - baseline", "role": role_a, "label": label_a, "versus": role_b,
                            "versus_label": label_b, "mode": mode, "order": order, "metric": metric}
                    rows += _paired_rows(base, a, b, q, bootstrap, seed, level)
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def _row(paired: pd.DataFrame, **where) -> pd.Series | None:
    mask = np.ones(len(paired), dtype=bool)
    for column, value in where.items():
        if isinstance(value, float) and np.isnan(value):
            mask &= paired[column].isna().to_numpy()
        else:
            mask &= (paired[column] == value).to_numpy()
    rows = paired[mask]
    return rows.iloc[0] if len(rows) else None


def _interval(row: pd.Series) -> str:
    if np.isnan(row["low"]):
        return f"{row['estimate']:+.3f}, p = {row['p_value']:.2g}"
    return f"{row['estimate']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}], p = {row['p_value']:.2g}"


def faithfulness_sentences(curves: pd.DataFrame, paired: pd.DataFrame, q: float = HEADLINE_Q) -> list[str]:
    """One sentence per model: its quality after deleting the top ``q`` of the pixels by its own map against a
    random ``q`` (the nearest q of the grid), and whether the difference is clear."""
    grid = np.sort(curves["q"].unique())
    grid = grid[grid > 0]  # q = 0 deletes nothing
    point = float(grid[np.argmin(np.abs(grid - q))]) if len(grid) else q
    sentences = []
    for (role, label), _ in curves.groupby(["role", "label"], sort=False):
        def mean(order: str, at: float) -> float:
            row = curves[(curves["role"] == role) & (curves["mode"] == "deletion") & (curves["order"] == order)
                         & (curves["q"] == at)]
            return float(row["quality"].iloc[0]) if len(row) else float("nan")

        diff = _row(paired, comparison="map - random", role=role, mode="deletion", metric="quality", q=point)
        start, by_map, by_random = mean("map", 0.0), mean("map", point), mean("random", point)
        text = (f"{label} ({role}): deleting the top {point:.0%} of the pixels by its own map takes its mean quality "
                f"from {start:.3f} to {by_map:.3f}, a random {point:.0%} to {by_random:.3f}")
        if diff is None:
            sentences.append(text + ".")
            continue
        if np.isnan(diff["low"]) or np.isnan(diff["high"]):  # no interval (--bootstrap 0): the sign and the p-value
            below = diff["estimate"] < 0 and diff["p_value"] < ALPHA
            above = diff["estimate"] > 0 and diff["p_value"] < ALPHA
        else:
            below, above = diff["high"] < 0, diff["low"] > 0
        text += f" (map - random {_interval(diff)})"
        if below:
            text += ": the detector needs the region its map ranks first."
        elif above:
            text += ": the map's top pixels matter less than random ones."
        else:
            text += ": no clear difference from random pixels."
        sentences.append(text)
    return sentences
