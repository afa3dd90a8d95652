"""detectron2 RetinaNet checkpoints, run as detectron2 runs them.

What upstream does (facebookresearch/detectron2; ``configs/Base-RetinaNet.yaml`` with
``COCO-Detection/retinanet_R_50_FPN_{1x,3x}.yaml``, or the LazyConfig ``configs/common/models/retinanet.py``),
and where gradlens follows it:

- **the network** (``modeling/backbone/resnet.py``, ``fpn.py``, ``meta_arch/retinanet.py``): a ResNet-50 of
  ``BasicStem`` (7x7 conv, FrozenBN, ReLU, ``max_pool2d(3, 2, 1)``) and ``BottleneckBlock`` s with
  ``STRIDE_IN_1X1 = True`` (the MSRA layout: a stage's stride sits in the first 1x1 convolution, not in the
  3x3 as in torchvision's ResNet), every norm ``FrozenBatchNorm2d`` (:class:`FrozenBatchNorm2d` below: its two
  code paths, eps 1e-5); an FPN on res3-res5 (``fpn_lateral{3,4,5}``, ``fpn_output{3,4,5}``, nearest 2x
  top-down) with ``LastLevelP6P7`` from **res5** and a ReLU before P7 (:class:`gradlens.models.detectors.fpn.P6P7`
  with ``from_p5=False, relu_before_p7=True``); ``RetinaNetHead`` (4 conv + ReLU per branch, no norm,
  ``cls_score``/``bbox_pred``) -- torchvision's RetinaNet head computes the same, so the head's keys are
  renamed to it (:func:`to_gradlens`);
- **anchors** (``modeling/anchor_generator.py``, ``DefaultAnchorGenerator``): sizes ``x, x 2^(1/3), x 2^(2/3)``
  for ``x`` in 32..512 (unrounded), aspect ratios 0.5/1/2 (height / width), ``OFFSET 0.0``, cell anchors
  **size-major** (mmdetection's are ratio-major) computed in double and stored as float32, shifts from a float32
  ``arange`` (:class:`Detectron2AnchorGenerator`);
- **preprocessing** (convention ``"detectron2"``, :mod:`gradlens.models.preprocessing.transform`): ``ResizeShortestEdge(800,
  1333)`` as ``get_output_shape`` rounds, Pillow's uint8 bilinear (:mod:`gradlens.models.preprocessing.pil_resize`), BGR,
  ``PIXEL_MEAN`` [103.53, 116.28, 123.675] and ``PIXEL_STD`` [1, 1, 1] (MSRA weights absorb the std), zero
  padding to the FPN's ``size_divisibility`` 32;
- **inference** (``meta_arch/dense_detector.py``, ``retinanet.py``, ``postprocessing.py``): per level, scores
  above ``SCORE_THRESH_TEST`` 0.05, the ``TOPK_CANDIDATES_TEST`` 1000 best (``topk``), ``Box2BoxTransform``
  decoding (weights 1, ``dw``/``dh`` clamped above at log(1000/16) only, no clipping); then ``batched_nms``
  (0.5) over all levels by class, the first ``DETECTIONS_PER_IMAGE`` 100; then ``detector_postprocess``:
  boxes times ``original / resized`` (``Boxes.scale``), clipped to the original image, and boxes of zero
  width or height dropped (:meth:`Detectron2RetinaNet._postprocess_one`);
- **the loss** (``RetinaNet.label_anchors``, ``losses``, ``modeling/matcher.py``, ``box_regression.py``):
  ``pairwise_iou``, ``Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)`` (an anchor keeps its
  own best object; low-quality matches only turn it positive), one-hot targets over the valid anchors, the
  sigmoid focal loss (alpha 0.25, gamma 2) and the smooth-L1 loss of ``Box2BoxTransform.get_deltas`` targets
  over the positive anchors with ``SMOOTH_L1_LOSS_BETA`` = **0.0** (``Base-RetinaNet.yaml``, and the default
  of ``RetinaNet.__init__`` the LazyConfig uses; ``defaults.py``'s 0.1 is overridden by every RetinaNet
  config), which is the L1 loss (fvcore's ``smooth_l1_loss`` for ``beta < 1e-5``). Ground truth is scaled as
  ``ResizeTransform.apply_box`` (float64, clipped to the resized image) and boxes whose side is not above
  1e-5 are dropped (``filter_empty_instances``).

**The loss normaliser.** detectron2 divides both terms by ``loss_normalizer``, a moving average over training
calls (``_ema_update``: ``0.9 * previous + 0.1 * max(1, positives)``, starting from 100), so the loss of an
image depends on the images the model saw before it. gradlens' total detection loss of an image is defined
independently of any other image: both terms are divided by **the image's own number of positive anchors,
at least 1** -- the value that moving average settles at for a stream of copies of that image. Gradients are
therefore the same whatever order images are processed in.

Checkpoints (``checkpoint/detection_checkpoint.py``): a model-zoo ``.pkl`` is a pickle of ``{"model": {name:
numpy array}, "__author__": ..., ["matching_heuristics": True]}`` read with ``pickle.load(f,
encoding="latin1")``; gradlens reads it with :func:`read_pkl`, an unpickler that builds numpy arrays and plain
containers only and refuses every other global (unless the user trusts the file). A ``.pth`` written by
``DetectionCheckpointer`` is ``{"model": state_dict, "iteration": ..., ...}`` (or a bare state dict) and is
read with ``torch.load(weights_only=True)``. Keys may carry DistributedDataParallel's ``module.`` prefix
(stripped, as fvcore's ``Checkpointer`` does); ``pixel_mean``/``pixel_std`` and
``anchor_generator.cell_anchors.*`` of old checkpoints are ignored, as detectron2 ignores them. Only the
ResNet-50 FPN RetinaNet is supported: other depths, ResNeXt, norms in the head or FPN, and Caffe2/Detectron1
``.pkl`` files (``blobs``, ``res2_0_branch2a_w``...) are refused in one sentence.
"""

from __future__ import annotations

import codecs
import collections
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, sigmoid_focal_loss

from gradlens.errors import CheckpointError
from gradlens.models.detectors.anchors import AnchorConfig, MMDetAnchorGenerator
from gradlens.models.detectors.fpn import BackboneWithPyramid
from gradlens.models.detectors.retinanet import LossConfig, RetinaNetDetector

ARCH = "detectron2_retinanet_resnet50_fpn"
FORMAT = "detectron2"  # detector.checkpoint_format
CONVENTION = "detectron2"  # PreprocessConfig.convention

# configs/Base-RetinaNet.yaml (ANCHOR_GENERATOR.SIZES) and defaults.py (ASPECT_RATIOS, OFFSET); strides of p3..p7
ANCHOR_SIZES = tuple((x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)) for x in (32, 64, 128, 256, 512))
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
ANCHOR_STRIDES = (8, 16, 32, 64, 128)
ANCHOR_OFFSET = 0.0
SCALE_CLAMP = math.log(1000.0 / 16)  # box_regression._DEFAULT_SCALE_CLAMP
BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # RETINANET.BBOX_REG_WEIGHTS
IOU_THRESHOLDS = (0.4, 0.5)  # RETINANET.IOU_THRESHOLDS
IOU_LABELS = (0, -1, 1)  # RETINANET.IOU_LABELS
EMPTY_BOX = 1e-5  # detection_utils.filter_empty_instances(box_threshold=1e-5)
RESNET50_BLOCKS = (3, 4, 6, 3)  # ResNet.make_default_stages(depth=50)
DEPTHS = {(3, 4, 6, 3): 50, (2, 2, 2, 2): 18, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}  # resnet.py


@dataclass(frozen=True)
class Detectron2LossConfig(LossConfig):
    """detectron2's RetinaNet loss settings: focal alpha/gamma, Matcher thresholds, smooth-L1 beta."""

    smooth_l1_beta: float = 0.0


# ---------------------------------------------------------------------------------------------
# the network


class FrozenBatchNorm2d(nn.Module):
    """detectron2's ``layers.FrozenBatchNorm2d`` (eps 1e-5), both of its code paths.

    When the input requires grad (a gradient pass): ``scale = weight * (running_var + eps).rsqrt()``,
    ``bias = bias - running_mean * scale``, ``x * scale + bias``; otherwise (inference) the fused
    ``F.batch_norm(training=False)``, whose last bits differ. Buffers only, as upstream (no
    ``num_batches_tracked``).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + bias.reshape(1, -1, 1, 1).to(x.dtype)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps)


class Conv2d(nn.Conv2d):
    """detectron2's ``layers.Conv2d`` with a norm: the convolution (no bias), then ``self.norm``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups))


class BasicStem(nn.Module):
    """``resnet.BasicStem``: 7x7/2 conv + FrozenBN, ReLU, ``max_pool2d(kernel 3, stride 2, padding 1)``."""

    def __init__(self):
        super().__init__()
        self.conv1 = Conv2d(3, 64, kernel_size=7, stride=2, padding=3)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """``resnet.BottleneckBlock`` (one group, dilation 1): 1x1, 3x3, 1x1 convs with FrozenBN, a projection
    shortcut where the channels change; the stride in the 1x1 conv with ``stride_in_1x1`` (MSRA), else in
    the 3x3."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int, stride_in_1x1: bool):
        super().__init__()
        self.shortcut = Conv2d(in_channels, out_channels, 1, stride=stride) if in_channels != out_channels else None
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(in_channels, bottleneck_channels, 1, stride=stride_1x1)
        self.conv2 = Conv2d(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3, padding=1)
        self.conv3 = Conv2d(bottleneck_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + shortcut)


class ResNet50(nn.Module):
    """detectron2's ``ResNet`` (depth 50, ``out_features`` res3-res5) returning C3, C4, C5; parameter names are
    detectron2's under ``backbone.bottom_up``: ``stem.conv1(.norm)``, ``res{2..5}.{i}.conv{1,2,3}(.norm)``,
    ``res{2..5}.0.shortcut(.norm)``.

    Run in contiguous memory whatever the detector's speed mode, as detectron2 runs it (see
    :class:`gradlens.models.registry.ResNet50Features`: tied max-pool windows and ReLUs at round-off distance
    from zero make the float32 input gradient follow the kernels' last bits)."""

    needs_contiguous_memory = True
    arithmetic_revision = 2  # 2: never channels-last (1 ran the body after the stem channels-last)

    def __init__(self, stride_in_1x1: bool = True):
        super().__init__()
        self.stem = BasicStem()
        in_channels, out_channels, bottleneck = 64, 256, 64
        for stage, blocks in enumerate(RESNET50_BLOCKS, start=2):
            first_stride = 1 if stage == 2 else 2
            layers = []
            for i in range(blocks):
                layers.append(BottleneckBlock(in_channels if i == 0 else out_channels, out_channels, bottleneck,
                                              first_stride if i == 0 else 1, stride_in_1x1))
            self.add_module(f"res{stage}", nn.Sequential(*layers))
            in_channels, out_channels, bottleneck = out_channels, out_channels * 2, bottleneck * 2
        self.out_channels = [512, 1024, 2048]

    def forward(self, x: Tensor):
        x = self.res2(self.stem(x))
        c3 = self.res3(x)
        c4 = self.res4(c3)
        return c3, c4, self.res5(c4)


def build_backbone(options: dict) -> nn.Module:
    """The R-50 FPN backbone: P6 from res5, ReLU before P7 (``build_retinanet_resnet_fpn_backbone``)."""
    body = ResNet50(stride_in_1x1=bool(options.get("stride_in_1x1", True)))
    return BackboneWithPyramid(body, [512, 1024, 2048], 256, start_level=0, from_p5=False, relu_before_p7=True)


# ---------------------------------------------------------------------------------------------
# anchors, matching, box coding


def cell_anchors(sizes=ANCHOR_SIZES[0], aspect_ratios=ANCHOR_RATIOS) -> Tensor:
    """``DefaultAnchorGenerator.generate_cell_anchors``: size-major, then aspect ratio; double math, float32."""
    anchors = []
    for size in sizes:
        area = size ** 2.0
        for aspect_ratio in aspect_ratios:
            w = math.sqrt(area / aspect_ratio)
            h = aspect_ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


def grid_anchors(base: Tensor, size: tuple[int, int], stride: int, offset: float = ANCHOR_OFFSET) -> Tensor:
    """``DefaultAnchorGenerator._grid_anchors`` of one level: float32 ``arange`` shifts, position-major."""
    height, width = size
    shifts_x = torch.arange(offset * stride, width * stride, step=stride, dtype=torch.float32, device=base.device)
    shifts_y = torch.arange(offset * stride, height * stride, step=stride, dtype=torch.float32, device=base.device)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)


class Detectron2AnchorGenerator(MMDetAnchorGenerator):
    """detectron2's ``DefaultAnchorGenerator`` for the RetinaNet (see :func:`cell_anchors`, :func:`grid_anchors`).

    A subclass of gradlens' mmdetection generator only for its interface (``level_anchors``, which the
    detector asks for float32 anchors whatever the network's dtype); its anchors are detectron2's.
    """

    def __init__(self):
        nn.Module.__init__(self)
        self.config = AnchorConfig(strides=ANCHOR_STRIDES, octave_base_scale=4.0, scales_per_octave=3,
                                   ratios=ANCHOR_RATIOS, center_offset=ANCHOR_OFFSET)  # counts only
        self.sizes = ANCHOR_SIZES
        self.aspect_ratios = tuple(ANCHOR_RATIOS for _ in ANCHOR_STRIDES)
        self.cell_anchors = [cell_anchors(s, ANCHOR_RATIOS) for s in ANCHOR_SIZES]
        self._cache: dict[tuple, list[Tensor]] = {}

    def level_anchors(self, feature_sizes, device, dtype=torch.float32) -> list[Tensor]:
        if len(feature_sizes) != len(ANCHOR_STRIDES):
            raise ValueError(f"expected {len(ANCHOR_STRIDES)} feature levels, got {len(feature_sizes)}")
        key = (tuple(feature_sizes), str(device), dtype)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = [grid_anchors(base.to(device), tuple(size), stride).to(dtype)
                                for base, size, stride in zip(self.cell_anchors, feature_sizes, ANCHOR_STRIDES)]
        return self._cache[key]


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``structures.boxes.pairwise_iou``: ``(N, M)``, 0 where the boxes do not intersect, same arithmetic."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    width_height = torch.min(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, None, :2], boxes2[:, :2])
    width_height.clamp_(min=0)
    inter = width_height.prod(dim=2)
    return torch.where(inter > 0, inter / (area1[:, None] + area2 - inter), torch.zeros(1, dtype=inter.dtype, device=inter.device))


def match(quality: Tensor, thresholds=IOU_THRESHOLDS, labels=IOU_LABELS, allow_low_quality_matches: bool = True):
    """``modeling.matcher.Matcher.__call__``: per column, the best row and a label in {-1, 0, 1}."""
    bounds = [-float("inf"), *thresholds, float("inf")]
    if quality.numel() == 0:
        return (quality.new_full((quality.size(1),), 0, dtype=torch.int64),
                quality.new_full((quality.size(1),), labels[0], dtype=torch.int8))
    matched_vals, matches = quality.max(dim=0)
    match_labels = matches.new_full(matches.size(), 1, dtype=torch.int8)
    for label, low, high in zip(labels, bounds[:-1], bounds[1:]):
        match_labels[(matched_vals >= low) & (matched_vals < high)] = label
    if allow_low_quality_matches:
        highest, _ = quality.max(dim=1)
        _, best = (quality == highest[:, None]).nonzero(as_tuple=True)
        match_labels[best] = 1
    return matches, match_labels


def get_deltas(src: Tensor, target: Tensor, weights=BOX_WEIGHTS) -> Tensor:
    """``Box2BoxTransform.get_deltas``."""
    src_widths = src[:, 2] - src[:, 0]
    src_heights = src[:, 3] - src[:, 1]
    src_ctr_x = src[:, 0] + 0.5 * src_widths
    src_ctr_y = src[:, 1] + 0.5 * src_heights
    target_widths = target[:, 2] - target[:, 0]
    target_heights = target[:, 3] - target[:, 1]
    target_ctr_x = target[:, 0] + 0.5 * target_widths
    target_ctr_y = target[:, 1] + 0.5 * target_heights
    wx, wy, ww, wh = weights
    dx = wx * (target_ctr_x - src_ctr_x) / src_widths
    dy = wy * (target_ctr_y - src_ctr_y) / src_heights
    dw = ww * torch.log(target_widths / src_widths)
    dh = wh * torch.log(target_heights / src_heights)
    return torch.stack((dx, dy, dw, dh), dim=1)


def apply_deltas(deltas: Tensor, boxes: Tensor, weights=BOX_WEIGHTS, scale_clamp: float = SCALE_CLAMP) -> Tensor:
    """``Box2BoxTransform.apply_deltas`` (float32, ``dw``/``dh`` clamped above only, no clipping)."""
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=scale_clamp)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=scale_clamp)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    x1 = pred_ctr_x - 0.5 * pred_w
    y1 = pred_ctr_y - 0.5 * pred_h
    x2 = pred_ctr_x + 0.5 * pred_w
    y2 = pred_ctr_y + 0.5 * pred_h
    return torch.stack((x1, y1, x2, y2), dim=-1).reshape(deltas.shape)


def smooth_l1(input: Tensor, target: Tensor, beta: float) -> Tensor:
    """fvcore's ``smooth_l1_loss`` unreduced: ``|x|`` for ``beta < 1e-5``, else the smooth-L1."""
    n = torch.abs(input - target)
    if beta < 1e-5:
        return n
    return torch.where(n < beta, 0.5 * n ** 2 / beta, n - 0.5 * beta)


# ---------------------------------------------------------------------------------------------
# the detector


class Detectron2RetinaNet(RetinaNetDetector):
    """A RetinaNet run as detectron2 runs it (see the module's docstring): its anchors, inference and
    ``detector_postprocess``, its ``Matcher``, box transform and losses, the loss of each image divided by
    the image's own number of positive anchors (at least 1)."""

    def __init__(self, *args, loss_cfg: LossConfig | None = None, **kwargs):
        super().__init__(*args, loss_cfg=loss_cfg or Detectron2LossConfig(), **kwargs)

    @property
    def framework(self) -> str:
        return "detectron2"

    # -- inference -----------------------------------------------------------------------------

    def _detections(self, outputs, levels, counts, images, sizes) -> list[dict[str, Tensor]]:
        cls = outputs["cls_logits"].float().split(counts, dim=1)
        reg = outputs["bbox_regression"].float().split(counts, dim=1)
        return [self._postprocess_one([c[i] for c in cls], [r[i] for r in reg], levels, size, tuple(image.shape[-2:]))
                for i, (image, size) in enumerate(zip(images, sizes))]

    def _postprocess_one(self, cls_levels, reg_levels, anchor_levels, size, original) -> dict[str, Tensor]:
        """``RetinaNet.inference_single_image`` (``_decode_per_level_predictions`` per level, ``batched_nms``,
        the first ``max_per_img``), then ``detector_postprocess`` to the ``original`` (h, w)."""
        cfg = self.test_cfg
        boxes, scores, labels = [], [], []
        for logits, deltas, anchors in zip(cls_levels, reg_levels, anchor_levels):
            pred_scores = logits.sigmoid()
            keep = pred_scores > cfg.score_thr
            pred_scores = pred_scores[keep]
            topk_idxs = torch.nonzero(keep)
            pred_scores, idxs = pred_scores.topk(min(topk_idxs.shape[0], cfg.nms_pre))
            anchor_idxs, classes_idxs = topk_idxs[idxs].unbind(dim=1)
            boxes.append(apply_deltas(deltas[anchor_idxs], anchors[anchor_idxs]))
            scores.append(pred_scores)
            labels.append(classes_idxs)
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        keep = batched_nms(boxes.float(), scores, labels, cfg.nms_iou)[: cfg.max_per_img]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        # detector_postprocess: Boxes.scale(scale_x, scale_y), Boxes.clip((h, w)), Boxes.nonempty()
        out_h, out_w = original
        scale_x, scale_y = out_w / size[1], out_h / size[0]
        boxes[:, 0::2] *= scale_x
        boxes[:, 1::2] *= scale_y
        boxes = torch.stack((boxes[:, 0].clamp(min=0, max=out_w), boxes[:, 1].clamp(min=0, max=out_h),
                             boxes[:, 2].clamp(min=0, max=out_w), boxes[:, 3].clamp(min=0, max=out_h)), dim=-1)
        nonempty = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
        return {"boxes": boxes[nonempty], "scores": scores[nonempty], "labels": labels[nonempty]}

    # -- loss ----------------------------------------------------------------------------------

    def _scaled_targets(self, boxes: Tensor, original: tuple[int, int], size: tuple[int, int], anchors: Tensor) -> Tensor:
        """``ResizeTransform.apply_box`` (float64 ``x * (new_w / w)``), ``.clip(min=0)``, ``np.minimum`` with the
        resized size, then float32 (``Boxes``)."""
        boxes = boxes.to(device=anchors.device).reshape(-1, 4).double()
        scale = torch.tensor([size[1] * 1.0 / original[1], size[0] * 1.0 / original[0]] * 2, dtype=torch.float64,
                             device=anchors.device)
        limit = torch.tensor([size[1], size[0]] * 2, dtype=torch.float64, device=anchors.device)
        return torch.minimum((boxes * scale).clamp(min=0), limit).float()

    def match(self, gt: Tensor, anchors: Tensor) -> Tensor:
        """Per anchor: the matched object (index into ``gt``), -1 (background) or -2 (ignored), by
        ``label_anchors``: objects whose scaled box has a side not above 1e-5 are left out first."""
        kept = (((gt[:, 2] - gt[:, 0]) > EMPTY_BOX) & ((gt[:, 3] - gt[:, 1]) > EMPTY_BOX)).nonzero()[:, 0]
        if kept.numel() == 0:
            return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
        thresholds = (self.loss_cfg.neg_iou, self.loss_cfg.pos_iou)  # RETINANET.IOU_THRESHOLDS [0.4, 0.5]
        matches, labels = match(pairwise_iou(gt[kept], anchors.to(gt.dtype)), thresholds)
        matched = kept[matches]
        return torch.where(labels == 1, matched, torch.where(labels == 0, -1, -2))

    def _encode(self, gt: Tensor, anchors: Tensor) -> Tensor:
        return get_deltas(anchors, gt)

    def _focal_terms(self, logits: Tensor, targets: Tensor) -> Tensor:
        """fvcore's ``sigmoid_focal_loss`` unreduced (torchvision's is a copy of it)."""
        return sigmoid_focal_loss(logits, targets, alpha=self.loss_cfg.alpha, gamma=self.loss_cfg.gamma, reduction="none")

    def _focal_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return sigmoid_focal_loss(logits, targets, alpha=self.loss_cfg.alpha, gamma=self.loss_cfg.gamma, reduction="sum")

    def _box_terms(self, pred: Tensor, target: Tensor) -> Tensor:
        return smooth_l1(pred, target, getattr(self.loss_cfg, "smooth_l1_beta", 0.0))

    def _losses(self, outputs, levels, images, sizes, targets) -> dict[str, Tensor]:
        """``RetinaNet.losses`` of each image, normalised by its own positives (at least 1), not by the EMA."""
        anchors = torch.cat(levels)
        cls_out, reg_out = outputs["cls_logits"], outputs["bbox_regression"]
        cls_losses, box_losses, num_foreground = [], [], []
        for i, (image, size, target) in enumerate(zip(images, sizes, targets)):
            gt, matched, foreground, num_fg, cls_target, valid = self._assign(image, size, target, anchors, cls_out[i])
            if target.get("object") is not None:  # one object's (or the background's) part of the loss
                cls_parts, box_parts = self._loss_parts(cls_out[i], reg_out[i], cls_target, matched, valid, gt, anchors)
                j = int(target["object"]) + 1
                cls_losses.append(cls_parts[j] / num_fg)
                box_losses.append(box_parts[j] / num_fg)
            else:
                cls_losses.append(self._focal_loss(cls_out[i][valid], cls_target[valid]) / num_fg)
                fg = foreground.nonzero()[:, 0]
                if fg.numel():
                    box_losses.append(self._box_terms(reg_out[i][fg], self._encode(gt[matched[fg]], anchors[fg])).sum() / num_fg)
                else:
                    box_losses.append(reg_out[i].sum() * 0.0)
            num_foreground.append(num_fg)
        return {"classification": torch.stack(cls_losses), "bbox_regression": torch.stack(box_losses),
                "num_foreground": torch.tensor(num_foreground, dtype=anchors.dtype, device=anchors.device)}

    def _loss_parts(self, cls_out, reg_out, cls_target, matched, valid, gt, anchors) -> tuple[Tensor, Tensor]:
        """Focal and box-loss sums of one image by owner: 0 the background anchors, 1 + j object j's."""
        owners = gt.shape[0] + 1
        per_anchor = self._focal_terms(cls_out[valid], cls_target[valid]).sum(dim=1)
        cls_parts = torch.zeros(owners, dtype=per_anchor.dtype, device=per_anchor.device)
        cls_parts = cls_parts.index_add(0, matched[valid] + 1, per_anchor)
        box_parts = torch.zeros(owners, dtype=reg_out.dtype, device=reg_out.device) + reg_out.sum() * 0.0
        fg = (matched >= 0).nonzero()[:, 0]
        if fg.numel():
            terms = self._box_terms(reg_out[fg], self._encode(gt[matched[fg]], anchors[fg])).sum(dim=1)
            box_parts = box_parts.index_add(0, matched[fg] + 1, terms.to(box_parts.dtype))
        return cls_parts, box_parts


# ---------------------------------------------------------------------------------------------
# checkpoints: reading, recognising, renaming


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler for a detectron2 model-zoo ``.pkl``: numpy arrays, numpy scalars, dicts, lists, tuples,
    strings and numbers only. Every other global is refused before anything is called."""

    def find_class(self, module: str, name: str):
        allowed = _allowed_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as Python 3 pickles ``bytes`` at protocols 0-2 (``encode(text, 'latin1')``) only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is allowed only to rebuild bytes (latin1)")
    return codecs.encode(text, "latin1")


def _allowed_globals() -> dict:
    try:
        from numpy._core import multiarray, numeric  # numpy 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             ("_codecs", "encode"): _latin1_encode, ("collections", "OrderedDict"): collections.OrderedDict}
    for package in ("numpy.core", "numpy._core"):  # the names numpy 1.x and 2.x pickle arrays under
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


def read_pkl(path, trust: bool = False):
    """A detectron2 ``.pkl`` (``pickle.load(f, encoding="latin1")`` as ``DetectionCheckpointer._load_file``)
    through :class:`_NumpyOnlyUnpickler`; with ``trust``, Python's own unpickler."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if trust:
                return pickle.load(f, encoding="latin1")
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        if "is not allowed" in str(exc):
            raise CheckpointError(f"{path} needs code beyond numpy arrays and plain containers to unpickle "
                                  f"({exc}); pass --trust-checkpoint (trust=True) only if you trust its source.") from None
        raise CheckpointError(f"{path} is damaged or truncated and cannot be read as a pickle.") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc.strerror or exc}.") from None
    except Exception:  # a damaged pickle fails in many ways (EOFError, ValueError, TypeError, ...)
        raise CheckpointError(f"{path} is damaged or truncated and cannot be read as a pickle.") from None


MARKERS = ("backbone.bottom_up.stem.conv1.weight", "head.cls_score.weight")
IGNORED = re.compile(r"^(pixel_mean|pixel_std|anchor_generator\.cell_anchors\..*)$")  # not loaded by detectron2
CAFFE2_HINT = ("conv1_w", "res2_0_branch2a_w", "fpn_inner_res5_2_sum_w", "retnet_cls_pred_fpn3_w")


def _model_of(obj):
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        return obj["model"]
    return obj if isinstance(obj, Mapping) else None


def _strip_module(state: Mapping) -> Mapping:
    """fvcore ``Checkpointer._load_model``'s ``_strip_prefix_if_present(state, "module.")``."""
    keys = [k for k in state if isinstance(k, str)]
    if keys and len(keys) == len(state) and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def is_detectron2_checkpoint(obj) -> bool:
    """Whether an unpickled checkpoint holds a detectron2 RetinaNet (its keys), or is a detectron2 ``.pkl``
    (``model`` and ``__author__``), or a Caffe2/Detectron1 ``.pkl`` detectron2 would convert."""
    if isinstance(obj, Mapping) and "__author__" in obj and "model" in obj:
        return True
    state = _model_of(obj)
    if state is None:
        return False
    state = _strip_module(state)
    detectron2_keys = any(isinstance(k, str) and k.startswith("backbone.bottom_up.") for k in state)
    return detectron2_keys or all(k in state for k in MARKERS) or any(k in state for k in CAFFE2_HINT) or \
        (isinstance(obj, Mapping) and "blobs" in obj)


def state_of(obj) -> dict[str, Tensor]:
    """The model's weights as tensors, keys as detectron2 names them (``module.`` stripped, ignored entries
    dropped); one sentence for anything detectron2 would convert by heuristics or not load."""
    state = _model_of(obj)
    if state is None:
        raise CheckpointError("The checkpoint holds no model weights (no mapping under model).")
    if (isinstance(obj, Mapping) and "blobs" in obj) or any(k in state for k in CAFFE2_HINT) or \
            (isinstance(obj, Mapping) and obj.get("__author__") == "Caffe2"):
        raise CheckpointError("The checkpoint is a Caffe2/Detectron1 model (blob names like res2_0_branch2a_w), "
                              "which detectron2 converts by name-matching heuristics; gradlens reads detectron2's "
                              "own key layout only.")
    out = {}
    from_pickle = any(isinstance(v, np.ndarray) for v in state.values())  # a .pkl: no state-dict metadata
    for key, value in _strip_module(state).items():
        if isinstance(key, str) and IGNORED.match(key):
            continue
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "fiub":
                raise CheckpointError(f"The checkpoint's {key} is a numpy array of {value.dtype}, not of numbers.")
            value = torch.from_numpy(np.ascontiguousarray(value).copy())
        out[key] = value
    # FrozenBatchNorm2d._load_from_state_dict: a norm without running statistics in a state dict of no version
    # (a .pkl's) gets mean 0 and variance 1; a .pth's state dict has one, and a missing key is refused
    norms = [k for k in out if k.startswith("backbone.bottom_up.") and k.endswith(".norm.weight")] if from_pickle else []
    for key in norms:
        prefix = key[: -len("weight")]
        if prefix + "running_mean" not in out and isinstance(out[key], Tensor):
            out[prefix + "running_mean"] = torch.zeros_like(out[key])
        if prefix + "running_var" not in out and isinstance(out[key], Tensor):
            out[prefix + "running_var"] = torch.ones_like(out[key])
    return out


def _count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def recognise(state: Mapping[str, Tensor]) -> tuple[str, dict, int]:
    """Architecture name, options and number of classes of a detectron2 RetinaNet state dict; one sentence
    for what gradlens does not run."""
    keys = list(state)
    missing = [k for k in MARKERS if k not in state]
    if missing:
        what = "a detectron2 model but no RetinaNet" if MARKERS[0] in state else "no detectron2 RetinaNet"
        raise CheckpointError(f"The checkpoint is {what} (it has no {missing[0]}); gradlens runs detectron2's "
                              "ResNet-50 FPN RetinaNet only.")
    blocks = tuple(_count(keys, f"backbone.bottom_up.res{i}") for i in range(2, 6))
    if blocks != RESNET50_BLOCKS:
        depth = DEPTHS.get(blocks)
        name = f"ResNet-{depth}" if depth else f"a ResNet with {'/'.join(map(str, blocks))} blocks"
        raise CheckpointError(f"The checkpoint is a detectron2 RetinaNet on {name}; gradlens runs detectron2's "
                              "ResNet-50 (R-50) FPN RetinaNet only.")
    conv2 = state.get("backbone.bottom_up.res2.0.conv2.weight")
    if isinstance(conv2, Tensor) and conv2.ndim == 4 and conv2.shape[0] != conv2.shape[1]:
        raise CheckpointError("The checkpoint's ResNet has grouped 3x3 convolutions (ResNeXt); gradlens runs "
                              "detectron2's ResNet-50 (R-50) FPN RetinaNet only.")
    extra = sorted(k for k in keys if re.match(r"^head\.(cls|bbox)_subnet\.\d*[13579]\.", k) or
                   re.match(r"^backbone\.fpn_(lateral|output)\d\.norm\.", k))
    if extra:
        raise CheckpointError(f"The checkpoint has normalisation layers in its head or FPN ({extra[0]}); gradlens "
                              "runs detectron2's RetinaNet with RETINANET.NORM and FPN.NORM empty only.")
    score = state["head.cls_score.weight"]
    anchors = len(ANCHOR_RATIOS) * len(ANCHOR_SIZES[0])
    if not isinstance(score, Tensor) or score.ndim != 4 or score.shape[0] < anchors or score.shape[0] % anchors:
        shape = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
        raise CheckpointError(f"The checkpoint's head.cls_score.weight has shape {shape}, not a convolution's with "
                              f"{anchors} anchors per class (classes x {anchors}, 256, 3, 3).")
    return ARCH, {"stride_in_1x1": True}, int(score.shape[0]) // anchors


_RULES = [
    (re.compile(r"^backbone\.bottom_up\.(.*)$"), "backbone.body.{0}"),
    (re.compile(r"^backbone\.fpn_lateral([345])\.(weight|bias)$"), "backbone.fpn.inner_blocks.{0}.0.{1}"),
    (re.compile(r"^backbone\.fpn_output([345])\.(weight|bias)$"), "backbone.fpn.layer_blocks.{0}.0.{1}"),
    (re.compile(r"^backbone\.top_block\.(p6|p7)\.(weight|bias)$"), "backbone.fpn.extra_blocks.{0}.{1}"),
    (re.compile(r"^head\.cls_subnet\.([0246])\.(weight|bias)$"), "head.classification_head.conv.{0}.0.{1}"),
    (re.compile(r"^head\.bbox_subnet\.([0246])\.(weight|bias)$"), "head.regression_head.conv.{0}.0.{1}"),
    (re.compile(r"^head\.cls_score\.(weight|bias)$"), "head.classification_head.cls_logits.{0}"),
    (re.compile(r"^head\.bbox_pred\.(weight|bias)$"), "head.regression_head.bbox_reg.{0}"),
]


def _rename(key: str) -> str:
    for pattern, template in _RULES:
        if m := pattern.match(key):
            groups = list(m.groups())
            if "fpn." in template and groups[0] in "345":
                groups[0] = str(int(groups[0]) - 3)  # res3..res5 -> the FPN's inputs 0..2
            elif "_head.conv." in template:
                groups[0] = str(int(groups[0]) // 2)  # Sequential(conv, ReLU, ...) -> one block per conv
            return template.format(*groups)
    return key  # left as is: reported as unexpected by the strict load


def to_gradlens(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """detectron2 keys -> gradlens' (torchvision RetinaNet head and FPN, detectron2's ResNet under ``backbone.body``)."""
    return {_rename(k): v for k, v in state.items()}


def to_detectron2(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """gradlens keys -> detectron2's (the inverse of :func:`to_gradlens`, for writing test checkpoints)."""
    inverse = [
        (re.compile(r"^backbone\.body\.(.*)$"), lambda m: f"backbone.bottom_up.{m[1]}"),
        (re.compile(r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.(weight|bias)$"), lambda m: f"backbone.fpn_lateral{int(m[1]) + 3}.{m[2]}"),
        (re.compile(r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.(weight|bias)$"), lambda m: f"backbone.fpn_output{int(m[1]) + 3}.{m[2]}"),
        (re.compile(r"^backbone\.fpn\.extra_blocks\.(p6|p7)\.(weight|bias)$"), lambda m: f"backbone.top_block.{m[1]}.{m[2]}"),
        (re.compile(r"^head\.classification_head\.conv\.(\d)\.0\.(weight|bias)$"), lambda m: f"head.cls_subnet.{int(m[1]) * 2}.{m[2]}"),
        (re.compile(r"^head\.regression_head\.conv\.(\d)\.0\.(weight|bias)$"), lambda m: f"head.bbox_subnet.{int(m[1]) * 2}.{m[2]}"),
        (re.compile(r"^head\.classification_head\.cls_logits\.(weight|bias)$"), lambda m: f"head.cls_score.{m[1]}"),
        (re.compile(r"^head\.regression_head\.bbox_reg\.(weight|bias)$"), lambda m: f"head.bbox_pred.{m[1]}"),
    ]
    out = {}
    for key, value in state.items():
        for pattern, rename in inverse:
            if m := pattern.match(key):
                out[rename(m)] = value
                break
        else:
            raise KeyError(key)
    return out
