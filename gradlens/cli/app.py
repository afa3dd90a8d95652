"""Entry point of the ``gradlens`` command line (also ``python -m gradlens``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from gradlens._version import __version__
from gradlens.cli import options as opt
from gradlens.data.coco import resolve_coco_paths
from gradlens.errors import GradlensError
from gradlens.precision import resolve_precision
from gradlens.runner import DetectorRun
from gradlens.selection.manifest import DEFAULT_WORKDIR

app = typer.Typer(
    name="gradlens",
    help="Where in the image does a detector look, and does a better detector look at less?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gradlens {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Gradient-attribution analysis of object detectors (CEDNet paper, Appendix B, and beyond)."""


def _echo_summary(label: str, s: dict) -> None:
    """What was scored and, just as visibly, everything that was skipped or dropped."""
    mean = s.get("mean_image_quality")
    head = f"mean image quality {mean:.4f}" if mean is not None else "no image has ground-truth objects"
    typer.echo(f"{label}: {s['num_images_scored']} of {s['num_images']} images scored, {head}")
    typer.echo(f"  objects: {s['num_objects']} ({s['num_virtual_matches']} with a virtual match); detections: {s['num_detections']}")
    skipped = [
        (s["num_images_without_objects"], "images without objects (no quality)"),
        (s["num_crowd_ignored"], "crowd regions ignored"),
        (s["num_images_with_objects_but_no_detections"], "images with objects but no detections (quality 0)"),
        (s.get("num_degenerate_objects", 0), "zero-size ground-truth boxes (quality 0)"),
    ] + [(n, f"detections dropped: {reason}") for reason, n in (s.get("num_detections_dropped") or {}).items()]
    for count, what in skipped:
        if count:
            typer.echo(f"  {what}: {count}")
    if "num_images_detected" in s:
        done = s["num_images_detected"]
        typer.echo(f"  images run through the detector: {done}"
                   + (f" (the other {s['num_images'] - done} from the cache or an interrupted run)" if done < s["num_images"] else ""))


def _located(gt, image_id):
    """The image's path, or None where the annotation cannot name one (scoring results needs no images)."""
    try:
        return gt.image_path(image_id)
    except GradlensError:
        return None


@app.command()
def score(
    out: Annotated[Path, typer.Option("--out", help="Directory for objects.csv, images.csv (+ .parquet) and score.json.")],
    detections: Annotated[
        Optional[Path], typer.Option("--detections", help="COCO results JSON (list of image_id, category_id, bbox, score).")
    ] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Detector checkpoint to run instead of --detections.")] = None,
    coco_root: opt.CocoRoot = None,
    ann: opt.Ann = None,
    images: opt.Images = None,
    exif_orientation: opt.ExifOrientation = None,
    class_agnostic: opt.ClassAgnostic = False,
    drop_invalid: opt.DropInvalid = False,
    arch: opt.Arch = None,
    trust_checkpoint: opt.TrustCheckpoint = False,
    batch_size: opt.BatchSize = 4,
    workers: opt.Workers = 2,
    precision: opt.Precision = "auto",
    cache_dir: opt.CacheDir = None,
    device: opt.Device = "auto",
    progress: opt.Progress = None,
) -> None:
    """Score one model's detections: the quality of every object and every image.

    Object quality = IoU x confidence of the object's best detection (virtual
    match 0 when none overlaps); image quality = mean over its non-crowd objects.
    """
    precision = resolve_precision(precision, device)
    from gradlens.data.coco import load_ground_truth
    from gradlens.scoring.sources import identify_source, score_source

    if (detections is None) == (model is None):
        raise GradlensError("Give exactly one of --detections RESULTS.json or --model CKPT.")
    source = identify_source(detections if detections is not None else model)
    if detections is not None and source.kind != "detections":
        raise GradlensError(f"--detections expects a COCO results .json file, but {detections} is a {source.kind}.")
    if model is not None and source.kind != "checkpoint":
        raise GradlensError(f"--model expects a detector checkpoint (.pth, .pt, .ckpt, .bin), but {model} is a {source.kind}.")
    paths = resolve_coco_paths(coco_root, ann, images, exif_orientation=exif_orientation or "ignore")
    run = DetectorRun(arch=arch, trust=trust_checkpoint, batch_size=batch_size, workers=workers, precision=precision,
                      cache_dir=cache_dir, device=device)
    loaded = []  # the ground truth, once score_source has needed it (it is not read for a score directory)

    def load_gt():
        loaded.append(load_ground_truth(paths))
        return loaded[-1]

    _, meta = score_source(
        source, load_gt, class_agnostic=class_agnostic, device=device,
        drop_invalid=drop_invalid, out_dir=out, progress=progress, detector_run=run,
    )  # fmt: skip
    _echo_summary(source.label, meta["summary"])
    if loaded and paths.images.is_dir():
        from gradlens.data.images import count_exif_turned

        gt = loaded[-1]
        turned = count_exif_turned((_located(gt, i) for i in gt.image_ids), progress)
        typer.echo(f"  images with a non-identity EXIF orientation tag: {turned} of {len(gt.image_ids)} "
                   f"(decoded with --exif-orientation {paths.exif_orientation})")
    typer.echo(f"Wrote {out / 'objects.csv'}, {out / 'images.csv'} (+ .parquet) and {out / 'score.json'}")


@app.command()
def select(
    a: Annotated[Path, typer.Option("--a", metavar="PATH", help="Model A: results .json, score directory or checkpoint.")],
    b: Annotated[List[Path], typer.Option("--b", metavar="PATH", help="Baseline model B (repeat for several; A must beat each).")],
    top: Annotated[int, typer.Option("--top", min=1, help="How many images to select.")] = 1000,
    workdir: opt.Workdir = DEFAULT_WORKDIR,
    coco_root: opt.CocoRoot = None,
    ann: opt.Ann = None,
    images: opt.Images = None,
    exif_orientation: opt.ExifOrientation = None,
    class_agnostic: opt.ClassAgnostic = False,
    drop_invalid: opt.DropInvalid = False,
    arch: opt.Arch = None,
    trust_checkpoint: opt.TrustCheckpoint = False,
    batch_size: opt.BatchSize = 4,
    workers: opt.Workers = 2,
    precision: opt.Precision = "auto",
    cache_dir: opt.CacheDir = None,
    device: opt.Device = "auto",
    progress: opt.Progress = None,
) -> None:
    """Rank images by how much A improves over every B and keep the top ones.

    Improvement = quality(A) - quality(B), the minimum over the B models; ties go
    to the smaller image id. Writes selection.csv, scores/<role>/ and manifest.json
    into the work directory, so later commands need no arguments.
    """
    precision = resolve_precision(precision, device)
    from gradlens.selection.run import run_selection

    result = run_selection(
        a, list(b), coco=resolve_coco_paths(coco_root, ann, images, exif_orientation=exif_orientation or "ignore"), workdir=workdir, top=top,
        class_agnostic=class_agnostic, device=device, drop_invalid=drop_invalid, progress=progress,
        detector_run=DetectorRun(arch=arch, trust=trust_checkpoint, batch_size=batch_size, workers=workers,
                                 precision=precision, cache_dir=cache_dir, device=device),
    )  # fmt: skip
    for model in result.manifest["models"]:
        _echo_summary(f"{model['role']} ({model['label']})", result.summaries[model["role"]])
    counts = result.manifest["counts"]
    typer.echo(f"Selected {counts['images_selected']} of {counts['images_compared']} images with objects.")
    if len(result.selection):
        best = result.selection.iloc[0]
        typer.echo(f"  largest improvement {best['improvement']:.4f} (image {int(best['image_id'])})")
    for path in result.removed:
        typer.echo(f"Removed {path}: the score directory of a role the earlier selection had and this one has not.")
    typer.echo(f"Wrote {workdir / 'selection.csv'} and {workdir / 'manifest.json'}")


@app.command()
def synthetic(
    out: Annotated[Path, typer.Argument(help="Folder for annotations/instances_<split>.json and <split>/*.jpg.")],
    num_images: Annotated[int, typer.Option("--num-images", min=1, help="Number of images.")] = 40,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same bytes).")] = 0,
    split: Annotated[str, typer.Option("--split", help="Split name used in file names.")] = "val2017",
    progress: opt.Progress = None,
) -> None:
    """Write a small COCO-format dataset of rendered shapes (real JPEGs, crowds, grayscale, empty images)."""
    from gradlens.data.synthetic import make_synthetic_coco

    removed = []
    paths = make_synthetic_coco(out, num_images=num_images, seed=seed, split=split, progress=progress, on_remove=removed.append)
    if removed:
        typer.echo(f"Removed {len(removed)} image(s) of the earlier synthetic dataset that the new one does not list "
                   f"(e.g. {removed[0].name}).")
    typer.echo(f"Wrote {num_images} images to {paths.images} and annotations to {paths.ann}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for everything the demo writes.")] = Path("gradlens-runs/demo"),
    num_images: Annotated[int, typer.Option("--num-images", min=1, help="Synthetic images to generate.")] = 60,
    top: Annotated[int, typer.Option("--top", min=1, help="Images to select.")] = 20,
    gallery: Annotated[int, typer.Option("--gallery", min=1, help="Figure A1 for the N best selected images.")] = 4,
    device: opt.Device = "auto",
    progress: opt.Progress = None,
) -> None:
    """The whole pipeline in a few CPU minutes: synthetic COCO data, the two small bundled detectors
    (CEDNet-style A vs ConvNeXt-style B), select, gradient maps, area curves (Figure A2) with scale against
    focus, faithfulness (deletion, insertion, randomisation), a Figure A1 gallery and the report."""
    from gradlens.demo import run_demo

    result = run_demo(out, num_images=num_images, top=top, device=device, progress=progress, gallery=gallery)
    sel = result.selection
    for model in sel.manifest["models"]:
        _echo_summary(f"{model['role']} ({model['label']})", sel.summaries[model["role"]])
    typer.echo(sel.selection.head(5).to_string(index=False))
    typer.echo("")
    typer.echo(f"dataset:    {result.coco.ann.parent.parent}")
    typer.echo(f"detections: {', '.join(str(p) for p in result.detections.values())}")
    typer.echo(f"selection:  {sel.workdir / 'selection.csv'}")
    typer.echo(f"manifest:   {sel.workdir / 'manifest.json'}")
    if result.area_curve is not None:
        curve = result.area_curve
        typer.echo(f"maps:       {', '.join(str(m.store.folder) for m in curve.models)}")
        typer.echo(f"Figure A2:  {curve.outputs['png']} (+ .pdf; table {curve.outputs['table']})")
        typer.echo(f"companion:  {curve.outputs['mass_area_png']} (mass-area; decomposition {curve.outputs['decomposition']})")
        for sentence in curve.verdicts:
            typer.echo(f"verdict:    {sentence}")
    if result.faithfulness is not None:
        faith = result.faithfulness
        typer.echo(f"faithfulness: {faith.outputs['png']} (+ .pdf; table {faith.outputs['table']}, "
                   f"randomisation {faith.outputs['randomisation']})")
        for sentence in faith.sentences:
            typer.echo(f"deletion:   {sentence}")
        for flag in faith.flags:
            typer.echo(f"flag:       {flag}")
    if result.figures:
        typer.echo(f"Figure A1:  {result.figures[0].parent} ({len(result.figures)} images"
                   f"{', figure_a1_gallery.pdf' if len(result.figures) > 1 else ''})")
    if result.report is not None:
        typer.echo(f"report:     {result.report} (open it in a browser)")


from gradlens.cli import detectors as _detectors  # noqa: E402  (commands about detectors live in their own module)

app.command(name="models")(_detectors.models)
app.command(name="profile")(_detectors.profile)
app.command(name="evaluate")(_detectors.evaluate)
app.command(name="convert")(_detectors.convert)

from gradlens.cli import attribution as _attribution  # noqa: E402  (gradients, area curves, figures)

app.command(name="gradients")(_attribution.gradients)
app.command(name="area-curve")(_attribution.area_curve)
app.command(name="figure")(_attribution.figure)
app.command(name="report")(_attribution.report)
app.command(name="faithfulness")(_attribution.faithfulness)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a user mistake becomes one line on stderr and exit code 1.

    Under torchrun, rank 0 runs the command and the other ranks compute their
    share of its long steps (:mod:`gradlens.distributed`). A rank that loses
    its peers or is stopped by torchrun says so in one sentence.
    """
    from gradlens import distributed

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    try:
        distributed.check_environment()
    except GradlensError as exc:  # every process of a node reads the same environment: its first one says it
        if os.environ.get("LOCAL_RANK", "0") == "0":
            typer.echo(f"gradlens: error: {exc}", err=True)
        if launched:
            _leave(1)
        sys.exit(1)
    try:
        with distributed.session() as world:
            if world is not None and not world.main:
                _leave(_serve(distributed, world))
            code = 1
            try:
                _run(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if world is None:
                    raise
            finally:
                if code != distributed.STOPPED:  # stopped by torchrun (another rank died): the others are being stopped too
                    distributed.release(code)
            if world is not None:
                if code == distributed.STOPPED:
                    typer.echo(f"gradlens: error: {distributed.stopped_sentence(world.rank)}", err=True)
                _leave(code)
    except GradlensError as exc:  # a failure while joining or leaving torchrun's process group, or a lost peer
        typer.echo(f"gradlens: error: {exc}", err=True)
        if launched:
            _leave(1)
        sys.exit(1)


def _serve(distributed, world) -> int:
    """A rank > 0: compute rank 0's jobs until it says exit; stopped by torchrun (SIGTERM), one sentence."""
    try:
        return distributed.serve(world)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if code == distributed.STOPPED:
            typer.echo(f"gradlens: error: {distributed.stopped_sentence(world.rank)}", err=True)
        return code
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: rank 0 says it
        return 130


def _leave(code: int) -> None:
    """End a torchrun rank at once, with everything it wrote flushed: interpreter teardown destroys gloo's
    threads while a peer closes its side, which aborted a rank now and then ("terminate called without an
    active exception", SIGABRT after its results were written)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


def _run(argv: list[str] | None) -> None:
    try:
        app(args=argv, prog_name="gradlens")
    except GradlensError as exc:
        typer.echo(f"gradlens: error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # the file system refused (no space, no permission, a file where a folder must be)
        where = f" {exc.filename}" if exc.filename else ""
        typer.echo(f"gradlens: error: cannot write or read{where}: {exc.strerror or exc}.", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except SystemExit as exc:  # typer turns Ctrl-C into a silent exit 130: say it in one sentence
        if exc.code == 130 and _caused_by_interrupt(exc):
            typer.echo(INTERRUPTED, err=True)
        raise


INTERRUPTED = "gradlens: error: interrupted; finished results are kept on disk (run the command again to go on)."


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
