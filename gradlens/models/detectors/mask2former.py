"""mmdetection 2.x Mask2Former (instance segmentation) as the CEDNet fork builds it, with a deterministic loss.

The network is the fork's (``configs/cednet/mask2former/mask2former_*``): a backbone giving C2..C5 (CEDNet's
``CEDNetWrapperMask2Former``, mmdetection's ResNet-50 or the fork's ConvNeXt), ``MSDeformAttnPixelDecoder`` (six
deformable-attention encoder layers over C3..C5, an FPN-like lateral on C2, a 1x1 mask-feature conv) and
``Mask2FormerHead`` (nine masked-attention decoder layers over the three coarse maps in turn, 100 queries, a class
and a mask prediction after the query embedding and after every layer). Parameter names are mmdetection's
(``backbone.*``, ``panoptic_head.*``), so fork checkpoints load with ``strict=True`` as they are.

Test arithmetic is the fork's: ``Resize`` keep-ratio to (1333, 800), ``Pad`` to a multiple of 128 with the *pixel*
value 128 before ``Normalize`` (the instance configs; the padded pixels become ``(128 - mean) / std``), the last
layer's masks upsampled bilinearly to the padded input, cropped to the image, upsampled to the original size, and
``MaskFormerFusionHead.instance_postprocess``: the best 100 (query, class) pairs of the softmax without the
no-object class, masks ``> 0``, score = class score x mean sigmoid inside the mask, boxes from the masks
(``mask2bbox``). The panoptic base config (133 classes) pads with zeros after normalising to a multiple of 32 and
keeps the 80 thing classes of its top 100 (``mask2former_resnet50_panoptic``).

**The total detection loss** (DESIGN: total detection loss) is ``Mask2FormerHead.loss`` of every one of the ten
predictions (the query embedding's and each decoder layer's, weights 2 / 5 / 5 for class, mask BCE and dice):
matching by ``MaskHungarianAssigner`` (``ClassificationCost`` 2, ``CrossEntropyLossCost`` 5, ``DiceCost`` 5, eps 1;
``scipy.optimize.linear_sum_assignment`` on the cost), softmax cross-entropy of every query with class weights
(no-object 0.1) over the summed weights, and mask BCE and dice of the matched queries over the number of objects.
mmdetection evaluates the mask costs and losses at random points (12,544 uniform points for the matching;
``get_uncertain_point_coords_with_randomness`` for the loss: the 9,408 most uncertain of 37,632 uniform points plus
3,136 uniform ones). gradlens replaces the random points by their large-sample limit on a fixed grid, so that no
draw enters the loss:

- the points are the centres of the mask-prediction grid's cells (stride 4 of the padded input), each cell
  subdivided 2 x 2 (``subdivisions``: the midpoint rule for the continuous bilinear interpolant that the random
  points sample; one point per cell was measured farther off, below); predictions and the padded full-size
  ground-truth mask are read there as ``point_sample`` reads them (bilinear, ``align_corners=False``, zero outside);
- matching: each point-sampled mean is the mean over the grid (the uniform points' expectation), each sum over the
  12,544 points is 12,544 x that mean (dice's ``eps`` 1 keeps its weight);
- loss: a point's weight is ``0.25 + 0.75 / q`` where it is among the fraction ``q = 9,408 / 37,632 = 1/4`` of the
  grid most uncertain (``-|logit|``, detached, as upstream) and ``0.25`` elsewhere: the limit of the importance
  sampler (three quarters of the points uniform over the most uncertain quarter, one quarter uniform); BCE is the
  weighted mean over the grid, dice's sums are 12,544 x the weighted means.

This is not the exact expectation (the sampled loss is a nonlinear function of 12,544 random points, the matching
a discontinuous one, and the grid stands for the continuous bilinear interpolant). Its distance from the
Monte-Carlo mean of the fork's own ``forward_train`` is measured by ``scripts/compare_mask2former_with_fork.py``
(eval mode, random weights, two photographs with two objects each at 240 x 400, 32 draws; README: Mask2Former): on
the CED-ResNet-50 and CEDNet-NeXt-T configs every term within 0.1 % of the draws' mean and the total within 0.03 %
(a few standard errors: a small bias); the input gradient 1.5-2.2 % (relative L2) from the draws' mean, whose own
noise is 0.6-1.2 % and from which one draw is 3.7-5.7 % away (cosine >= 0.9997). One point per cell instead: total
0.1-0.2 % off, gradient 7-12 %; the plain uniform grid mean without importance weights: total 2-9 %, gradient
29-57 %. ``tests/test_mask2former.py`` repeats the check in small (2,048 points, 16 x 24 grid: 0.07 %).
Per object (:meth:`MMDetMask2Former.object_losses`), each query's terms in each layer belong to
the object it is matched to in that layer (owner ``1 + j``), an unmatched query's class term to the background.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet

from gradlens.errors import GradlensError
from gradlens.models.backbones.layers import EvalBatchNorm2d
from gradlens.models.detectors.mmdet_targets import resized_boxes, resized_masks
from gradlens.models.detectors.sampling import owner_sums, owner_terms
from gradlens.models.detectors.matching import hungarian_match
from gradlens.models.detectors.transformer import (FFN, ConvGN, DeformableEncoderLayer, LayerStack, MultiheadAttention,
                                                   SinePositionalEncoding)
from gradlens.models.preprocessing.transform import PreprocessConfig, batch_images, mmcv_normalise

EPS = float(torch.finfo(torch.float32).eps)  # mmdetection's weight_reduce_loss: sum / (avg_factor + eps)
TERMS = ("loss_cls", "loss_mask", "loss_dice")
INSTANCE_PREPROCESS = PreprocessConfig(min_size=800, max_size=1333, size_divisor=128, convention="mmcv")
PANOPTIC_PREPROCESS = PreprocessConfig(min_size=800, max_size=1333, size_divisor=32, convention="mmcv")
COCO_THINGS = 80


@dataclass(frozen=True)
class Mask2FormerConfig:
    """The fork's ``train_cfg``/``test_cfg`` and loss settings (``mask2former_r50_lsj_8x2_50e_coco-panoptic.py``)."""

    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    cls_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    dice_eps: float = 1.0
    no_object_weight: float = 0.1
    max_per_image: int = 100
    subdivisions: int = 2  # the points: the centres of an s x s subdivision of each mask-grid cell

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def uncertain_fraction(self) -> float:
        """The share of the oversampled points the importance sampler keeps (9,408 / 37,632)."""
        uncertain = int(self.importance_sample_ratio * self.num_points)
        return uncertain / int(self.num_points * self.oversample_ratio)

    @property
    def random_share(self) -> float:
        """The share of the loss's points drawn uniformly (3,136 / 12,544)."""
        return (self.num_points - int(self.importance_sample_ratio * self.num_points)) / self.num_points


# ---------------------------------------------------------------------------------------------
# modules, under mmdetection's / mmcv's parameter names


class MSDeformAttnPixelDecoder(nn.Module):
    """mmdetection's ``MSDeformAttnPixelDecoder``: deformable-attention encoder over the coarsest ``levels`` maps,
    then a lateral + 3x3 conv for each finer map; returns the mask features and the multi-scale maps (coarse first)."""

    def __init__(self, in_channels: list[int], strides=(4, 8, 16, 32), feat_channels: int = 256,
                 out_channels: int = 256, levels: int = 3, layers: int = 6, heads: int = 8, points: int = 4,
                 ffn: int = 1024):
        super().__init__()
        self.strides = tuple(strides)
        self.num_input_levels = len(in_channels)
        self.num_encoder_levels = levels
        n = self.num_input_levels
        self.input_convs = nn.ModuleList([ConvGN(in_channels[i], feat_channels, 1, bias=True)
                                          for i in range(n - 1, n - levels - 1, -1)])
        self.encoder = LayerStack([DeformableEncoderLayer(feat_channels, heads, levels, points, ffn) for _ in range(layers)])
        self.postional_encoding = SinePositionalEncoding(feat_channels // 2, normalize=True)  # mmdetection's spelling
        self.level_encoding = nn.Embedding(levels, feat_channels)
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for i in range(n - levels - 1, -1, -1):
            self.lateral_convs.append(ConvGN(in_channels[i], feat_channels, 1))
            self.output_convs.append(ConvGN(feat_channels, feat_channels, 3, relu=True))
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, 1)

    def reference_points(self, h: int, w: int, stride: int, dtype: torch.dtype, device) -> Tensor:
        """``MlvlPointGenerator.single_level_grid_priors`` (float32 centres ``(i + 0.5) * stride``) over
        ``(w, h) * stride``, in the maps' dtype: the normalised (x, y) pixel centres, row-major."""
        xs = (torch.arange(w, device=device) + 0.5) * stride
        ys = (torch.arange(h, device=device) + 0.5) * stride
        priors = torch.stack([xs.repeat(h), ys.view(-1, 1).repeat(1, w).view(-1)], dim=-1).to(torch.float32)
        return priors / (torch.tensor([[w, h]], dtype=dtype, device=device) * stride)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        bs = feats[0].shape[0]
        inputs, positions, shapes, refs = [], [], [], []
        for i in range(self.num_encoder_levels):
            level = self.num_input_levels - i - 1
            feat = feats[level]
            h, w = feat.shape[-2:]
            projected = self.input_convs[i](feat)
            pos = self.postional_encoding(feat.new_zeros((bs, h, w), dtype=torch.bool)).to(feat.dtype)
            pos = self.level_encoding.weight[i].view(1, -1, 1, 1) + pos
            inputs.append(projected.flatten(2).permute(2, 0, 1))
            positions.append(pos.flatten(2).permute(2, 0, 1))
            shapes.append((h, w))
            refs.append(self.reference_points(h, w, self.strides[level], feat.dtype, feat.device))
        query, pos = torch.cat(inputs), torch.cat(positions)
        reference = torch.cat(refs)[None, :, None].repeat(bs, 1, self.num_encoder_levels, 1)
        for layer in self.encoder.layers:
            query = layer(query, pos, reference, shapes)
        memory = query.permute(1, 2, 0)
        outs = [x.reshape(bs, -1, h, w) for x, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=-1), shapes)]
        for i in range(self.num_input_levels - self.num_encoder_levels - 1, -1, -1):
            lateral = self.lateral_convs[i](feats[i])
            y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output_convs[i](y))
        return self.mask_feature(outs[-1]), outs[: self.num_encoder_levels]


class DecoderLayer(nn.Module):
    """mmcv's ``DetrTransformerDecoderLayer`` of Mask2Former: masked cross-attention, norm, self-attention, norm,
    FFN, norm (sequence-first)."""

    def __init__(self, dims: int, heads: int, ffn: int):
        super().__init__()
        self.attentions = nn.ModuleList([MultiheadAttention(dims, heads), MultiheadAttention(dims, heads)])
        self.ffns = nn.ModuleList([FFN(dims, ffn)])
        self.norms = nn.ModuleList([nn.LayerNorm(dims) for _ in range(3)])

    def forward(self, query: Tensor, memory: Tensor, query_pos: Tensor, key_pos: Tensor, attn_mask: Tensor) -> Tensor:
        query = self.norms[0](self.attentions[0](query, memory, memory, query_pos=query_pos, key_pos=key_pos,
                                                 attn_mask=attn_mask))
        query = self.norms[1](self.attentions[1](query, query, query, query_pos=query_pos, key_pos=query_pos))
        return self.norms[2](self.ffns[0](query))


class Mask2FormerHead(nn.Module):
    """mmdetection's ``Mask2FormerHead`` (its ``forward``): class logits ``(bs, Q, C + 1)`` and mask logits
    ``(bs, Q, H/4, W/4)`` of the query embedding and of every decoder layer, in that order."""

    def __init__(self, in_channels: list[int], num_classes: int, num_queries: int = 100, feat_channels: int = 256,
                 heads: int = 8, layers: int = 9, levels: int = 3, decoder_ffn: int = 2048, encoder_layers: int = 6,
                 encoder_ffn: int = 1024):
        super().__init__()
        self.num_classes, self.num_queries, self.num_heads, self.levels = num_classes, num_queries, heads, levels
        self.pixel_decoder = MSDeformAttnPixelDecoder(in_channels, feat_channels=feat_channels, out_channels=feat_channels,
                                                      levels=levels, layers=encoder_layers, heads=heads, ffn=encoder_ffn)
        self.transformer_decoder = LayerStack([DecoderLayer(feat_channels, heads, decoder_ffn) for _ in range(layers)],
                                              post_norm=feat_channels)
        self.decoder_input_projs = nn.ModuleList([nn.Identity() for _ in range(levels)])
        self.decoder_positional_encoding = SinePositionalEncoding(feat_channels // 2, normalize=True)
        self.query_embed = nn.Embedding(num_queries, feat_channels)
        self.query_feat = nn.Embedding(num_queries, feat_channels)
        self.level_embed = nn.Embedding(levels, feat_channels)
        self.cls_embed = nn.Linear(feat_channels, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(feat_channels, feat_channels), nn.ReLU(inplace=True),
                                        nn.Linear(feat_channels, feat_channels), nn.ReLU(inplace=True),
                                        nn.Linear(feat_channels, feat_channels))

    def predict(self, query: Tensor, mask_feature: Tensor, attn_size) -> tuple[Tensor, Tensor, Tensor]:
        """``forward_head``: post-norm, class and mask logits, and the next layer's attention mask (true where the
        query's mask, bilinearly resized to the next map, has a sigmoid below 0.5; detached)."""
        out = self.transformer_decoder.post_norm(query).transpose(0, 1)
        cls = self.cls_embed(out)
        mask = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_feature)
        attn = F.interpolate(mask, attn_size, mode="bilinear", align_corners=False)
        attn = attn.flatten(2).unsqueeze(1).repeat((1, self.num_heads, 1, 1)).flatten(0, 1)
        return cls, mask, (attn.sigmoid() < 0.5).detach()

    def forward(self, feats: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        bs = feats[0].shape[0]
        mask_feature, maps = self.pixel_decoder(feats)
        memories, positions = [], []
        for i in range(self.levels):
            x = self.decoder_input_projs[i](maps[i]).flatten(2).permute(2, 0, 1)
            memories.append(x + self.level_embed.weight[i].view(1, 1, -1))
            pos = self.decoder_positional_encoding(x.new_zeros((bs, *maps[i].shape[-2:]), dtype=torch.bool))
            positions.append(pos.to(x.dtype).flatten(2).permute(2, 0, 1))
        query = self.query_feat.weight.unsqueeze(1).repeat((1, bs, 1))
        query_pos = self.query_embed.weight.unsqueeze(1).repeat((1, bs, 1))
        cls, mask, attn = self.predict(query, mask_feature, maps[0].shape[-2:])
        outputs = [(cls, mask)]
        for i, layer in enumerate(self.transformer_decoder.layers):
            level = i % self.levels
            attn = attn.masked_fill(attn.all(-1, keepdim=True), False)  # a query masked everywhere sees everything
            query = layer(query, memories[level], query_pos, positions[level], attn)
            cls, mask, attn = self.predict(query, mask_feature, maps[(i + 1) % self.levels].shape[-2:])
            outputs.append((cls, mask))
        return outputs


class ResNet50Levels(ResNet):
    """mmdetection's ResNet-50 (``style='pytorch'``, batch norm on running statistics) returning C2..C5; torchvision's
    parameter names, which mmdetection's ResNet shares. Like gradlens' RetinaNet ResNet-50 it runs in contiguous
    memory (its float32 input gradient follows the kernels' last bits through tied max-pool windows)."""

    needs_contiguous_memory = True

    def __init__(self):
        super().__init__(Bottleneck, [3, 4, 6, 3], norm_layer=EvalBatchNorm2d)
        del self.fc, self.avgpool
        self.out_channels = [256, 512, 1024, 2048]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        c2 = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return c2, c3, c4, self.layer4(c4)


# ---------------------------------------------------------------------------------------------
# the loss's pieces (module docstring), each a function of the predictions so that tests can hold them to upstream


def grid_points(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """``point_sample`` of ``(K, H, W)`` masks at the pixel centres of an ``size`` grid: ``(K, h * w)``, row-major."""
    h, w = size
    ys = (torch.arange(h, dtype=masks.dtype, device=masks.device) + 0.5) / h
    xs = (torch.arange(w, dtype=masks.dtype, device=masks.device) + 0.5) / w
    coords = torch.stack([xs.repeat(h), ys.view(-1, 1).repeat(1, w).view(-1)], dim=-1)
    grid = (2.0 * coords - 1.0)[None, :, None, :].expand(masks.shape[0], -1, -1, -1)
    return F.grid_sample(masks[:, None], grid, align_corners=False)[:, 0, :, 0]


def match_cost(cls: Tensor, points: Tensor, labels: Tensor, gt_points: Tensor, config: Mask2FormerConfig) -> Tensor:
    """``MaskHungarianAssigner``'s cost ``(Q, K)`` with the point sums as ``num_points`` x the grid means:
    ``ClassificationCost`` (minus the softmax score) + ``CrossEntropyLossCost`` + ``DiceCost`` (sigmoid, eps)."""
    scale = config.num_points / points.shape[1]
    cls_cost = -cls.softmax(-1)[:, labels] * config.cls_weight
    # CrossEntropyLossCost: sum_p softplus(-x) g + softplus(x) (1 - g) = sum_p softplus(x) - x g, one pass
    bce_cost = (F.softplus(points).sum(1)[:, None] - points @ gt_points.T) / points.shape[1] * config.mask_weight
    p = points.sigmoid()
    numerator = 2 * scale * (p @ gt_points.T)
    denominator = scale * p.sum(-1)[:, None] + scale * gt_points.sum(-1)[None, :]
    dice_cost = (1 - (numerator + config.dice_eps) / (denominator + config.dice_eps)) * config.dice_weight
    return cls_cost + bce_cost + dice_cost


def point_weights(points: Tensor, config: Mask2FormerConfig) -> Tensor:
    """The importance sampler's limit on the grid (module docstring): ``random_share`` everywhere plus
    ``(1 - random_share) / q`` on the fraction ``q`` of each row's points most uncertain (smallest ``|logit|``)."""
    g = points.shape[1]
    k = max(1, int(round(config.uncertain_fraction * g)))
    weights = torch.full_like(points, config.random_share)
    if points.shape[0]:
        top = (-points.detach().abs()).topk(k, dim=1).indices
        weights.scatter_add_(1, top, torch.full_like(top, 1.0, dtype=points.dtype) * (1 - config.random_share) * g / k)
    return weights


def mask_terms(points: Tensor, gt_points: Tensor, num_masks: float, config: Mask2FormerConfig) -> tuple[Tensor, Tensor]:
    """Each matched query's weighted BCE and dice (``loss_mask``, ``loss_dice`` of ``Mask2FormerHead.loss_single``
    with the sampled points replaced by :func:`point_weights` on the grid), normalised as upstream."""
    n = config.num_points
    w = point_weights(points, config) / points.shape[1]
    bce = F.binary_cross_entropy_with_logits(points, gt_points, reduction="none")
    loss_mask = config.mask_weight * n * (w * bce).sum(1) / (num_masks * n + EPS)
    p = points.sigmoid()
    a, b, c = n * (w * p * gt_points).sum(1), n * (w * p).sum(1), n * (w * gt_points).sum(1)
    dice = 1 - (2 * a + config.dice_eps) / (b + c + config.dice_eps)
    return loss_mask, config.dice_weight * dice / (num_masks + EPS)


def layer_parts(cls: Tensor, masks: Tensor, labels: Tensor, gt_points: Tensor, class_weight: Tensor,
                config: Mask2FormerConfig) -> dict[str, tuple[Tensor, Tensor]]:
    """One prediction's terms per query and their owners (0: background, ``1 + j``: object ``j``) for one image:
    ``cls`` ``(Q, C + 1)``, ``masks`` ``(Q, h, w)``, ``gt_points`` ``(K, h * w)``."""
    num_classes = cls.shape[1] - 1
    h, w = masks.shape[-2:]
    s = config.subdivisions

    def read(m: Tensor) -> Tensor:
        return m.flatten(1) if s == 1 else grid_points(m, (h * s, w * s))

    with torch.no_grad():  # every query's points for the matching; the loss reads only the matched queries' again
        matched = hungarian_match(match_cost(cls.detach(), read(masks.detach()), labels, gt_points.to(masks.dtype), config))
    owner = matched + 1
    targets = torch.where(matched >= 0, labels[matched.clamp(min=0)] if len(labels) else matched, num_classes)
    ce = F.cross_entropy(cls, targets, weight=class_weight, reduction="none")
    parts = {"loss_cls": (config.cls_weight * ce / (class_weight[targets].sum() + EPS), owner)}
    fg = (matched >= 0).nonzero().squeeze(1)
    num_masks = float(max(len(labels), 1))
    if len(fg) == 0:
        empty = masks[:0, 0, 0]
        parts["loss_mask"] = (empty, owner[fg])
        parts["loss_dice"] = (empty, owner[fg])
        return parts
    loss_mask, loss_dice = mask_terms(read(masks[fg]), gt_points[matched[fg]].to(masks.dtype), num_masks, config)
    parts["loss_mask"] = (loss_mask, owner[fg])
    parts["loss_dice"] = (loss_dice, owner[fg])
    return parts


def mask2bbox(masks: Tensor) -> Tensor:
    """mmdetection's ``mask2bbox``: the tight float32 box ``[x0, y0, x1 + 1, y1 + 1]`` of each mask (zeros if empty)."""
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32, device=masks.device)
    if masks.shape[0] == 0:
        return boxes
    x_any, y_any = masks.any(dim=1), masks.any(dim=2)
    w, h = masks.shape[2], masks.shape[1]
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x0 = torch.where(x_any, xs, w).min(1).values
    x1 = torch.where(x_any, xs, -1).max(1).values + 1
    y0 = torch.where(y_any, ys, h).min(1).values
    y1 = torch.where(y_any, ys, -1).max(1).values + 1
    found = x_any.any(1) & y_any.any(1)
    boxes[found] = torch.stack([x0, y0, x1, y1], 1)[found].to(torch.float32)
    return boxes


# ---------------------------------------------------------------------------------------------
# the detector


class MMDetMask2Former(nn.Module):
    """A Mask2Former of mmdetection 2.x (the CEDNet fork) as a gradlens detector (module docstring).

    ``backbone(x)`` returns C2..C5. Labels are contiguous ``0..num_classes-1`` (``num_things`` of them detectable:
    fewer than ``num_classes`` for a panoptic checkpoint, whose stuff classes gradlens' targets never contain).
    ``pad_pixel``: the pixel value the test pipeline pads with before normalising (the instance configs' 128), or
    ``None`` for zeros after normalising. ``head``: :class:`Mask2FormerHead` sizes other than the fork's (tests).
    """

    framework = "mmdetection"

    def __init__(self, backbone: nn.Module, num_classes: int, *, in_channels: list[int] | None = None,
                 num_things: int | None = None, preprocess: PreprocessConfig | None = None,
                 pad_pixel: float | None = 128.0, config: Mask2FormerConfig | None = None,
                 arch_name: str = "mask2former", num_queries: int = 100, head: dict | None = None):
        super().__init__()
        self.backbone = backbone
        channels = list(in_channels or backbone.out_channels)
        self.panoptic_head = Mask2FormerHead(channels, num_classes, num_queries=num_queries, **(head or {}))
        self.num_classes = num_classes
        self.num_things = num_classes if num_things is None else num_things
        self.preprocess = preprocess or INSTANCE_PREPROCESS
        self.pad_pixel = pad_pixel
        self.config = config or Mask2FormerConfig()
        self.arch_name = arch_name
        self.channels_last = False
        self.categories = [{"id": i + 1 if i < self.num_things else None, "name": f"class_{i + 1}"}
                           for i in range(num_classes)]  # a panoptic checkpoint's stuff classes: no category

    # -- interface members -----------------------------------------------------------------------

    loss_terms = TERMS

    @property
    def needs_masks(self) -> bool:
        """Every term needs the objects' instance masks (the pipeline gives them from COCO)."""
        return True

    @property
    def postprocess_revision(self) -> int:
        return 1

    def use_channels_last(self, enabled: bool = True) -> "MMDetMask2Former":
        """The CPU speed mode of :meth:`RetinaNetDetector.use_channels_last` (NHWC convolutions, fused channel
        LayerNorms), unless a module needs contiguous memory."""
        from gradlens.models.backbones.layers import channels_last_mode

        self.channels_last = channels_last_mode(self, enabled)
        return self

    @property
    def class_weight(self) -> Tensor:
        """``loss_cls.class_weight``: 1 per class, ``no_object_weight`` for the no-object class."""
        weights = [1.0] * self.num_classes + [self.config.no_object_weight]
        return self.panoptic_head.cls_embed.weight.new_tensor(weights)

    # -- the network -----------------------------------------------------------------------------

    def prepare(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """The test pipeline's batch: :func:`batch_images`, then the padding set to the normalised ``pad_pixel``
        (``Pad`` before ``Normalize``: a constant, so the gradient is the same)."""
        batch, sizes = batch_images(images, self.preprocess)
        if self.pad_pixel is None:
            return batch, sizes
        fill = mmcv_normalise(torch.full((3, 1, 1), float(self.pad_pixel), dtype=batch.dtype, device=batch.device),
                              self.preprocess)
        valid = torch.zeros((len(sizes), 1, *batch.shape[-2:]), dtype=torch.bool, device=batch.device)
        for i, (h, w) in enumerate(sizes):
            valid[i, :, :h, :w] = True
        return torch.where(valid, batch, fill[None]), sizes

    def forward_outputs(self, batch: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every prediction (the query embedding's, then each decoder layer's): ``(cls, masks)`` per prediction."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        feats = list(self.backbone(batch))
        if len(feats) != 4:
            raise GradlensError(f"the Mask2Former backbone gave {len(feats)} maps, not the four C2..C5 its pixel decoder reads")
        if feats[0].dtype in (torch.float16, torch.bfloat16):
            feats = [f.float() for f in feats]
        return self.panoptic_head(feats)

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image in original pixels: ``boxes`` (from the masks), ``scores``, ``labels`` and boolean
        ``masks`` ``[n, H, W]``, best first; one image at a time."""
        out = []
        for image in images:
            batch, (size,) = self.prepare([image])
            out.append(self._detect_one(image, self.forward_outputs(batch)[-1], size, tuple(batch.shape[-2:])))
        return out

    def _detect_one(self, image: Tensor, last: tuple[Tensor, Tensor], size, padded) -> dict[str, Tensor]:
        """``simple_test`` + ``MaskFormerFusionHead.instance_postprocess`` of the last prediction (rescale=True)."""
        cls, masks = (t[0].float() for t in last)
        classes = self.num_classes
        scores = F.softmax(cls, dim=-1)[:, :-1]
        top, index = scores.flatten(0, 1).topk(min(self.config.max_per_image, scores.numel()), sorted=False)
        labels, queries = index % classes, index // classes
        thing = labels < self.num_things
        top, labels, queries = top[thing], labels[thing], queries[thing]
        h, w = size
        logits = F.interpolate(masks[queries][None], size=padded, mode="bilinear", align_corners=False)[0]
        logits = F.interpolate(logits[:, :h, :w][None], size=tuple(image.shape[-2:]), mode="bilinear",
                               align_corners=False)[0]
        binary = (logits > 0).float()
        mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        det_scores = top * mask_scores
        binary = binary.bool()
        order = det_scores.argsort(descending=True, stable=True)
        return {"boxes": mask2bbox(binary)[order], "scores": det_scores[order], "labels": labels[order],
                "masks": binary[order]}

    @torch.no_grad()
    def detect_with_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[list[dict], dict]:
        """:meth:`detect` and :meth:`image_losses` of the same images from one forward pass each."""
        detections, losses = [], []
        for image, target in zip(images, targets):
            batch, (size,) = self.prepare([image])
            outputs = self.forward_outputs(batch)
            detections.append(self._detect_one(image, outputs[-1], size, tuple(batch.shape[-2:])))
            parts = self._parts(image, target, outputs, size, tuple(batch.shape[-2:]))
            losses.append({name: values.sum() for name, (values, _) in parts.items()})
        return detections, _stack(losses)

    # -- the loss --------------------------------------------------------------------------------

    def image_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Each image's loss terms (module docstring), on that image alone: ``[len(images)]`` per term,
        differentiable with respect to the images. With ``targets[i]["object"] = j`` the image's entry is object
        ``j``'s part (``-1``: the background's), see :meth:`object_losses`."""
        out = []
        for image, target in zip(images, targets):
            out.append(owner_terms(self.loss_parts(image, target), target))
        return _stack(out)

    def object_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Each image's loss split by owner, ``[1 + K]`` per term: entry 0 the background (the class terms of the
        queries matched to nothing), ``1 + j`` every term of the queries matched to object ``j``, layer by layer;
        they add up to :meth:`image_losses`."""
        return [owner_sums(self.loss_parts(image, target), _count(target)) for image, target in zip(images, targets)]

    def loss_parts(self, image: Tensor, target: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Every query's contribution to each term in every prediction, and its owner."""
        batch, (size,) = self.prepare([image])
        return self._parts(image, target, self.forward_outputs(batch), size, tuple(batch.shape[-2:]))

    def gt_in_resized(self, image: Tensor, target: dict, size) -> tuple[Tensor, Tensor]:
        """mmdetection's ``Resize`` of the ground truth (the loss itself reads only the labels and the masks)."""
        return resized_boxes(image, target, size)

    def _resized_masks(self, target: dict, size, padded: tuple[int, int]) -> Tensor:
        """The objects' masks as the pipeline gives them to the head (``preprocess_gt``)."""
        return resized_masks(target, size, padded)

    def _parts(self, image: Tensor, target: dict, outputs, size, padded) -> dict[str, tuple[Tensor, Tensor]]:
        _, labels = self.gt_in_resized(image, target, size)
        masks = self._resized_masks(target, size, padded).to(image.device)
        if masks.shape[0] != labels.shape[0]:
            raise GradlensError(f"{masks.shape[0]} instance masks for {labels.shape[0]} objects")
        dtype = outputs[-1][1].dtype if outputs[-1][1].dtype not in (torch.float16, torch.bfloat16) else torch.float32
        h, w = outputs[-1][1].shape[-2:]
        gt_points = grid_points(masks.to(dtype), (h * self.config.subdivisions, w * self.config.subdivisions))
        class_weight = self.class_weight.to(dtype)
        parts: dict[str, tuple[Tensor, Tensor]] = {}
        for cls, mask in outputs:
            layer = layer_parts(cls[0].to(dtype), mask[0].to(dtype), labels, gt_points, class_weight, self.config)
            for name, (values, owners) in layer.items():
                if name in parts:
                    parts[name] = (torch.cat([parts[name][0], values]), torch.cat([parts[name][1], owners]))
                else:
                    parts[name] = (values, owners)
        return parts


def _count(target: dict) -> int:
    return int(torch.as_tensor(target["labels"]).numel())


def _stack(per_image: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {name: torch.stack([d[name] for d in per_image]) for name in TERMS}


# ---------------------------------------------------------------------------------------------
# architectures (checkpoints are recognised by gradlens.models.formats.mmdet.recognise_mask2former)

MASK2FORMER_ARCHITECTURES: dict[str, str] = {
    "mask2former_cednet_next_tiny": "Mask2Former, CEDNet-NeXt-T (CEDNetWrapperMask2Former; mask2former_ced_convnext_lsj)",
    "mask2former_ced_resnet_50": "Mask2Former, CED-ResNet-50 (CEDNetWrapperMask2Former; mask2former_ced_r50_lsj)",
    "mask2former_resnet50": "Mask2Former, ResNet-50 (mask2former_r50_lsj, instance)",
    "mask2former_convnext_tiny": "Mask2Former, ConvNeXt-T (mask2former_convnext_lsj)",
    "mask2former_resnet50_panoptic": "Mask2Former, ResNet-50, COCO panoptic (133 classes; its 80 things' instances)",
}


def _backbone(name: str, options: dict) -> nn.Module:
    opts = dict(options)
    if name in ("mask2former_cednet_next_tiny", "mask2former_ced_resnet_50"):
        from gradlens.models.backbones.cednet import CEDNET_VARIANTS, CEDNetMask2FormerBackbone

        variant = "next_tiny" if name.endswith("next_tiny") else "resnet_50"
        return CEDNetMask2FormerBackbone(**{**CEDNET_VARIANTS[variant], **opts, "drop_path_rate": 0.0})
    if name == "mask2former_convnext_tiny":
        from gradlens.models.backbones.convnext import CONVNEXT_VARIANTS, ConvNeXtBackbone

        return ConvNeXtBackbone(**{**CONVNEXT_VARIANTS["convnext_tiny"], "layer_scale_init_value": 1.0, **opts,
                                   "out_indices": (0, 1, 2, 3), "drop_path_rate": 0.0})
    return ResNet50Levels()


def build_mask2former(name: str, num_classes: int, options: dict | None = None,
                      preprocess: PreprocessConfig | None = None) -> MMDetMask2Former:
    """A randomly initialised Mask2Former of :data:`MASK2FORMER_ARCHITECTURES`, in eval mode."""
    if name not in MASK2FORMER_ARCHITECTURES:
        raise GradlensError(f"Unknown Mask2Former architecture {name!r}; known: {', '.join(MASK2FORMER_ARCHITECTURES)}.")
    options = dict(options or {})
    panoptic = name.endswith("_panoptic")
    num_things = int(options.pop("num_things", COCO_THINGS if panoptic else num_classes))
    detector = MMDetMask2Former(
        _backbone(name, options), num_classes, num_things=num_things,
        preprocess=preprocess or (PANOPTIC_PREPROCESS if panoptic else INSTANCE_PREPROCESS),
        pad_pixel=None if panoptic else 128.0, arch_name=name)
    detector.arch_options = dict(options or {}, **({"num_things": num_things} if panoptic else {}))
    return detector.eval()
