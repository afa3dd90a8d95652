"""From a checkpoint path (or a detector object) to cached detections: the step ``score --model`` and
``select --a a.pth`` share."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from gradlens.data.coco import GroundTruth
from gradlens.device import resolve_device
from gradlens.fileio import sha256_file
from gradlens.inference import InferenceResult, InferenceSettings, cached_detections


@dataclass
class DetectorRun:
    """How to load and run checkpoints (the CLI's detector options).

    ``detectors``: role -> detector object (a :class:`gradlens.Detector`, such as a
    :class:`gradlens.LossDictDetector`) for the steps after ``select`` (gradients, area-curve, figure,
    faithfulness): the models that ``run_selection`` was given as objects, which no file on disk holds.
    An object must be unchanged since ``select`` (same weights and settings: same ``identity_sha256``). It
    is moved to ``device``. Python only: the command line has no way to pass an object.
    """

    arch: str | None = None
    trust: bool = False
    batch_size: int = 4
    workers: int = 2
    precision: str = "fp32"
    cache_dir: str | os.PathLike | None = None
    device: str = "auto"
    detectors: dict = field(default_factory=dict, repr=False)

    @classmethod
    def recorded(cls, workdir: str | os.PathLike, **overrides) -> "DetectorRun":
        """The run recorded by ``select`` in a work directory's manifest, with some settings changed
        (``DetectorRun.recorded("runs/latest", device="cuda")``).

        Trust is never read back: a manifest is a file anyone can edit or send, so unpickling code is
        allowed only when this call says so (``trust=True``, the command line's ``--trust-checkpoint``).
        """
        from gradlens.selection.manifest import load_manifest

        settings = load_manifest(workdir).get("settings") or {}
        detector = settings.get("detector") or {}
        recorded = {"device": settings.get("device", "auto"), "arch": detector.get("arch"),
                    "trust": False, "batch_size": detector.get("batch_size") or 4,
                    "precision": detector.get("precision") or "fp32"}
        return cls(**{**recorded, **overrides})

    @property
    def settings(self) -> InferenceSettings:
        return InferenceSettings(batch_size=self.batch_size, workers=self.workers, precision=self.precision)


def detections_for_checkpoint(path: str | os.PathLike, gt: GroundTruth, run: DetectorRun | None = None,
                              progress: bool | None = None, checkpoint_sha256: str | None = None) -> InferenceResult:
    """Load the checkpoint and detect on every image of ``gt``, or reuse the cached result of the same run."""
    from gradlens.models.formats.checkpoints import load_detector

    run = run or DetectorRun()
    device = resolve_device(run.device)
    detector = load_detector(Path(path), arch=run.arch, trust=run.trust, device=device)
    digest = checkpoint_sha256 or sha256_file(path)
    return cached_detections(detector, digest, gt, run.settings, cache_dir=run.cache_dir, progress=progress)


def detections_for_detector(detector, gt: GroundTruth, run: DetectorRun | None = None, progress: bool | None = None,
                            detector_sha256: str | None = None) -> InferenceResult:
    """:func:`detections_for_checkpoint` for a detector object (``run_selection(a=detector, ...)``): it is moved
    to the run's device and its detections are cached under its content digest
    (:func:`gradlens.models.detectors.adapter.detector_sha256`) in place of a checkpoint file's hash."""
    from gradlens.models.detectors.adapter import detector_sha256 as content_digest

    run = run or DetectorRun()
    digest = detector_sha256 or content_digest(detector)
    detector = detector.to(resolve_device(run.device))
    return cached_detections(detector, digest, gt, run.settings, cache_dir=run.cache_dir, progress=progress)
