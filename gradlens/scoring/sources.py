"""What ``--a``/``--b`` (and ``score``) accept, and how each kind becomes quality scores.

A model is given as a COCO detection results file (``.json``), a score
directory written by ``gradlens score``, or a detector checkpoint (``.pth``,
``.pt``, ``.ckpt``); in Python also as a detector object (a :class:`gradlens.Detector`,
such as a :class:`gradlens.LossDictDetector`). Results files are scored against the
ground truth; score directories are read back after checking they are comparable;
checkpoints and detector objects are run on every image first.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from gradlens.data.coco import GroundTruth
from gradlens.data.detections import read_detections
from gradlens.errors import GradlensError, InputFileError
from gradlens.fileio import atomic_path, sha256_file
from gradlens.scoring.quality import QualityScores, quality_scores
from gradlens.scoring.store import (
    SCORE_META,
    is_score_dir,
    make_meta,
    read_scores,
    read_scores_if_current,
    score_dir_digest,
    write_scores,
)

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")  # .pkl: detectron2 model-zoo pickles (numpy arrays only)
SourceKind = Literal["detections", "scores", "checkpoint", "detector"]


@dataclass(frozen=True)
class ModelSource:
    """One model as the user named it: the path, what kind of thing it is, and its content hash.

    A detector object has no path (``None``); ``detector`` holds it and ``sha256`` is its content digest.
    """

    path: Path | None
    kind: SourceKind
    sha256: str
    detector: object = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """A short name for tables and legends: the file's stem, the directory's name or the detector's name."""
        if self.kind == "detector":
            from gradlens.models.detectors.adapter import detector_label

            return detector_label(self.detector)
        return self.path.stem if self.kind != "scores" else self.path.name


def detector_source(detector) -> ModelSource:
    """A detector object given as a model (Python only), or one sentence if it is none."""
    import torch

    from gradlens.models.detectors.adapter import detector_sha256
    from gradlens.models.interface import Detector

    if not (isinstance(detector, torch.nn.Module) and isinstance(detector, Detector)):
        raise GradlensError(
            f"A model is given as a path or as a detector object (a torch.nn.Module with gradlens.Detector's members, "
            f"such as gradlens.LossDictDetector(model, categories)), not as a {type(detector).__name__}."
        )
    return ModelSource(None, "detector", detector_sha256(detector), detector)


def identify_source(path: str | os.PathLike) -> ModelSource:
    """Decide what a ``--a``/``--b`` argument is, from the file system alone (or, for a detector object, from
    the object: :func:`detector_source`)."""
    if not isinstance(path, (str, os.PathLike)):
        return detector_source(path)
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path} does not exist (expected a results .json, a score directory or a checkpoint).")
    if path.is_dir():
        if not is_score_dir(path):
            raise InputFileError(f"The directory {path} is not a score directory written by 'gradlens score' (no {SCORE_META}).")
        return ModelSource(path, "scores", score_dir_digest(path))
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return ModelSource(path, "checkpoint", sha256_file(path))
    if suffix == ".json":
        return ModelSource(path, "detections", sha256_file(path))
    raise InputFileError(
        f"Cannot tell what {path} is: give a COCO results .json, a score directory or a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})."
    )


def annotations_record(gt: GroundTruth) -> dict:
    return {"path": str(gt.path.resolve()), "sha256": gt.sha256}


def compute_scores(
    source: ModelSource,
    load_gt: Callable[[], GroundTruth],
    class_agnostic: bool = False,
    device: str = "cpu",
    drop_invalid: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = False,
    detector_run=None,
) -> tuple[QualityScores, dict, bool]:
    """Quality scores of one model and the metadata that says where they came from, writing nothing.

    Returns ``(scores, meta, current)``; ``current`` says that ``cache_dir``
    already holds exactly these scores (a valid cache of the same input,
    annotations and settings, or the score directory itself), so saving them
    there can be skipped. Reading never writes (into ``cache_dir``), so a
    caller can read every input before it overwrites any of them.

    A checkpoint is run on every image of the dataset first (through
    ``detector_run``, a :class:`gradlens.runner.DetectorRun`); its detections
    are cached by content, so scoring it again costs only the reading.
    """
    if source.kind in ("checkpoint", "detector"):
        return _checkpoint_scores(source, load_gt, class_agnostic, device, cache_dir, progress, detector_run)
    if source.kind == "scores":
        scores, meta = read_scores(source.path)
        stored = meta["settings"]["class_agnostic"]
        if stored != class_agnostic:
            mode = "class-agnostic" if stored else "class-aware"
            raise GradlensError(
                f"{source.path} was scored {mode}; re-score it or {'pass' if stored else 'drop'} --class-agnostic so all models are matched alike."
            )
        current = cache_dir is not None and Path(cache_dir).resolve() == source.path.resolve()
        return scores, meta, current

    gt = load_gt()
    source_record = {"kind": "detections", "path": str(source.path.resolve()), "sha256": source.sha256}
    settings = {"class_agnostic": bool(class_agnostic), "drop_invalid": bool(drop_invalid)}
    if cache_dir is not None:
        cached = read_scores_if_current(cache_dir, source.sha256, gt.sha256, settings)
        if cached is not None:
            return *cached, True
    detections = read_detections(source.path, gt, drop_invalid=drop_invalid, check_categories=not class_agnostic)
    scores = quality_scores(detections, gt, class_agnostic=class_agnostic, device=device, progress=progress)
    return scores, make_meta(scores, source_record, annotations_record(gt), settings), False


def _checkpoint_scores(source, load_gt, class_agnostic, device, cache_dir, progress, detector_run):
    from gradlens.runner import DetectorRun, detections_for_checkpoint, detections_for_detector

    run = detector_run or DetectorRun(device=device)
    gt = load_gt()
    arch = run.arch if source.kind == "checkpoint" else None  # an object is what it is
    settings = {"class_agnostic": bool(class_agnostic), "drop_invalid": False, "arch": arch, "precision": run.precision}
    if cache_dir is not None:
        cached = read_scores_if_current(cache_dir, source.sha256, gt.sha256, settings)
        if cached is not None:
            scores, meta = cached
            return scores, {**meta, "summary": {**meta["summary"], "num_images_detected": 0}}, True
    if source.kind == "detector":
        result = detections_for_detector(source.detector, gt, run, progress=progress, detector_sha256=source.sha256)
        source_record = {"kind": "detector", "path": None, "label": source.label, "sha256": source.sha256,
                         "detections": str(result.path)}
    else:
        result = detections_for_checkpoint(source.path, gt, run, progress=progress, checkpoint_sha256=source.sha256)
        source_record = {"kind": "checkpoint", "path": str(source.path.resolve()), "sha256": source.sha256,
                         "detections": str(result.path)}
    scores = quality_scores(result.detections, gt, class_agnostic=class_agnostic, device=device, progress=progress)
    meta = make_meta(scores, source_record, annotations_record(gt), settings)
    meta["summary"]["num_images_detected"] = 0 if result.reused else int(result.images)  # by this run (not resumed)
    return scores, meta, False


def save_scores(scores: QualityScores, meta: dict, out_dir: str | os.PathLike) -> dict:
    """Write scores from :func:`compute_scores` as a score directory; returns the ``score.json`` written.

    A checkpoint's detections (a COCO results file) are copied beside the
    tables as ``detections.json``, so the directory says what was scored.
    """
    detections = meta["source"].get("detections")
    if detections and Path(detections).is_file():
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "detections.json") as tmp:
            shutil.copyfile(detections, tmp)
    return write_scores(scores, out_dir, meta["source"], meta["annotations"], meta["settings"])


def score_source(
    source: ModelSource,
    load_gt: Callable[[], GroundTruth],
    class_agnostic: bool = False,
    device: str = "cpu",
    drop_invalid: bool = False,
    out_dir: str | os.PathLike | None = None,
    progress: bool | None = False,
    detector_run=None,
) -> tuple[QualityScores, dict]:
    """Quality scores of one model, and the metadata that says where they came from.

    ``load_gt`` is called only when the ground truth is needed. With ``out_dir``
    the scores are written there as a score directory; if it already holds
    scores of the same input, annotations and settings, they are reused.
    """
    scores, meta, current = compute_scores(
        source, load_gt, class_agnostic=class_agnostic, device=device, drop_invalid=drop_invalid,
        cache_dir=out_dir, progress=progress, detector_run=detector_run,
    )  # fmt: skip
    if out_dir is not None and not current:
        meta = save_scores(scores, meta, out_dir)
    return scores, meta
