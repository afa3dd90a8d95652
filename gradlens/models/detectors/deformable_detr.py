"""mmdetection 2.x Deformable DETR as the CEDNet fork builds it, with its training loss after Hungarian matching.

The network is the fork's ``configs/cednet/deformable_detr/*`` (mmdetection's ``deformable_detr_r50_16x2_50e_coco``
without box refinement or two-stage proposals): a backbone giving four maps at strides 8..64 with 256 channels
(CEDNet's ``CEDNetWrapper`` with one added block and no neck, or ResNet-50 / ConvNeXt C3..C5 under mmdetection's
``ChannelMapper`` with group norm and a fourth, stride-2 map from C5), sine positional encodings of the unpadded
pixels plus a learned level embedding, a six-layer encoder of multi-scale deformable self-attention, a six-layer
decoder (self-attention among 300 queries, deformable cross-attention to the encoder's memory at reference points
predicted from the queries) and one class and one box branch shared by every decoder layer.
The arithmetic is mmcv's and mmdetection's, operation by operation (:mod:`gradlens.models.detectors.transformer`).

**Detections** are mmdetection's ``DETRHead._get_bboxes_single`` on the last layer: sigmoid scores of every
(query, class), the best 100, boxes scaled to the resized image, clipped and divided by the scale factor.

**The total detection loss is the training loss itself** (``DeformableDETRHead.loss``): for each decoder layer, the
queries are matched one to one with the ground truth by ``HungarianAssigner`` (focal classification cost x 2, L1 of
the normalised (cx, cy, w, h) x 5, -GIoU in pixels x 2; ``scipy.optimize.linear_sum_assignment`` on the float32 cost,
ties broken as scipy breaks them), then

- ``loss_cls``: sigmoid focal loss (alpha 0.25, gamma 2) of every query and class, the unmatched queries against
  background, x 2, over ``max(matched, 1)``;
- ``loss_bbox``: L1 of the matched queries' normalised boxes, x 5, over ``max(matched, 1)``;
- ``loss_iou``: ``1 - GIoU`` of the matched queries' boxes in pixels of the resized image, x 2, same normaliser;

the last layer's terms named as above and the earlier layers' ``d0.loss_cls`` ... ``d4.loss_iou`` (every auxiliary
layer counts with weight 1, as in training). mmdetection divides by ``avg_factor + float32 eps``; so does gradlens.
The matching itself carries no gradient. No part of the loss is random: one forward pass gives it exactly.

Per object, each query's terms belong to the object it is matched to (at that layer) and the unmatched queries'
classification terms to the background.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens.errors import GradlensError
from gradlens.models.detectors.boxes import cxcywh_to_xyxy, giou_loss, giou_matrix, xyxy_to_cxcywh
from gradlens.models.detectors.mmdet_targets import resized_boxes, scale_factor
from gradlens.models.detectors.sampling import owner_sums, owner_terms
from gradlens.models.detectors.matching import hungarian_match
from gradlens.models.detectors.transformer import (FFN, ConvGN, DeformableEncoderLayer, LayerStack, MultiheadAttention,
                                                   MultiScaleDeformableAttention, SinePositionalEncoding,
                                                   inverse_sigmoid, padding_masks, valid_ratios)
from gradlens.models.preprocessing.transform import PreprocessConfig, batch_images
from gradlens.precision import full_precision

EPS = float(torch.finfo(torch.float32).eps)  # mmdetection's weight_reduce_loss: sum / (avg_factor + eps)
CLS_WEIGHT, L1_WEIGHT, IOU_WEIGHT = 2.0, 5.0, 2.0  # the configs' loss weights, equal to the matching costs'
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
DETR_PREPROCESS = PreprocessConfig(min_size=800, max_size=1333, size_divisor=128, convention="mmcv")


def layer_term_names(layers: int) -> tuple[str, ...]:
    """mmdetection's names of the loss terms: the last layer's plain, the others ``d{i}.``-prefixed, in the order
    ``DeformableDETRHead.loss`` puts them in its dict."""
    last = ("loss_cls", "loss_bbox", "loss_iou")
    return last + tuple(f"d{i}.{name}" for i in range(layers - 1) for name in last)


# -- matching -------------------------------------------------------------------------------------------------


def matching_cost(logits: Tensor, boxes: Tensor, gt: Tensor, gt_labels: Tensor, size: tuple[int, int]) -> Tensor:
    """``HungarianAssigner``'s cost ``[queries, objects]`` (float32, as mmdetection computes it): focal
    classification cost, L1 of the (cx, cy, w, h) boxes normalised by the image, and -GIoU in pixels."""
    h, w = size
    factor = gt.new_tensor([w, h, w, h]).unsqueeze(0)
    prob = logits.sigmoid()
    neg = -(1 - prob + 1e-12).log() * (1 - FOCAL_ALPHA) * prob.pow(FOCAL_GAMMA)
    pos = -(prob + 1e-12).log() * FOCAL_ALPHA * (1 - prob).pow(FOCAL_GAMMA)
    cls_cost = (pos[:, gt_labels] - neg[:, gt_labels]) * CLS_WEIGHT
    reg_cost = torch.cdist(boxes, xyxy_to_cxcywh(gt / factor), p=1) * L1_WEIGHT
    iou_cost = -giou_matrix(cxcywh_to_xyxy(boxes) * factor, gt) * IOU_WEIGHT
    return cls_cost + reg_cost + iou_cost


def focal_loss_terms(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """mmdetection's ``py_sigmoid_focal_loss`` per (query, class) before reduction; label ``num_classes`` is the
    background (every class a negative)."""
    target = F.one_hot(labels, num_classes=num_classes + 1)[:, :num_classes].type_as(logits)
    prob = logits.sigmoid()
    pt = (1 - prob) * target + prob * (1 - target)
    weight = (FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)) * pt.pow(FOCAL_GAMMA)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight


# -- the network ----------------------------------------------------------------------------------------------


class ChannelMapper(nn.Module):
    """mmdetection's ``ChannelMapper`` as the Deformable DETR configs build it: a 1x1 conv + group norm per input
    map, and extra stride-2 3x3 conv + group norm maps, the first from the last *input* map."""

    def __init__(self, in_channels: list[int], out_channels: int = 256, num_outs: int = 4):
        super().__init__()
        self.convs = nn.ModuleList(ConvGN(c, out_channels, 1) for c in in_channels)
        extra = num_outs - len(in_channels)
        if extra > 0:
            self.extra_convs = nn.ModuleList(
                ConvGN(in_channels[-1] if i == 0 else out_channels, out_channels, 3, 2) for i in range(extra))

    def forward(self, inputs) -> list[Tensor]:
        outs = [conv(x) for conv, x in zip(self.convs, inputs)]
        for i, conv in enumerate(getattr(self, "extra_convs", [])):
            outs.append(conv(inputs[-1] if i == 0 else outs[-1]))
        return outs


class DecoderLayer(nn.Module):
    """``DetrTransformerDecoderLayer`` with ``('self_attn', 'norm', 'cross_attn', 'norm', 'ffn', 'norm')``."""

    def __init__(self, dims: int = 256, ffn: int = 1024, levels: int = 4, heads: int = 8):
        super().__init__()
        self.attentions = nn.ModuleList([MultiheadAttention(dims, heads), MultiScaleDeformableAttention(dims, num_levels=levels)])
        self.ffns = nn.ModuleList([FFN(dims, ffn)])
        self.norms = nn.ModuleList([nn.LayerNorm(dims) for _ in range(3)])

    def forward(self, query: Tensor, pos: Tensor, memory: Tensor, reference: Tensor, shapes, padding: Tensor) -> Tensor:
        query = self.norms[0](self.attentions[0](query, query, query, query_pos=pos, key_pos=pos))
        query = self.norms[1](self.attentions[1](query, memory, pos, reference, shapes, padding))
        return self.norms[2](self.ffns[0](query))


class DeformableDetrTransformer(nn.Module):
    """mmdetection's ``DeformableDetrTransformer`` (single-stage, no box refinement)."""

    def __init__(self, dims: int = 256, encoder_layers: int = 6, decoder_layers: int = 6, levels: int = 4,
                 ffn: int = 1024):
        super().__init__()
        self.embed_dims = dims
        self.encoder = LayerStack([DeformableEncoderLayer(dims, levels=levels, ffn=ffn) for _ in range(encoder_layers)])
        self.decoder = LayerStack([DecoderLayer(dims, ffn, levels) for _ in range(decoder_layers)])
        self.level_embeds = nn.Parameter(torch.empty(levels, dims))
        self.reference_points = nn.Linear(dims, 2)
        nn.init.normal_(self.level_embeds)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)

    @staticmethod
    def encoder_reference_points(shapes, ratios: Tensor, device) -> Tensor:
        """``get_reference_points``: every pixel centre of every level, normalised by the valid extent, ``(bs,
        sum(h*w), levels, 2)``."""
        points = []
        for level, (h, w) in enumerate(shapes):
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                          torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                          indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (ratios[:, None, level, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (ratios[:, None, level, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * ratios[:, None]

    def forward(self, feats: list[Tensor], masks: list[Tensor], query_embed: Tensor,
                pos_embeds: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The decoder's states after each layer ``(layers, bs, queries, C)`` and the initial reference points
        ``(bs, queries, 2)``."""
        shapes = [tuple(f.shape[-2:]) for f in feats]
        flat = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
        padding = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embeds[i].view(1, 1, -1)
                         for i, p in enumerate(pos_embeds)], 1)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)
        reference = self.encoder_reference_points(shapes, ratios, flat.device)
        memory, pos = flat.permute(1, 0, 2), pos.permute(1, 0, 2)
        for layer in self.encoder.layers:
            memory = layer(memory, pos, reference, shapes, padding)
        bs, c = flat.shape[0], flat.shape[2]
        query_pos, query = torch.split(query_embed, c, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
        query = query.unsqueeze(0).expand(bs, -1, -1)
        init_reference = self.reference_points(query_pos).sigmoid()
        query, query_pos = query.permute(1, 0, 2), query_pos.permute(1, 0, 2)
        decoder_reference = init_reference[:, :, None] * ratios[:, None]
        states = []
        for layer in self.decoder.layers:
            query = layer(query, query_pos, memory, decoder_reference, shapes, padding)
            states.append(query)
        return torch.stack(states).permute(0, 2, 1, 3), init_reference


class DeformableDETRHead(nn.Module):
    """The head's modules under mmdetection's names; every decoder layer shares one class and one box branch."""

    def __init__(self, num_classes: int, dims: int = 256, num_query: int = 300, encoder_layers: int = 6,
                 decoder_layers: int = 6, levels: int = 4):
        super().__init__()
        self.transformer = DeformableDetrTransformer(dims, encoder_layers, decoder_layers, levels)
        self.positional_encoding = SinePositionalEncoding(dims // 2, normalize=True, offset=-0.5)
        fc_cls = nn.Linear(dims, num_classes)
        reg = nn.Sequential(nn.Linear(dims, dims), nn.ReLU(), nn.Linear(dims, dims), nn.ReLU(), nn.Linear(dims, 4))
        nn.init.constant_(fc_cls.bias, -float(np.log((1 - 0.01) / 0.01)))  # bias_init_with_prob(0.01)
        nn.init.zeros_(reg[-1].weight)
        nn.init.zeros_(reg[-1].bias)
        with torch.no_grad():
            reg[-1].bias[2:] = -2.0
        self.cls_branches = nn.ModuleList([fc_cls] * decoder_layers)
        self.reg_branches = nn.ModuleList([reg] * decoder_layers)
        self.query_embedding = nn.Embedding(num_query, dims * 2)

    def forward(self, feats: list[Tensor], batch_shape: tuple[int, int], sizes) -> tuple[Tensor, Tensor]:
        """Class logits ``(layers, bs, queries, classes)`` and sigmoid boxes (cx, cy, w, h) ``(layers, bs,
        queries, 4)`` of every decoder layer."""
        masks = padding_masks(batch_shape, sizes, feats)
        pos = [self.positional_encoding(m) for m in masks]
        states, reference = self.transformer(feats, masks, self.query_embedding.weight, pos)
        reference = inverse_sigmoid(reference)
        classes, boxes = [], []
        for level in range(states.shape[0]):
            classes.append(self.cls_branches[level](states[level]))
            tmp = self.reg_branches[level](states[level])
            boxes.append(torch.cat([tmp[..., :2] + reference, tmp[..., 2:]], -1).sigmoid())
        return torch.stack(classes), torch.stack(boxes)


class MMDetDeformableDETR(nn.Module):
    """A Deformable DETR of mmdetection 2.x as a gradlens detector (module docstring).

    ``backbone(x)`` returns the four 256-channel maps (``neck=None``: CEDNet) or the maps the ``neck``
    (:class:`ChannelMapper`) reads. Labels are contiguous ``0..num_classes-1``; ``categories`` maps them to
    dataset ids.
    """

    framework = "mmdetection"

    def __init__(self, backbone: nn.Module, num_classes: int, *, neck: nn.Module | None = None,
                 preprocess: PreprocessConfig | None = None, arch_name: str = "deformable_detr", num_query: int = 300,
                 encoder_layers: int = 6, decoder_layers: int = 6, max_per_img: int = 100):
        super().__init__()
        self.backbone = backbone
        if neck is not None:
            self.neck = neck
        self.bbox_head = DeformableDETRHead(num_classes, num_query=num_query, encoder_layers=encoder_layers,
                                            decoder_layers=decoder_layers)
        self.num_classes = num_classes
        self.max_per_img = max_per_img
        self.preprocess = preprocess or DETR_PREPROCESS
        self.arch_name = arch_name
        self.channels_last = False
        self.categories = [{"id": i + 1, "name": f"class_{i + 1}"} for i in range(num_classes)]

    # -- interface members -----------------------------------------------------------------------

    @property
    def loss_terms(self) -> tuple[str, ...]:
        return layer_term_names(len(self.bbox_head.transformer.decoder.layers))

    @property
    def postprocess_revision(self) -> int:
        return 1

    def use_channels_last(self, enabled: bool = True) -> "MMDetDeformableDETR":
        """The CPU speed mode of the other detectors: backbone convolutions in NHWC (equal up to round-off)."""
        from gradlens.models.backbones.layers import channels_last_mode

        self.channels_last = channels_last_mode(self, enabled)
        return self

    # -- the network -----------------------------------------------------------------------------

    def prepare(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        return batch_images(images, self.preprocess)

    def features(self, batch: Tensor) -> list[Tensor]:
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        maps = self.backbone(batch)
        if hasattr(self, "neck"):
            maps = self.neck(list(maps))
        maps = [m.float() if m.dtype in (torch.float16, torch.bfloat16) else m.contiguous() for m in maps]
        levels = self.bbox_head.transformer.level_embeds.shape[0]
        if len(maps) != levels:
            raise GradlensError(f"the Deformable DETR backbone gave {len(maps)} maps, not the {levels} levels its "
                                "transformer reads")
        return maps

    def head_outputs(self, image: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """One image's class logits and boxes of every decoder layer (``(layers, queries, ...)``) and its resized
        size, computed on that image alone."""
        batch, (size,) = self.prepare([image])
        classes, boxes = self.bbox_head(self.features(batch), tuple(batch.shape[-2:]), [size])
        return classes[:, 0], boxes[:, 0], size

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image in original pixels (``boxes``, ``scores``, ``labels``), one image at a time."""
        out = []
        for image in images:
            classes, boxes, size = self.head_outputs(image)
            out.append(self._detections(image, classes[-1], boxes[-1], size))
        return out

    def _detections(self, image: Tensor, logits: Tensor, boxes: Tensor, size) -> dict[str, Tensor]:
        """``DETRHead._get_bboxes_single`` with ``rescale=True``."""
        logits, boxes = full_precision(logits.detach()), full_precision(boxes.detach())
        scores, index = logits.sigmoid().view(-1).topk(min(self.max_per_img, logits.numel()))
        labels = index % self.num_classes
        det = cxcywh_to_xyxy(boxes[index // self.num_classes])
        h, w = size
        det[:, 0::2] = (det[:, 0::2] * w).clamp(min=0, max=w)
        det[:, 1::2] = (det[:, 1::2] * h).clamp(min=0, max=h)
        det = det / scale_factor(image, size)
        return {"boxes": det, "scores": scores, "labels": labels}

    @torch.no_grad()
    def detect_with_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[list[dict], dict]:
        """:meth:`detect` and :meth:`image_losses` of the same images from one forward pass each."""
        detections, losses = [], []
        for image, target in zip(images, targets):
            classes, boxes, size = self.head_outputs(image)
            detections.append(self._detections(image, classes[-1], boxes[-1], size))
            parts = self._loss_parts(image, target, classes, boxes, size)
            losses.append({name: values.sum() for name, (values, _) in parts.items()})
        return detections, _stack(losses, self.loss_terms)

    # -- the training loss -----------------------------------------------------------------------

    def image_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Each image's loss terms (module docstring), computed on that image alone: ``[len(images)]`` per term,
        differentiable with respect to the images. With ``targets[i]["object"] = j`` the image's entry is object
        ``j``'s part (``-1``: the background's), see :meth:`object_losses`."""
        out = []
        for image, target in zip(images, targets):
            out.append(owner_terms(self.loss_parts(image, target), target))
        return _stack(out, self.loss_terms)

    def object_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Each image's loss split by owner, ``[1 + K]`` per term: entry 0 the background (the unmatched queries'
        classification terms), ``1 + j`` every term of the queries matched to object ``j``; they add up to
        :meth:`image_losses`."""
        return [owner_sums(self.loss_parts(image, target), len(target["boxes"])) for image, target in zip(images, targets)]

    def loss_parts(self, image: Tensor, target: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Every query's normalised contribution to each term and its owner (0: the background, ``1 + j``:
        object ``j``)."""
        classes, boxes, size = self.head_outputs(image)
        return self._loss_parts(image, target, classes, boxes, size)

    def gt_in_resized(self, image: Tensor, target: dict, size) -> tuple[Tensor, Tensor]:
        """mmdetection's ``Resize`` of the ground truth: float32 boxes times the scale factor, clipped."""
        return resized_boxes(image, target, size)

    def matches(self, image: Tensor, target: dict[str, Tensor]) -> Tensor:
        """Each decoder layer's matching ``(layers, queries)``: the object each query is matched to, -1 for none."""
        with torch.no_grad():
            classes, boxes, size = self.head_outputs(image)
            gt, gt_labels = self.gt_in_resized(image, target, size)
            gt = gt.to(full_precision(boxes).dtype)
            return torch.stack([self._match(full_precision(c), full_precision(b), gt, gt_labels, size) for c, b in zip(classes, boxes)])

    def _match(self, logits: Tensor, boxes: Tensor, gt: Tensor, gt_labels: Tensor, size) -> Tensor:
        if gt.shape[0] == 0:
            return torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
        with torch.no_grad():
            return hungarian_match(matching_cost(logits.detach(), boxes.detach(), gt, gt_labels, size))

    def _loss_parts(self, image: Tensor, target: dict, classes: Tensor, boxes: Tensor, size) -> dict:
        gt, gt_labels = self.gt_in_resized(image, target, size)
        gt = gt.to(full_precision(boxes).dtype)
        if gt_labels.numel() and (int(gt_labels.min()) < 0 or int(gt_labels.max()) >= self.num_classes):
            raise GradlensError(f"a ground-truth label is outside the detector's {self.num_classes} classes")
        h, w = size
        factor = boxes.new_tensor([w, h, w, h]).unsqueeze(0)
        names = self.loss_terms
        layers = classes.shape[0]
        parts = {}
        for layer in range(layers):
            logits, pred = full_precision(classes[layer]), full_precision(boxes[layer])
            matched = self._match(logits, pred, gt, gt_labels, size)
            fg = (matched >= 0).nonzero().squeeze(1)
            owner = matched + 1
            labels = torch.full_like(matched, self.num_classes)
            labels[fg] = gt_labels[matched[fg]]
            positives = max(float(fg.numel()), 1.0)  # cls_avg_factor and num_total_pos, each at least 1
            focal = focal_loss_terms(logits, labels, self.num_classes).sum(1)
            target_boxes = xyxy_to_cxcywh(gt[matched[fg]] / factor)
            l1 = (pred[fg] - target_boxes).abs().sum(1)
            iou = giou_loss(cxcywh_to_xyxy(pred[fg]) * factor, cxcywh_to_xyxy(target_boxes) * factor)
            prefix = "" if layer == layers - 1 else f"d{layer}."
            parts[f"{prefix}loss_cls"] = (CLS_WEIGHT * focal / (positives + EPS), owner)
            parts[f"{prefix}loss_bbox"] = (L1_WEIGHT * l1 / (positives + EPS), owner[fg])
            parts[f"{prefix}loss_iou"] = (IOU_WEIGHT * iou / (positives + EPS), owner[fg])
        return {name: parts[name] for name in names}


def _stack(per_image: list[dict[str, Tensor]], names) -> dict[str, Tensor]:
    return {name: torch.stack([d[name] for d in per_image]) for name in names}
