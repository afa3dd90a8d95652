"""Per-image area curves and localisation metrics of one model's stored maps.

The mean curve of Figure A2 is the mean of these rows; the bootstrap bands
and the paired tests need the rows themselves. One pass over the maps gives
everything: each map is read once (its float16 codes, or the float32 map),
and the image's box region is rasterised once. The same pass gives each
map's scale and scale-free concentration (:mod:`gradlens.regions.decomposition`)
from the distribution of its values, which the code histogram already holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradlens.errors import GradlensError
from gradlens.progress import track
from gradlens.regions.area import CodeCurves, area_curve_from_summaries, region_areas
from gradlens.regions.concentration import Distribution, distribution
from gradlens.regions.decomposition import CONCENTRATION_COLUMNS, LogGrid, image_measures
from gradlens.regions.histogram import bin_values
from gradlens.regions.localisation import box_mask, image_boxes, masked_areas, masked_energy, masked_pointing
from gradlens.regions.statistics import area_under_curve

METRIC_COLUMNS = ["role", "label", "rank", "image_id", "num_boxes", "box_fraction", "box_energy", "pointing_game",
                  "map_max", "area_auc", "inside_auc", "outside_auc"]
SUMMARY_METRICS = ["box_energy", "pointing_game", "box_fraction", "area_auc", "inside_auc", "outside_auc"]


@dataclass
class ImageCurves:
    """One model's curves per selected image (rows in selection order) and its metrics table."""

    role: str
    label: str
    image_ids: list[int]
    areas: np.ndarray  # [images, thresholds]
    inside: np.ndarray | None  # None when computed from summaries (no map read)
    outside: np.ndarray | None
    metrics: pd.DataFrame
    concentration: pd.DataFrame | None = None  # CONCENTRATION_COLUMNS, one row per image (with a decomposition grid)
    mass_area: np.ndarray | None = None  # [images, MASS_FRACTIONS]

    def long_table(self, thresholds: np.ndarray) -> pd.DataFrame:
        """One row per (image, threshold): the per-image curves, for notebooks and other statistics."""
        n, t = self.areas.shape
        table = pd.DataFrame({
            "role": self.role, "image_id": np.repeat(np.asarray(self.image_ids, dtype=np.int64), t),
            "threshold_index": np.tile(np.arange(t), n), "threshold": np.tile(np.asarray(thresholds, dtype=np.float64), n),
            "area": self.areas.reshape(-1),
        })  # fmt: skip
        if self.inside is not None:
            table["area_inside"] = self.inside.reshape(-1)
            table["area_outside"] = self.outside.reshape(-1)
        return table


def image_curves(model, image_ids: list[int], thresholds: np.ndarray, scale: str, gt, per_image_normalize: bool = False,
                 from_summaries: bool = False, device="cpu", progress: bool | None = None,
                 log_grid: LogGrid | None = None, log_references=None, losses=None) -> ImageCurves:
    """Area curve, inside/outside curves and localisation metrics of every image of ``model`` (a ``ModelMaps``).

    With ``log_grid`` (and ``log_references``: each image's reference log scale, in image order) also each
    map's scale and concentration (:func:`~gradlens.regions.decomposition.image_measures`), from the
    same read of the map (from the histogram of its summary with ``from_summaries``: within one 0.8 % bin).
    ``losses`` (in image order) are the maps' recorded losses when the caller has already read them from
    the summaries; without them each map's loss is read from its file.
    """
    store = model.store
    rows, areas, inside, outside = [], [], [], []
    measures, mass_curves = [], []

    def measure(k: int, image_id: int, d: Distribution, loss: float | None = None) -> None:
        if log_grid is None:
            return
        if loss is None:
            loss = float(losses[k]) if losses is not None else store.loss(image_id)
        row, curve = image_measures(d, log_grid, float(log_references[k]))
        measures.append({"image_id": int(image_id), "loss": loss, **row})
        mass_curves.append(curve)

    if from_summaries:  # no map is read: areas within one histogram bin, no localisation metrics
        for k, s in enumerate(store.summaries(image_ids)):
            areas.append(area_curve_from_summaries([s], thresholds, per_image_normalize))
            rows.append({"image_id": int(s.image_id), "map_max": float(s.max)})
            measure(k, s.image_id, Distribution(*bin_values(s)), float(s.loss))
    else:
        codes_curves = CodeCurves(thresholds) if store.map_dtype == "float16" else None
        for k, image_id in enumerate(track(image_ids, f"area curve {model.role} ({model.label})", progress)):
            boxes = image_boxes(gt, image_id)
            if codes_curves is not None:  # exact, from histograms of the stored 16-bit codes
                codes, code_scale = store.read_codes(image_id)
                mask = box_mask(codes.shape, boxes)
                one = codes_curves.image(codes, code_scale, per_image_normalize, mask)
                if log_grid is not None:  # the code histogram is the distribution: no sort, no second read
                    measure(k, image_id, Distribution(one["values"].astype(np.float64), one["counts"]))
            else:
                values = store.read(image_id)
                if log_grid is not None:
                    measure(k, image_id, distribution(values))
                mask = box_mask(values.shape, boxes)
                shown = values
                if per_image_normalize:
                    peak = values.max()
                    shown = values / peak if peak > 0 else np.zeros_like(values)
                one = {"area": region_areas(shown, thresholds, device=device), "max": float(values.max())}
                one["inside"], one["outside"] = masked_areas(shown.astype(np.float32), mask, thresholds)
                magnitude = np.abs(values.astype(np.float64))  # as box_energy and pointing_game read a map
                one["box_energy"], one["pointing_game"] = masked_energy(magnitude, mask), masked_pointing(magnitude, mask)
            areas.append(one["area"])
            inside.append(one["inside"])
            outside.append(one["outside"])
            rows.append({"image_id": int(image_id), "num_boxes": len(boxes), "box_fraction": float(mask.mean()),
                         "box_energy": one["box_energy"], "map_max": one["max"],
                         "pointing_game": np.nan if one["pointing_game"] is None else float(one["pointing_game"])})
    if not areas:
        raise GradlensError("No gradient maps were given, so there is no area curve.")
    areas_a = np.stack(areas)
    inside_a = np.stack(inside) if inside else None
    outside_a = np.stack(outside) if outside else None
    metrics = pd.DataFrame(rows)
    metrics.insert(0, "rank", np.arange(1, len(rows) + 1))
    metrics.insert(0, "label", model.label)
    metrics.insert(0, "role", model.role)
    metrics["area_auc"] = area_under_curve(areas_a, thresholds, scale)
    metrics["inside_auc"] = area_under_curve(inside_a, thresholds, scale) if inside_a is not None else np.nan
    metrics["outside_auc"] = area_under_curve(outside_a, thresholds, scale) if outside_a is not None else np.nan
    metrics = metrics.reindex(columns=METRIC_COLUMNS)
    concentration = mass = None
    if log_grid is not None:
        concentration = pd.DataFrame(measures)
        concentration.insert(0, "rank", np.arange(1, len(measures) + 1))
        concentration.insert(0, "label", model.label)
        concentration.insert(0, "role", model.role)
        concentration = concentration.reindex(columns=CONCENTRATION_COLUMNS)
        mass = np.stack(mass_curves)
    return ImageCurves(model.role, model.label, [int(i) for i in image_ids], areas_a, inside_a, outside_a, metrics,
                       concentration, mass)
