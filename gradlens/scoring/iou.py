"""Intersection over union of box *pairs*, the primitive that batched matching is built on.

Matching needs the IoU of each ground-truth object with only the detections of
its own image (and category), so gradlens computes IoU on a flat list of
candidate pairs rather than on dense per-image matrices: one kernel call for a
whole dataset, no Python loop over images.
"""

from __future__ import annotations

import torch


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` for corner boxes ``[x1, y1, x2, y2]`` of shape ``(n, 4)``.

    Same convention as COCO evaluation (``pycocotools.mask.iou`` on non-crowd
    boxes): areas are ``w * h`` with no +1, and a pair whose union is empty
    (two degenerate boxes) has IoU 0 rather than NaN.
    """
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp_(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))
