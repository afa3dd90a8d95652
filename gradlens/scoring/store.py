"""Score directories: what ``gradlens score`` writes and ``gradlens select`` reads back.

A score directory holds ``objects`` and ``images`` tables (CSV and Parquet) and
``score.json``, which records where the detections and annotations came from
(with content hashes) and the settings, so a later step can tell whether two
score tables are comparable and whether a cached one is still valid.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from gradlens._version import __version__
from gradlens.errors import InputFileError
from gradlens.fileio import read_json, read_table, write_json, write_table
from gradlens.scoring.quality import QualityScores

SCORE_META = "score.json"


def is_score_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / SCORE_META).is_file()


def make_meta(scores: QualityScores, source: dict, annotations: dict, settings: dict) -> dict:
    """The ``score.json`` record: inputs with hashes, settings, and the counts of what was skipped."""
    return {
        "gradlens_version": __version__,
        "source": source,
        "annotations": annotations,
        "settings": settings,
        "summary": scores.summary,
    }


def write_scores(scores: QualityScores, directory: str | os.PathLike, source: dict, annotations: dict, settings: dict) -> dict:
    """Write the tables, then ``score.json`` last, so a directory with metadata is always complete."""
    directory = Path(directory)
    if (directory / SCORE_META).exists():
        (directory / SCORE_META).unlink()  # the tables are about to change: invalidate first
    write_table(scores.objects, directory, "objects")
    write_table(scores.images, directory, "images")
    meta = make_meta(scores, source, annotations, settings)
    write_json(directory / SCORE_META, meta)
    return meta


def read_scores(directory: str | os.PathLike) -> tuple[QualityScores, dict]:
    """Read a score directory back as (:class:`QualityScores`, its ``score.json``)."""
    directory = Path(directory)
    if not is_score_dir(directory):
        raise InputFileError(f"{directory} is not a score directory written by 'gradlens score' (no {SCORE_META}).")
    meta = read_json(directory / SCORE_META, "score metadata file")
    objects = read_table(directory, "objects")
    images = read_table(directory, "images")
    for name, table, needed in (("images", images, {"image_id", "quality"}), ("objects", objects, {"image_id", "quality"})):
        missing = needed - set(table.columns)
        if missing:
            raise InputFileError(f"The {name} table in {directory} lacks the column(s) {', '.join(sorted(missing))}.")
    return QualityScores(objects=objects, images=images, summary=meta.get("summary", {})), meta


def read_scores_if_current(
    directory: str | os.PathLike, source_sha256: str, annotations_sha256: str, settings: dict
) -> tuple[QualityScores, dict] | None:
    """Cached scores in ``directory`` if they were made from the same input, annotations and
    settings; None if not, or if the cache is incomplete or damaged (then it is simply redone)."""
    directory = Path(directory)
    if not is_score_dir(directory):
        return None
    try:
        meta = read_json(directory / SCORE_META, "score metadata file")
        current = (
            meta.get("source", {}).get("sha256") == source_sha256
            and meta.get("annotations", {}).get("sha256") == annotations_sha256
            and meta.get("settings") == settings
        )
        return read_scores(directory) if current else None
    except (InputFileError, AttributeError):
        return None


def score_dir_digest(directory: str | os.PathLike) -> str:
    """One content hash for a score directory: the SHA-256 over its tables and metadata, in name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and not path.name.startswith("."):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
