"""Intersection over union of box *pairs*, the primitive that batched matching is built on.

Matching needs the IoU of each ground-truth object with only the detections of
its own image (and category), so gradlens computes IoU on a flat list of
candidate pairs rather than on dense per-image matrices: one kernel call for a
whole dataset, no Python loop over images.
"""

from __future__ import annotations

import torch


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` for COCO boxes ``[x, y, w, h]`` of shape ``(n, 4)``.

    The arithmetic is COCO evaluation's own (``pycocotools.mask.iou`` on
    non-crowd boxes): areas are ``w * h``, corners ``x + w``, and a pair that
    does not overlap — or whose union is empty — has IoU 0. Doing the same
    operations in the same order gives bit-identical values in float64, so ties
    are ties in both.
    """
    iw = torch.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])
    ih = torch.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])
    overlap = (iw > 0) & (ih > 0)
    inter = torch.where(overlap, iw * ih, torch.zeros_like(iw))
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return torch.where(overlap & (union > 0), inter / torch.where(union > 0, union, torch.ones_like(union)), torch.zeros_like(iw))
