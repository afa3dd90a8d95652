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

import numpy as np
import pandas as pd

from gradlens._version import __version__
from gradlens.errors import InputFileError
from gradlens.fileio import read_json, read_table, write_json, write_table
from gradlens.scoring.quality import QualityScores

SCORE_META = "score.json"
SCORE_FILES = (SCORE_META, "objects.csv", "objects.parquet", "images.csv", "images.parquet")
# What later steps read from score.json's summary (the CLI prints these).
SUMMARY_COUNTS = (
    "num_images", "num_images_scored", "num_images_without_objects", "num_images_with_objects_but_no_detections",
    "num_objects", "num_virtual_matches", "num_crowd_ignored", "num_detections",
)  # fmt: skip


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


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def _meta_problem(meta) -> str | None:
    """What is wrong with a ``score.json``, or None; later steps index it without further checks."""
    if not isinstance(meta, dict):
        return "is not a JSON object"
    for key in ("source", "annotations", "settings", "summary"):
        if not isinstance(meta.get(key), dict):
            return f"has no '{key}' object"
    if not isinstance(meta["annotations"].get("sha256"), str):
        return "records no annotation file hash"
    if not isinstance(meta["settings"].get("class_agnostic"), bool):
        return "does not record whether scoring was class-agnostic"
    summary = meta["summary"]
    bad = [k for k in SUMMARY_COUNTS if not _is_count(summary.get(k))]
    if bad:
        return f"has no count '{bad[0]}' in its summary"
    dropped = summary.get("num_detections_dropped", {})
    if not (isinstance(dropped, dict) and all(_is_count(n) for n in dropped.values())):
        return "has a malformed count of dropped detections"
    mean = summary.get("mean_image_quality")
    if mean is not None and type(mean) not in (int, float):
        return "has a mean image quality that is not a number"
    return None


def _table_problem(table: pd.DataFrame) -> str | None:
    """What is wrong with an objects or images table for ranking, or None."""
    missing = {"image_id", "quality"} - set(table.columns)
    if missing:
        return f"lacks the column(s) {', '.join(sorted(missing))}"
    if table.empty:  # nothing to rank; a CSV without rows has no dtypes to check
        return None
    if not pd.api.types.is_integer_dtype(table["image_id"]) or pd.api.types.is_bool_dtype(table["image_id"]):
        return "has image ids that are not all integers"
    quality = table["quality"]
    if not pd.api.types.is_numeric_dtype(quality) or pd.api.types.is_bool_dtype(quality):
        return "has quality values that are not all numbers"
    if not np.isfinite(quality.to_numpy(np.float64)).all():
        return "has missing or non-finite quality values"
    return None


def read_scores(directory: str | os.PathLike) -> tuple[QualityScores, dict]:
    """Read a score directory back as (:class:`QualityScores`, its ``score.json``), checking that
    it holds what ranking needs, so a damaged one is one sentence rather than a crash later."""
    directory = Path(directory)
    if not is_score_dir(directory):
        raise InputFileError(f"{directory} is not a score directory written by 'gradlens score' (no {SCORE_META}).")
    meta = read_json(directory / SCORE_META, "score metadata file")
    problem = _meta_problem(meta)
    if problem:
        raise InputFileError(f"The score directory {directory} is damaged: its {SCORE_META} {problem}; score the model again.")
    tables = {name: read_table(directory, name) for name in ("objects", "images")}
    for name, table in tables.items():
        problem = _table_problem(table)
        if problem:
            raise InputFileError(f"The score directory {directory} is damaged: its {name} table {problem}; score the model again.")
    return QualityScores(objects=tables["objects"], images=tables["images"], summary=meta["summary"]), meta


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
            _meta_problem(meta) is None
            and meta["source"].get("sha256") == source_sha256
            and meta["annotations"]["sha256"] == annotations_sha256
            and meta["settings"] == settings
        )
        return read_scores(directory) if current else None
    except InputFileError:
        return None


def remove_score_dir(directory: str | os.PathLike) -> bool:
    """Delete a score directory's own files (``score.json`` first, so it stops counting as scores
    at once) and the folder if nothing else is left; anything else in it is kept. True if it was one."""
    directory = Path(directory)
    if not is_score_dir(directory):
        return False
    for name in SCORE_FILES:
        (directory / name).unlink(missing_ok=True)
    if not any(directory.iterdir()):
        directory.rmdir()
    return True


def score_dir_digest(directory: str | os.PathLike) -> str:
    """One content hash for a score directory: the SHA-256 over its tables and metadata, in name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and not path.name.startswith("."):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
