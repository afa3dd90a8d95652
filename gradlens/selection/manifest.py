"""The work directory's ``manifest.json``: what was run, on what, with which settings.

Later commands (``area-curve``, ``figure``) read it so that they need no
arguments after ``gradlens select``, and a reader can tell exactly which inputs
(by content hash) produced a selection.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from gradlens.data.images import EXIF_ORIENTATIONS
from gradlens.errors import InputFileError
from gradlens.fileio import read_json, short_repr, write_json

MANIFEST = "manifest.json"
DEFAULT_WORKDIR = Path("gradlens-runs/latest")


def save_manifest(workdir: str | os.PathLike, manifest: dict) -> Path:
    path = Path(workdir) / MANIFEST
    write_json(path, manifest)
    return path


def load_manifest(workdir: str | os.PathLike = DEFAULT_WORKDIR) -> dict:
    """Read a work directory's manifest, with a hint when ``select`` has not been run there."""
    path = Path(workdir) / MANIFEST
    if not path.is_file():
        raise InputFileError(f"{Path(workdir)} has no {MANIFEST}; run 'gradlens select' first or pass --workdir.")
    manifest = read_json(path, "manifest")
    if not isinstance(manifest, dict) or "models" not in manifest:
        raise InputFileError(f"{path} is not a gradlens manifest.")
    _check_manifest(manifest, path)
    # A first, then B, B1, B2...: the order select writes, which every comparison (A against each baseline) relies on
    manifest["models"] = sorted(manifest["models"], key=lambda m: (m["role"] != "a", len(m["role"]), m["role"]))
    return manifest


_ROLE = re.compile(r"^(a|b\d*)$")  # the roles select writes; they name folders, so nothing else is accepted


def _check_manifest(manifest: dict, path: Path) -> None:
    """Every field later commands use, type-checked once: a manifest is a file anyone can edit or send."""
    from gradlens.inference import PRECISIONS  # (torch and the models: only when a manifest is read)

    again = "run 'gradlens select' again"
    models = manifest["models"]
    if not isinstance(models, list) or len(models) < 2:
        raise InputFileError(f"{path} names no models A and B; {again}.")
    roles, labels = [], {}
    for k, model in enumerate(models):
        if not (isinstance(model, dict) and isinstance(model.get("role"), str) and model["role"]):
            raise InputFileError(f"Model entry {k} of {path} has no role; {again}.")
        role = model["role"]
        if not _ROLE.match(role) or role in roles:
            raise InputFileError(f"Model entry {k} of {path} has the role {role!r}; roles are a, b, b1, b2... each once.")
        roles.append(role)
        for key in ("label", "scores", "source", "detections", "sha256", "kind", "quality_column"):
            if model.get(key) is not None and not isinstance(model[key], str):
                raise InputFileError(f"Model {role} of {path} has a {key} that is not text.")
        label = model.get("label")
        if not (isinstance(label, str) and label.strip()):
            raise InputFileError(f"Model {role} of {path} has no label (the name its curves and tables carry); {again}.")
        if label in labels:
            raise InputFileError(f"Models {labels[label]} and {role} of {path} are both labelled {short_repr(label)}, "
                                 f"so their curves and tables could not be told apart; {again}.")
        labels[label] = role
        if model.get("scores") is not None and model["scores"] != f"scores/{role}":
            raise InputFileError(f"Model {role} of {path} keeps its scores in {model['scores']!r}, not scores/{role}; {again}.")
    for key in ("dataset", "settings", "outputs", "counts"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise InputFileError(f"{path} has a '{key}' that is not an object; {again}.")
    dataset = manifest.get("dataset") or {}
    for key in ("annotations", "annotations_sha256", "images"):
        if dataset.get(key) is not None and not isinstance(dataset[key], str):
            raise InputFileError(f"The dataset {key} in {path} is not text; {again}.")
    if dataset.get("exif_orientation") not in (None, *EXIF_ORIENTATIONS):
        raise InputFileError(f"The dataset exif_orientation in {path} is {dataset['exif_orientation']!r}, not ignore or apply.")
    detector = (manifest.get("settings") or {}).get("detector")
    if detector is not None:
        if not isinstance(detector, dict):
            raise InputFileError(f"The detector settings in {path} are not an object; {again}.")
        batch = detector.get("batch_size")
        if batch is not None and not (type(batch) is int and batch >= 1):
            raise InputFileError(f"The recorded batch size in {path} is {batch!r}, not a positive integer; {again}.")
        if detector.get("arch") is not None and not isinstance(detector["arch"], str):
            raise InputFileError(f"The recorded architecture in {path} is not text; {again}.")
        if detector.get("precision") not in (None, *PRECISIONS):
            raise InputFileError(f"The recorded precision in {path} is {detector['precision']!r}; {again}.")
