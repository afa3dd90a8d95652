"""COCO ground truth: where it lives and the non-crowd objects that every score is measured against.

The annotation file is parsed once into flat NumPy arrays (one row per object),
so scoring can be vectorised across the whole dataset instead of looping over
images. pycocotools' :class:`~pycocotools.coco.COCO` index is kept beside them
for anything that wants the usual API (``gt.coco.loadImgs`` and friends).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from gradlens.errors import InputFileError
from gradlens.fileio import parse_json, read_bytes, short_repr

ENV_COCO_ROOT = "GRADLENS_COCO_ROOT"
DEFAULT_COCO_ROOT = Path("data/coco")
DEFAULT_SPLIT = "val2017"


@dataclass(frozen=True)
class CocoPaths:
    """The two halves of a COCO dataset on disk: the annotation file and the image folder."""

    ann: Path
    images: Path
    # Whether the user named the dataset (a flag, the environment variable or a CocoPaths of
    # their own) rather than falling back to ./data/coco; only a named annotation file is
    # held against the one that score directories record.
    given: bool = field(default=True, compare=False)
    # "ignore" (COCO boxes refer to the stored pixels) or "apply" (turn images as their EXIF tag says, as
    # OpenCV's IMREAD_COLOR does in mmdetection's loader)
    exif_orientation: str = "ignore"


def resolve_coco_paths(
    coco_root: str | os.PathLike | None = None,
    ann: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    split: str = DEFAULT_SPLIT,
    exif_orientation: str = "ignore",
) -> CocoPaths:
    """Apply DESIGN.md's precedence: ``--ann``/``--images``, else ``--coco-root``, else
    ``$GRADLENS_COCO_ROOT``, else ``./data/coco``, each holding the standard layout."""
    if coco_root is None:
        coco_root = os.environ.get(ENV_COCO_ROOT) or None
    given = ann is not None or coco_root is not None
    root = Path(coco_root) if coco_root is not None else DEFAULT_COCO_ROOT
    return CocoPaths(
        ann=Path(ann) if ann is not None else root / "annotations" / f"instances_{split}.json",
        images=Path(images) if images is not None else root / split,
        given=given,
        exif_orientation=exif_orientation,
    )


@dataclass
class GroundTruth:
    """Non-crowd COCO objects as flat arrays sorted by (image id, annotation id).

    ``boxes`` are corners ``[x1, y1, x2, y2]`` in the stored pixel layout of the
    image. Crowd annotations are not objects (COCO evaluation ignores them) and
    are only counted.
    """

    coco: COCO
    path: Path
    sha256: str
    image_ids: np.ndarray  # every image of the annotation file, sorted
    obj_image_id: np.ndarray
    obj_ann_id: np.ndarray
    obj_category_id: np.ndarray
    obj_xywh: np.ndarray  # (n, 4) float64, as annotated
    category_names: dict[int, str]
    num_crowd: int
    num_degenerate: int  # non-crowd objects with zero width or height
    images_dir: Path | None = None
    exif_orientation: str = "ignore"  # how images are decoded: see CocoPaths

    @property
    def boxes(self) -> np.ndarray:
        """Object boxes as corners ``[x1, y1, x2, y2]``."""
        xywh = self.obj_xywh
        return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)

    @property
    def num_objects(self) -> int:
        return len(self.obj_ann_id)

    def image_info(self, image_id: int) -> dict:
        """The annotation file's record of one image (``file_name``, ``width``, ``height``)."""
        try:
            return self.coco.imgs[int(image_id)]
        except KeyError:
            raise InputFileError(f"Image id {image_id} is not in the annotation file {self.path}.") from None

    def image_path(self, image_id: int) -> Path:
        """The image's file, which must lie inside the image folder (after resolving symlinks and ``..``).

        A dataset names files, it does not get to read the rest of the disk: a
        ``file_name`` like ``../secret.jpg`` or ``/etc/passwd`` is refused.
        """
        if self.images_dir is None:
            raise InputFileError("No image folder was given (use --coco-root or --images).")
        name = self.image_info(image_id)["file_name"]
        path = self.images_dir / name
        if not path.resolve().is_relative_to(Path(self.images_dir).resolve()):
            raise InputFileError(
                f"Image {image_id} has a file_name {name!r} that points outside the image folder {self.images_dir}; "
                "gradlens reads images only inside it."
            )
        return path


def _is_positive_integer(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and float(value).is_integer() and value > 0


def _is_finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        return False


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def is_int64_id(value) -> bool:
    """An id gradlens can hold in an int64 array: an integer, or an integral float (``4.0``) as
    pycocotools accepts; bools, strings, fractions and values beyond 64 bits are not ids."""
    if type(value) is float:
        if not value.is_integer():
            return False
    elif type(value) is not int:
        return False
    return INT64_MIN <= value <= INT64_MAX


def _check_id(value, what: str, where: str, path: Path) -> None:
    if not is_int64_id(value):
        raise InputFileError(f"{where} of {path} has {what} {short_repr(value)}, which is not an integer id of at most 64 bits.")


def _check_structure(data: object, path: Path) -> None:
    if not isinstance(data, dict):
        raise InputFileError(f"The annotation file {path} is not a COCO annotation object (expected a JSON object).")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputFileError(f"The annotation file {path} has no '{key}' list, so it is not in COCO format.")
    image_ids = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise InputFileError(f"Image entry {i} of {path} has no 'id'.")
        _check_id(img["id"], "the id", f"Image entry {i}", path)
        if img["id"] in image_ids:
            raise InputFileError(f"Image id {img['id']} appears more than once in {path}.")
        image_ids.add(img["id"])
        name = img.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise InputFileError(f"Image {img['id']} of {path} has no file_name (a non-empty string naming its file).")
        for key in ("width", "height"):
            if key in img and not _is_positive_integer(img[key]):
                raise InputFileError(f"Image {img['id']} of {path} has a {key} {short_repr(img[key])} that is not a positive integer.")
    category_ids = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise InputFileError(f"Category entry {i} of {path} has no 'id'.")
        _check_id(cat["id"], "the id", f"Category entry {i}", path)
        category_ids.add(cat["id"])
    ann_ids = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"id", "image_id", "category_id", "bbox"} <= ann.keys():
            raise InputFileError(
                f"Annotation entry {i} of {path} lacks one of 'id', 'image_id', 'category_id', 'bbox'."
            )
        for key in ("id", "image_id", "category_id"):
            _check_id(ann[key], f"the {key}", f"Annotation entry {i}", path)
        if ann["id"] in ann_ids:
            raise InputFileError(f"Annotation id {ann['id']} appears more than once in {path}.")
        ann_ids.add(ann["id"])
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)):
            raise InputFileError(f"Annotation {ann['id']} of {path} has a bbox that is not four finite numbers.")
        if bbox[2] < 0 or bbox[3] < 0:
            raise InputFileError(f"Annotation {ann['id']} of {path} has a negative box width or height.")
        if "iscrowd" in ann and not (type(ann["iscrowd"]) in (int, bool) and ann["iscrowd"] in (0, 1)):
            raise InputFileError(f"Annotation {ann['id']} of {path} has an iscrowd {short_repr(ann['iscrowd'])} that is not 0 or 1.")
        if "area" in ann and not _is_finite_number(ann["area"]):
            raise InputFileError(f"Annotation {ann['id']} of {path} has an area {short_repr(ann['area'])} that is not a number.")
        if ann["image_id"] not in image_ids:
            raise InputFileError(f"Annotation {ann['id']} of {path} refers to image {ann['image_id']}, which is not listed.")
        if ann["category_id"] not in category_ids:
            raise InputFileError(
                f"Annotation {ann['id']} of {path} has category {ann['category_id']}, which is not listed."
            )


def load_ground_truth(
    ann: str | os.PathLike | CocoPaths,
    images_dir: str | os.PathLike | None = None,
) -> GroundTruth:
    """Read a COCO ``instances_*.json`` into a :class:`GroundTruth` (through pycocotools' index)."""
    exif = "ignore"
    if isinstance(ann, CocoPaths):
        images_dir = ann.images if images_dir is None else images_dir
        ann, exif = ann.ann, ann.exif_orientation
    path = Path(ann)
    raw = read_bytes(path, "annotation file")
    gt = ground_truth_from_dict(parse_json(raw, path, "annotation file"), path, hashlib.sha256(raw).hexdigest(), images_dir)
    if not len(gt.image_ids):
        raise InputFileError(f"The annotation file {path} lists no images, so there is nothing to detect or score.")
    gt.exif_orientation = exif
    return gt


def ground_truth_from_dict(
    data: dict,
    path: str | os.PathLike = "<in-memory annotations>",
    sha256: str | None = None,
    images_dir: str | os.PathLike | None = None,
) -> GroundTruth:
    """Build a :class:`GroundTruth` from an annotation dict already in memory (checked like a file)."""
    path = Path(path)
    _check_structure(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()

    anns = sorted(coco.anns.values(), key=lambda a: (a["image_id"], a["id"]))
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    keep = [a for a, c in zip(anns, crowd) if not c]
    xywh = np.array([a["bbox"] for a in keep], dtype=np.float64).reshape(-1, 4)
    if sha256 is None:
        sha256 = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return GroundTruth(
        coco=coco,
        path=path,
        sha256=sha256,
        image_ids=np.array(sorted(coco.imgs), dtype=np.int64),
        obj_image_id=np.array([a["image_id"] for a in keep], dtype=np.int64),
        obj_ann_id=np.array([a["id"] for a in keep], dtype=np.int64),
        obj_category_id=np.array([a["category_id"] for a in keep], dtype=np.int64),
        obj_xywh=xywh,
        category_names={int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]},
        num_crowd=int(crowd.sum()),
        num_degenerate=int(((xywh[:, 2] <= 0) | (xywh[:, 3] <= 0)).sum()),
        images_dir=Path(images_dir) if images_dir is not None else None,
    )


def as_ground_truth(value) -> GroundTruth:
    """Accept what a notebook has at hand: :class:`GroundTruth`, :class:`CocoPaths`, an annotation
    file path, an annotation dict or a pycocotools ``COCO`` object."""
    if isinstance(value, GroundTruth):
        return value
    if isinstance(value, (CocoPaths, str, os.PathLike)):
        return load_ground_truth(value)
    if isinstance(value, COCO):
        return ground_truth_from_dict(value.dataset)
    if isinstance(value, dict):
        return ground_truth_from_dict(value)
    raise TypeError(f"Cannot read ground truth from a {type(value).__name__}.")
