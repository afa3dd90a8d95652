"""A against each baseline on the same images: bands on every curve, paired differences, metric summaries,
and the split of the paper's difference into scale and focus with its verdict.

Built on :mod:`gradlens.regions.statistics`: one set of image resamples is
drawn from the seed and shared by every model, curve and metric, so the
bands and intervals of one run are mutually consistent and reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradlens.regions.decomposition import DECOMPOSITION_COLUMNS, MASS_FRACTIONS, decompose, pair_terms, table_verdict
from gradlens.regions.per_image import SUMMARY_METRICS, ImageCurves
from gradlens.regions.statistics import bootstrap_mean, paired_difference, resample_counts

PAIRED_COLUMNS = ["role", "label", "versus", "versus_label", "quantity", "threshold_index", "threshold", "difference",
                  "low", "high", "p_value", "num_images"]
SUMMARY_COLUMNS = ["role", "label", "metric", "mean", "low", "high", "num_images"]


@dataclass
class CurveStatistics:
    bands: dict[str, tuple[np.ndarray, np.ndarray]]  # role -> (low, high) of the mean area per threshold
    paired: pd.DataFrame  # A minus each baseline: per threshold ("area") and per metric
    summary: pd.DataFrame  # per model and metric: mean and interval


def curve_statistics(per_image: list[ImageCurves], thresholds: np.ndarray, scale: str, bootstrap: int, seed: int,
                     level: float) -> CurveStatistics:
    """Bands for every model, A (the first) minus each other model, and every metric's mean with its interval."""
    n = per_image[0].areas.shape[0]
    counts = resample_counts(n, bootstrap, seed) if bootstrap > 0 else None
    bands, summary, paired = {}, [], []
    for c in per_image:
        band = bootstrap_mean(c.areas, bootstrap, seed, level, counts=counts)
        bands[c.role] = (band.low, band.high)
        for metric in SUMMARY_METRICS:
            b = bootstrap_mean(c.metrics[metric].to_numpy(dtype=np.float64), bootstrap, seed, level, counts=counts)
            summary.append({"role": c.role, "label": c.label, "metric": metric, "mean": float(b.mean),
                            "low": float(b.low), "high": float(b.high), "num_images": b.num_images})
    a = per_image[0]
    grid = np.asarray(thresholds, dtype=np.float64)
    for b in per_image[1:]:
        base = {"role": a.role, "label": a.label, "versus": b.role, "versus_label": b.label}
        curve = paired_difference(a.areas, b.areas, bootstrap, seed, level)
        paired.append(pd.DataFrame({
            **base, "quantity": "area", "threshold_index": np.arange(len(grid)), "threshold": grid,
            "difference": curve.band.mean, "low": curve.band.low, "high": curve.band.high, "p_value": curve.p_value,
            "num_images": curve.band.num_images,
        }))  # fmt: skip
        rows = []
        for metric in ["area_auc", "inside_auc", "outside_auc", "box_energy", "pointing_game"]:
            values_a = a.metrics[metric].to_numpy(dtype=np.float64)
            values_b = b.metrics[metric].to_numpy(dtype=np.float64)
            keep = ~(np.isnan(values_a) | np.isnan(values_b))  # an image counts where both are defined
            if not keep.any():
                continue
            d = paired_difference(values_a[keep], values_b[keep], bootstrap, seed, level)
            rows.append({**base, "quantity": metric, "threshold_index": -1, "threshold": np.nan,
                         "difference": float(d.band.mean), "low": float(d.band.low), "high": float(d.band.high),
                         "p_value": float(d.p_value), "num_images": d.band.num_images})
        paired.append(pd.DataFrame(rows))
    paired_table = pd.concat(paired, ignore_index=True) if paired else pd.DataFrame()
    return CurveStatistics(bands, paired_table.reindex(columns=PAIRED_COLUMNS), pd.DataFrame(summary, columns=SUMMARY_COLUMNS))


def with_bands(table: pd.DataFrame, per_image: list[ImageCurves], stats: CurveStatistics) -> pd.DataFrame:
    """The curves table with each model's interval (raw and in the display normalisation) and mean inside/outside areas."""
    table = table.copy()
    peak = float(table["area"].max())  # DESIGN's display normalisation: the largest mean area of all curves
    for column in ("area_low", "area_high", "area_inside", "area_outside"):
        table[column] = np.nan
    for c in per_image:
        rows = (table["role"] == c.role).to_numpy()
        low, high = stats.bands[c.role]
        table.loc[rows, "area_low"], table.loc[rows, "area_high"] = low, high
        if c.inside is not None:
            table.loc[rows, "area_inside"] = c.inside.mean(axis=0)
            table.loc[rows, "area_outside"] = c.outside.mean(axis=0)
    for column in ("area_low", "area_high"):
        table[f"{column}_normalized"] = table[column] / peak if peak > 0 else table[column]
    return table



@dataclass
class ScaleFocus:
    """Scale against focus, A against each baseline (:mod:`gradlens.regions.decomposition`)."""

    concentration: pd.DataFrame  # per image and model: scale, concentration, log-grid areas
    mass_area: pd.DataFrame  # per model and mass fraction: mean mass-area with its band
    decomposition: pd.DataFrame  # per baseline and quantity: estimate, interval, p-value, share of the paper's difference
    verdicts: list[dict]  # per baseline: {"role", "versus", "label", "versus_label", "sentence"}


def scale_focus(per_image: list[ImageCurves], width: float, bootstrap: int, seed: int, level: float) -> ScaleFocus:
    """The decomposition and its verdict for A (the first) against each other model, and the mass-area bands."""
    n = per_image[0].areas.shape[0]
    counts = resample_counts(n, bootstrap, seed) if bootstrap > 0 else None
    bands = []
    for c in per_image:
        band = bootstrap_mean(c.mass_area, bootstrap, seed, level, counts=counts)
        bands.append(pd.DataFrame({"role": c.role, "label": c.label, "fraction": MASS_FRACTIONS, "mass_area": band.mean,
                                   "low": band.low, "high": band.high, "num_images": band.num_images}))
    a = per_image[0]
    tables, verdicts = [], []
    for b in per_image[1:]:
        base = {"role": a.role, "label": a.label, "versus": b.role, "versus_label": b.label}
        table = decompose(pair_terms(a.concentration, b.concentration, width), bootstrap, seed, level, base, counts)
        tables.append(table)
        verdicts.append({**base, "sentence": table_verdict(table, a.label, b.label, level)})
    decomposition = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=DECOMPOSITION_COLUMNS)
    return ScaleFocus(pd.concat([c.concentration for c in per_image], ignore_index=True),
                      pd.concat(bands, ignore_index=True), decomposition, verdicts)
