"""Detection results in the standard COCO results format.

A results file is a JSON list of ``{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}`` records, as written by mmdetection, detectron2 and pycocotools tooling,
so gradlens reads other tools' output and other tools read gradlens'. Files are
checked strictly: a value that cannot be a detection is an error that names it,
unless the user asks for such records to be dropped, and then they are counted.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from gradlens.data.coco import GroundTruth, is_int64_id
from gradlens.errors import InvalidDetectionsError
from gradlens.fileio import atomic_path, parse_json, read_bytes, short_repr

REQUIRED_KEYS = ("image_id", "category_id", "bbox", "score")


@dataclass
class Detections:
    """Detections as flat arrays, in file order (``index`` is the record's position in the file)."""

    image_id: np.ndarray  # int64
    category_id: np.ndarray  # int64
    xywh: np.ndarray  # (n, 4) float64
    score: np.ndarray  # float64
    index: np.ndarray  # int64, position in the source file
    source: Path | None = None
    sha256: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def __len__(self) -> int:
        return len(self.score)

    @classmethod
    def from_arrays(cls, image_id, category_id, xywh, score, **kwargs) -> "Detections":
        score = np.asarray(score, dtype=np.float64)
        return cls(
            image_id=np.asarray(image_id, dtype=np.int64),
            category_id=np.asarray(category_id, dtype=np.int64),
            xywh=np.asarray(xywh, dtype=np.float64).reshape(-1, 4),
            score=score,
            index=np.arange(len(score), dtype=np.int64),
            **kwargs,
        )

    def to_records(self) -> list[dict]:
        """The COCO results list (what :func:`write_detections` writes)."""
        return [
            {"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
            for i, c, b, s in zip(self.image_id, self.category_id, self.xywh, self.score)
        ]


def write_detections(detections: Detections | list[dict], path: str | os.PathLike) -> Path:
    """Write a COCO results JSON file atomically."""
    import json

    records = detections.to_records() if isinstance(detections, Detections) else detections
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            json.dump(records, handle, separators=(",", ":"))
    return path


def _first_bad_record(data: list, where: str) -> InvalidDetectionsError | None:
    """Find the first record that breaks the format, for an error that points at it; None if
    there is none (records made in Python may hold NumPy numbers, which are numbers too)."""
    for i, rec in enumerate(data):
        entry = f"Entry {i} of {where}"
        if not isinstance(rec, dict):
            return InvalidDetectionsError(f"{entry} is not a JSON object; COCO results are a list of objects.")
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
            return InvalidDetectionsError(
                f"{entry} has no {', '.join(repr(k) for k in missing)}; "
                "COCO results need image_id, category_id, bbox and score."
            )
        for key in ("image_id", "category_id"):
            value = rec[key]
            if _is_id(value):
                continue
            if _is_number(value) and _fits_float(value) and float(value).is_integer():
                return InvalidDetectionsError(f"{entry} has a {key} {short_repr(value)} beyond the 64-bit integer range.")
            return InvalidDetectionsError(f"{entry} has a non-integer {key} {short_repr(value)}.")
        bbox = rec["bbox"]
        is_vector = isinstance(bbox, (list, tuple)) or (isinstance(bbox, np.ndarray) and bbox.ndim == 1)
        if not (is_vector and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            return InvalidDetectionsError(f"{entry} has a bbox {short_repr(bbox)} that is not four numbers [x, y, w, h].")
        if not all(_fits_float(v) for v in bbox):
            return InvalidDetectionsError(f"{entry} has a bbox {short_repr(bbox)} with a value beyond floating-point range.")
        if not _is_number(rec["score"]):
            return InvalidDetectionsError(f"{entry} has a score {short_repr(rec['score'])} that is not a number.")
        if not _fits_float(rec["score"]):
            return InvalidDetectionsError(f"{entry} has a score {short_repr(rec['score'])} beyond floating-point range.")
    return None


_NUMBER_TYPES = (int, float)  # exact types: bool is an int subclass but not a number here
_NUMBER_TYPE_SET = set(_NUMBER_TYPES)


def _is_number(value) -> bool:
    """A real number; bool, null and strings are not, whatever NumPy would cast them to."""
    return type(value) in _NUMBER_TYPES or isinstance(value, (np.integer, np.floating))


def _is_id(value) -> bool:
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    return is_int64_id(value)


def _fits_float(value) -> bool:
    try:
        float(value)
    except OverflowError:  # an integer with hundreds of digits
        return False
    return True


class _Record(msgspec.Struct, gc=False):
    """One well-formed results record; extra fields (segmentation, area, ...) are ignored."""

    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    score: float


_DECODER = msgspec.json.Decoder(list[_Record])


def _decode_fast(raw: bytes):
    """Typed decoding straight from bytes (several times faster than ``json`` for 500k records).

    Returns None for anything that is not a clean list of records, so that the
    slow path can say exactly what is wrong (and accept NaN, which Python's
    ``json`` writes but JSON does not allow, to report it as a value error).
    """
    try:
        records = _DECODER.decode(raw)
        n = len(records)
        return (
            np.fromiter((r.image_id for r in records), np.int64, n),
            np.fromiter((r.category_id for r in records), np.int64, n),
            np.array([r.bbox for r in records], dtype=np.float64).reshape(-1, 4),
            np.fromiter((r.score for r in records), np.float64, n),
        )
    except (msgspec.ValidationError, msgspec.DecodeError, OverflowError):  # OverflowError: ids past int64
        return None


def _parse_records(data: list, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Columns from the records in one pass each; any oddity falls back to a scan that names the record.

    Types are checked before NumPy sees the values, since NumPy would quietly
    turn ``"3"``, ``true`` and ``null`` inside a bbox into 3.0, 1.0 and NaN.
    """
    try:
        image_id = [rec["image_id"] for rec in data]
        category_id = [rec["category_id"] for rec in data]
        bbox = [rec["bbox"] for rec in data]
        score = [rec["score"] for rec in data]
        int_ok = all(is_int64_id(v) for v in image_id) and all(is_int64_id(v) for v in category_id)
        num_ok = set(map(type, score)) <= _NUMBER_TYPE_SET
        box_ok = set(map(len, bbox)) <= {4} and set(map(type, bbox)) <= {list}
        box_ok = box_ok and set(map(type, itertools.chain.from_iterable(bbox))) <= _NUMBER_TYPE_SET
        if not (int_ok and num_ok and box_ok):  # the quick check of JSON types failed: look closer
            bad = _first_bad_record(data, where)
            if bad is not None:
                raise bad
        return (
            np.array(image_id, dtype=np.int64),
            np.array(category_id, dtype=np.int64),
            np.array(bbox, dtype=np.float64).reshape(-1, 4),
            np.array(score, dtype=np.float64),
        )
    except (TypeError, KeyError, ValueError, OverflowError):
        raise _first_bad_record(data, where) or InvalidDetectionsError(f"Cannot read {where} as COCO results.") from None


def _invalid_value_masks(xywh: np.ndarray, score: np.ndarray) -> dict[str, np.ndarray]:
    finite = np.isfinite(xywh).all(axis=1) & np.isfinite(score)
    return {
        "non-finite box or score": ~finite,
        # zero is allowed: mmdetection keeps boxes clipped to zero area at the border (they match nothing)
        "negative box width or height": finite & ((xywh[:, 2] < 0) | (xywh[:, 3] < 0)),
        "score outside [0, 1]": finite & ((score < 0) | (score > 1)),
    }


def read_detections(
    path: str | os.PathLike,
    gt: GroundTruth | None = None,
    drop_invalid: bool = False,
    check_categories: bool = True,
) -> Detections:
    """Read and check a COCO results file.

    With ``gt``, every image id (and, with ``check_categories``, every category
    id) must exist in the annotations. Records with impossible values
    (negative box sizes, scores outside [0, 1], NaN) are an error, or,
    with ``drop_invalid``, dropped and counted in ``Detections.dropped``.
    """
    path = Path(path)
    raw = read_bytes(path, "detection results file")
    columns = _decode_fast(raw)
    if columns is None:
        data = parse_json(raw, path, "detection results file")
        if isinstance(data, dict) and "annotations" in data:
            raise InvalidDetectionsError(
                f"{path} looks like a COCO annotation file, not a results file (a JSON list of detections)."
            )
        if not isinstance(data, list):
            raise InvalidDetectionsError(f"{path} is not a COCO results file: expected a JSON list of detections.")
        columns = _parse_records(data, str(path))
    detections = _checked(columns, str(path), gt, drop_invalid, check_categories)
    detections.source, detections.sha256 = path, hashlib.sha256(raw).hexdigest()
    return detections


def detections_from_records(
    records: list[dict],
    gt: GroundTruth | None = None,
    drop_invalid: bool = False,
    check_categories: bool = True,
    name: str = "the detection list",
) -> Detections:
    """The same checks as :func:`read_detections`, for a results list already in memory."""
    if not isinstance(records, list):
        raise InvalidDetectionsError("Detections must be a list of COCO results records.")
    return _checked(_parse_records(records, name), name, gt, drop_invalid, check_categories, allow_empty=True)


def as_detections(value, gt: GroundTruth | None = None, check_categories: bool = True) -> Detections:
    """Accept what a notebook has at hand: :class:`Detections`, a results file path, a results list
    or a DataFrame with ``image_id, category_id, bbox, score`` columns (``bbox`` cells may be lists,
    tuples or arrays, and numbers NumPy's)."""
    if isinstance(value, Detections):
        return value
    if isinstance(value, (str, os.PathLike)):
        return read_detections(value, gt, check_categories=check_categories)
    if isinstance(value, list):
        return detections_from_records(value, gt, check_categories=check_categories)
    if hasattr(value, "to_dict") and hasattr(value, "columns"):
        records = value.to_dict("records")
        return detections_from_records(records, gt, check_categories=check_categories, name="the detection table")
    raise TypeError(f"Cannot read detections from a {type(value).__name__}.")


def _checked(
    columns, name: str, gt: GroundTruth | None, drop_invalid: bool, check_categories: bool, allow_empty: bool = False
) -> Detections:
    """Value checks shared by every way in: ranges, finiteness, ids known to the annotations."""
    image_id, category_id, xywh, score = columns
    if not len(score) and not allow_empty:
        raise InvalidDetectionsError(f"{_capital(name)} contains no detections (an empty list).")
    index = np.arange(len(score), dtype=np.int64)

    dropped: dict[str, int] = {}
    bad_any = np.zeros(len(score), dtype=bool)
    for reason, mask in _invalid_value_masks(xywh, score).items():
        count = int(mask.sum())
        if not count:
            continue
        if not drop_invalid:
            i = int(np.flatnonzero(mask)[0])
            raise InvalidDetectionsError(
                f"{_capital(name)} has {count} detection(s) with {reason} (first: entry {i}, bbox {xywh[i].tolist()}, "
                f"score {score[i]}); fix the file or pass --drop-invalid to skip them."
            )
        dropped[reason] = count
        bad_any |= mask

    if gt is not None:
        where = f"the annotation file {gt.path}"
        _check_ids(name, "image", image_id, gt.image_ids, where)
        if check_categories:
            _check_ids(name, "category", category_id, np.array(sorted(gt.category_names)), where)

    if bad_any.any():
        keep = ~bad_any
        image_id, category_id, xywh, score, index = image_id[keep], category_id[keep], xywh[keep], score[keep], index[keep]
        if not len(score):
            raise InvalidDetectionsError(f"Every detection in {name} is invalid ({_describe(dropped)}).")
    return Detections(image_id, category_id, xywh, score, index, dropped=dropped)


def _check_ids(name: str, kind: str, ids: np.ndarray, known: np.ndarray, where: str) -> None:
    unknown = ~np.isin(ids, known)
    if unknown.any():
        values = np.unique(ids[unknown])
        shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise InvalidDetectionsError(
            f"{_capital(name)} has {int(unknown.sum())} detection(s) whose {kind} id is not in {where} "
            f"({len(values)} distinct id(s): {shown}); were the results made on another dataset?"
        )


def _capital(name: str) -> str:
    """``name`` at the start of a sentence: "the detection list" is capitalised, a path is not."""
    return "T" + name[1:] if name.startswith("the ") else name


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} with {reason}" for reason, n in Counter(counts).most_common())
