"""``gradlens area-curve`` as a Python function: maps of every model, one shared grid, table and Figure A2."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from gradlens._version import __version__
from gradlens.attribution.methods import AttributionConfig
from gradlens.attribution.workdir import ModelMaps, selection_ids, workdir_maps
from gradlens.data.coco import CocoPaths
from gradlens.errors import GradlensError
from gradlens.fileio import atomic_path, check_output_name, write_json, write_table
from gradlens.regions.comparison import ScaleFocus, curve_statistics, scale_focus, with_bands
from gradlens.regions.decomposition import LogGrid
from gradlens.regions.per_image import ImageCurves, image_curves
from gradlens.regions.record import check_name_is_free, move_into_place, staging_folder
from gradlens.regions.statistics import DEFAULT_BOOTSTRAP, DEFAULT_LEVEL, check_bootstrap, check_level
from gradlens.regions.histogram import approximate_mean, pooled_percentile
from gradlens.regions.area import (
    DEFAULT_LOG_DECADES,
    DEFAULT_SCALE,
    DEFAULT_THRESHOLDS,
    mean_of_rows,
    normalise_curves,
    threshold_grid,
)
from gradlens.runner import DetectorRun
from gradlens.selection.manifest import load_manifest, save_manifest

DEFAULT_T_MAX_PERCENTILE = 99.9
CURVE_COLUMNS = ["role", "label", "threshold_index", "threshold", "threshold_normalized", "area", "area_normalized", "num_images"]


@dataclass
class AreaCurveResult:
    table: pd.DataFrame
    thresholds: np.ndarray
    curves: dict[str, np.ndarray]
    models: list[ModelMaps]
    outputs: dict[str, Path] = field(default_factory=dict)
    per_image: list[ImageCurves] = field(default_factory=list)
    paired: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None
    scale_focus: ScaleFocus | None = None  # the decomposition, the concentration tables and the verdicts

    @property
    def verdicts(self) -> list[str]:
        """One sentence per baseline: does A's region differ by scale, by focus, or both (DESIGN: scale and focus)."""
        return [v["sentence"] for v in self.scale_focus.verdicts] if self.scale_focus is not None else []


def curves_table(thresholds: np.ndarray, curves: dict, labels: dict, num_images: int) -> pd.DataFrame:
    """Long table, one row per (model, threshold), raw and normalised (DESIGN's display normalisation)."""
    t_norm, normed = normalise_curves(thresholds, curves)
    frames = [
        pd.DataFrame({
            "role": role,
            "label": labels.get(role, role),
            "threshold_index": np.arange(len(thresholds)),
            "threshold": np.asarray(thresholds, dtype=np.float64),
            "threshold_normalized": t_norm,
            "area": np.asarray(values, dtype=np.float64),
            "area_normalized": normed[role],
            "num_images": int(num_images),
        })  # fmt: skip
        for role, values in curves.items()
    ]
    return pd.concat(frames, ignore_index=True)[CURVE_COLUMNS]


def shared_grid(models: list[ModelMaps], image_ids: list[int], num: int, scale: str, log_decades: float,
                per_image_normalize: bool, t_max_percentile: float = DEFAULT_T_MAX_PERCENTILE,
                summaries: list | None = None) -> np.ndarray:
    """One grid for all models, from the summaries alone (no map is read).

    It ends at the ``t_max_percentile``-th percentile of all pixel values of
    all models' maps pooled (100: the largest value). Gradient magnitudes are
    heavy-tailed: a grid up to the single largest pixel spends almost all its
    thresholds where every area is ~0.
    """
    if summaries is None:
        summaries = (s for m in models for s in m.store.summaries(image_ids))
    top = pooled_percentile(summaries, t_max_percentile, per_image_normalize)
    return threshold_grid(top, num, scale, log_decades)


def decomposition_plan(models: list[ModelMaps], image_ids: list[int], summaries: list, log_decades: float,
                       t_max_percentile: float) -> tuple[LogGrid, np.ndarray]:
    """The log grid the decomposition is read on and each image's reference log scale, from the summaries.

    The grid is the paper's (raw maps, log thresholds, ``log_decades`` decades up to the pooled percentile)
    whatever ``--scale`` or ``--per-image-normalize`` the curves use. An image's reference is the geometric
    mean of its models' approximate mean magnitudes: it only places the scale-free maps on the grid (the
    focus term does not depend on it where the grid covers them), near their own scales.
    """
    top = pooled_percentile(summaries, t_max_percentile, False)
    grid = LogGrid.ending_at(top, log_decades)
    logs = np.full((len(models), len(image_ids)), np.nan)
    for k, s in enumerate(summaries):
        mean = approximate_mean(s)
        logs[k // len(image_ids), k % len(image_ids)] = np.log(mean) if mean > 0 else np.nan
    with np.errstate(all="ignore"):
        references = np.nanmean(np.where(np.isnan(logs), np.nan, logs), axis=0) if len(models) else np.array([])
    return grid, np.where(np.isfinite(references), references, grid.log_low)


def run_area_curve(
    workdir: str | os.PathLike,
    thresholds: int = DEFAULT_THRESHOLDS,
    scale: str = DEFAULT_SCALE,
    log_decades: float = DEFAULT_LOG_DECADES,
    per_image_normalize: bool = False,
    config: AttributionConfig | None = None,
    detector_run: DetectorRun | None = None,
    checkpoints: dict | None = None,
    coco: CocoPaths | None = None,
    top: int | None = None,
    map_dtype: str = "float16",
    from_summaries: bool = False,
    t_max_percentile: float = DEFAULT_T_MAX_PERCENTILE,
    name: str = "area_curve",
    progress: bool | None = None,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    bootstrap_seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> AreaCurveResult:
    """Maps of the selected images for every model (computed or reused), their area curves on one grid,
    ``<name>.csv``/``.parquet``, ``<name>.json`` and Figure A2 (``<name>.png``/``.pdf``) in the work directory.

    ``name`` lets a variant (another method, ``per_image_normalize``) sit beside the paper's curves.
    Beside them: localisation metrics per image and model (``metrics.csv``), their summary with bootstrap
    intervals (``metrics_summary.csv``), A minus each baseline per threshold and per metric with intervals
    and Wilcoxon p-values (``<name>_paired.csv``) and the per-image curves (``<name>_per_image.parquet``);
    ``bootstrap`` resamples of the images (0: no intervals).
    """
    from gradlens.figures.area_curve import save_area_curve_figure
    from gradlens.figures.scale_focus import save_mass_area_figure

    workdir = Path(workdir)
    if scale not in ("linear", "log"):
        raise GradlensError(f"Unknown threshold scale {scale!r}; use linear or log.")
    threshold_grid(1.0, thresholds, scale, log_decades)  # check the grid options before any long work
    check_name_is_free(workdir, name, "area-curve")
    check_bootstrap(bootstrap, bootstrap_seed, check_level(level))  # before any long work, as the grid options
    if not 0 < t_max_percentile <= 100:
        raise GradlensError(f"--t-max-percentile must be in (0, 100]; got {t_max_percentile}.")
    ids = selection_ids(workdir, top)
    if not ids:
        raise GradlensError("The selection is empty, so there are no images to compute an area curve over.")
    check_bootstrap(bootstrap, bootstrap_seed, level, images=len(ids), columns=thresholds)  # its memory, now known
    config = config or AttributionConfig()
    if config.target != "total":
        raise GradlensError("Area curves are of whole-image maps (--target total); per-object maps are drawn by 'figure --object'.")
    models, gt = workdir_maps(workdir, ids, config, detector_run, checkpoints, coco, map_dtype, progress)
    summaries = [s for m in models for s in m.store.summaries(ids)]  # each map's summary read once, in model order
    grid = shared_grid(models, ids, thresholds, scale, log_decades, per_image_normalize, t_max_percentile, summaries)
    log_grid, references = decomposition_plan(models, ids, summaries, log_decades if scale == "log" else DEFAULT_LOG_DECADES,
                                              t_max_percentile)
    losses = np.array([s.loss for s in summaries], dtype=np.float64).reshape(len(models), len(ids))
    del summaries
    device = detector_run.device if detector_run is not None else "auto"
    per_image = [image_curves(m, ids, grid, scale, gt, per_image_normalize, from_summaries, device, progress,
                              log_grid, references, losses[k]) for k, m in enumerate(models)]
    curves = {c.role: mean_of_rows(c.areas) for c in per_image}
    labels = {m.role: m.label for m in models}
    table = curves_table(grid, curves, labels, len(ids))
    stats = curve_statistics(per_image, grid, scale, bootstrap, bootstrap_seed, level)
    table = with_bands(table, per_image, stats)
    split = scale_focus(per_image, log_grid.width, bootstrap, bootstrap_seed, level)
    metrics_name = "metrics" if name == "area_curve" else f"{name}_metrics"
    # One unit (gradlens.regions.record): everything is written into a staging folder, the figures first (a
    # figure that cannot be drawn leaves the previous run's files as they were), then moved into place, and
    # the record, written last, lists the SHA-256 of each file: a run killed in between is caught on reading.
    with staging_folder(workdir, name) as staged:
        figures = [workdir / p.name for p in save_area_curve_figure(table, staged / name, scale=scale, paired=stats.paired)]
        companions = [workdir / p.name for p in save_mass_area_figure(split.mass_area, staged / f"{name}_mass_area",
                                                                      split.decomposition)]
        write_table(table, staged, name)
        write_table(split.concentration, staged, f"{name}_concentration")
        write_table(split.mass_area, staged, f"{name}_mass_area")
        write_table(split.decomposition, staged, f"{name}_decomposition")
        write_table(stats.paired, staged, f"{name}_paired")
        write_table(pd.concat([c.metrics for c in per_image], ignore_index=True), staged, metrics_name)
        write_table(stats.summary, staged, f"{metrics_name}_summary")
        with atomic_path(staged / f"{name}_per_image.parquet") as tmp:
            pd.concat([c.long_table(grid) for c in per_image], ignore_index=True).to_parquet(tmp, index=False)
        digests = move_into_place(staged, workdir, name)
    settings = {
        "thresholds": thresholds, "scale": scale, "log_decades": log_decades if scale == "log" else None,
        "per_image_normalize": per_image_normalize, "t_max_percentile": t_max_percentile, "from_summaries": from_summaries, "map_dtype": map_dtype,
        "batch_size": detector_run.batch_size if detector_run is not None else None,
        "attribution": config.to_dict(), "num_images": len(ids), "threshold_max": float(grid[-1]),
        "bootstrap": int(bootstrap), "bootstrap_seed": int(bootstrap_seed), "confidence_level": float(level),
    }  # fmt: skip
    record = {
        "gradlens_version": __version__,
        "command": "area-curve",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "models": [{"role": m.role, "label": m.label,
                    "checkpoint": str(m.checkpoint.resolve()) if m.checkpoint is not None else None,  # None: an object
                    "maps": str(m.store.folder.relative_to(workdir)) if m.store.folder.is_relative_to(workdir) else str(m.store.folder),
                    "computed": m.run.computed if m.run else 0, "reused": m.run.reused if m.run else len(ids)}
                   for m in models],
        "outputs": {"table": f"{name}.csv", "table_parquet": f"{name}.parquet", "paired": f"{name}_paired.csv",
                    "metrics": f"{metrics_name}.csv", "metrics_summary": f"{metrics_name}_summary.csv",
                    "per_image": f"{name}_per_image.parquet", "concentration": f"{name}_concentration.csv",
                    "mass_area": f"{name}_mass_area.csv", "decomposition": f"{name}_decomposition.csv",
                    "figure": [p.name for p in figures + companions]},
        "decomposition": {"log_threshold_low": log_grid.log_low, "log_threshold_width": log_grid.width,
                          "scale": "mean magnitude", "verdicts": split.verdicts},
        "summary": [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}  # NaN is not JSON
                    for row in stats.summary.to_dict(orient="records")],
        "sha256": digests,  # the files this record describes, as written (checked by load_area_curve_record)
    }  # fmt: skip
    write_json(workdir / f"{name}.json", record)
    manifest = load_manifest(workdir)
    manifest.setdefault("outputs", {})[name] = f"{name}.json"
    save_manifest(workdir, manifest)
    outputs = {"table": workdir / f"{name}.csv", "meta": workdir / f"{name}.json", "paired": workdir / f"{name}_paired.csv",
               "metrics": workdir / f"{metrics_name}.csv", "metrics_summary": workdir / f"{metrics_name}_summary.csv",
               **{p.suffix[1:]: p for p in figures}}
    outputs.update({key: workdir / f"{name}_{key}.csv" for key in ("concentration", "mass_area", "decomposition")})
    outputs.update({f"mass_area_{p.suffix[1:]}": p for p in companions})
    return AreaCurveResult(table=table, thresholds=grid, curves=curves, models=models, outputs=outputs,
                           per_image=per_image, paired=stats.paired, summary=stats.summary, scale_focus=split)
