"""``gradlens select`` as a Python function: score every model, rank, write the work directory."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from gradlens._version import __version__
from gradlens.data.coco import CocoPaths, GroundTruth, load_ground_truth
from gradlens.device import resolve_device
from gradlens.errors import GradlensError
from gradlens.fileio import require_file, sha256_file, write_table
from gradlens.scoring.sources import ModelSource, compute_scores, identify_source, save_scores
from gradlens.scoring.store import remove_score_dir
from gradlens.selection.improvement import DEFAULT_TOP, b_roles, select_images
from gradlens.selection.manifest import DEFAULT_WORKDIR, load_manifest, save_manifest


@dataclass
class SelectionResult:
    """The ranked selection, the manifest written beside it, and each model's score summary."""

    selection: pd.DataFrame
    manifest: dict
    summaries: dict[str, dict]
    workdir: Path
    removed: list[Path] = field(default_factory=list)  # score directories of an earlier selection's other roles


def _unique_labels(sources: list[ModelSource]) -> list[str]:
    labels, seen = [], {}
    for src in sources:
        label = src.label
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return labels


def _check_annotations(sources: list[ModelSource], roles: list[str], metas: dict[str, dict], coco: CocoPaths | None) -> None:
    """Refuse to compare qualities measured against different annotation files, including a
    named one (``--ann``/``--coco-root``) that score directories were not scored against."""
    from_dirs = [(role, src) for role, src in zip(roles, sources) if src.kind == "scores"]
    if coco is not None and coco.given and from_dirs:
        ann_sha = sha256_file(require_file(coco.ann, "annotation file"))
        for role, src in from_dirs:
            if metas[role]["annotations"]["sha256"] != ann_sha:
                raise GradlensError(
                    f"The score directory {src.path} was scored against another annotation file than {coco.ann}; "
                    "pass the annotation file it was scored with, or score the model again."
                )
    if len({m["annotations"]["sha256"] for m in metas.values()}) > 1:
        raise GradlensError("The models were scored against different annotation files, so their qualities cannot be compared.")


def _previous_score_dirs(workdir: Path) -> list[Path]:
    """The score directories the work directory's previous manifest says gradlens wrote (none if unreadable)."""
    try:
        previous = load_manifest(workdir)
    except GradlensError:
        return []
    folder = (workdir / "scores").resolve()
    dirs = []
    for model in previous.get("models") or []:
        rel = model.get("scores") if isinstance(model, dict) else None
        if isinstance(rel, str) and (workdir / rel).resolve().parent == folder:  # only scores/<role>, nothing else
            dirs.append(workdir / rel)
    return dirs


def _remove_stale_scores(workdir: Path, previous: list[Path], roles: list[str], sources: list[ModelSource]) -> list[Path]:
    """Remove the score directories an earlier selection wrote for roles this one has not (``b2``, ``b3``
    after a run with one baseline). Only those the earlier manifest recorded go — a folder of the user's own
    under ``scores/`` stays — and never one that this run read as an input. Returns what was removed."""
    keep = {(workdir / "scores" / role).resolve() for role in roles} | {src.path.resolve() for src in sources if src.path}
    removed = []
    for path in previous:
        if path.is_dir() and path.resolve() not in keep:
            remove_score_dir(path)
            removed.append(path)
    return removed


def _detector_settings(run) -> dict | None:
    """How checkpoints were run (None when no input was a checkpoint run by this call)."""
    if run is None:
        return None
    return {"arch": run.arch, "precision": run.precision, "batch_size": run.batch_size, "trust_checkpoint": run.trust}


def run_selection(
    a,
    b: list,
    coco: CocoPaths | None = None,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    top: int = DEFAULT_TOP,
    class_agnostic: bool = False,
    device: str = "cpu",
    drop_invalid: bool = False,
    progress: bool | None = False,
    detector_run=None,
) -> SelectionResult:
    """Score A and every B (reusing cached scores in ``workdir``), select the top images, write it all down.

    Writes ``selection.csv``/``.parquet``, ``scores/<role>/`` for each model and
    ``manifest.json`` (inputs with content hashes, settings, package version),
    then removes score directories of roles the new manifest does not name.
    Every input is read before anything is written, because an input may be a
    score directory inside this very work directory (``--a work/scores/b``).

    ``a`` and each of ``b``: a results file, a score directory or a checkpoint (paths), or a detector object
    (a :class:`gradlens.Detector` such as :class:`gradlens.LossDictDetector`; the manifest records it by its
    name and content digest, and the later steps get it again through ``DetectorRun(detectors={role: ...})``).
    """
    if not b:
        raise GradlensError("Give at least one baseline with --b.")
    if top < 1:
        raise GradlensError(f"--top must be at least 1 (got {top}).")
    workdir = Path(workdir)
    previous_scores = _previous_score_dirs(workdir)
    device = str(resolve_device(device))
    sources = [identify_source(a)] + [identify_source(p) for p in b]
    roles = ["a"] + b_roles(len(b))

    @functools.cache
    def load_gt() -> GroundTruth:
        if coco is None:
            raise GradlensError("Scoring a results file needs the annotations: pass --coco-root or --ann.")
        return load_ground_truth(coco)

    # Read everything first: nothing in the work directory is written until every input is in memory.
    scored = {}
    for role, src in zip(roles, sources):
        scored[role] = compute_scores(
            src, load_gt, class_agnostic=class_agnostic, device=device, drop_invalid=drop_invalid,
            cache_dir=workdir / "scores" / role, progress=progress, detector_run=detector_run,
        )  # fmt: skip
    metas = {role: meta for role, (_, meta, _) in scored.items()}
    _check_annotations(sources, roles, metas, coco)
    tables = {role: scores.images for role, (scores, _, _) in scored.items()}
    summaries = {role: scores.summary for role, (scores, _, _) in scored.items()}
    ranking = select_images(tables["a"], {r: tables[r] for r in roles[1:]}, top=None)
    selection = ranking.head(top)

    for role, (scores, meta, current) in scored.items():
        if not current:
            save_scores(scores, meta, workdir / "scores" / role)
    write_table(selection, workdir, "selection")

    labels = _unique_labels(sources)
    ann = next(iter(metas.values())).get("annotations", {})
    manifest = {
        "gradlens_version": __version__,
        "command": "select",
        "argv": sys.argv[1:],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {
            "annotations": ann.get("path"),
            "annotations_sha256": ann.get("sha256"),
            "images": str(coco.images.resolve()) if coco is not None else None,
            "exif_orientation": coco.exif_orientation if coco is not None else "ignore",
        },
        "settings": {"top": top, "class_agnostic": class_agnostic, "device": device, "drop_invalid": drop_invalid,
                     "detector": _detector_settings(detector_run)},
        "models": [
            {
                "role": role,
                "label": label,
                "kind": src.kind,
                "source": str(src.path.resolve()) if src.path is not None else None,  # None: a detector object
                "sha256": src.sha256,
                "scores": f"scores/{role}",
                "quality_column": f"quality_{role}",
                "detections": metas[role].get("source", {}).get("detections"),
            }
            for role, label, src in zip(roles, labels, sources)
        ],
        "outputs": {"selection": "selection.csv", "selection_parquet": "selection.parquet"},
        "counts": {
            "images_compared": int(len(ranking)),
            "images_selected": int(len(selection)),
        },
    }
    save_manifest(workdir, manifest)
    removed = _remove_stale_scores(workdir, previous_scores, roles, sources)
    return SelectionResult(selection=selection, manifest=manifest, summaries=summaries, workdir=workdir, removed=removed)
