"""torchvision's Faster and Mask R-CNN with a total loss that does not depend on a random draw.

Their training loss is computed on samples: the RPN's ``BalancedPositiveNegativeSampler`` over anchors and the
RoI head's over proposals (ground-truth boxes added). One draw gives one noisy input gradient; gradlens' total
detection loss for them is the **expectation of that loss over the samplers' randomness**, everything else as
torchvision's training forward computes it: the eval-mode transform (one test scale), normalisation layers in
inference mode, the RPN's training-time proposal settings (``pre_nms_top_n`` and ``post_nms_top_n``
``["training"]``), proposals detached as upstream detaches them. With the counts of a balanced draw fixed by
the candidates (:mod:`gradlens.models.detectors.sampling`), every term is exact:

- ``loss_objectness``: binary cross-entropy summed over every positive and negative anchor, each weighted by
  its probability of being drawn, over the number drawn (torchvision's mean over the sample);
- ``loss_rpn_box_reg``: smooth L1 (beta 1/9) summed over the positive anchors, weighted, over the number drawn;
- ``loss_classifier``: cross-entropy over every proposal (the training proposals plus the ground-truth boxes),
  weighted, over the number drawn;
- ``loss_box_reg``: smooth L1 of the ground-truth class's box over the positive proposals, weighted, over the
  number drawn;
- ``loss_mask`` (Mask R-CNN, when the targets hold ``masks``): per-pixel binary cross-entropy of the positive
  proposals' masks, weighted, over (positives drawn) x M x M - torchvision's mean over the sampled positives.

The sum over all candidates costs the RoI head ~4x the proposals of one draw (2,000 + objects, against 512);
the backbone and RPN, most of the work, are the same; RoIAlign's backward, torchvision's slowest step on so many
boxes, is one sparse product (:mod:`gradlens.models.detectors.roi_align`).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens.errors import CheckpointError, GradlensError
from gradlens.models.detectors.adapter import LossDictDetector, mode_view
from gradlens.models.detectors.roi_align import multiscale_roi_align
from gradlens.models.detectors.sampling import inclusion_probabilities, owner_sums, owner_terms
from gradlens.models.preprocessing.transform import PreprocessConfig

TERMS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
MASK_TERM = "loss_mask"


def _two_stage_parts(model: nn.Module) -> None:
    """One sentence unless ``model`` is a torchvision two-stage detector this module can take its loss from."""
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork

    if not (isinstance(model, GeneralizedRCNN) and isinstance(model.rpn, RegionProposalNetwork)
            and isinstance(model.roi_heads, RoIHeads)):
        raise GradlensError(f"ExpectedLossRCNN takes torchvision's Faster or Mask R-CNN (a GeneralizedRCNN with its "
                            f"RegionProposalNetwork and RoIHeads), not {type(model).__name__}.")
    if model.roi_heads.has_keypoint():
        raise GradlensError("Keypoint R-CNN is not supported: its keypoint loss is not part of gradlens' total "
                            "detection loss.")


class ExpectedLossRCNN(LossDictDetector):
    """A torchvision Faster/Mask R-CNN as a gradlens detector, its loss the expectation over its samplers.

    ``detect`` is the model's own eval-mode forward (as :class:`LossDictDetector`); ``image_losses`` gives
    the terms of the module docstring per image, differentiable with respect to the images. ``loss_mask`` is
    part of the total when the targets carry ``masks`` (one ``H x W`` mask per object, original pixels).
    """

    allows_random_samplers = True

    def __init__(self, model: nn.Module, categories, *, name: str | None = None,
                 preprocess: PreprocessConfig | None = None, keep_in_inference: Iterable[type] = ()):
        _two_stage_parts(model)
        super().__init__(model, categories, name=name, preprocess=preprocess, keep_in_inference=keep_in_inference)

    @property
    def arch_name(self) -> str:
        """The torchvision architecture it was loaded as (``torchvision_fasterrcnn_resnet50_fpn``, ...), or the
        wrapped class; marked as taking the expected loss (no store of a sampled loss could share its key)."""
        loaded = getattr(self, "loaded_arch", None)
        return (loaded or super().arch_name) + "+expected-sampler-loss"

    @property
    def needs_masks(self) -> bool:
        """Mask R-CNN's loss has a mask term: the pipeline gives it the objects' instance masks."""
        return bool(self.model.roi_heads.has_mask())

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def image_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Each image's expected loss terms, computed on that image alone (``[len(images)]`` per term). With
        ``targets[i]["object"] = j`` the image's entry is object ``j``'s part instead (``-1``: the background's),
        see :meth:`object_losses`."""
        view = mode_view(self.model, training=True, keep=self._keep)
        per_image = []
        for image, target in zip(images, targets):
            per_image.append(owner_terms(self.expected_parts(view, image, target), target))
        return self._stacked(per_image, hint=" (give masks for all images or for none)")

    def object_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Each image's expected loss split by owner, ``[1 + K]`` per term: entry 0 the background (negative
        anchors and proposals), entry ``1 + j`` every term of the candidates matched to object ``j`` (its positive
        anchors and proposals, their boxes and masks). Each candidate's term is weighted and normalised as in the
        total, so the entries add up to :meth:`image_losses`."""
        view = mode_view(self.model, training=True, keep=self._keep)
        return [owner_sums(self.expected_parts(view, image, target), len(target["boxes"]))
                for image, target in zip(images, targets)]

    @staticmethod
    def expected_parts(view: nn.Module, image: Tensor, target: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Every candidate's weighted, normalised contribution to each expected term, and its owner (0: the
        background, ``1 + j``: object ``j``), through the modules of ``view`` (the model with its loss path in
        training mode and its transform and norms in inference mode)."""
        from torchvision.models.detection.rpn import concat_box_prediction_layers
        from torchvision.ops import box_iou

        boxes = torch.as_tensor(target["boxes"]).to(device=image.device, dtype=image.dtype).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"]).to(device=image.device, dtype=torch.int64).reshape(-1)
        given = {"boxes": boxes, "labels": labels}
        if target.get("masks") is not None:
            given["masks"] = torch.as_tensor(target["masks"]).to(device=image.device, dtype=torch.uint8)
        batch, (resized,) = view.transform([image], [given])
        features = view.backbone(batch.tensors)

        # -- the RPN: every anchor that the sampler could draw ------------------------------------------
        rpn = view.rpn
        levels = list(features.values())
        objectness, deltas = rpn.head(levels)
        anchors = rpn.anchor_generator(batch, levels)
        per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(1, -1, 4)
        proposals, _ = rpn.filter_proposals(proposals, objectness, batch.image_sizes, per_level)
        anchor_labels, matched = rpn.assign_targets_to_anchors(anchors, [resized])
        anchor_labels = anchor_labels[0]
        regression = rpn.box_coder.encode(matched, anchors)[0]
        positive = anchor_labels >= 1
        anchor_owner = torch.zeros(len(anchor_labels), dtype=torch.int64, device=image.device)
        if len(resized["boxes"]) and bool(positive.any()):  # the object each positive anchor regresses to
            anchor_owner[positive] = rpn.proposal_matcher(box_iou(resized["boxes"], anchors[0]))[positive] + 1
        sampler = rpn.fg_bg_sampler
        p, draw = inclusion_probabilities(anchor_labels, sampler.batch_size_per_image, sampler.positive_fraction)
        p = p.to(objectness.dtype)
        drawn = max(draw.drawn, 1)  # torchvision divides by the sample's size (never empty with anchors)
        logits = objectness.flatten()
        bce = F.binary_cross_entropy_with_logits(logits, anchor_labels.clamp(min=0).to(logits.dtype), reduction="none")
        rpn_box = F.smooth_l1_loss(deltas[positive], regression[positive].to(deltas.dtype), beta=1 / 9,
                                   reduction="none").sum(1)
        parts = {"loss_objectness": (p * bce / drawn, anchor_owner),
                 "loss_rpn_box_reg": (p[positive] * rpn_box / drawn, anchor_owner[positive])}

        # -- the RoI head: every proposal (ground truth added) the sampler could draw -------------------
        heads = view.roi_heads
        gt_boxes = resized["boxes"].to(proposals[0].dtype)
        candidates = heads.add_gt_proposals(proposals, [gt_boxes])
        matched_idxs, roi_labels = heads.assign_targets_to_proposals(candidates, [gt_boxes], [resized["labels"]])
        candidates, matched_idxs, roi_labels = candidates[0], matched_idxs[0], roi_labels[0]
        sampler = heads.fg_bg_sampler
        q, draw = inclusion_probabilities(roi_labels, sampler.batch_size_per_image, sampler.positive_fraction)
        keep = q > 0  # candidates never drawn (ignored, or negatives when none is drawn) add nothing
        candidates, matched_idxs, roi_labels, q = candidates[keep], matched_idxs[keep], roi_labels[keep], q[keep]
        drawn = max(draw.drawn, 1)
        roi_owner = torch.where(roi_labels > 0, matched_idxs + 1, torch.zeros_like(matched_idxs))
        box_gt = gt_boxes if gt_boxes.numel() else torch.zeros((1, 4), dtype=gt_boxes.dtype, device=gt_boxes.device)
        roi_regression = heads.box_coder.encode([box_gt[matched_idxs]], [candidates])[0]
        pooled = heads.box_head(multiscale_roi_align(heads.box_roi_pool, features, candidates, batch.image_sizes))
        class_logits, box_regression = heads.box_predictor(pooled)
        q = q.to(class_logits.dtype)
        ce = F.cross_entropy(class_logits, roi_labels, reduction="none")
        fg = torch.where(roi_labels > 0)[0]
        box_regression = box_regression.reshape(len(candidates), -1, 4)
        roi_box = F.smooth_l1_loss(box_regression[fg, roi_labels[fg]], roi_regression[fg].to(box_regression.dtype),
                                   beta=1 / 9, reduction="none").sum(1)
        parts["loss_classifier"] = (q * ce / drawn, roi_owner)
        parts["loss_box_reg"] = (q[fg] * roi_box / drawn, roi_owner[fg])

        if heads.has_mask() and "masks" in resized:
            values = ExpectedLossRCNN._expected_mask_parts(heads, features, batch.image_sizes, candidates[fg],
                                                           matched_idxs[fg], resized, q[fg], draw.positives)
            parts[MASK_TERM] = (values, roi_owner[fg] if len(values) == len(fg) else roi_owner[:0])
        return {name: parts[name] for name in (*TERMS, MASK_TERM) if name in parts}

    @staticmethod
    def _expected_mask_parts(heads, features, image_sizes, positives: Tensor, matched: Tensor, resized: dict,
                             weights: Tensor, drawn_positives: int) -> Tensor:
        """torchvision's ``maskrcnn_loss`` (mean BCE over the sampled positives' M x M targets) in expectation:
        each positive's weighted share."""
        from torchvision.models.detection.roi_heads import project_masks_on_boxes

        mask_logits = heads.mask_predictor(heads.mask_head(multiscale_roi_align(heads.mask_roi_pool, features, positives,
                                                                                image_sizes)))
        if drawn_positives == 0 or positives.numel() == 0:
            return (mask_logits.sum() * 0).reshape(1)[:0]  # as torchvision: no positive, no mask loss
        size = mask_logits.shape[-1]
        targets = project_masks_on_boxes(resized["masks"], positives, matched, size)
        labels = resized["labels"][matched]
        logits = mask_logits[torch.arange(len(labels), device=labels.device), labels]
        bce = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none").flatten(1).sum(1)
        return weights * bce / (drawn_positives * size * size)


# torchvision's two-stage builders gradlens loads state dicts of (``--arch``); each is built without weights
TORCHVISION_TWO_STAGE = {
    "torchvision_fasterrcnn_resnet50_fpn": "fasterrcnn_resnet50_fpn",
    "torchvision_fasterrcnn_resnet50_fpn_v2": "fasterrcnn_resnet50_fpn_v2",
    "torchvision_maskrcnn_resnet50_fpn": "maskrcnn_resnet50_fpn",
    "torchvision_maskrcnn_resnet50_fpn_v2": "maskrcnn_resnet50_fpn_v2",
}
CLASSIFIER_KEY = "roi_heads.box_predictor.cls_score.weight"


def rcnn_from_state_dict(state, arch_name: str, where: str, categories: list[dict] | None = None) -> ExpectedLossRCNN:
    """A torchvision Faster/Mask R-CNN state dict as a gradlens detector (``where`` names it in messages): the
    builder of ``arch_name`` without weights, the classes read from the classifier, every key loaded strictly;
    COCO's 91 labels get torchvision's COCO categories."""
    import torchvision.models.detection as detection

    from gradlens.models.detectors.adapter import torchvision_coco_categories

    weight = state.get(CLASSIFIER_KEY)
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[0] < 2:
        raise CheckpointError(f"{where} is not a {arch_name} state dict (its {CLASSIFIER_KEY} is missing or not a "
                            "(classes, features) matrix).")
    num_classes = int(weight.shape[0])
    model = getattr(detection, TORCHVISION_TWO_STAGE[arch_name])(weights=None, weights_backbone=None,
                                                                 num_classes=num_classes)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise CheckpointError(f"{where} does not fit {arch_name}: {len(missing)} of its keys are missing and "
                            f"{len(unexpected)} unexpected (first: {first}).")
    if categories is None:
        categories = torchvision_coco_categories() if num_classes == 91 else \
            [None] + [{"id": k, "name": str(k)} for k in range(1, num_classes)]
    detector = ExpectedLossRCNN(model.eval(), categories, name=arch_name.removeprefix("torchvision_"))
    detector.loaded_arch = arch_name
    return detector
