"""Box arithmetic as mmdetection writes it: (cx, cy, w, h) conversions and generalised IoU.

Kept operation for operation (the order of the subtractions, the ``eps`` floors) so that losses built on them
agree with mmdetection's to float32 round-off.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(box: Tensor) -> Tensor:
    """mmdetection's ``bbox_cxcywh_to_xyxy``."""
    cx, cy, w, h = box.split((1, 1, 1, 1), dim=-1)
    return torch.cat([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def xyxy_to_cxcywh(box: Tensor) -> Tensor:
    """mmdetection's ``bbox_xyxy_to_cxcywh``."""
    x1, y1, x2, y2 = box.split((1, 1, 1, 1), dim=-1)
    return torch.cat([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def giou_matrix(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """mmdetection's ``bbox_overlaps(boxes1, boxes2, mode="giou")``: ``[n, m]`` generalised IoU of every pair."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    e = boxes1.new_tensor([eps])
    union = torch.max(area1[:, None] + area2[None, :] - overlap, e)
    enclose = (torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:]) - torch.min(boxes1[:, None, :2], boxes2[None, :, :2]))
    enclose = enclose.clamp(min=0)
    enclose_area = torch.max(enclose[..., 0] * enclose[..., 1], e)
    return overlap / union - (enclose_area - union) / enclose_area


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """mmdetection's ``giou_loss`` per box pair: ``1 - GIoU`` (``bbox_overlaps(..., is_aligned=True)``)."""
    area1 = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area2 = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    wh = (torch.min(pred[:, 2:], target[:, 2:]) - torch.max(pred[:, :2], target[:, :2])).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    e = pred.new_tensor([eps])
    union = torch.max(area1 + area2 - overlap, e)
    enclose = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0)
    enclose_area = torch.max(enclose[:, 0] * enclose[:, 1], e)
    return 1 - (overlap / union - (enclose_area - union) / enclose_area)
