"""mmcv's ``batched_nms``, as mmdetection 2.x and 3.x run it after a dense head.

torchvision's ``batched_nms`` keeps the same boxes only when no two scores tie: on the CPU it runs one NMS per
class above 1,000 boxes (mmcv offsets every class into its own region of the plane and runs one NMS), it orders
tied scores with a *stable* sort (mmcv's kernel calls ``scores.sort(0, descending=True)``, PyTorch's default
sort), and it compares the overlap with the threshold in double precision (mmcv's kernel takes the threshold as
a float). A detector whose scores saturate (many exactly 1.0) kept 46 of 100 other boxes than the fork's own
pipeline did. This module follows mmcv 1.7.2's ``mmcv/ops/nms.py`` and ``csrc/pytorch/cpu/nms.cpp`` (mmcv 2.x
is the same), using torchvision's NMS kernel only on scores already in mmcv's order, where its own stable sort
keeps that order.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms

SPLIT_THRESHOLD = 10000  # mmcv's split_thr: from this many boxes on, one NMS per class


def mmcv_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """mmcv's ``nms`` (offset 0): indices of the kept boxes, best score first, ties in ``torch.sort``'s order."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.sort(0, descending=True)[1]
    threshold = float(torch.tensor(float(iou_threshold), dtype=torch.float32))  # the kernel's float argument
    return order[nms(boxes[order], scores[order], threshold)]


def mmcv_batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """mmcv's ``batched_nms`` (class-aware, ``type='nms'``): indices of the kept boxes, best score first."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offsets = labels.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    shifted = boxes + offsets[:, None]
    if shifted.shape[0] < SPLIT_THRESHOLD:
        return mmcv_nms(shifted, scores, iou_threshold)
    kept = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for label in torch.unique(labels):
        members = (labels == label).nonzero().view(-1)
        kept[members[mmcv_nms(shifted[members], scores[members], iou_threshold)]] = True
    keep = kept.nonzero().view(-1)
    return keep[scores[keep].sort(descending=True)[1]]
