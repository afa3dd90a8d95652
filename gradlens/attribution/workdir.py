"""Maps of every model of a selection, in the work directory: what ``area-curve`` and ``figure`` share.

A work directory written by ``gradlens select`` names the dataset and each
model (A and the baselines). Gradients need the network, so each model must
be a checkpoint: given to ``select`` directly, recorded in a score
directory that was scored from a checkpoint, or supplied now
(``--checkpoint b=convnext.pth``); or, in Python, a detector object given
again to this step (``DetectorRun(detectors={"a": detector})``). Maps go to
``maps/<role>/<settings digest>/``, so other methods or settings never
overwrite them and an unchanged rerun reuses every map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from gradlens.attribution.compute import MapRun, compute_maps, map_store_key
from gradlens.attribution.methods import AttributionConfig
from gradlens.attribution.store import MapStore, key_digest
from gradlens.data.coco import CocoPaths, GroundTruth, load_ground_truth
from gradlens.device import resolve_device
from gradlens.errors import GradlensError, InputFileError
from gradlens.fileio import read_json, read_table, sha256_file, short_repr
from gradlens.runner import DetectorRun
from gradlens.scoring.store import SCORE_META
from gradlens.selection.manifest import load_manifest


@dataclass
class ModelMaps:
    """One model of the work directory and the store holding its maps."""

    role: str
    label: str
    checkpoint: Path | None  # None for a detector object
    store: MapStore
    run: MapRun | None = None
    sha256: str | None = None  # the checkpoint's, hashed once when the work directory's models are gathered
    detector: object = None  # the detector object (DetectorRun.detectors), where the model is one


def selection_table(workdir: str | os.PathLike) -> pd.DataFrame:
    """The work directory's selection (image ids best first, qualities and improvement), checked as a manifest is:
    each image once (a repeated one would count twice in every mean), qualities finite numbers in [0, 1] and
    improvements in [-1, 1] (selected images always have objects, hence a quality)."""
    from gradlens.fileio import image_id_column

    load_manifest(workdir)  # a work directory without one gets the hint to run 'select'
    table = read_table(Path(workdir), "selection")
    where, again = Path(workdir) / "selection", "run 'gradlens select' again"
    if "image_id" in table:
        ids = pd.Series(image_id_column(table, where))
        if ids.duplicated().any():
            raise InputFileError(f"{where} lists image {int(ids[ids.duplicated()].iloc[0])} twice; {again}.")
    for column in table.columns:
        low = -1.0 if column == "improvement" else 0.0 if str(column).startswith("quality_") else None
        if low is None:
            continue
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(np.float64)
        bad = ~(np.isfinite(values) & (values >= low) & (values <= 1.0))
        if bad.any():
            raise InputFileError(f"{where} has the {column} {short_repr(table[column].iloc[int(np.argmax(bad))])}, "
                                 f"which is not a number from {low:g} to 1; {again}.")
    return table


def selection_ids(workdir: str | os.PathLike, top: int | None = None) -> list[int]:
    """Image ids of the work directory's selection, best first (the first ``top`` if given)."""
    from gradlens.fileio import image_id_column

    table = selection_table(workdir)
    if "image_id" not in table:
        raise GradlensError(f"The selection in {workdir} has no image_id column; run 'gradlens select' again.")
    ids = image_id_column(table, Path(workdir) / "selection")
    return ids[:top] if top is not None else ids


def workdir_ground_truth(manifest: dict, coco: CocoPaths | None = None) -> GroundTruth:
    """The dataset the selection was made on (or the one given, if its annotations are the same file)."""
    dataset = manifest.get("dataset") or {}
    if coco is None:
        if not dataset.get("annotations") or not dataset.get("images"):
            raise GradlensError("The manifest names no dataset; pass --coco-root (or --ann and --images).")
        coco = CocoPaths(ann=Path(dataset["annotations"]), images=Path(dataset["images"]),
                         exif_orientation=dataset.get("exif_orientation", "ignore"))
    elif dataset.get("exif_orientation"):  # images decoded as the selection's detections were
        coco = replace(coco, exif_orientation=dataset["exif_orientation"])
    gt = load_ground_truth(coco)
    if dataset.get("annotations_sha256") and gt.sha256 != dataset["annotations_sha256"]:
        raise GradlensError(f"{coco.ann} is not the annotation file the selection was made with; pass that one.")
    return gt


def _recorded_checkpoint(model: dict, workdir: Path) -> Path | None:
    """The checkpoint a model came from: itself, or the one its score directory was scored from."""
    if model.get("kind") == "checkpoint":
        return Path(model["source"])
    if model.get("kind") == "scores":
        meta_path = Path(model["source"]) / SCORE_META
        if not meta_path.is_file():
            meta_path = workdir / model.get("scores", "") / SCORE_META
        try:
            source = read_json(meta_path, "score metadata file").get("source", {})
        except GradlensError:
            return None
        if source.get("kind") == "checkpoint" and source.get("path"):
            return Path(source["path"])
    return None


def require_checkpoint(path: str | os.PathLike, what: str) -> Path:
    """A checkpoint path, or one sentence saying what else it is (gradients need the network)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() == ".json":
        kind = "a score directory" if path.is_dir() else "a detection results file"
        raise GradlensError(f"{what} {path} is {kind}; gradients need the detector's checkpoint (.pth, .pt, .ckpt, .bin).")
    if not path.is_file():
        state = "is not a regular file" if path.exists() else "does not exist"  # /dev/null, a FIFO
        raise GradlensError(f"The checkpoint {path} ({what}) {state}.")
    return path


def model_checkpoints(manifest: dict, workdir: Path, overrides: dict[str, str | os.PathLike] | None = None,
                      detectors: dict | None = None) -> dict[str, tuple]:
    """role -> (checkpoint, its SHA-256) for every model of the manifest, or one sentence saying which is missing;
    for a role in ``detectors`` (``DetectorRun.detectors``), (the detector object, its content digest).

    Each file is hashed once here: the hash both checks that a checkpoint given to
    ``select`` is unchanged and names the map store; so does an object's digest.
    """
    overrides, detectors = dict(overrides or {}), dict(detectors or {})
    roles = [m["role"] for m in manifest["models"]]
    unknown = sorted(set(overrides) - set(roles))
    if unknown:
        raise GradlensError(f"--checkpoint names role {unknown[0]!r}, but the selection's models are {', '.join(roles)}.")
    unknown = sorted(set(detectors) - set(roles))
    if unknown:
        raise GradlensError(f"DetectorRun.detectors names role {unknown[0]!r}, but the selection's models are {', '.join(roles)}.")
    both = sorted(set(detectors) & set(overrides))
    if both:
        raise GradlensError(f"Model {both[0]} is given both a checkpoint and a detector object; give one.")
    found = {}
    for model in manifest["models"]:
        role = model["role"]
        if role in detectors:
            found[role] = _given_detector(model, detectors[role])
            continue
        path = Path(overrides[role]) if role in overrides else _recorded_checkpoint(model, workdir)
        if path is None and model.get("kind") == "detector":
            raise GradlensError(
                f"Model {role} ({model.get('label')}) was given to select as a detector object, which no file holds: "
                f"pass the same object again, DetectorRun(detectors={{{role!r}: detector}}) (Python only)."
            )
        if path is None:
            given = {"detections": "a detection results file", "scores": "a score directory"}.get(model.get("kind"), model.get("kind"))
            raise GradlensError(
                f"Model {role} ({model.get('label')}) was given to select as {given}, and gradients need the network: "
                f"pass its checkpoint with --checkpoint {role}=PATH."
            )
        if role in overrides:
            require_checkpoint(path, f"--checkpoint {role}=")
        if not path.is_file():
            raise GradlensError(f"The checkpoint of model {role}, {path}, does not exist; pass it with --checkpoint {role}=PATH.")
        digest = sha256_file(path)
        if role not in overrides and model.get("kind") == "checkpoint" and model.get("sha256") and digest != model["sha256"]:
            raise GradlensError(f"The checkpoint {path} of model {role} changed since 'gradlens select'; run select again.")
        found[role] = (path, digest)
    return found


def _given_detector(model: dict, detector) -> tuple:
    """(detector, content digest) of an object given for a model, checked against what select scored."""
    from gradlens.models.detectors.adapter import detector_label
    from gradlens.scoring.sources import detector_source

    role = model["role"]
    source = detector_source(detector)  # one sentence if it is not a detector
    digest = source.sha256
    if model.get("kind") == "detector" and model.get("sha256") and digest != model["sha256"]:
        raise GradlensError(
            f"The detector object given for model {role} ({detector_label(detector)}) is not the one select scored: "
            "its weights or settings changed since; run select again with it."
        )
    return detector, digest


def workdir_maps(
    workdir: str | os.PathLike,
    image_ids: list[int] | None = None,
    config: AttributionConfig | None = None,
    detector_run: DetectorRun | None = None,
    checkpoints: dict[str, str | os.PathLike] | None = None,
    coco: CocoPaths | None = None,
    map_dtype: str = "float16",
    progress: bool | None = None,
    compute: bool = True,
    gt: GroundTruth | None = None,
) -> tuple[list[ModelMaps], GroundTruth]:
    """Make sure every model of the work directory has a map of every image in ``image_ids``.

    ``gt``: the work directory's ground truth if the caller already loaded it (with
    :func:`workdir_ground_truth`). ``image_ids`` defaults to the whole selection. Returns the stores (A
    first, then the baselines, as in the manifest) and the ground truth. A model that ``select`` was given as a
    detector object needs it again in ``detector_run.detectors`` (role -> object).
    """
    from gradlens.models.formats.checkpoints import load_detector

    workdir = Path(workdir)
    manifest = load_manifest(workdir)
    run = detector_run or DetectorRun.recorded(workdir)
    device = resolve_device(run.device)
    config = (config or AttributionConfig()).check(device)
    selected = selection_ids(workdir)
    ids = selected if image_ids is None else [int(i) for i in image_ids]
    # Batches are planned over the whole selection whatever subset is asked for, so an image's map is
    # computed with the same batch mates by 'figure --image-id', 'area-curve --top' and 'area-curve'.
    plan_ids = sorted(set(selected) | set(ids))
    gt = gt if gt is not None else workdir_ground_truth(manifest, coco)
    checkpoints_found = model_checkpoints(manifest, workdir, checkpoints, run.detectors)
    result = []
    for model in manifest["models"]:
        role = model["role"]
        source, digest = checkpoints_found[role]
        given = not isinstance(source, Path)  # a detector object (DetectorRun.detectors)
        detector = source.to(device) if given else load_detector(source, arch=run.arch, trust=run.trust, device=device)
        if device.type == "cpu" and hasattr(detector, "use_channels_last"):
            detector.use_channels_last()  # depthwise-conv backward is far faster in NHWC on the CPU
        key = map_store_key(detector, digest, gt, config, batch_size=run.batch_size)
        store = MapStore(workdir / "maps" / role / key_digest({**key, "map_dtype": map_dtype}), key, map_dtype=map_dtype,
                         remedy="it was changed outside gradlens; delete that folder and its maps are computed again")
        maps = ModelMaps(role=role, label=model.get("label", role), checkpoint=None if given else source, store=store,
                         sha256=digest, detector=source if given else None)
        if compute and config.target == "object":  # one map per object of these images (gradlens.attribution.objects)
            from gradlens.attribution.objects import compute_object_maps

            maps.run = compute_object_maps(detector, gt, ids, store, config, batch_size=run.batch_size, workers=run.workers,
                                           progress=progress, label=f"{role} ({maps.label})", plan_ids=plan_ids)
        elif compute:
            maps.run = compute_maps(detector, gt, ids, store, config, batch_size=run.batch_size, workers=run.workers,
                                    progress=progress, label=f"{role} ({maps.label})", plan_ids=plan_ids)
        result.append(maps)
        del detector
    return result, gt

