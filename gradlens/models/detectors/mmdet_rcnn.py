"""mmdetection 2.x Mask R-CNN and Cascade Mask R-CNN as the CEDNet fork builds them, with an exact expected loss.

The network is the fork's (``configs/cednet/{convnext,swin,cswin}/mask_rcnn_*`` and ``cascade_mask_rcnn_*``):
a backbone giving P2..P6 (CEDNet's ``CEDNetWrapperTwoStage``, or a plain backbone under mmdetection's FPN with
a max-pooled P6), ``RPNHead``, ``SingleRoIExtractor`` (mmdetection's level mapping, ``finest_scale=56``, over
``torchvision.ops.roi_align`` with ``aligned=True, sampling_ratio=0``: bit-equal to mmcv's ``RoIAlign`` forward and
backward, with a faster backward of its own, :mod:`gradlens.models.detectors.roi_align`), a box head per
stage (``Shared2FCBBoxHead``; Cascade's ``ConvFCBBoxHead``, 4 convs + 1 fc with batch norm in inference mode)
and ``FCNMaskHead``. Test arithmetic is mmdetection's: RPN proposals per level (``nms_pre``), decoded and
clipped, level-wise NMS; box decoding, rescaling to the original image and ``multiclass_nms`` (score 0.05,
NMS 0.5, 100 per image); Cascade averages the stages' class logits.

**The total detection loss is the expectation of the training loss over its samplers** (DESIGN: total
detection loss). mmdetection trains the RPN on ``RandomSampler(num=256, pos_fraction=0.5)`` of the anchors
and the RoI head on ``RandomSampler(num=512, pos_fraction=0.25, add_gt_as_proposals=True)`` of the proposals.
The counts a draw takes are fixed by the candidate counts (:mod:`gradlens.models.detectors.sampling`), so
every normaliser is fixed and each term is a sum over *every* candidate weighted by its chance of being drawn:

- ``loss_rpn_cls``: sigmoid cross-entropy of the positive and negative anchors, weighted, over
  ``max(positives drawn, 1) + max(negatives drawn, 1)`` (mmdetection's ``num_total_samples``);
- ``loss_rpn_bbox``: L1 of the positive anchors' deltas (means 0, stds 1; Cascade: smooth L1, beta 1/9),
  weighted, same normaliser;
- ``loss_cls``: softmax cross-entropy over the ground-truth boxes and the training proposals (``rpn_proposal``:
  2,000 per level before NMS 0.7, 1,000 after), weighted, over ``max(drawn, 1)``;
- ``loss_bbox``: L1 of the ground-truth class's deltas (stds 0.1/0.1/0.2/0.2) of the positive RoIs, weighted,
  over the number drawn; Cascade: GIoU x 10 of the decoded boxes;
- ``loss_mask``: per-pixel binary cross-entropy of the positive RoIs' 28 x 28 masks against the ground-truth
  mask cropped and resized onto each RoI (``mask_target``: RoIAlign of the binary mask, then ``>= 0.5``),
  weighted, over (positives drawn) x 28 x 28.

mmdetection divides by ``avg_factor + float32 eps``; so does gradlens. Cascade's later stages train on the
*sampled* RoIs of the stage before, refined: see :class:`MMDetTwoStage` for what gradlens computes there.
Gradients flow where mmdetection lets them: proposals and refined boxes are detached.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from gradlens.errors import GradlensError
from gradlens.models.detectors.anchors import AnchorConfig, MMDetAnchorGenerator
from gradlens.models.detectors.assign import MaxIoUAssigner, mmdet_box_overlaps
from gradlens.models.detectors.boxes import giou_loss
from gradlens.models.detectors.nms import mmcv_batched_nms
from gradlens.models.detectors.roi_align import roi_align as fast_roi_align
from gradlens.models.detectors.mmdet_targets import resized_boxes, resized_masks, scale_factor
from gradlens.models.detectors.sampling import (expected_count_probabilities, inclusion_probabilities, owner_sums,
                                               owner_terms)
from gradlens.models.preprocessing.transform import PreprocessConfig, batch_images
from gradlens.precision import full_precision

EPS = float(torch.finfo(torch.float32).eps)  # mmdetection's weight_reduce_loss: sum / (avg_factor + eps)
RPN_ANCHORS = AnchorConfig(strides=(4, 8, 16, 32, 64), octave_base_scale=8.0, scales_per_octave=1)
STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
STAGE_IOUS = (0.5, 0.6, 0.7)
TERMS = ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask")


@dataclass(frozen=True)
class ProposalConfig:
    """The RPN's ``test_cfg.rpn`` / ``train_cfg.rpn_proposal``."""

    nms_pre: int
    max_per_img: int = 1000
    nms_iou: float = 0.7
    min_bbox_size: float = 0.0


@dataclass(frozen=True)
class RCNNConfig:
    """The fork's two-stage ``train_cfg`` and ``test_cfg`` (its ``_base_/models/*mask_rcnn*_fpn.py``)."""

    rpn_test: ProposalConfig = ProposalConfig(nms_pre=1000)
    rpn_train: ProposalConfig = ProposalConfig(nms_pre=2000)
    rpn_num: int = 256
    rpn_pos_fraction: float = 0.5
    rcnn_num: int = 512
    rcnn_pos_fraction: float = 0.25
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5
    mask_size: int = 28
    stage_loss_weights: tuple[float, ...] = (1.0, 0.5, 0.25)
    rcnn_low_quality: bool = True  # the RoI assigners' match_low_quality (Cascade: False)
    rpn_smooth_l1_beta: float = 0.0  # the RPN's box loss: L1 (0), or SmoothL1Loss with this beta (Cascade: 1/9)

    def to_dict(self) -> dict:
        return asdict(self)


CASCADE_CONFIG = RCNNConfig(rpn_train=ProposalConfig(nms_pre=2000, max_per_img=2000), rcnn_low_quality=False,
                            rpn_smooth_l1_beta=1.0 / 9.0)


def rpn_box_loss(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """The RPN's per-coordinate box loss: mmdetection's ``l1_loss`` (``beta`` 0) or ``smooth_l1_loss``."""
    diff = (pred - target).abs()
    return diff if beta <= 0 else torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


# ---------------------------------------------------------------------------------------------
# box arithmetic (mmdetection's DeltaXYWHBBoxCoder, bbox_overlaps(mode='giou', is_aligned=True))


def delta_decode(rois: Tensor, deltas: Tensor, stds=(1.0, 1.0, 1.0, 1.0), max_shape=None) -> Tensor:
    """mmdetection 2.x ``delta2bbox`` (means 0): ``deltas`` ``(N, 4 * C)`` on ``rois`` ``(N, 4)`` -> boxes ``(N, 4 * C)``."""
    n = deltas.shape[0]
    if n == 0:
        return deltas
    classes = deltas.shape[1] // 4
    d = deltas.reshape(-1, 4) * deltas.new_tensor(stds).view(1, -1) + deltas.new_zeros(1, 4)
    r = rois.repeat(1, classes).reshape(-1, 4)
    pxy = (r[:, :2] + r[:, 2:]) * 0.5
    pwh = r[:, 2:] - r[:, :2]
    max_ratio = abs(math.log(16 / 1000))
    gxy = pxy + pwh * d[:, :2]
    gwh = pwh * d[:, 2:].clamp(min=-max_ratio, max=max_ratio).exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if max_shape is not None:
        h, w = max_shape
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                             boxes[:, 3].clamp(0, h)], dim=-1)
    return boxes.reshape(n, -1)


def delta_encode(rois: Tensor, gt: Tensor, stds=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """mmdetection 2.x ``bbox2delta`` (means 0): regression targets of ``gt`` on ``rois``."""
    pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
    pwh = rois[:, 2:] - rois[:, :2]
    gxy = (gt[:, :2] + gt[:, 2:]) * 0.5
    gwh = gt[:, 2:] - gt[:, :2]
    deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=-1)
    return (deltas - deltas.new_zeros(1, 4)) / deltas.new_tensor(stds).view(1, -1)


# ---------------------------------------------------------------------------------------------
# modules, under mmdetection's parameter names (checkpoints load without renaming)


class MMDetFPN(nn.Module):
    """mmdetection's ``FPN`` (``start_level=0``, no extra convs): laterals, top-down nearest upsampling added
    to the finer lateral, 3x3 output convs, then P(n+1) = ``max_pool2d(P_n, 1, stride=2)`` up to ``num_outs``."""

    def __init__(self, in_channels: list[int], out_channels: int = 256, num_outs: int = 5):
        super().__init__()
        self.lateral_convs = nn.ModuleList([_ConvModule(c, out_channels, 1) for c in in_channels])
        self.fpn_convs = nn.ModuleList([_ConvModule(out_channels, out_channels, 3) for _ in in_channels])
        self.num_outs = num_outs

    def forward(self, inputs) -> list[Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


class _ConvModule(nn.Module):
    """mmcv's ``ConvModule`` as these heads use it: ``conv`` (no bias under a norm), optional ``bn``, optional ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, norm: bool = False, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(c_out)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class RPNHead(nn.Module):
    """mmdetection's ``RPNHead``: a shared 3x3 conv + ReLU, sigmoid objectness and box deltas per anchor."""

    def __init__(self, channels: int = 256, anchors: int = 3):
        super().__init__()
        self.rpn_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, anchors, 1)
        self.rpn_reg = nn.Conv2d(channels, anchors * 4, 1)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Objectness logits ``(N, A_total)`` and deltas ``(N, A_total, 4)``, level-major, mmdetection's order."""
        logits, deltas = [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            logits.append(self.rpn_cls(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1))
            deltas.append(self.rpn_reg(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4))
        return torch.cat(logits, 1), torch.cat(deltas, 1)


class ConvFCBBoxHead(nn.Module):
    """mmdetection's ``ConvFCBBoxHead`` with shared layers only: ``Shared2FCBBoxHead`` (0 convs, 2 fcs) and
    Cascade's ``4conv1f`` (4 conv + BN + ReLU, 1 fc); class-specific regression, background the last class."""

    def __init__(self, num_classes: int, convs: int = 0, fcs: int = 2, channels: int = 256, fc_channels: int = 1024,
                 roi_size: int = 7):
        super().__init__()
        self.shared_convs = nn.ModuleList([_ConvModule(channels, channels, 3, norm=True, relu=True) for _ in range(convs)])
        self.shared_fcs = nn.ModuleList([nn.Linear(channels * roi_size * roi_size if i == 0 else fc_channels, fc_channels)
                                         for i in range(fcs)])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """mmdetection's ``FCNMaskHead``: 4 x (3x3 conv + ReLU), a stride-2 transposed conv + ReLU, 1x1 logits."""

    def __init__(self, num_classes: int, channels: int = 256, convs: int = 4):
        super().__init__()
        self.convs = nn.ModuleList([_ConvModule(channels, channels, 3, relu=True) for _ in range(convs)])
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


class RoIHead(nn.Module):
    """``roi_head``: one box head and one mask head (Mask R-CNN), or a list of each (Cascade)."""

    def __init__(self, num_classes: int, cascade: bool, with_mask: bool = True, channels: int = 256,
                 fc_channels: int = 1024):
        super().__init__()
        box = dict(channels=channels, fc_channels=fc_channels)
        if cascade:
            self.bbox_head = nn.ModuleList([ConvFCBBoxHead(num_classes, convs=4, fcs=1, **box) for _ in range(3)])
            if with_mask:
                self.mask_head = nn.ModuleList([FCNMaskHead(num_classes, channels) for _ in range(3)])
        else:
            self.bbox_head = ConvFCBBoxHead(num_classes, **box)
            if with_mask:
                self.mask_head = FCNMaskHead(num_classes, channels)


def extract_roi_features(feats: list[Tensor], rois: Tensor, size: int, strides=(4, 8, 16, 32),
                         finest_scale: float = 56.0) -> Tensor:
    """mmdetection's ``SingleRoIExtractor`` for one image: each box ``(x1, y1, x2, y2)`` pooled from level
    ``clamp(floor(log2(sqrt(area) / 56 + 1e-6)), 0, 3)`` with mmcv's ``RoIAlign(aligned=True, sampling_ratio=0)``."""
    out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], size, size)
    if rois.shape[0] == 0:
        return out
    scale = torch.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(min=0, max=len(strides) - 1).long()
    boxes = torch.cat([rois.new_zeros(rois.shape[0], 1), rois], dim=1)
    for i, stride in enumerate(strides):
        inds = (levels == i).nonzero().squeeze(1)
        if inds.numel():
            pooled = fast_roi_align(feats[i], boxes[inds].to(feats[i].dtype), size, 1.0 / stride)
            out = out.index_put((inds,), pooled)
    return out


# ---------------------------------------------------------------------------------------------
# the detector


class MMDetTwoStage(nn.Module):
    """A Mask R-CNN (``cascade=False``) or Cascade Mask R-CNN of mmdetection 2.x as a gradlens detector.

    ``backbone(x)`` returns P2..P6 (``neck=None``, CEDNet) or the maps the ``neck`` (:class:`MMDetFPN`) reads.
    Labels are contiguous ``0..num_classes-1``; ``categories`` maps them to dataset ids.

    Cascade's stage ``t > 1`` trains on stage ``t - 1``'s *sampled* RoIs, refined by that stage's regression
    (ground-truth RoIs dropped, the ground truth added again). gradlens takes stage ``t``'s candidates as every
    candidate of stage ``t - 1`` that can be drawn, refined, each weighted by its probability of reaching stage
    ``t`` (the product of the stages' inclusion probabilities), and stage ``t``'s own draw from the *expected*
    counts of its candidates. That is exact whenever stage ``t`` draws all its candidates (at most 128 positive,
    at most 512 in all, the usual case) and the stage before draws every positive; otherwise an approximation
    whose distance from the Monte-Carlo average is measured in ``benchmarks/README.md``.
    """

    framework = "mmdetection"

    def __init__(self, backbone: nn.Module, num_classes: int, *, neck: nn.Module | None = None, cascade: bool = False,
                 with_mask: bool = True, preprocess: PreprocessConfig | None = None, config: RCNNConfig | None = None,
                 arch_name: str = "mask_rcnn", channels: int = 256, fc_channels: int = 1024):
        super().__init__()
        self.backbone = backbone
        if neck is not None:
            self.neck = neck
        self.rpn_head = RPNHead(channels)
        self.roi_head = RoIHead(num_classes, cascade, with_mask, channels, fc_channels)
        self.num_classes = num_classes
        self.cascade = cascade
        self.with_mask = with_mask
        self.preprocess = preprocess or PreprocessConfig(min_size=800, max_size=1333, size_divisor=32, convention="mmcv")
        self.config = config or (CASCADE_CONFIG if cascade else RCNNConfig())
        self.arch_name = arch_name
        self.anchor_generator = MMDetAnchorGenerator(RPN_ANCHORS)
        self.rpn_assigner = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3)
        self.channels_last = False
        self.categories = [{"id": i + 1, "name": f"class_{i + 1}"} for i in range(num_classes)]

    # -- interface members -----------------------------------------------------------------------

    @property
    def loss_terms(self) -> tuple[str, ...]:
        return TERMS if self.with_mask else TERMS[:-1]

    @property
    def needs_masks(self) -> bool:
        """The mask term needs the objects' instance masks (the pipeline gives them from COCO)."""
        return self.with_mask

    @property
    def postprocess_revision(self) -> int:
        return 1

    def use_channels_last(self, enabled: bool = True) -> "MMDetTwoStage":
        """The CPU speed mode of :meth:`RetinaNetDetector.use_channels_last`: convolutions in NHWC and channel
        LayerNorms fused (equal to the reference up to round-off), unless a module needs contiguous memory."""
        from gradlens.models.backbones.layers import channels_last_mode

        self.channels_last = channels_last_mode(self, enabled)
        return self

    # -- the network -----------------------------------------------------------------------------

    @property
    def box_heads(self) -> list[ConvFCBBoxHead]:
        heads = self.roi_head.bbox_head
        return list(heads) if isinstance(heads, nn.ModuleList) else [heads]

    @property
    def mask_heads(self) -> list[FCNMaskHead]:
        if not self.with_mask:
            return []
        heads = self.roi_head.mask_head
        return list(heads) if isinstance(heads, nn.ModuleList) else [heads]

    def features(self, batch: Tensor) -> list[Tensor]:
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        maps = self.backbone(batch)
        if hasattr(self, "neck"):
            maps = self.neck(list(maps))
        maps = list(maps)
        if len(maps) != 5:
            raise GradlensError(f"the two-stage backbone gave {len(maps)} maps, not the five levels P2..P6 its RPN reads")
        if maps[0].dtype in (torch.float16, torch.bfloat16):
            maps = [m.float() for m in maps]
        return maps

    def rpn(self, feats: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Objectness logits and deltas of one image (``[A_total]``, ``[A_total, 4]``) and its per-level anchors."""
        logits, deltas = self.rpn_head(feats)
        sizes = [tuple(f.shape[-2:]) for f in feats]
        levels = self.anchor_generator.level_anchors(sizes, feats[0].device, torch.float32)
        return logits[0], deltas[0], levels

    def proposals(self, logits: Tensor, deltas: Tensor, levels: list[Tensor], size, cfg: ProposalConfig) -> Tensor:
        """mmdetection's ``RPNHead._get_bboxes_single`` (detached): the proposal boxes ``(n, 4)``, best first."""
        logits, deltas = logits.detach().float(), deltas.detach().float()
        scores, boxes_pred, anchors, ids = [], [], [], []
        start = 0
        for i, level in enumerate(levels):
            end = start + level.shape[0]
            s, d, a = logits[start:end].sigmoid(), deltas[start:end], level
            start = end
            if 0 < cfg.nms_pre < s.shape[0]:
                s, order = s.sort(descending=True)
                s, top = s[: cfg.nms_pre], order[: cfg.nms_pre]
                d, a = d[top], a[top]
            scores.append(s)
            boxes_pred.append(d)
            anchors.append(a)
            ids.append(torch.full((s.shape[0],), i, dtype=torch.long, device=s.device))
        scores, ids = torch.cat(scores), torch.cat(ids)
        boxes = delta_decode(torch.cat(anchors), torch.cat(boxes_pred), max_shape=size)
        if cfg.min_bbox_size >= 0:
            valid = ((boxes[:, 2] - boxes[:, 0]) > cfg.min_bbox_size) & ((boxes[:, 3] - boxes[:, 1]) > cfg.min_bbox_size)
            if not bool(valid.all()):
                boxes, scores, ids = boxes[valid], scores[valid], ids[valid]
        if boxes.numel() == 0:
            return boxes.new_zeros(0, 4)
        keep = mmcv_batched_nms(boxes, scores, ids, cfg.nms_iou)
        return boxes[keep][: cfg.max_per_img]

    def box_forward(self, stage: int, feats: list[Tensor], rois: Tensor) -> tuple[Tensor, Tensor]:
        pooled = extract_roi_features(feats[:4], rois, 7)
        return self.box_heads[stage](pooled)

    def mask_forward(self, stage: int, feats: list[Tensor], rois: Tensor) -> Tensor:
        return self.mask_heads[stage](extract_roi_features(feats[:4], rois, 14))

    def prepare(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        return batch_images(images, self.preprocess)

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image in original pixels (``boxes``, ``scores``, ``labels``, and ``masks``: boolean
        ``[n, H, W]`` instance masks where the detector has a mask head), one image at a time."""
        return [self._detect_one(image) for image in images]

    def _scale_factor(self, image: Tensor, size) -> Tensor:
        return scale_factor(image, size)

    def _detect_one(self, image: Tensor, feats: list[Tensor] | None = None, size=None) -> dict[str, Tensor]:
        if feats is None:
            batch, (size,) = self.prepare([image])
            feats = self.features(batch)
        logits, deltas, levels = self.rpn(feats)
        rois = self.proposals(logits, deltas, levels, size, self.config.rpn_test)
        scale = self._scale_factor(image, size)
        empty = {"boxes": rois.new_zeros(0, 4), "scores": rois.new_zeros(0),
                 "labels": torch.zeros(0, dtype=torch.long, device=rois.device)}
        if self.with_mask:
            empty["masks"] = torch.zeros((0, *image.shape[-2:]), dtype=torch.bool, device=rois.device)
        if rois.shape[0] == 0:
            return empty
        heads = self.box_heads
        cls_scores = []
        for stage in range(len(heads)):
            cls_score, bbox_pred = map(full_precision, self.box_forward(stage, feats, rois))
            cls_scores.append(cls_score)
            if stage < len(heads) - 1:  # Cascade: regress by each RoI's best foreground class
                label = cls_score[:, :-1].argmax(dim=1)
                rois = self._regress(stage, rois, label, bbox_pred, size)
        cls_score = sum(cls_scores) / float(len(cls_scores)) if len(cls_scores) > 1 else cls_scores[0]
        scores = F.softmax(cls_score, dim=-1)
        boxes = delta_decode(rois, bbox_pred, STAGE_STDS[len(heads) - 1 if self.cascade else 0], max_shape=size)
        boxes = (boxes.view(boxes.shape[0], -1, 4) / scale).view(boxes.shape[0], -1)
        det_boxes, det_scores, det_labels = self._multiclass_nms(boxes, scores)
        out = {"boxes": det_boxes, "scores": det_scores, "labels": det_labels}
        if self.with_mask:
            out["masks"] = self._masks(feats, det_boxes, det_labels, scale, tuple(image.shape[-2:]))
        return out

    def _regress(self, stage: int, rois: Tensor, labels: Tensor, bbox_pred: Tensor, size) -> Tensor:
        """mmdetection's ``BBoxHead.regress_by_class``: each RoI moved by its ``labels`` class's deltas, clipped."""
        pred = bbox_pred.view(bbox_pred.shape[0], -1, 4)[torch.arange(len(labels), device=labels.device), labels]
        return delta_decode(rois, pred, STAGE_STDS[stage], max_shape=size)

    def _multiclass_nms(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """mmdetection's ``multiclass_nms``: every (RoI, class) above ``score_thr``, class-wise NMS, the best 100."""
        cfg = self.config
        n, classes = scores.shape[0], scores.shape[1] - 1
        boxes = boxes.view(n, -1, 4).reshape(-1, 4)
        labels = torch.arange(classes, dtype=torch.long, device=scores.device).view(1, -1).expand(n, classes).reshape(-1)
        scores = scores[:, :-1].reshape(-1)
        inds = (scores > cfg.score_thr).nonzero().squeeze(1)
        boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
        if boxes.numel() == 0:
            return boxes.new_zeros(0, 4), scores.new_zeros(0), labels.new_zeros(0)
        keep = mmcv_batched_nms(boxes, scores, labels, cfg.nms_iou)[: cfg.max_per_img]
        return boxes[keep], scores[keep], labels[keep]

    def _masks(self, feats, boxes: Tensor, labels: Tensor, scale: Tensor, shape: tuple[int, int]) -> Tensor:
        """mmdetection's ``simple_test_mask`` + ``FCNMaskHead.get_seg_masks`` (Cascade: the stages' mask
        probabilities averaged): each detection's 28 x 28 mask pasted into the original image, ``>= 0.5``."""
        if boxes.shape[0] == 0:
            return torch.zeros((0, *shape), dtype=torch.bool, device=boxes.device)
        rois = boxes * scale
        probs = [self.mask_forward(stage, feats, rois).float().sigmoid() for stage in range(len(self.mask_heads))]
        prob = sum(probs) / float(len(probs)) if len(probs) > 1 else probs[0]
        prob = prob[torch.arange(len(labels), device=labels.device), labels]
        return paste_masks(prob, rois / scale, shape) >= self.config.mask_thr

    @torch.no_grad()
    def detect_with_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[list[dict], dict]:
        """:meth:`detect` and :meth:`image_losses` of the same images, each image's backbone run once."""
        detections, losses = [], []
        for image, target in zip(images, targets):
            batch, (size,) = self.prepare([image])
            feats = self.features(batch)
            detections.append(self._detect_one(image, feats, size))
            parts = self._expected_parts(image, target, feats, size, tuple(batch.shape[-2:]))
            losses.append({name: values.sum() for name, (values, _) in parts.items()})
        return detections, _stack(losses, self.loss_terms)

    # -- the expected training loss --------------------------------------------------------------

    def image_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Each image's expected loss terms (module docstring), computed on that image alone: ``[len(images)]``
        per term, differentiable with respect to the images. With ``targets[i]["object"] = j`` the image's entry
        is object ``j``'s part (``-1``: the background's), see :meth:`object_losses`."""
        out = []
        for image, target in zip(images, targets):
            out.append(owner_terms(self.expected_parts(image, target), target))
        return _stack(out, self.loss_terms)

    def object_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Each image's expected loss split by owner, ``[1 + K]`` per term: entry 0 the background (negative
        anchors and RoIs), ``1 + j`` every term of the candidates matched to object ``j``; they add up to
        :meth:`image_losses`."""
        return [owner_sums(self.expected_parts(image, target), len(target["boxes"])) for image, target in zip(images, targets)]

    def expected_parts(self, image: Tensor, target: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Every candidate's weighted, normalised contribution to each term and its owner (0: the background,
        ``1 + j``: object ``j``)."""
        batch, (size,) = self.prepare([image])
        return self._expected_parts(image, target, self.features(batch), size, tuple(batch.shape[-2:]))

    def gt_in_resized(self, image: Tensor, target: dict, size) -> tuple[Tensor, Tensor]:
        """mmdetection's ``Resize`` of the ground truth: float32 boxes times the scale factor, clipped."""
        return resized_boxes(image, target, size)

    def _expected_parts(self, image: Tensor, target: dict, feats: list[Tensor], size,
                        padded: tuple[int, int]) -> dict[str, tuple[Tensor, Tensor]]:
        cfg = self.config
        gt, gt_labels = self.gt_in_resized(image, target, size)
        k = gt.shape[0]
        logits, deltas, levels = self.rpn(feats)
        anchors = torch.cat(levels)

        # -- RPN: every anchor the sampler could draw --------------------------------------------
        matched = self.rpn_assigner.assign(mmdet_box_overlaps(gt, anchors)) if k else \
            torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device)
        labels = torch.where(matched >= 0, 1, torch.where(matched == -1, 0, -1))
        p, draw = inclusion_probabilities(labels, cfg.rpn_num, cfg.rpn_pos_fraction)
        p = p.to(logits.dtype)
        avg = max(draw.positives, 1) + max(draw.negatives, 1) + EPS  # num_total_samples, each count at least 1
        owner = (matched + 1).clamp(min=0)
        drawn = p > 0
        bce = F.binary_cross_entropy_with_logits(logits[drawn], (labels[drawn] == 1).to(logits.dtype), reduction="none")
        parts = {"loss_rpn_cls": (p[drawn] * bce / avg, owner[drawn])}
        fg = (matched >= 0).nonzero().squeeze(1)
        l1 = rpn_box_loss(deltas[fg], delta_encode(anchors[fg], gt[matched[fg]]).to(deltas.dtype),
                          cfg.rpn_smooth_l1_beta).sum(1) if k else deltas[:0, 0]
        parts["loss_rpn_bbox"] = (p[fg] * l1 / avg, owner[fg])

        # -- RoI stages: the ground truth and every proposal the sampler could draw ---------------
        proposals = self.proposals(logits, deltas, levels, size, cfg.rpn_train)
        candidates, weight = proposals, torch.ones(proposals.shape[0], dtype=proposals.dtype, device=proposals.device)
        masks = None
        if self.with_mask and target.get("masks") is not None:
            masks = self._resized_masks(target, size, padded).to(feats[0].device)
        for stage in range(len(self.box_heads)):
            stage_weight = cfg.stage_loss_weights[stage] if self.cascade else 1.0
            rois, matched, q, drawn, positives = self._sample_roi_stage(stage, candidates, weight, gt, gt_labels)
            cls_score, bbox_pred = map(full_precision, self.box_forward(stage, feats, rois))
            roi_labels = torch.where(matched >= 0, gt_labels[matched.clamp(min=0)] if k else matched, self.num_classes)
            roi_owner = (matched + 1).clamp(min=0)
            ce = F.cross_entropy(cls_score, roi_labels, reduction="none")
            _add(parts, "loss_cls", q * ce * stage_weight / (max(drawn, 1) + EPS), roi_owner)
            fg = (matched >= 0).nonzero().squeeze(1)
            pred = bbox_pred.view(rois.shape[0], -1, 4)
            if self.cascade:  # reg_decoded_bbox: GIoU x 10 of the decoded class box against the ground truth
                decoded = delta_decode(rois[fg], pred[fg, roi_labels[fg]], STAGE_STDS[stage])
                box = 10.0 * giou_loss(decoded, gt[matched[fg]])
            else:
                box = (pred[fg, roi_labels[fg]] - delta_encode(rois[fg], gt[matched[fg]], STAGE_STDS[0])).abs().sum(1)
            _add(parts, "loss_bbox", q[fg] * box * stage_weight / (drawn + EPS), roi_owner[fg])
            if masks is not None:
                mask = self._mask_term(stage, feats, rois[fg], matched[fg], roi_labels[fg], masks, q[fg], positives)
                _add(parts, "loss_mask", mask * stage_weight, roi_owner[fg])
            if stage < len(self.box_heads) - 1:  # Cascade: the next stage's candidates, refined and detached
                with torch.no_grad():
                    best = torch.where(roi_labels == self.num_classes, cls_score[:, :-1].argmax(1), roi_labels)
                    refined = self._regress(stage, rois, best, bbox_pred, size)
                not_gt = torch.arange(rois.shape[0], device=rois.device) >= k
                candidates, weight = refined[not_gt].detach(), q[not_gt].detach()
        return {name: parts[name] for name in self.loss_terms if name in parts}

    def _sample_roi_stage(self, stage: int, candidates: Tensor, weight: Tensor, gt: Tensor, gt_labels: Tensor):
        """A stage's RoIs (ground truth first, then the candidates), matched object (-1: background), expected
        weight of each in the stage's loss, the draw's size and its positives; RoIs that cannot be drawn dropped."""
        cfg = self.config
        thr = STAGE_IOUS[stage] if self.cascade else 0.5
        assigner = MaxIoUAssigner(thr, thr, min_pos_iou=thr, match_low_quality=cfg.rcnn_low_quality)
        k = gt.shape[0]
        if k:
            matched = assigner.assign(mmdet_box_overlaps(gt, candidates))
        else:
            matched = torch.full((candidates.shape[0],), -1, dtype=torch.long, device=candidates.device)
        rois = torch.cat([gt.to(candidates.dtype), candidates])
        matched = torch.cat([torch.arange(k, device=gt.device), matched])  # add_gt_as_proposals
        weight = torch.cat([weight.new_ones(k), weight])
        labels = torch.where(matched >= 0, 1, torch.where(matched == -1, 0, -1))
        if stage == 0:
            q, draw = inclusion_probabilities(labels, cfg.rcnn_num, cfg.rcnn_pos_fraction)
            drawn, positives = draw.drawn, draw.positives
        else:  # the stage's draw from the expected counts of the candidates that reach it
            q, drawn, positives = expected_count_probabilities(labels, weight, cfg.rcnn_num, cfg.rcnn_pos_fraction)
        q = q.to(rois.dtype) * weight
        keep = q > 0
        return rois[keep], matched[keep], q[keep], drawn, positives

    def _resized_masks(self, target: dict, size, padded: tuple[int, int]) -> Tensor:
        """The objects' masks as mmdetection's pipeline gives them to ``mask_target``."""
        return resized_masks(target, size, padded)

    def _mask_term(self, stage, feats, rois, matched, labels, masks, weights, positives) -> Tensor:
        """``FCNMaskHead.loss`` (mean BCE over the drawn positives' 28 x 28 targets) in expectation."""
        logits = full_precision(self.mask_forward(stage, feats, rois))
        if positives == 0 or rois.shape[0] == 0:
            return logits.sum(dim=(1, 2, 3)) * 0
        size = self.config.mask_size
        h, w = masks.shape[-2:]
        boxes = torch.stack([rois[:, 0].clamp(0, w), rois[:, 1].clamp(0, h), rois[:, 2].clamp(0, w),
                             rois[:, 3].clamp(0, h)], dim=1).detach()
        index = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None]
        targets = roi_align(masks[matched][:, None].to(boxes.dtype), torch.cat([index, boxes], 1), size, 1.0, 0, True)
        targets = (targets[:, 0] >= 0.5).to(logits.dtype)
        pred = logits[torch.arange(len(labels), device=labels.device), labels]
        bce = F.binary_cross_entropy_with_logits(pred, targets, reduction="none").flatten(1).sum(1)
        return weights * bce / (positives * size * size)


def paste_masks(prob: Tensor, boxes: Tensor, shape: tuple[int, int]) -> Tensor:
    """mmdetection's ``_do_paste_mask`` on the CPU (``skip_empty``): each ``M x M`` probability map sampled
    bilinearly (``grid_sample``, ``align_corners=False``) at the pixel centres of its box in an ``H x W`` image."""
    h, w = shape
    out = prob.new_zeros((prob.shape[0], h, w))
    for i in range(prob.shape[0]):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        left, top = max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0)
        right, bottom = min(int(math.ceil(x1)) + 1, w), min(int(math.ceil(y1)) + 1, h)
        if right <= left or bottom <= top:
            continue
        ys = torch.arange(top, bottom, device=prob.device, dtype=torch.float32) + 0.5
        xs = torch.arange(left, right, device=prob.device, dtype=torch.float32) + 0.5
        bx0, by0, bx1, by1 = boxes[i].float().unbind()
        gy = (ys - by0) / (by1 - by0) * 2 - 1
        gx = (xs - bx0) / (bx1 - bx0) * 2 - 1
        grid = torch.stack([gx[None, :].expand(len(gy), -1), gy[:, None].expand(-1, len(gx))], dim=2)
        sampled = F.grid_sample(prob[i][None, None].float(), grid[None], align_corners=False)
        out[i, top:bottom, left:right] = sampled[0, 0]
    return out


def _add(parts: dict, name: str, values: Tensor, owners: Tensor) -> None:
    """Append one stage's candidate contributions to a term (Cascade's stages add up)."""
    if name in parts:
        v, o = parts[name]
        parts[name] = (torch.cat([v, values]), torch.cat([o, owners]))
    else:
        parts[name] = (values, owners)


def _stack(per_image: list[dict[str, Tensor]], names) -> dict[str, Tensor]:
    missing = [n for n in names if any(n not in d for d in per_image)]
    if missing:
        raise GradlensError(f"the loss term {missing[0]} needs the objects' instance masks; give masks for every image "
                            "(the pipeline reads them from the COCO annotations)")
    return {name: torch.stack([d[name] for d in per_image]) for name in names}
