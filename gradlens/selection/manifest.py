"""The work directory's ``manifest.json``: what was run, on what, with which settings.

Later commands (``area-curve``, ``figure``) read it so that they need no
arguments after ``gradlens select``, and a reader can tell exactly which inputs
(by content hash) produced a selection.
"""

from __future__ import annotations

import os
from pathlib import Path

from gradlens.errors import InputFileError
from gradlens.fileio import read_json, write_json

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
    models = manifest["models"]
    if not isinstance(models, list) or len(models) < 2:
        raise InputFileError(f"{path} names no models A and B; run 'gradlens select' again.")
    for k, model in enumerate(models):
        if not (isinstance(model, dict) and isinstance(model.get("role"), str) and model["role"]):
            raise InputFileError(f"Model entry {k} of {path} has no role; run 'gradlens select' again.")
        for key in ("label", "scores", "source", "detections", "sha256", "kind"):
            if model.get(key) is not None and not isinstance(model[key], str):
                raise InputFileError(f"Model {model['role']} of {path} has a {key} that is not text.")
    for key in ("dataset", "settings"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise InputFileError(f"{path} has a '{key}' that is not an object; run 'gradlens select' again.")
    return manifest
