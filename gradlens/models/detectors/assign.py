"""Which anchors learn which object: mmdetection's ``MaxIoUAssigner``, exactly.

torchvision's ``Matcher`` and mmdetection's assigner agree on easy scenes and
disagree where objects compete for an anchor (nested boxes, duplicates,
neighbours). mmdetection's low-quality step (``gt_max_assign_all``,
``min_pos_iou=0`` in the paper's RetinaNet ``train_cfg``) gives *every* anchor
that reaches a ground truth's maximum IoU to that ground truth, taking the
ground truths in order so that a later one wins; torchvision keeps each
anchor's own best match. Since the loss — and so the input gradient — depends
on the assignment, a checkpoint is scored with its own framework's rule.

The assignment here is vectorised: the upstream loop over ground-truth
objects is replaced by finding, for every anchor, the *last* object whose
maximum it reaches (a scatter-max over the few anchor/object pairs at an
object's maximum), which is the object the loop would have left in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IOU_EPS = 1e-6  # mmdetection's bbox_overlaps: union = max(union, eps)


def mmdet_box_overlaps(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """mmdetection's ``bbox_overlaps(boxes1, boxes2, mode='iou')``: an ``(N, M)`` IoU matrix, same arithmetic."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    # upstream's (rb - lt).clamp(0) on (N, M, 2) corners, one coordinate at a time and in place (same values)
    iw = torch.min(boxes1[:, None, 2], boxes2[None, :, 2]).sub_(torch.max(boxes1[:, None, 0], boxes2[None, :, 0])).clamp_(min=0)
    ih = torch.min(boxes1[:, None, 3], boxes2[None, :, 3]).sub_(torch.max(boxes1[:, None, 1], boxes2[None, :, 1])).clamp_(min=0)
    overlap = iw.mul_(ih)
    union = (area1[:, None] + area2[None, :]).sub_(overlap).clamp_(min=IOU_EPS)  # = torch.max(union, eps)
    return overlap.div_(union)


@dataclass(frozen=True)
class MaxIoUAssigner:
    """The paper's RetinaNet assigner: ``pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0``, low-quality matches on."""

    pos_iou_thr: float = 0.5
    neg_iou_thr: float = 0.4
    min_pos_iou: float = 0.0
    match_low_quality: bool = True  # Cascade R-CNN's RoI stages turn it off

    def assign(self, overlaps: Tensor) -> Tensor:
        """Per anchor: the matched object's index, ``-1`` for background, ``-2`` for ignored.

        ``overlaps`` is ``(objects, anchors)``. (mmdetection's own codes are
        ``i + 1``, ``0`` and ``-1``; these follow torchvision's ``Matcher`` so
        both rules feed the same loss code.)
        """
        num_gts, num_anchors = overlaps.shape
        if num_gts == 0 or num_anchors == 0:  # no object: every anchor is background
            return torch.full((num_anchors,), -1, dtype=torch.int64, device=overlaps.device)
        max_overlaps, argmax_overlaps = overlaps.max(dim=0)
        gt_max_overlaps, _ = overlaps.max(dim=1)
        codes = torch.full((num_anchors,), -1, dtype=torch.int64, device=overlaps.device)
        codes[(max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)] = 0
        positive = max_overlaps >= self.pos_iou_thr
        codes[positive] = argmax_overlaps[positive] + 1
        if not self.match_low_quality:
            return torch.where(codes > 0, codes - 1, torch.where(codes == 0, -1, -2))
        # low-quality step: for i in 0..G-1, every anchor whose IoU with object i equals object i's maximum goes to i
        reaches = overlaps == gt_max_overlaps[:, None]
        eligible = gt_max_overlaps >= self.min_pos_iou
        if not bool(eligible.all()):
            reaches &= eligible[:, None]
        objects, anchors = reaches.nonzero(as_tuple=True)  # sparse: the few anchors at each object's maximum
        winner = torch.full((num_anchors,), -1, dtype=torch.int64, device=overlaps.device)
        winner.scatter_reduce_(0, anchors, objects, reduce="amax")  # the loop's last writer wins
        reached = winner >= 0
        codes[reached] = winner[reached] + 1
        # mmdetection's codes -> matched index (>= 0), background (-1), ignored (-2)
        return torch.where(codes > 0, codes - 1, torch.where(codes == 0, -1, -2))
