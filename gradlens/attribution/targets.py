"""Training targets of one image: what its total detection loss is measured against.

DESIGN: the loss of an image is computed against its non-crowd ground truth.
Objects are given to the detector exactly as its training pipeline gave them:
mmdetection's ``CocoDataset._parse_ann_info`` skips boxes narrower or lower
than one pixel, annotations whose ``area`` is not positive and boxes that do
not overlap the image; those are dropped here too and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gradlens.data.coco import GroundTruth
from gradlens.errors import GradlensError

MIN_BOX_SIDE = 1.0  # mmdetection's CocoDataset._parse_ann_info: `if w < 1 or h < 1: continue`


@dataclass
class ImageTargets:
    """Boxes (xyxy, original pixels) and contiguous labels of one image, plus what was left out."""

    image_id: int
    boxes: Tensor
    labels: Tensor
    num_too_small: int = 0
    ann_ids: tuple[int, ...] = ()  # the annotation id of each kept object, in the order of ``boxes``
    masks: Tensor | None = None  # uint8 (objects, height, width) for detectors with a mask loss, else None

    def as_dict(self) -> dict[str, Tensor]:
        target = {"boxes": self.boxes, "labels": self.labels}
        if self.masks is not None:
            target["masks"] = self.masks
        return target

    def for_object(self, index: int) -> dict:
        """The targets of object ``index``'s part of the loss (``-1``: the background's)."""
        return {**self.as_dict(), "object": int(index)}


def label_map(categories: list[dict]) -> dict[int, int]:
    """Dataset category id -> the detector's contiguous label (categories without an id are skipped)."""
    return {int(c["id"]): label for label, c in enumerate(categories) if c.get("id") is not None}


def _area(annotation: dict) -> float:
    """The annotation's ``area`` (segment area in COCO); files without one count as positive."""
    value = annotation.get("area", 1.0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0


def needs_masks(detector) -> bool:
    """Whether the detector's total loss has a mask term (Mask R-CNN), so its targets carry instance masks."""
    return bool(getattr(detector, "needs_masks", False))


def object_masks(gt: GroundTruth, image_id: int, ann_ids) -> Tensor:
    """The objects' instance masks at the image's size, from their COCO polygons or RLE (pycocotools'
    ``annToMask``, the decoding every COCO training pipeline uses)."""
    info = gt.image_info(image_id)
    height, width = info.get("height"), info.get("width")
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise GradlensError(f"Image {image_id} has no positive integer height and width in the annotation file, "
                            "which its objects' masks need.")
    masks = np.zeros((len(ann_ids), height, width), dtype=np.uint8)
    for k, ann_id in enumerate(ann_ids):
        annotation = gt.coco.anns[int(ann_id)]
        if not annotation.get("segmentation"):
            raise GradlensError(f"Annotation {ann_id} of image {image_id} has no segmentation, which a detector with "
                                "a mask loss (Mask R-CNN) needs.")
        try:
            masks[k] = gt.coco.annToMask(annotation)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise GradlensError(f"The segmentation of annotation {ann_id} (image {image_id}) cannot be decoded "
                                f"({exc}).") from None
    return torch.from_numpy(masks)


def image_targets(gt: GroundTruth, image_id: int, categories: list[dict], masks: bool = False) -> ImageTargets:
    """The non-crowd objects of ``image_id`` as the detector's training targets (with ``masks``: their instance
    masks too, see :func:`needs_masks`)."""
    image_id = int(image_id)
    gt.image_info(image_id)  # a clear error for an unknown id
    rows = np.flatnonzero(gt.obj_image_id == image_id)
    xywh = gt.obj_xywh[rows]
    info = gt.image_info(image_id)
    width, height = float(info.get("width") or np.inf), float(info.get("height") or np.inf)
    inter_w = np.maximum(0, np.minimum(xywh[:, 0] + xywh[:, 2], width) - np.maximum(xywh[:, 0], 0))
    inter_h = np.maximum(0, np.minimum(xywh[:, 1] + xywh[:, 3], height) - np.maximum(xywh[:, 1], 0))
    area = np.array([_area(gt.coco.anns[int(a)]) for a in gt.obj_ann_id[rows]], dtype=np.float64)
    keep = (inter_w * inter_h > 0) & (area > 0) & (xywh[:, 2] >= MIN_BOX_SIDE) & (xywh[:, 3] >= MIN_BOX_SIDE)
    labels_of = label_map(categories)
    cats = gt.obj_category_id[rows][keep]
    unknown = sorted({int(c) for c in cats if int(c) not in labels_of})
    if unknown:
        names = ", ".join(f"{c} ({gt.category_names.get(c, '?')})" for c in unknown)
        raise GradlensError(
            f"Image {image_id} has objects of categories {names} that the detector does not know; "
            "its loss cannot be computed (is this the dataset the detector was trained for?)."
        )
    kept = xywh[keep]
    boxes = np.concatenate([kept[:, :2], kept[:, :2] + kept[:, 2:]], axis=1) if len(kept) else np.zeros((0, 4))
    return ImageTargets(
        image_id=image_id,
        boxes=torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.as_tensor([labels_of[int(c)] for c in cats], dtype=torch.int64),
        num_too_small=int((~keep).sum()),
        ann_ids=tuple(int(a) for a in gt.obj_ann_id[rows][keep]),
        masks=object_masks(gt, image_id, gt.obj_ann_id[rows][keep]) if masks else None,
    )
