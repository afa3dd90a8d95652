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
    return manifest
