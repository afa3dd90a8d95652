"""RetinaNet as the paper trained and tested it, on torchvision's RetinaNet.

torchvision provides the head and the loss pieces. A detector runs as the
framework that trained its checkpoint runs it, because both post-processing
and anchor assignment change detections and gradients:

- **mmdetection** (``preprocess.convention == "mmcv"``): mmdetection's anchors,
  mmcv's uint8 resize, its post-processing order (decode and clip per level,
  rescale to the original image, then NMS, 100 per image), its
  ``MaxIoUAssigner``, box-delta encoding and focal-loss arithmetic, and ground
  truth rescaled and clipped to the image as its ``Resize`` does;
- **torchvision** (``"torchvision"``): torchvision's own transform,
  ``postprocess_detections`` (NMS before rescaling, 300 per image),
  ``Matcher`` and box coder.

The loss is computed **per image** and without touching train/eval flags, so
that the gradient engine can backpropagate each image's own total detection
loss with normalisation layers in inference mode (DESIGN: total detection loss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou, sigmoid_focal_loss

from gradlens.models.detectors.nms import mmcv_batched_nms
from gradlens.models.detectors.anchors import AnchorConfig, MMDetAnchorGenerator, mmdet_delta_decode, mmdet_delta_encode
from gradlens.models.detectors.assign import MaxIoUAssigner, mmdet_box_overlaps
from gradlens.models.preprocessing.transform import PreprocessConfig, batch_images


@dataclass(frozen=True)
class TestConfig:
    """Post-processing of the paper's RetinaNets (mmdetection ``test_cfg``)."""

    score_thr: float = 0.05
    nms_pre: int = 1000
    nms_iou: float = 0.5
    max_per_img: int = 100

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LossConfig:
    """Training loss of the paper's RetinaNets: focal loss + L1 on box deltas, IoU thresholds 0.5/0.4."""

    alpha: float = 0.25
    gamma: float = 2.0
    pos_iou: float = 0.5
    neg_iou: float = 0.4

    def to_dict(self) -> dict:
        return asdict(self)


class RetinaNetDetector(RetinaNet):
    """A RetinaNet whose inputs are lists of RGB images in [0, 1] at original size.

    ``backbone(x)`` must return the list of pyramid maps (P3..P7) and carry
    ``out_channels``. Labels are contiguous ``0..num_classes-1``; the
    checkpoint maps them to dataset category ids.
    """

    # the terms of image_losses that add up to the total loss (num_foreground is a count reported beside them)
    loss_terms = ("classification", "bbox_regression")

    def __init__(self, backbone, num_classes: int, preprocess: PreprocessConfig | None = None,
                 test_cfg: TestConfig | None = None, loss_cfg: LossConfig | None = None,
                 anchor_generator: AnchorGenerator | None = None):
        self.loss_cfg = loss_cfg or LossConfig()
        self.test_cfg = test_cfg or TestConfig()
        anchor_generator = anchor_generator or MMDetAnchorGenerator(AnchorConfig())
        super().__init__(
            backbone, num_classes, anchor_generator=anchor_generator,
            score_thresh=self.test_cfg.score_thr, nms_thresh=self.test_cfg.nms_iou,
            detections_per_img=self.test_cfg.max_per_img, topk_candidates=self.test_cfg.nms_pre,
            fg_iou_thresh=self.loss_cfg.pos_iou, bg_iou_thresh=self.loss_cfg.neg_iou,
        )
        self.preprocess = preprocess or PreprocessConfig()
        self.num_classes = num_classes
        self.transform = None  # replaced by gradlens' differentiable preprocessing
        self.channels_last = False
        self.assigner = MaxIoUAssigner(self.loss_cfg.pos_iou, self.loss_cfg.neg_iou, min_pos_iou=0.0)

    @property
    def framework(self) -> str:
        """``"mmdetection"`` or ``"torchvision"``: whose test and training arithmetic this detector follows."""
        return "mmdetection" if self.preprocess.convention == "mmcv" else "torchvision"

    @property
    def postprocess_revision(self) -> int | None:
        """2 for mmdetection's post-processing since it follows mmcv's ``batched_nms`` to the order of tied scores
        (:mod:`gradlens.models.detectors.nms`); detection caches of revision 1 are not reused."""
        return 2 if self.framework == "mmdetection" else None

    def use_channels_last(self, enabled: bool = True) -> "RetinaNetDetector":
        """The CPU's speed mode: convolutions in NHWC layout (depthwise-conv backward is ~20x faster that way)
        and channel LayerNorms as one fused kernel over it (24 % of a small CEDNet's gradient pass).
        Equal to the reference arithmetic up to round-off, not bit for bit.

        A detector with a module that ``needs_contiguous_memory`` (the batch-norm/ReLU backbones: ResNet-50,
        CED-ResNet-50, detectron2's ResNet) stays in contiguous memory: their float32 input gradient follows
        the kernels' last bits by whole per cent (tied max-pool windows, ReLUs at round-off distance from zero),
        so only the upstream's own kernels give the upstream's gradient."""
        from gradlens.models.backbones.layers import channels_last_mode

        self.channels_last = channels_last_mode(self, enabled)
        return self

    # -- the network ---------------------------------------------------------------------------

    def prepare(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Resize, normalise and pad (differentiably); returns the batch and each resized size."""
        return batch_images(images, self.preprocess)

    def head_outputs(self, batch: Tensor) -> tuple[dict[str, Tensor], list[Tensor], list[int]]:
        """Run backbone and head on a preprocessed batch: outputs, per-level anchors, anchors per level."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        features = self.backbone(batch)
        outputs = self.head(features)
        if outputs["bbox_regression"].dtype in (torch.float16, torch.bfloat16):
            # under autocast: anchors, matching and losses stay in float32 (only the network runs in low precision)
            outputs = {k: v.float() for k, v in outputs.items()}
        sizes = [tuple(f.shape[-2:]) for f in features]
        if isinstance(self.anchor_generator, MMDetAnchorGenerator):
            # mmdetection's anchors, ground truth and assignment are float32 whatever the network's dtype (a
            # float64 reference run changes the network's arithmetic, not which anchors are positive)
            levels = self.anchor_generator.level_anchors(sizes, batch.device, torch.float32)
        else:  # torchvision's rounded anchors (torchvision zoo checkpoints)
            from torchvision.models.detection.image_list import ImageList

            flat = self.anchor_generator(ImageList(batch, [tuple(batch.shape[-2:])] * batch.shape[0]), features)[0]
            counts = [h * w * self.anchor_generator.num_anchors_per_location()[0] for h, w in sizes]
            levels = list(flat.split(counts))
        return outputs, levels, [a.shape[0] for a in levels]

    # -- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image in original pixel coordinates: ``boxes`` (xyxy), ``scores``, ``labels``."""
        batch, sizes = self.prepare(images)
        outputs, levels, counts = self.head_outputs(batch)
        return self._detections(outputs, levels, counts, images, sizes)

    @torch.no_grad()
    def detect_with_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[list[dict], dict]:
        """:meth:`detect` and :meth:`image_losses` of the same images from one forward pass (no gradient):
        what a perturbation test needs of every perturbed image, at half the cost of the two calls."""
        batch, sizes = self.prepare(images)
        outputs, levels, counts = self.head_outputs(batch)
        return self._detections(outputs, levels, counts, images, sizes), self._losses(outputs, levels, images, sizes, targets)

    def _detections(self, outputs, levels, counts, images, sizes) -> list[dict[str, Tensor]]:
        cls = outputs["cls_logits"].float().split(counts, dim=1)
        reg = outputs["bbox_regression"].float().split(counts, dim=1)
        if self.framework == "torchvision":
            split = {"cls_logits": list(cls), "bbox_regression": list(reg)}
            results = self.postprocess_detections(split, [[a.float() for a in levels]] * len(images), sizes)
            for result, image, size in zip(results, images, sizes):
                result["boxes"] = resize_boxes(result["boxes"], list(size), list(image.shape[-2:]))
            return results
        results = []
        for i, (image, size) in enumerate(zip(images, sizes)):
            scale = torch.tensor(
                [size[1] / image.shape[-1], size[0] / image.shape[-2]] * 2, dtype=torch.float32, device=levels[0].device
            )
            results.append(self._postprocess_one([c[i] for c in cls], [r[i] for r in reg], levels, size, scale))
        return results

    def _postprocess_one(self, cls_levels, reg_levels, anchor_levels, size, scale) -> dict[str, Tensor]:
        """mmdetection's ``_get_bboxes_single`` + ``_bbox_post_process`` for one image."""
        boxes, scores, labels = self._level_candidates(cls_levels, reg_levels, anchor_levels, size)
        return self._nms(boxes / scale, scores, labels)

    def _level_candidates(self, cls_levels, reg_levels, anchor_levels, size) -> tuple[Tensor, Tensor, Tensor]:
        """mmdetection's ``filter_scores_and_topk`` per level (above ``score_thr``, the ``nms_pre`` best) and the
        decoded, clipped boxes in the resized image; all levels concatenated (2.x and 3.x alike)."""
        cfg = self.test_cfg
        boxes, scores, labels = [], [], []
        for logits, deltas, anchors in zip(cls_levels, reg_levels, anchor_levels):
            prob = logits.sigmoid()
            keep = prob > cfg.score_thr
            values = prob[keep]
            where = keep.nonzero()
            values, order = values.sort(descending=True)
            values, where = values[: cfg.nms_pre], where[order[: cfg.nms_pre]]
            anchor_idx, label = where[:, 0], where[:, 1]
            boxes.append(mmdet_delta_decode(anchors[anchor_idx].float(), deltas[anchor_idx], max_shape=size))
            scores.append(values)
            labels.append(label)
        return torch.cat(boxes), torch.cat(scores), torch.cat(labels)

    def _nms(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """mmcv's class-wise ``batched_nms`` and the first ``max_per_img`` kept, as mmdetection ends a dense head."""
        if boxes.numel():
            keep = mmcv_batched_nms(boxes, scores, labels, self.test_cfg.nms_iou)[: self.test_cfg.max_per_img]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return {"boxes": boxes, "scores": scores, "labels": labels}

    # -- loss ----------------------------------------------------------------------------------

    def image_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Per-image focal and L1 losses, shape ``[len(images)]`` each, in whatever mode the modules are.

        Each is normalised by the image's own number of positive anchors (at
        least 1), reported as ``num_foreground``.

        ``targets[i]["boxes"]`` are xyxy boxes in original pixel coordinates and
        ``targets[i]["labels"]`` contiguous labels. Call it on a model in eval
        mode to get DESIGN's total detection loss; the images may require grad.
        With ``targets[i]["object"] = j`` the image's entry is object ``j``'s part
        of that loss instead (``-1``: the background part), see :meth:`object_losses`.
        """
        batch, sizes = self.prepare(images)
        outputs, levels, _ = self.head_outputs(batch)
        return self._losses(outputs, levels, images, sizes, targets)

    def _losses(self, outputs, levels, images, sizes, targets) -> dict[str, Tensor]:
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
                num_foreground.append(num_fg)
                continue
            cls_loss = self._focal_loss(cls_out[i][valid], cls_target[valid]) / num_fg
            if gt.shape[0]:
                fg = foreground.nonzero()[:, 0]
                target_deltas = self._encode(gt[matched[fg]], anchors[fg])
                box_loss = (reg_out[i][fg] - target_deltas).abs().sum() / num_fg
            else:
                box_loss = reg_out[i].sum() * 0.0
            cls_losses.append(cls_loss)
            box_losses.append(box_loss)
            num_foreground.append(num_fg)
        return {"classification": torch.stack(cls_losses), "bbox_regression": torch.stack(box_losses),
                "num_foreground": torch.tensor(num_foreground, dtype=anchors.dtype, device=anchors.device)}

    def _assign(self, image: Tensor, size, target: dict, anchors: Tensor, cls_out: Tensor):
        """One image's anchor assignment: its scaled boxes, matched object per anchor, foreground mask,
        number of positives (at least 1), one-hot classification targets and the anchors in the loss."""
        gt = self._scaled_targets(target["boxes"], tuple(image.shape[-2:]), size, anchors)
        matched = self.match(gt, anchors)
        foreground = matched >= 0
        num_fg = max(1, int(foreground.sum()))
        cls_target = torch.zeros_like(cls_out)
        if gt.shape[0]:
            labels = target["labels"].to(anchors.device)
            cls_target[foreground, labels[matched[foreground]]] = 1.0
        valid = matched != self.proposal_matcher.BETWEEN_THRESHOLDS
        return gt, matched, foreground, num_fg, cls_target, valid

    def _loss_parts(self, cls_out, reg_out, cls_target, matched, valid, gt, anchors) -> tuple[Tensor, Tensor]:
        """Focal and L1 sums of one image split by owner: index 0 the background anchors, 1 + j object j's anchors.

        An anchor belongs to the object the assigner matched it to; ignored
        anchors belong to nobody (they are not in the loss either).
        """
        owners = gt.shape[0] + 1
        per_anchor = self._focal_terms(cls_out[valid], cls_target[valid]).sum(dim=1)
        cls_parts = torch.zeros(owners, dtype=per_anchor.dtype, device=per_anchor.device)
        cls_parts = cls_parts.index_add(0, matched[valid] + 1, per_anchor)
        box_parts = torch.zeros(owners, dtype=reg_out.dtype, device=reg_out.device) + reg_out.sum() * 0.0
        fg = (matched >= 0).nonzero()[:, 0]
        if fg.numel():
            l1 = (reg_out[fg] - self._encode(gt[matched[fg]], anchors[fg])).abs().sum(dim=1)
            box_parts = box_parts.index_add(0, matched[fg] + 1, l1.to(box_parts.dtype))
        return cls_parts, box_parts

    def object_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Each image's total loss split by object: ``classification`` and ``bbox_regression`` of shape ``[1 + K]``.

        Entry 0 is the background (the focal loss of anchors matched to no
        object, no box term); entry ``1 + j`` the focal and L1 losses of the
        anchors assigned to object ``j`` (``targets[i]["boxes"][j]``). Normalised
        like the total, by the image's number of positive anchors, so the entries
        add up to :meth:`image_losses` (up to summation order).
        """
        batch, sizes = self.prepare(images)
        outputs, levels, _ = self.head_outputs(batch)
        anchors = torch.cat(levels)
        out = []
        for i, (image, size, target) in enumerate(zip(images, sizes, targets)):
            gt, matched, _, num_fg, cls_target, valid = self._assign(image, size, target, anchors, outputs["cls_logits"][i])
            cls_parts, box_parts = self._loss_parts(outputs["cls_logits"][i], outputs["bbox_regression"][i], cls_target,
                                                    matched, valid, gt, anchors)
            out.append({"classification": cls_parts / num_fg, "bbox_regression": box_parts / num_fg})
        return out

    def _scaled_targets(self, boxes: Tensor, original: tuple[int, int], size: tuple[int, int], anchors: Tensor) -> Tensor:
        """Ground-truth boxes in the resized image, as the framework's own resize moves them."""
        boxes = boxes.to(device=anchors.device).reshape(-1, 4)
        if self.framework == "torchvision":
            return resize_boxes(boxes.to(anchors.dtype), list(original), list(size))
        # mmdetection's Resize: float32 boxes times the float32 scale factor, clipped to the resized image
        scale = torch.tensor([size[1] / original[1], size[0] / original[0]] * 2, dtype=torch.float32, device=anchors.device)
        scaled = (boxes.float() * scale).to(anchors.dtype)
        return torch.stack([scaled[:, 0].clamp(0, size[1]), scaled[:, 1].clamp(0, size[0]),
                            scaled[:, 2].clamp(0, size[1]), scaled[:, 3].clamp(0, size[0])], dim=1)

    def match(self, gt: Tensor, anchors: Tensor) -> Tensor:
        """Per anchor: matched object index, -1 (background) or -2 (ignored), by the framework's own rule."""
        if gt.shape[0] == 0:
            return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
        if self.framework == "torchvision":
            return self.proposal_matcher(box_iou(gt, anchors))
        return self.assigner.assign(mmdet_box_overlaps(gt, anchors))

    def _encode(self, gt: Tensor, anchors: Tensor) -> Tensor:
        if self.framework == "torchvision":
            return self.box_coder.encode_single(gt, anchors)
        return mmdet_delta_encode(anchors, gt)

    def _focal_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Summed sigmoid focal loss, in torchvision's or mmdetection's (``py_sigmoid_focal_loss``) arithmetic."""
        if self.framework == "torchvision":
            alpha, gamma = self.loss_cfg.alpha, self.loss_cfg.gamma
            return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum")
        return self._focal_terms(logits, targets).sum()

    def _focal_terms(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The focal loss of every anchor and class, unsummed (the same arithmetic as :meth:`_focal_loss`)."""
        alpha, gamma = self.loss_cfg.alpha, self.loss_cfg.gamma
        if self.framework == "torchvision":
            return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
        prob = logits.sigmoid()
        pt = (1 - prob) * targets + prob * (1 - targets)
        weight = (alpha * targets + (1 - alpha) * (1 - targets)) * pt.pow(gamma)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """With targets: the batch's training losses; without: :meth:`detect`.

        As in mmdetection's training, the batch's summed losses are divided by
        the batch's number of positive anchors (not averaged per image), so an
        image with few small objects does not dominate the batch.
        """
        if targets is not None:
            losses = self.image_losses(images, targets)
            weights = losses["num_foreground"]
            return {k: (losses[k] * weights).sum() / weights.sum() for k in ("classification", "bbox_regression")}
        return self.detect(images)
