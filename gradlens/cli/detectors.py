"""Commands about detectors themselves: ``models``, ``profile``, ``evaluate``, ``convert``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, List, Literal, Optional

import typer

from gradlens.cli import options as opt
from gradlens.data.coco import resolve_coco_paths
from gradlens.errors import GradlensError
from gradlens.precision import resolve_precision

Format = Annotated[Literal["table", "csv", "json"], typer.Option("--format", help="Output format.")]


def models() -> None:
    """List the detector architectures gradlens can build and load, and whose arithmetic each follows.

    mmdetection: mmcv's uint8 OpenCV resize, 100 detections per image,
    MaxIoUAssigner; torchvision: its own transform, 300 per image, Matcher;
    detectron2: Pillow's uint8 resize, BGR, 100 per image, its Matcher.
    """
    from gradlens.models.detectors.rcnn import TORCHVISION_TWO_STAGE
    from gradlens.models.detectors.mask2former import MASK2FORMER_ARCHITECTURES
    from gradlens.models.registry import ARCHITECTURES, DETR_ARCHITECTURES, TWO_STAGE_ARCHITECTURES

    width = max(len(n) for n in [*ARCHITECTURES, *TORCHVISION_TWO_STAGE, *TWO_STAGE_ARCHITECTURES, *DETR_ARCHITECTURES,
                                   *MASK2FORMER_ARCHITECTURES])
    for name, arch in ARCHITECTURES.items():
        framework = {"mmcv": "mmdetection", "mmdet3": "mmdetection", "detectron2": "detectron2"}.get(
            arch.preprocess.convention, "torchvision")
        typer.echo(f"{name:<{width}}  {framework:<11}  {arch.description}")
    for name, description in {**TWO_STAGE_ARCHITECTURES, **DETR_ARCHITECTURES, **MASK2FORMER_ARCHITECTURES}.items():
        typer.echo(f"{name:<{width}}  {'mmdetection':<11}  {description}")
    for name, builder in TORCHVISION_TWO_STAGE.items():
        typer.echo(f"{name:<{width}}  {'torchvision':<11}  torchvision's {builder} (state dict; loss: the expectation "
                   "over its samplers)")


def profile(
    classifiers: Annotated[
        bool, typer.Option("--classifiers/--no-classifiers", help="Table A1 backbones as ImageNet classifiers at 224x224.")
    ] = True,
    detectors: Annotated[bool, typer.Option("--detectors/--no-detectors", help="The paper's detectors at 1280x800.")] = True,
    only: Annotated[
        Optional[List[str]], typer.Option("--model", help="Only these (a Table A1 name like CEDNet-NeXt-T, or an architecture).")
    ] = None,
    fmt: Format = "table",
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Also write the table to this file (.csv, .json or .parquet, by its suffix).")
    ] = None,
    progress: opt.Progress = None,
) -> None:
    """Parameters and FLOPs (multiply-accumulates) of the supported backbones and detectors.

    Classifiers count only what inference uses (as Table A1 does); the paper's
    figures are printed beside gradlens' own, with whether they agree (within
    1M and 0.1G) and, where they do not, why.
    """
    import pandas as pd

    from gradlens.models.registry import ARCHITECTURES
    from gradlens.profile import CLASSIFIERS, profile_classifier, profile_detector
    from gradlens.progress import track

    if not classifiers and not detectors:
        raise GradlensError("Nothing to profile: --no-classifiers and --no-detectors together switch off both tables; "
                            "keep at least one.")
    writers = {".csv": "csv", ".json": "json", ".parquet": "parquet"}
    if out is not None and out.suffix.lower() not in writers:  # refused before minutes of profiling, not after
        raise GradlensError(f"--out {out} has no known table suffix; name a .csv, .json or .parquet file.")
    jobs = []
    if classifiers:
        jobs += [("classifier", n) for n in CLASSIFIERS]
    if detectors:
        jobs += [("detector", n) for n in ARCHITECTURES if not n.endswith("_mini")]
    if only:
        known = {n for _, n in jobs}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise GradlensError(f"Unknown model {unknown[0]!r} for profile; known: {', '.join(sorted(known))}.")
        jobs = [(k, n) for k, n in jobs if n in only]
    rows = []
    for kind, name in track(jobs, "profiling", progress, unit="model"):
        result = profile_classifier(name) if kind == "classifier" else profile_detector(name)
        rows.append(result.row())
    table = pd.DataFrame(rows)
    if out is not None:
        from gradlens.fileio import atomic_path

        with atomic_path(out) as tmp:
            kind = writers[out.suffix.lower()]
            if kind == "json":
                tmp.write_text(json.dumps(rows, indent=2))
            elif kind == "parquet":
                table.to_parquet(tmp, index=False)
            else:
                table.to_csv(tmp, index=False)
    if fmt == "csv":
        typer.echo(table.to_csv(index=False), nl=False)
    elif fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
    else:  # the notes as numbered footnotes under the table, one number per distinct note
        texts = list(dict.fromkeys(r["note"] for r in rows if r.get("note")))
        verdict = {True: "yes", False: "no", None: "-"}
        shown = table.drop(columns=["note"])
        shown = shown.astype(object).where(shown.notna(), "-")
        shown["reproduced"] = [verdict[r["reproduced"]] + (f" [{texts.index(r['note']) + 1}]" if r.get("note") else "")
                               for r in rows]
        typer.echo(shown.to_string(index=False))
        for i, text in enumerate(texts, 1):
            names = ", ".join(r["model"] for r in rows if r.get("note") == text)
            typer.echo(f"[{i}] {names}: {text}")


def evaluate(
    model: Annotated[Optional[Path], typer.Option("--model", help="Detector checkpoint to run.")] = None,
    detections: Annotated[Optional[Path], typer.Option("--detections", help="COCO results JSON to evaluate instead.")] = None,
    coco_root: opt.CocoRoot = None,
    ann: opt.Ann = None,
    images: opt.Images = None,
    exif_orientation: opt.ExifOrientation = None,
    arch: opt.Arch = None,
    trust_checkpoint: opt.TrustCheckpoint = False,
    batch_size: opt.BatchSize = 4,
    workers: opt.Workers = 2,
    precision: opt.Precision = "auto",
    cache_dir: opt.CacheDir = None,
    device: opt.Device = "auto",
    fmt: Format = "table",
    progress: opt.Progress = None,
) -> None:
    """COCO box mAP (pycocotools COCOeval) of a checkpoint or a results file, to check it against its published AP."""
    precision = resolve_precision(precision, device)
    from gradlens.data.coco import load_ground_truth
    from gradlens.data.detections import read_detections
    from gradlens.evaluation import coco_map
    from gradlens.runner import DetectorRun, detections_for_checkpoint

    if (detections is None) == (model is None):
        raise GradlensError("Give exactly one of --model CKPT or --detections RESULTS.json.")
    gt = load_ground_truth(resolve_coco_paths(coco_root, ann, images, exif_orientation=exif_orientation or "ignore"))
    if model is not None:
        run = DetectorRun(arch=arch, trust=trust_checkpoint, batch_size=batch_size, workers=workers,
                          precision=precision, cache_dir=cache_dir, device=device)
        result = detections_for_checkpoint(model, gt, run, progress=progress)
        dets = result.detections
        typer.echo(f"{model}: {len(dets)} detections on {len(gt.image_ids)} images "
                   f"({'reused from cache' if result.reused else f'{result.seconds:.1f} s'}; {result.path})", err=True)
    else:
        dets = read_detections(detections, gt)
    stats = coco_map(gt, dets)
    if fmt == "json":
        typer.echo(json.dumps(stats, indent=2))
    elif fmt == "csv":
        typer.echo("metric,value")
        for k, v in stats.items():
            typer.echo(f"{k},{v:.4f}")
    else:
        for k, v in stats.items():
            typer.echo(f"{k:<10} {v * 100:6.2f}" if v >= 0 else f"{k:<10}    n/a")


def convert(
    source: Annotated[Path, typer.Argument(help="mmdetection or torchvision checkpoint.")],
    out: Annotated[Path, typer.Argument(help="gradlens checkpoint to write (.pth).")],
    arch: opt.Arch = None,
    trust_checkpoint: opt.TrustCheckpoint = False,
) -> None:
    """Rewrite a checkpoint in gradlens' own format (architecture, categories, settings and weights in one file)."""
    from gradlens.models.formats.checkpoints import load_detector, save_detector

    detector = load_detector(source, arch=arch, trust=trust_checkpoint)
    save_detector(detector, out)
    typer.echo(f"{source} ({detector.checkpoint_format}, {detector.arch_name}, {detector.num_classes} classes) -> {out}")
