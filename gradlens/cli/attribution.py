"""Commands about gradients: ``gradients``, ``area-curve``, ``figure``, ``report`` and ``faithfulness`` (thin layers
over the Python API)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Literal, Optional

import typer

from gradlens.cli import options as opt
from gradlens.errors import GradlensError
from gradlens.precision import resolve_precision
from gradlens.attribution.workdir import require_checkpoint
from gradlens.runner import DetectorRun
from gradlens.selection.manifest import DEFAULT_WORKDIR


def _config(method, channel_reduce, steps, baseline, samples, noise, seed, precision, target="total"):
    from gradlens.attribution.methods import AttributionConfig

    return AttributionConfig(method=method, channel_reduce=channel_reduce, steps=steps, baseline=baseline,
                             samples=samples, noise=noise, seed=seed, precision=precision, target=target)


def _role_paths(items: list[str] | None) -> dict[str, Path]:
    out = {}
    for item in items or []:
        role, sep, path = item.partition("=")
        if not sep or not role.strip() or not path.strip():
            raise GradlensError(f"--checkpoint expects ROLE=PATH (for example b=convnext.pth), got {item!r}.")
        out[role.strip().lower()] = Path(path.strip())
    return out


def _parse_ids(values: list[str] | None) -> list[int]:
    ids = []
    for value in values or []:
        for part in value.replace(",", " ").split():
            try:
                ids.append(int(part))
            except ValueError:
                raise GradlensError(f"Image ids must be integers; got {part!r}.") from None
    if values and not ids:  # --image-ids '' or ',,': asked for images, named none
        raise GradlensError("--image-ids names no image; give ids such as --image-ids 42,139.")
    return ids


OptionalBatchSize = Annotated[
    Optional[int],
    typer.Option("--batch-size", min=1, help="Images per batch (same padded canvas) [default: as recorded by select, else 4]."),
]


def _workdir_run(workdir, arch, trust, batch_size, workers, precision, device) -> DetectorRun:
    """select's recorded detector settings (architecture, batch size), with what was given on this command line;
    trust only from this command line."""
    given = {"workers": workers, "precision": precision, "device": device}
    if arch is not None:
        given["arch"] = arch
    if trust:
        given["trust"] = True
    if batch_size is not None:
        given["batch_size"] = batch_size
    return DetectorRun.recorded(workdir, **given)


def _coco_or_none(coco_root, ann, images):
    from gradlens.data.coco import resolve_coco_paths

    return resolve_coco_paths(coco_root, ann, images) if (coco_root or ann or images) else None


def gradients(
    model: Annotated[Path, typer.Option("--model", help="Detector checkpoint (gradlens, torchvision or mmdetection 2.x).")],
    out: Annotated[Path, typer.Option("--out", help="Map store folder: one <image_id>.npz per image plus store.json.")],
    selection: Annotated[
        Optional[Path], typer.Option("--selection", help="selection.csv written by 'gradlens select' (its images, best first).")
    ] = None,
    image_ids: Annotated[
        Optional[List[str]], typer.Option("--image-ids", help="Image ids, comma-separated or repeated, instead of --selection.")
    ] = None,
    top: Annotated[Optional[int], typer.Option("--top", min=1, help="Only the first N images of --selection.")] = None,
    target: opt.Target = "total",
    method: opt.Method = "gradient",
    channel_reduce: opt.ChannelReduce = "max",
    steps: opt.Steps = 32,
    baseline: opt.Baseline = "black",
    samples: opt.Samples = 16,
    noise: opt.Noise = 0.15,
    seed: opt.Seed = 0,
    map_dtype: opt.MapDtype = "float16",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace maps in --out that were made with other settings.")] = False,
    coco_root: opt.CocoRoot = None,
    ann: opt.Ann = None,
    images: opt.Images = None,
    exif_orientation: opt.ExifOrientationRecorded = None,
    arch: opt.Arch = None,
    trust_checkpoint: opt.TrustCheckpoint = False,
    batch_size: opt.BatchSize = 4,
    workers: opt.Workers = 2,
    precision: opt.Precision = "auto",
    device: opt.Device = "auto",
    progress: opt.Progress = None,
) -> None:
    """Input-gradient maps of the total detection loss, one compressed file per image (resumable).

    The gradient of each image's total detection loss against its non-crowd
    ground truth (RetinaNet: focal + box loss; Mask R-CNN and Cascade Mask
    R-CNN: the expectation of their training loss over the samplers, masks
    included), w.r.t. the RGB image in [0, 1] at original size, through the
    detector's own resize/normalise/pad, reduced over channels. A rerun
    computes only the images whose maps are missing. With --target object,
    one map per ground-truth object instead: the gradient of that object's
    part of the loss (the terms of the anchors and RoIs matched to it), named
    by annotation id.
    """
    precision = resolve_precision(precision, device)
    from gradlens.attribution.compute import compute_maps, map_store_key
    from gradlens.attribution.store import MapStore
    from gradlens.data.coco import load_ground_truth
    from gradlens.device import resolve_device
    from gradlens.fileio import image_id_column, read_table, read_table_file, sha256_file
    from gradlens.models.formats.checkpoints import load_detector
    from gradlens.selection.manifest import MANIFEST, load_manifest
    from gradlens.attribution.workdir import workdir_ground_truth

    if (selection is None) == (not image_ids):
        raise GradlensError("Give exactly one of --selection selection.csv or --image-ids.")
    require_checkpoint(model, "--model")
    coco = _coco_or_none(coco_root, ann, images)
    if selection is not None:
        if selection.is_dir():  # a work directory: its selection, read from the exact Parquet copy when there
            table = read_table(selection, "selection")
            selection = selection / "selection.csv"
        else:  # the named file, and no other
            table = read_table_file(selection) if selection.suffix in (".csv", ".parquet") else None
        if table is None or "image_id" not in table:
            raise GradlensError(f"{selection} is not a selection table written by 'gradlens select'.")
        ids = image_id_column(table, selection)[:top]
        if (selection.parent / MANIFEST).is_file():  # the selection's dataset, decoded as select decoded it
            gt = workdir_ground_truth(load_manifest(selection.parent), coco)
        else:
            from gradlens.data.coco import resolve_coco_paths

            gt = load_ground_truth(coco or resolve_coco_paths())
    else:
        from gradlens.data.coco import resolve_coco_paths

        ids = _parse_ids(image_ids)[:top]
        gt = load_ground_truth(coco or resolve_coco_paths())
    if exif_orientation is not None:
        gt.exif_orientation = exif_orientation
    config = _config(method, channel_reduce, steps, baseline, samples, noise, seed, precision, target)
    dev = resolve_device(device)
    config.check(dev)
    detector = load_detector(model, arch=arch, trust=trust_checkpoint, device=dev)
    if dev.type == "cpu":
        detector.use_channels_last()
    store = MapStore(out, map_store_key(detector, sha256_file(model), gt, config, batch_size=batch_size), map_dtype=map_dtype,
                     overwrite=overwrite)
    if target == "object":
        from gradlens.attribution.objects import compute_object_maps

        run = compute_object_maps(detector, gt, ids, store, config, batch_size=batch_size, workers=workers,
                                  progress=progress)
        typer.echo(f"{len(ids)} images, {run.computed + run.reused} objects: {run.computed} object maps computed, "
                   f"{run.reused} reused ({config.method}, {config.channel_reduce}; files named by annotation id).")
    else:
        run = compute_maps(detector, gt, ids, store, config, batch_size=batch_size, workers=workers, progress=progress)
        typer.echo(f"{len(ids)} images: {run.computed} maps computed, {run.reused} reused ({config.method}, {config.channel_reduce}).")
    if run.replaced:
        typer.echo(f"  {run.replaced} stored map(s) were damaged, of another store or of the wrong shape, and were computed again.")
    typer.echo(f"Wrote maps to {out}")


def area_curve(
    workdir: opt.Workdir = DEFAULT_WORKDIR,
    thresholds: Annotated[int, typer.Option("--thresholds", min=2, max=1_000_000, help="Points on the shared threshold grid.")] = 200,
    scale: Annotated[Literal["log", "linear"], typer.Option("--scale", help="Threshold grid spacing.")] = "log",
    log_decades: Annotated[float, typer.Option("--log-decades", min=0.1, help="log grid: decades below the top threshold.")] = 4.0,
    t_max_percentile: Annotated[
        float, typer.Option("--t-max-percentile", help="Top of the grid: this percentile of all pixels of all maps (100: the max).")
    ] = 99.9,
    per_image_normalize: Annotated[
        bool, typer.Option("--per-image-normalize", help="Divide each map by its own max before thresholding (not the paper's).")
    ] = False,
    from_summaries: Annotated[
        bool, typer.Option("--from-summaries", help="Curves from the stored histograms (no map read; within 0.8% in t).")
    ] = False,
    top: Annotated[Optional[int], typer.Option("--top", min=1, help="Only the first N selected images.")] = None,
    name: Annotated[str, typer.Option("--name", help="Output file stem, so variants can sit beside the paper's curves.")] = "area_curve",
    bootstrap: opt.Bootstrap = 1000,
    bootstrap_seed: opt.BootstrapSeed = 0,
    level: opt.Level = 0.95,
    checkpoint: opt.Checkpoint = None,
    method: opt.Method = "gradient",
    channel_reduce: opt.ChannelReduce = "max",
    steps: opt.Steps = 32,
    baseline: opt.Baseline = "black",
    samples: opt.Samples = 16,
    noise: opt.Noise = 0.15,
    seed: opt.Seed = 0,
    map_dtype: opt.MapDtype = "float16",
    coco_root: opt.CocoRoot = None,
    ann: opt.Ann = None,
    images: opt.Images = None,
    arch: opt.Arch = None,
    trust_checkpoint: opt.TrustCheckpoint = False,
    batch_size: OptionalBatchSize = None,
    workers: opt.Workers = 2,
    precision: opt.Precision = "auto",
    device: opt.Device = "auto",
    progress: opt.Progress = None,
) -> None:
    """Figure A2: mean important-region area against the gradient threshold, for every model of the selection.

    Computes (or reuses) the gradient map of every selected image for A and
    each baseline, then the mean fraction of pixels with magnitude > t on one
    grid shared by all models, with bootstrap bands. Writes area_curve.csv
    (+ .parquet, raw and normalised values, bands, inside/outside the boxes),
    area_curve_paired.csv (A minus each baseline: per threshold and per
    metric, interval, Wilcoxon p), metrics.csv (box energy, pointing game,
    areas per image and model), metrics_summary.csv, area_curve.json and
    area_curve.png/.pdf.

    Shared thresholds mix gradient scale with focus, so it also splits A's
    difference from each baseline into a scale term and a focus term, with
    scale-free concentration measures (Gini, effective area, mass-area), and
    prints a verdict saying which of the two drives it:
    area_curve_concentration.csv (per image and model),
    area_curve_decomposition.csv, area_curve_mass_area.csv and
    area_curve_mass_area.png/.pdf (Figure A2's companion).
    """
    precision = resolve_precision(precision, device)
    from gradlens.regions.run import run_area_curve

    result = run_area_curve(
        workdir, thresholds=thresholds, scale=scale, log_decades=log_decades, per_image_normalize=per_image_normalize,
        config=_config(method, channel_reduce, steps, baseline, samples, noise, seed, precision),
        detector_run=_workdir_run(workdir, arch, trust_checkpoint, batch_size, workers, precision, device),
        checkpoints=_role_paths(checkpoint), coco=_coco_or_none(coco_root, ann, images), top=top, map_dtype=map_dtype,
        from_summaries=from_summaries, t_max_percentile=t_max_percentile, name=name, progress=progress,
        bootstrap=bootstrap, bootstrap_seed=bootstrap_seed, level=level,
    )  # fmt: skip
    n = int(result.table["num_images"].iloc[0])
    typer.echo(f"Area curves over {n} images, {thresholds} thresholds ({scale}, top t = {result.thresholds[-1]:.4g}):")
    for m in result.models:
        curve = result.curves[m.role]
        mid = len(curve) // 2
        replaced = f" ({m.run.replaced} damaged or mismatched, computed again)" if m.run and m.run.replaced else ""
        typer.echo(f"  {m.role} ({m.label}): maps {m.run.computed} computed{replaced}, {m.run.reused} reused; "
                   f"mean area {curve[0]:.4f} at t={result.thresholds[0]:.3g}, {curve[mid]:.4f} at t={result.thresholds[mid]:.3g}")
    summary = result.summary.set_index(["role", "metric"])
    for m in result.models:
        energy, pointing = summary.loc[(m.role, "box_energy")], summary.loc[(m.role, "pointing_game")]
        chance = summary.loc[(m.role, "box_fraction"), "mean"]
        if energy["num_images"]:
            typer.echo(f"  {m.role}: box energy {energy['mean']:.3f} [{energy['low']:.3f}, {energy['high']:.3f}] "
                       f"(boxes cover {chance:.3f} of the pixels), pointing game {pointing['mean']:.3f}")
    paired = result.paired[result.paired["quantity"] == "area_auc"] if len(result.paired) else result.paired
    for _, row in paired.iterrows():
        typer.echo(f"  {row['role']} - {row['versus']}: area under the curve {row['difference']:+.4f} "
                   f"[{row['low']:+.4f}, {row['high']:+.4f}], Wilcoxon p = {row['p_value']:.3g} ({row['num_images']} images)")
    _echo_scale_focus(result)
    for key in ("table", "paired", "metrics", "metrics_summary", "concentration", "decomposition", "mass_area", "png",
                "pdf", "mass_area_png", "meta"):
        typer.echo(f"Wrote {result.outputs[key]}")


def _echo_scale_focus(result) -> None:
    """The decomposition in one line per part, then the verdict, for A against each baseline."""
    split = result.scale_focus
    if split is None:
        return
    for verdict in split.verdicts:
        rows = split.decomposition[split.decomposition["versus"] == verdict["versus"]].set_index("quantity")
        parts = []
        for quantity, name in (("paper_auc", "ΔAUC"), ("scale_term", "scale"), ("focus_term", "focus"),
                               ("outside_grid", "outside the grid")):
            row = rows.loc[quantity]
            share = f", {row['share_of_paper']:.0%} of ΔAUC" if quantity != "paper_auc" and row["share_of_paper"] == row["share_of_paper"] else ""
            bounds = "" if row["low"] != row["low"] or row["high"] != row["high"] else f" [{row['low']:+.4f}, {row['high']:+.4f}]"
            parts.append(f"{name} {row['estimate']:+.4f}{bounds}{share}")  # no interval with one image
        typer.echo(f"  {verdict['role']} - {verdict['versus']}, scale and focus: " + "; ".join(parts))
        typer.echo(f"  Verdict: {verdict['sentence']}")


def figure(
    image_id: Annotated[
        Optional[List[str]], typer.Option("--image-id", help="Image id(s) to draw (repeat or comma-separate).")
    ] = None,
    top: Annotated[
        Optional[int], typer.Option("--top", min=1, help="Gallery: the N best selected images (default: the best one).")
    ] = None,
    object_id: Annotated[
        Optional[List[str]],
        typer.Option("--object", help="Annotation id(s): draw that object's own map (--target object) on its image."),
    ] = None,
    workdir: opt.Workdir = DEFAULT_WORKDIR,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the figures [default: <workdir>/figures].")] = None,
    map_scale: Annotated[
        Literal["shared", "per-map"],
        typer.Option("--map-scale", help="shared: one brightness scale for all models of an image; per-map: each its own."),
    ] = "shared",
    clip_percentile: Annotated[
        float, typer.Option("--clip-percentile", help="Brightness saturates at this percentile of the map values.")
    ] = 99.5,
    checkpoint: opt.Checkpoint = None,
    method: opt.Method = "gradient",
    channel_reduce: opt.ChannelReduce = "max",
    steps: opt.Steps = 32,
    baseline: opt.Baseline = "black",
    samples: opt.Samples = 16,
    noise: opt.Noise = 0.15,
    seed: opt.Seed = 0,
    map_dtype: opt.MapDtype = "float16",
    coco_root: opt.CocoRoot = None,
    ann: opt.Ann = None,
    images: opt.Images = None,
    arch: opt.Arch = None,
    trust_checkpoint: opt.TrustCheckpoint = False,
    batch_size: OptionalBatchSize = None,
    workers: opt.Workers = 2,
    precision: opt.Precision = "auto",
    device: opt.Device = "auto",
    progress: opt.Progress = None,
) -> None:
    """Figure A1: per model, detections on the image (ground truth red, matches blue) above its gradient map.

    Draws the named images, or the --top N selected ones as a gallery
    (one PNG/PDF per image plus figure_a1_gallery.pdf). Missing maps are
    computed for just these images. --object ANN_ID draws that object's own
    map (its part of the loss) on its image, with its box drawn thicker.
    """
    precision = resolve_precision(precision, device)
    from gradlens.figures.figure_a1 import render_figures_a1

    ids = _parse_ids(image_id)
    objects = _parse_ids(object_id)
    if sum(map(bool, (ids, top is not None, objects))) > 1:
        raise GradlensError("Give one of --image-id, --top or --object.")
    written = render_figures_a1(
        workdir, image_ids=ids or None, top=top, out_dir=out, object_ids=objects or None,
        config=_config(method, channel_reduce, steps, baseline, samples, noise, seed, precision,
                       "object" if objects else "total"),
        detector_run=_workdir_run(workdir, arch, trust_checkpoint, batch_size, workers, precision, device),
        checkpoints=_role_paths(checkpoint), coco=_coco_or_none(coco_root, ann, images), map_scale=map_scale,
        clip_percentile=clip_percentile, map_dtype=map_dtype, progress=progress,
    )  # fmt: skip
    for path in written:
        typer.echo(f"Wrote {path} (+ .pdf)")
    if len(written) > 1:
        typer.echo(f"Wrote {written[0].parent / 'figure_a1_gallery.pdf'}")


def report(
    workdir: opt.Workdir = DEFAULT_WORKDIR,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder of the page and its pictures [default: <workdir>/report].")] = None,
    thumbnails: Annotated[
        Optional[int],
        typer.Option("--thumbnails", min=0, help="Figure A1 panels (and thumbnails) of only the N best selected images [default: all]."),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="The area-curve run to show (its --name).")] = "area_curve",
    checkpoint: opt.Checkpoint = None,
    coco_root: opt.CocoRoot = None,
    ann: opt.Ann = None,
    images: opt.Images = None,
    arch: opt.Arch = None,
    trust_checkpoint: opt.TrustCheckpoint = False,
    batch_size: OptionalBatchSize = None,
    workers: opt.Workers = 2,
    precision: opt.Precision = "auto",
    device: opt.Device = "auto",
    progress: opt.Progress = None,
) -> None:
    """One self-contained HTML page to browse the work directory (no server needed).

    The selection as a sortable, filterable table (quality per model,
    improvement, box energy, pointing game), Figure A2 with its bands, the
    paired A-versus-baseline statistics, the metrics summary and Figure A1
    thumbnails that open the full panels. Run 'gradlens area-curve' first;
    missing Figure A1 maps are computed with the settings area-curve used.
    """
    from gradlens.fileio import check_output_name
    from gradlens.report import recorded_attribution, write_report

    check_output_name(name)  # the rule area-curve writes by, before any file is read: no record from outside the work directory
    from gradlens.regions.record import load_area_curve_record  # typed field by field, its files checked by hash

    meta = load_area_curve_record(workdir, name, missing_ok=True)
    settings = meta.get("settings", {})
    # area-curve's own maps unless told otherwise: its precision, map dtype and batch size name its map stores
    recorded_precision = settings.get("attribution", {}).get("precision")
    precision = recorded_precision if precision == "auto" and recorded_precision else resolve_precision(precision, device)
    batch_size = batch_size if batch_size is not None else settings.get("batch_size")
    config = recorded_attribution(meta, precision)
    result = write_report(workdir, out, thumbnails=thumbnails, name=name, progress=progress, figures_kwargs={
        "config": config, "detector_run": _workdir_run(workdir, arch, trust_checkpoint, batch_size, workers, precision, device),
        "checkpoints": _role_paths(checkpoint), "coco": _coco_or_none(coco_root, ann, images),
    })  # fmt: skip
    typer.echo(f"Report of {result.images} selected images ({result.thumbnails} Figure A1 panels): {result.page}")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise GradlensError(f"--fractions expects numbers separated by commas (0,0.01,0.1); got {text!r}.") from None


def faithfulness(
    workdir: opt.Workdir = DEFAULT_WORKDIR,
    fill: Annotated[
        Literal["mean", "blur", "noise"],
        typer.Option("--fill", help="What replaces deleted pixels: the detector's normalisation mean, a blurred copy, "
                                    "or seeded noise."),
    ] = "mean",
    fractions: Annotated[
        str, typer.Option("--fractions", help="The fractions q of pixels deleted or restored, from 0, comma-separated.")
    ] = "0,0.005,0.01,0.02,0.05,0.1,0.2,0.5",
    faithfulness_seed: Annotated[
        int, typer.Option("--faithfulness-seed", min=0, help="Seed of the random pixel order (and of --fill noise).")
    ] = 0,
    randomise: Annotated[
        bool, typer.Option("--randomise", help="Also the randomisation sanity check: maps of cascadingly re-initialised "
                                               "detectors against the trained one's.")
    ] = False,
    randomise_seed: Annotated[int, typer.Option("--randomise-seed", min=0, help="Seed of the re-initialisations.")] = 0,
    top: Annotated[Optional[int], typer.Option("--top", min=1, help="Only the first N selected images.")] = None,
    name: Annotated[str, typer.Option("--name", help="Output file stem.")] = "faithfulness",
    bootstrap: opt.Bootstrap = 1000,
    bootstrap_seed: opt.BootstrapSeed = 0,
    level: opt.Level = 0.95,
    checkpoint: opt.Checkpoint = None,
    method: opt.Method = "gradient",
    channel_reduce: opt.ChannelReduce = "max",
    steps: opt.Steps = 32,
    baseline: opt.Baseline = "black",
    samples: opt.Samples = 16,
    noise: opt.Noise = 0.15,
    seed: opt.Seed = 0,
    map_dtype: opt.MapDtype = "float16",
    coco_root: opt.CocoRoot = None,
    ann: opt.Ann = None,
    images: opt.Images = None,
    arch: opt.Arch = None,
    trust_checkpoint: opt.TrustCheckpoint = False,
    batch_size: OptionalBatchSize = None,
    workers: opt.Workers = 2,
    precision: opt.Precision = "auto",
    device: opt.Device = "auto",
    progress: opt.Progress = None,
) -> None:
    """Does each detector need the region its own map ranks first? Deletion and insertion curves.

    For every selected image and every model: rank the pixels by the model's own gradient map (as
    area-curve computes it, or reuses it), delete the top q of them (fill them with --fill) or, starting
    from the filled image, restore them, run the detector as score does, and record the image quality and
    the total detection loss; the same in a seeded random pixel order as the baseline. Writes
    faithfulness.csv (+ .parquet, one row per image, model, mode, order and q), faithfulness_curves.csv
    (means with bootstrap bands), faithfulness_paired.csv (own map minus random, and A minus each
    baseline, per q and on the area under the curve, with intervals and Wilcoxon p), faithfulness.png/.pdf
    and faithfulness.json. Resumable per image; shared out under torchrun.

    --randomise adds the model-parameter randomisation test (Adebayo et al. 2018): the maps of copies of
    each detector re-initialised from the head down, compared with the trained model's by Spearman
    correlation and SSIM, and a flag for maps that do not change when the head is randomised.
    """
    precision = resolve_precision(precision, device)
    from gradlens.faithfulness.run import run_faithfulness

    result = run_faithfulness(
        workdir, fill=fill, fractions=_fractions(fractions), seed=faithfulness_seed, top=top,
        config=_config(method, channel_reduce, steps, baseline, samples, noise, seed, precision),
        detector_run=_workdir_run(workdir, arch, trust_checkpoint, batch_size, workers, precision, device),
        checkpoints=_role_paths(checkpoint), coco=_coco_or_none(coco_root, ann, images), map_dtype=map_dtype,
        bootstrap=bootstrap, bootstrap_seed=bootstrap_seed, level=level, randomise=randomise,
        randomise_seed=randomise_seed, name=name, progress=progress,
    )  # fmt: skip
    n = int(result.table["image_id"].nunique())
    typer.echo(f"Faithfulness over {n} images, fill {fill}, q = {', '.join(f'{q:g}' for q in sorted(result.table['q'].unique()))}:")
    for m in result.models:
        run = result.runs[m.role]
        typer.echo(f"  {m.role} ({m.label}): {run.computed} images computed, {run.reused} reused")
        if result.q0_difference[m.role] > 1e-4:
            typer.echo(f"  Note: {m.role}'s detections of the unperturbed images, rerun here, differ from those select "
                       f"scored (quality up to {result.q0_difference[m.role]:.3g} apart): its checkpoint may not be what "
                       "made the detections select was given; q = 0 uses select's.")
    areas = result.paired[result.paired["q"].isna() & (result.paired["metric"] == "quality")]
    for _, row in areas.iterrows():
        what = (f"{row['role']}: own map - random" if row["comparison"] == "map - random"
                else f"{row['role']} - {row['versus']} ({row['order']} order)")
        typer.echo(f"  {row['mode']}, {what}: area under the quality curve {row['estimate']:+.4f} "
                   f"[{row['low']:+.4f}, {row['high']:+.4f}], Wilcoxon p = {row['p_value']:.3g}")
    for sentence in result.sentences:
        typer.echo(f"  {sentence}")
    for flag in result.flags:
        typer.echo(f"  Flag: {flag}")
    for key, path in result.outputs.items():
        typer.echo(f"Wrote {path}")
