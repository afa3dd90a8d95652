"""Reading mmdetection 2.x RetinaNet checkpoints of the CEDNet paper's configurations.

An mmdetection checkpoint is ``{"meta": {..., "config": text, "CLASSES": names},
"state_dict": {...}}`` with keys ``backbone.*``, ``neck.*`` and ``bbox_head.*``.
The architecture is recognised from what the keys and shapes say (the fork's
config files are not always consistent: the ConvNeXt-T RetinaNet config
declares three backbone outputs while its FPN expects four); the config text
only supplies test-time hints (resize scale, padding divisor). Backbone keys
already equal gradlens' (its backbones mirror the official parameter names);
neck and head keys are renamed to torchvision's RetinaNet layout, and the 80
contiguous labels are mapped to COCO category ids.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from importlib import import_module

import torch
from torch import Tensor

from gradlens.errors import CheckpointError
from gradlens.models.formats.config_text import ConfigDict, Opaque, read_config, settings

# mmdetection's 80 contiguous labels -> COCO category ids (CocoDataset.CLASSES order).
COCO80_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
]
NUM_ANCHORS = 9
# Backbone families whose modules recognise their own checkpoints (``is_<family>_checkpoint``, ``recognise``).
TABLE_A1_FAMILIES = ("hrnet", "focalnet", "msg", "revcol")


def coco80_categories(names=None) -> list[dict]:
    """The 80 COCO categories in mmdetection's label order, with the checkpoint's names when it has them."""
    if names is None or len(names) != 80:
        from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

        names = [n for n in RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"] if n not in ("N/A", "__background__")]
    return [{"id": i, "name": str(n)} for i, n in zip(COCO80_IDS, names)]


def is_mmdet_checkpoint(obj) -> bool:
    if not isinstance(obj, Mapping):
        return False
    state = obj.get("state_dict", obj)
    return isinstance(state, Mapping) and any(isinstance(k, str) and k.startswith(("bbox_head.", "rpn_head.", "panoptic_head."))
                                              for k in state)


def is_two_stage(sd: Mapping[str, Tensor]) -> bool:
    """An mmdetection two-stage detector (an RPN head), not a RetinaNet."""
    return "rpn_head.rpn_cls.weight" in sd


def recognise_two_stage(sd: Mapping[str, Tensor]) -> tuple[str, dict, int]:
    """Architecture name, options and number of classes of an mmdetection 2.x Mask R-CNN or Cascade Mask R-CNN
    state dict (the CEDNet fork's configs), from its keys and shapes."""
    from gradlens.models.registry import TWO_STAGE_ARCHITECTURES

    cascade = "roi_head.bbox_head.0.fc_cls.weight" in sd
    head = "roi_head.bbox_head.0" if cascade else "roi_head.bbox_head"
    if f"{head}.fc_cls.weight" not in sd:
        raise CheckpointError("The checkpoint has an RPN head but no RoI box head gradlens knows (roi_head.bbox_head "
                              "with fc_cls and fc_reg).")
    if f"roi_head.mask_head{'.0' if cascade else ''}.conv_logits.weight" not in sd:
        raise CheckpointError("The checkpoint is a two-stage detector without a mask head (a Faster or Cascade R-CNN); "
                              "gradlens runs the fork's Mask R-CNN and Cascade Mask R-CNN.")
    if cascade and f"{head}.shared_convs.0.conv.weight" not in sd:
        raise CheckpointError("The checkpoint's Cascade box heads have no shared convolutions; gradlens runs the fork's "
                              "4conv1f Cascade Mask R-CNN heads.")
    weight = sd[f"{head}.fc_cls.weight"]
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[0] < 2:
        raise CheckpointError(f"The checkpoint's {head}.fc_cls.weight is not a (classes + 1, features) matrix.")
    num_classes = int(weight.shape[0]) - 1
    if "backbone.reduce_convs.0.0.weight" in sd and "backbone.reduce_c2.0.weight" not in sd:
        raise CheckpointError("The checkpoint's CEDNet backbone has no P2 branch (backbone.reduce_c2): it is not the "
                              "fork's CEDNetWrapperTwoStage.")
    name, options = _read_layout(_recognise, sd)
    body = name.removeprefix("retinanet_")
    arch = f"{'cascade_' if cascade else ''}mask_rcnn_{body}"
    if arch not in TWO_STAGE_ARCHITECTURES:
        raise CheckpointError(f"The checkpoint is a two-stage detector on a {body} backbone, which gradlens does not run "
                              f"in Mask R-CNN (known: {', '.join(n for n in TWO_STAGE_ARCHITECTURES if n.startswith('mask'))}).")
    return arch, options, num_classes


def is_deformable_detr(sd: Mapping[str, Tensor]) -> bool:
    """An mmdetection Deformable DETR (a transformer head with level embeddings), not a RetinaNet."""
    return "bbox_head.transformer.level_embeds" in sd


def recognise_deformable_detr(sd: Mapping[str, Tensor]) -> tuple[str, dict, int]:
    """Architecture name, options and number of classes of an mmdetection 2.x Deformable DETR state dict (the
    CEDNet fork's configs: no box refinement, no two-stage proposals), from its keys and shapes."""
    from gradlens.models.registry import DETR_ARCHITECTURES

    if "bbox_head.transformer.enc_output.weight" in sd:
        raise CheckpointError("The checkpoint is a two-stage Deformable DETR (bbox_head.transformer.enc_output); "
                              "gradlens runs the fork's single-stage Deformable DETR without box refinement.")
    weight = sd.get("bbox_head.cls_branches.0.weight")
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[0] < 1:
        raise CheckpointError("The checkpoint's Deformable DETR head has no class branch gradlens knows "
                              "(bbox_head.cls_branches.0.weight, a classes x 256 matrix).")
    decoder_layers = _count(list(sd), "bbox_head.transformer.decoder.layers")
    encoder_layers = _count(list(sd), "bbox_head.transformer.encoder.layers")
    branches = [sd.get(f"bbox_head.cls_branches.{i}.weight") for i in range(decoder_layers)]
    if any(not isinstance(b, Tensor) or b.shape != weight.shape
           or not (b.is_meta or weight.is_meta or bool(torch.equal(b, weight))) for b in branches):  # meta: shapes only
        raise CheckpointError("The checkpoint's Deformable DETR has a class branch per decoder layer (box refinement); "
                              "gradlens runs the fork's configs, whose layers share one branch.")
    levels = sd["bbox_head.transformer.level_embeds"]
    if not isinstance(levels, Tensor) or tuple(levels.shape) != (4, 256):
        raise CheckpointError("The checkpoint's Deformable DETR does not read four 256-channel levels "
                              "(bbox_head.transformer.level_embeds is not 4 x 256).")
    num_classes = int(weight.shape[0])
    options = {}
    queries = _rows(sd, "bbox_head.query_embedding.weight", "Deformable DETR's query embedding")
    if queries != 300:
        options["num_query"] = queries
    if encoder_layers != 6:
        options["encoder_layers"] = encoder_layers
    if decoder_layers != 6:
        options["decoder_layers"] = decoder_layers
    name, backbone_options = _read_layout(_recognise, sd)
    body = name.removeprefix("retinanet_")
    if "backbone.reduce_convs.0.0.weight" in sd:
        added = _count(list(sd), "backbone.add_blocks")
        if added != 1:
            raise CheckpointError(f"The checkpoint's CEDNet backbone adds {added} stride-2 maps; the fork's Deformable "
                                  "DETR configs add one (four levels).")
    elif _count(list(sd), "neck.convs") != 3 or _count(list(sd), "neck.extra_convs") != 1:
        raise CheckpointError("The checkpoint's neck is not the fork's ChannelMapper (three 1x1 convs on C3..C5 and "
                              "one extra stride-2 conv).")
    elif list(backbone_options.get("out_indices", [1, 2, 3])) == [1, 2, 3]:
        backbone_options.pop("out_indices", None)  # the configs' own
    arch = f"deformable_detr_{body}"
    if arch not in DETR_ARCHITECTURES:
        raise CheckpointError(f"The checkpoint is a Deformable DETR on a {body} backbone, which gradlens does not run "
                              f"in Deformable DETR (known: {', '.join(DETR_ARCHITECTURES)}).")
    return arch, {**backbone_options, **options}, num_classes


def is_mask2former(state_dict) -> bool:
    """An mmdetection 2.x MaskFormer-family state dict (its ``panoptic_head``)."""
    return any(isinstance(k, str) and k.startswith("panoptic_head.") for k in state_dict)


def _shapes(state_dict) -> dict[str, tuple[int, ...]]:
    """Keys and shapes, without batch norm's ``num_batches_tracked`` (frozen norms drop it when loading)."""
    return {k: tuple(v.shape) for k, v in state_dict.items()
            if isinstance(v, Tensor) and not k.endswith("num_batches_tracked")}


def recognise_mask2former(state_dict) -> tuple[str, dict, int]:
    """Architecture name, options and number of classes of a fork Mask2Former state dict, from its keys and
    shapes: each architecture is built on the meta device and its keys and shapes compared."""
    from gradlens.models.detectors.mask2former import COCO_THINGS, MASK2FORMER_ARCHITECTURES, build_mask2former

    weight = state_dict.get("panoptic_head.cls_embed.weight")
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise CheckpointError("The checkpoint has a panoptic_head but no Mask2Former class embedding "
                              "(panoptic_head.cls_embed.weight): it is not a Mask2Former gradlens runs.")
    if "panoptic_head.transformer_decoder.post_norm.weight" not in state_dict or \
            "panoptic_head.pixel_decoder.encoder.layers.0.attentions.0.sampling_offsets.weight" not in state_dict:
        raise CheckpointError("The checkpoint's panoptic_head has no masked-attention decoder over a deformable "
                              "pixel decoder: it is a MaskFormer, not a Mask2Former, which gradlens does not run.")
    num_classes = int(weight.shape[0]) - 1
    queries = _rows(state_dict, "panoptic_head.query_feat.weight", "Mask2Former's query features")
    wanted = _shapes(state_dict)
    for name in MASK2FORMER_ARCHITECTURES:
        if name.endswith("_panoptic") and num_classes != COCO_THINGS + 53:
            continue
        if not name.endswith("_panoptic") and num_classes == COCO_THINGS + 53 and "resnet50" in name:
            continue
        with torch.device("meta"):
            model = build_mask2former(name, num_classes)
        if queries != model.panoptic_head.num_queries:
            break
        if _shapes(model.state_dict()) == wanted:
            return name, dict(model.arch_options), num_classes
    if queries != 100:
        raise CheckpointError(f"The checkpoint's Mask2Former has {queries} queries; gradlens runs the fork's 100.")
    raise CheckpointError("The checkpoint's Mask2Former backbone or head matches none of the fork's configurations "
                          f"gradlens runs ({', '.join(MASK2FORMER_ARCHITECTURES)}).")


def _rows(sd: Mapping[str, Tensor], key: str, what: str) -> int:
    """The number of rows of a matrix the recognition reads, or one sentence on why it is not there."""
    value = sd.get(key)
    if not isinstance(value, Tensor) or value.ndim != 2:
        raise CheckpointError(f"The checkpoint's {what} ({key}) is {'missing' if value is None else 'not a matrix'}.")
    return int(value.shape[0])


# ---------------------------------------------------------------------------------------------
# recognising the architecture


def _count(keys, prefix: str) -> int:
    """How many numbered children ``prefix.<n>.`` exist."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _recognise_cednet(sd: Mapping[str, Tensor]) -> tuple[str, dict]:
    from gradlens.models.backbones.cednet import CEDNET_VARIANTS, DETECTION_ONLY

    keys = [k[len("backbone."):] for k in sd if k.startswith("backbone.")]
    stages = _count(keys, "stages") - 1
    dims = [int(sd[f"backbone.reduce_convs.{i}.0.weight"].shape[1]) for i in range(_count(keys, "reduce_convs"))]
    has = lambda part: any(part in k for k in keys)  # noqa: E731
    decoder = "DecoderFPN" if has(".decoder_conv.") else "DecoderHourglass" if has(".lateral.") else (
        "DecoderUNet" if has(".1.decoder.") else "Decoder")
    enc = [_count(keys, f"stages.1.0.encoder.{i}") for i in range(3)]
    if decoder in ("DecoderUNet", "DecoderHourglass"):
        dec = [_count(keys, f"stages.1.1.decoder.{i}") for i in range(2)]
        blocks = [enc[0] + dec[1], enc[1] + dec[0], enc[2]]
    else:
        blocks = enc
    layout = {
        "base_block": _cednet_block(keys),
        "p2_dim": int(sd["backbone.stem.3.weight"].shape[0]),
        "p2_block": _count(keys, "stages.0") - 1,
        "dims": dims,
        "blocks": blocks,
        "num_stages": stages,
        "decoder_type": decoder,
    }
    for variant, settings in CEDNET_VARIANTS.items():
        wanted = {k: settings.get(k) for k in layout}
        wanted["blocks"] = list(settings["blocks"]) if isinstance(settings["blocks"][0], int) else settings["blocks"]
        wanted["dims"] = list(settings["dims"])
        wanted["decoder_type"] = settings.get("decoder_type", "Decoder")
        wanted["base_block"] = settings.get("base_block", "NeXtBlock")
        if all(layout[k] == wanted[k] for k in layout):
            out = int(sd["backbone.reduce_convs.0.0.weight"].shape[0])
            name = f"retinanet_ced_{variant}" if variant in DETECTION_ONLY else f"retinanet_cednet_{variant}"
            return name, ({"out_chans": out} if out != 256 else {})
    raise CheckpointError(
        f"The checkpoint's CEDNet backbone ({layout['base_block']}s, p2_dim {layout['p2_dim']}, dims {dims}, blocks {blocks}, "
        f"{stages} stages, {decoder}) matches none of the known CEDNet variants ({', '.join(CEDNET_VARIANTS)})."
    )


# The p2 stage's first block tells CEDNet's block family (the fork's base_block) by its parameter names.
_CEDNET_BLOCK_KEYS = (("stages.0.0.dwconv.weight", "NeXtBlock"), ("stages.0.0.conv1.0.weight", "Bottleneck"),
                      ("stages.0.0.attn.qkv.weight", "SwinBlock"), ("stages.0.0.attns.0.get_v.weight", "CSwinBlock"))


def _cednet_block(keys) -> str:
    present = set(keys)
    for key, block in _CEDNET_BLOCK_KEYS:
        if key in present:
            return block
    raise CheckpointError("The checkpoint's CEDNet backbone has blocks of no family gradlens knows (NeXt, ResNet "
                          "bottleneck, Swin, CSwin): its stages.0.0 holds none of their weights.")


def _recognise_convnext(sd: Mapping[str, Tensor]) -> tuple[str, dict]:
    from gradlens.models.backbones.convnext import CONVNEXT_VARIANTS

    keys = [k[len("backbone."):] for k in sd if k.startswith("backbone.")]
    depths = [_count(keys, f"stages.{i}") for i in range(4)]
    dims = [int(sd["backbone.downsample_layers.0.0.weight"].shape[0])] + [
        int(sd[f"backbone.downsample_layers.{i}.1.weight"].shape[0]) for i in (1, 2, 3)
    ]
    out_indices = [i for i in range(4) if f"backbone.norm{i}.weight" in sd]
    for variant, settings in CONVNEXT_VARIANTS.items():
        if list(settings["depths"]) == depths and list(settings["dims"]) == dims:
            return f"retinanet_{variant}", {"out_indices": out_indices}
    raise CheckpointError(f"The checkpoint's ConvNeXt backbone (depths {depths}, dims {dims}) matches none of ConvNeXt-T/S/B.")


def _recognise_swin(sd: Mapping[str, Tensor]) -> tuple[str, dict]:
    from gradlens.models.backbones.swin import SWIN_VARIANTS

    keys = [k[len("backbone."):] for k in sd if k.startswith("backbone.")]
    embed = int(sd["backbone.patch_embed.proj.weight"].shape[0])
    depths = [_count(keys, f"layers.{i}.blocks") for i in range(_count(keys, "layers"))]
    heads = [int(sd[f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]) for i in range(len(depths))]
    table = int(sd["backbone.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0])
    window = (int(round(table ** 0.5)) + 1) // 2
    out_indices = [i for i in range(len(depths)) if f"backbone.norm{i}.weight" in sd]
    for variant, settings in SWIN_VARIANTS.items():
        if (settings["embed_dim"] == embed and list(settings["depths"]) == depths
                and list(settings["num_heads"]) == heads and settings.get("window_size", 7) == window):
            return f"retinanet_{variant}", {"out_indices": out_indices}
    raise CheckpointError(f"The checkpoint's Swin backbone (embed {embed}, depths {depths}, heads {heads}, window {window}) matches none of Swin-T/S/B.")


def _recognise_cswin(sd: Mapping[str, Tensor]) -> tuple[str, dict]:
    """The fork's CSWin Transformer (configs/cednet/cswin/retinanet_cswin_*): its embedding width and depths name
    the variant (heads and stripe widths have no weights of their own)."""
    from gradlens.models.backbones.cswin import CSWIN_VARIANTS

    keys = [k[len("backbone."):] for k in sd if k.startswith("backbone.")]
    embed = int(sd["backbone.stage1_conv_embed.0.weight"].shape[0])
    depths = [_count(keys, f"stage{i}") for i in range(1, 5)]
    out_indices = [i for i in range(4) if f"backbone.norm{i}.weight" in sd]
    for variant, settings in CSWIN_VARIANTS.items():
        if settings["embed_dim"] == embed and list(settings["depth"]) == depths:
            return f"retinanet_{variant}", {"out_indices": out_indices}
    raise CheckpointError(f"The checkpoint's CSWin backbone (embed {embed}, depths {depths}) matches none of "
                          f"{', '.join(CSWIN_VARIANTS)}.")


class _Reading(Mapping):
    """A state dict that remembers the last tensor read from it, so a tensor of a shape no architecture has
    (a 1-d weight where a convolution's belongs) is named when reading its dimensions fails."""

    def __init__(self, sd: Mapping[str, Tensor]):
        self._sd = sd
        self.last: str | None = None

    def __getitem__(self, key):
        value = self._sd[key]
        self.last = key
        return value

    def __contains__(self, key) -> bool:
        return key in self._sd

    def __iter__(self):
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)


def _read_layout(read, sd: Mapping[str, Tensor]):
    """``read(sd)`` (a recogniser), with a failure to read a tensor's dimensions said in one sentence naming it."""
    reading = _Reading(sd)
    try:
        return read(reading)
    except KeyError as exc:
        key = exc.args[0] if exc.args else None
        if not (isinstance(key, str) and key.startswith(("backbone.", "neck.", "bbox_head.")) and key not in sd):
            raise
        raise CheckpointError(f"The checkpoint lacks the tensor {key}, which its backbone's layout needs.") from None
    except (IndexError, ValueError, TypeError, AttributeError, ZeroDivisionError, RuntimeError):
        key = reading.last
        if key is None or key not in sd:
            raise
        value = sd[key]
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise CheckpointError(f"The checkpoint's tensor {key} has shape {shape}, which that weight has in no "
                              "architecture gradlens knows.") from None


# Tensors whose number of dimensions every architecture agrees on: the stem convolution of each backbone family,
# the neck's and head's convolutions and biases. Checked before any shape is read, so that a 1-d stem weight is
# named as such rather than read as a backbone of another width.
_DIMENSIONS = [
    (re.compile(r"^backbone\.(conv1|conv2|patch_embed\.proj|stem\.0|downsample_layers\.0\.0|stage1_conv_embed\.0)\.weight$"), 4,
     "a convolution's weight"),
    (re.compile(r"^(neck|bbox_head)\..*\.conv\.weight$"), 4, "a convolution's weight"),
    (re.compile(r"^bbox_head\.retina_(cls|reg)\.weight$"), 4, "a convolution's weight"),
    (re.compile(r"^(neck|bbox_head)\..*\.bias$"), 1, "a bias"),
]


def _check_dimensions(sd: Mapping[str, Tensor]) -> None:
    """Refuse, naming it, a tensor of :data:`_DIMENSIONS` with another number of dimensions, and a classifier
    whose output channels are not 9 anchors per class."""
    for key, value in sd.items():
        for pattern, ndim, what in _DIMENSIONS:
            if isinstance(key, str) and pattern.match(key):
                shape = tuple(value.shape) if isinstance(value, Tensor) else None
                if shape is None or len(shape) != ndim:
                    raise CheckpointError(f"The checkpoint's {key} has shape {shape}, but {what} has {ndim} "
                                          f"dimension{'s' if ndim > 1 else ''}.")
                break
    key = "bbox_head.retina_cls.weight"  # its rows give the classes: 9 anchors each
    rows = int(sd[key].shape[0])
    if rows < NUM_ANCHORS or rows % NUM_ANCHORS:
        raise CheckpointError(f"The checkpoint's {key} has {rows} output channels, not {NUM_ANCHORS} anchors per class.")


def recognise(sd: Mapping[str, Tensor]) -> tuple[str, dict]:
    """Architecture name and options of an mmdetection RetinaNet state dict, from its keys and shapes."""
    if "bbox_head.retina_cls.weight" not in sd:
        raise CheckpointError("The mmdetection checkpoint is not a RetinaNet (it has no bbox_head.retina_cls weights).")
    _check_dimensions(sd)
    return _read_layout(_recognise, sd)


# The fork's neck/retinanet_bifpn_… config names BiFPNScratch (ced-mmdet/mmdet/models/necks/bifpn.py), which the fork
# itself cannot build or run: necks/__init__.py never imports that file (the registry has no BiFPNScratch), its
# __init__ calls super(BiFPN, self) on a class that is not a BiFPN (TypeError), and its lateral convolutions are
# nn.Conv1d applied to 4-d maps (RuntimeError). No checkpoint of that config can come from the fork's code.
_BIFPN = ("The checkpoint's neck is the fork's BiFPN (neck.bifpn.*), which gradlens does not run: the fork's own "
          "BiFPNScratch cannot be built or run as committed (it is not registered, its __init__ calls super(BiFPN, self) "
          "and its Conv1d laterals fail on image maps), so there is no upstream arithmetic to follow.")


def _recognise(sd: Mapping[str, Tensor]) -> tuple[str, dict]:
    if any(k.startswith("neck.bifpn.") for k in sd):
        raise CheckpointError(_BIFPN)
    for family in TABLE_A1_FAMILIES:  # before Swin: FocalNet and MSG also have a patch_embed.proj
        if _is_family(sd, family):
            _check_fpn_neck(sd, family)
            return _family(family).recognise(sd)
    if "backbone.reduce_convs.0.0.weight" in sd:
        return _recognise_cednet(sd)
    if "backbone.downsample_layers.0.0.weight" in sd:
        return _recognise_convnext(sd)
    if "backbone.patch_embed.proj.weight" in sd:
        return _recognise_swin(sd)
    if "backbone.stage1_conv_embed.0.weight" in sd:
        return _recognise_cswin(sd)
    if "backbone.layer1.0.conv1.weight" in sd and _count(list(sd), "backbone.layer3") == 6:
        return "retinanet_resnet50", {}
    sample = ", ".join(sorted({k.split(".")[1] for k in sd if k.startswith("backbone.")})[:5])
    raise CheckpointError(f"The checkpoint's backbone (modules {sample or 'none'}) is not one gradlens knows.")


def _family(family: str):
    return import_module(f"gradlens.models.backbones.{family}")


def _is_family(sd: Mapping[str, Tensor], family: str) -> bool:
    return getattr(_family(family), f"is_{family}_checkpoint")(sd)


def _check_fpn_neck(sd: Mapping[str, Tensor], family: str) -> None:
    """gradlens runs these backbones under mmdetection's RetinaNet FPN on C3..C5; say so for any other neck."""
    if "neck.reduction_conv.conv.weight" in sd:
        raise CheckpointError(f"The checkpoint's neck is HRFPN (mmdetection's HRNet configs); gradlens runs {family} "
                              "RetinaNets with mmdetection's FPN on the last three backbone maps only.")
    laterals = _count(list(sd), "neck.lateral_convs")
    if laterals != 3:
        raise CheckpointError(f"The checkpoint's FPN has {laterals} lateral convs; gradlens runs {family} RetinaNets "
                              "with mmdetection's FPN on the last three backbone maps (start_level=1), which has 3.")


def check_fpn_inputs(sd: Mapping[str, Tensor], detector, path, name: str) -> None:
    """The checkpoint's FPN must read maps of the channels the recognised backbone gives (its output stages)."""
    fpn = getattr(getattr(detector, "backbone", None), "fpn", None)
    if fpn is None or "neck.lateral_convs.0.conv.weight" not in sd:
        return
    given = [int(block[0].weight.shape[1]) for block in fpn.inner_blocks]
    laterals = _count(list(sd), "neck.lateral_convs")
    if laterals != len(given):
        raise CheckpointError(f"{path}: its FPN has {laterals} lateral convs; gradlens runs {name} with mmdetection's FPN "
                              f"on the last {len(given)} backbone maps, which has {len(given)}.")
    weights = [sd.get(f"neck.lateral_convs.{k}.conv.weight") for k in range(laterals)]
    if any(w is None or w.ndim != 4 for w in weights):
        raise CheckpointError(f"{path}: its FPN's lateral convs are not numbered 0..{laterals - 1} with 4-d weights.")
    wanted = [int(w.shape[1]) for w in weights]
    if wanted != given:
        raise CheckpointError(f"{path}: its FPN reads maps of {wanted} channels, but the {name} backbone it holds gives "
                              f"{given} to the FPN (the last three of its output stages); the backbone's output stages "
                              "(out_indices) and the neck's in_channels do not fit together.")


def family_options(family: str, sd: Mapping[str, Tensor], path, arch_name: str) -> dict:
    """The constructor options a Table A1 family's weights imply, checked against the architecture named for them."""
    if not _is_family(sd, family):
        raise CheckpointError(f"{path} does not fit {arch_name}: its backbone weights are not a {family} backbone's.")
    _check_dimensions(sd)
    name, options = _read_layout(_family(family).recognise, sd)
    if name != arch_name:
        raise CheckpointError(f"{path} holds a {name} backbone, not the {arch_name} named by --arch.")
    return options


def num_classes_of(sd: Mapping[str, Tensor]) -> int:
    return int(sd["bbox_head.retina_cls.weight"].shape[0]) // NUM_ANCHORS


# ---------------------------------------------------------------------------------------------
# renaming


_NECK_HEAD_RULES = [
    (re.compile(r"^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$"), "backbone.fpn.inner_blocks.{0}.0.{1}"),
    (re.compile(r"^bbox_head\.cls_convs\.(\d+)\.conv\.(weight|bias)$"), "head.classification_head.conv.{0}.0.{1}"),
    (re.compile(r"^bbox_head\.reg_convs\.(\d+)\.conv\.(weight|bias)$"), "head.regression_head.conv.{0}.0.{1}"),
    (re.compile(r"^bbox_head\.retina_cls\.(weight|bias)$"), "head.classification_head.cls_logits.{0}"),
    (re.compile(r"^bbox_head\.retina_reg\.(weight|bias)$"), "head.regression_head.bbox_reg.{0}"),
]
_FPN_OUT = re.compile(r"^neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)$")
_DROPPED = re.compile(r"relative_position_index$")  # recomputed; num_batches_tracked is kept for backbones with live BN


def to_gradlens(sd: Mapping[str, Tensor], levels: int = 3) -> dict[str, Tensor]:
    """mmdetection keys -> gradlens (torchvision RetinaNet) keys; Swin-style index tables are dropped (recomputed).

    Batch norm's ``num_batches_tracked`` is renamed like any backbone key:
    backbones with frozen batch norm do not have it, and the strict loader
    drops it for them.

    ``levels`` is the number of FPN output levels before the two extra convs
    (mmdetection numbers P6/P7's convs after them).
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if _DROPPED.search(key):
            continue
        if key.startswith("backbone."):
            out["backbone.body." + key[len("backbone."):]] = value
            continue
        if m := _FPN_OUT.match(key):
            i = int(m.group(1))
            name = f"backbone.fpn.layer_blocks.{i}.0.{m.group(2)}" if i < levels else f"backbone.fpn.extra_blocks.p{i - levels + 6}.{m.group(2)}"
            out[name] = value
            continue
        for pattern, template in _NECK_HEAD_RULES:
            if m := pattern.match(key):
                out[template.format(*m.groups())] = value
                break
        else:
            out[key] = value  # left as is: reported as unexpected by the strict load
    return out


def to_mmdet(sd: Mapping[str, Tensor], levels: int = 3) -> dict[str, Tensor]:
    """gradlens keys -> mmdetection keys (the inverse of :func:`to_gradlens`, for writing test checkpoints)."""
    inverse = [
        (re.compile(r"^backbone\.fpn\.inner_blocks\.(\d+)\.0\.(weight|bias)$"), "neck.lateral_convs.{0}.conv.{1}"),
        (re.compile(r"^backbone\.fpn\.layer_blocks\.(\d+)\.0\.(weight|bias)$"), "neck.fpn_convs.{0}.conv.{1}"),
        (re.compile(r"^head\.classification_head\.conv\.(\d+)\.0\.(weight|bias)$"), "bbox_head.cls_convs.{0}.conv.{1}"),
        (re.compile(r"^head\.regression_head\.conv\.(\d+)\.0\.(weight|bias)$"), "bbox_head.reg_convs.{0}.conv.{1}"),
        (re.compile(r"^head\.classification_head\.cls_logits\.(weight|bias)$"), "bbox_head.retina_cls.{0}"),
        (re.compile(r"^head\.regression_head\.bbox_reg\.(weight|bias)$"), "bbox_head.retina_reg.{0}"),
    ]
    extra = re.compile(r"^backbone\.fpn\.extra_blocks\.p([67])\.(weight|bias)$")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith("backbone.body."):
            out["backbone." + key[len("backbone.body."):]] = value
        elif m := extra.match(key):
            out[f"neck.fpn_convs.{levels + int(m.group(1)) - 6}.conv.{m.group(2)}"] = value
        else:
            for pattern, template in inverse:
                if m := pattern.match(key):
                    out[template.format(*m.groups())] = value
                    break
            else:
                raise KeyError(f"no mmdetection name for {key}")
    return out


# ---------------------------------------------------------------------------------------------
# config text hints


MAX_TEST_SIDE = 8192  # pixels: the paper tests at 1333 x 800; a side beyond 8192 is a mistake
MAX_SIZE_DIVISOR = 8192


def shorten(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first(config: dict, key: str, label: str | None = None, start: str | None = None):
    """``(value, written)`` of the first ``key`` setting in the config's names, from the name ``start`` on when
    the config has it (test-time settings before the training ones), or ``(None, None)``. A value that is no
    literal (an expression, a call) is refused in one sentence: the text is data, never run."""
    names = list(config)
    if start in config:
        names = names[names.index(start):]
    for name in names:
        found = settings({name: config[name]}, key) if key != name else [(config[name], config.sources.get(name, ""), None)]
        if found:
            value, written, _ = found[0]
            if isinstance(value, Opaque):
                raise CheckpointError(f"The checkpoint's config sets {label or key}={shorten(written)}, which is not a "
                                      "literal value; gradlens reads config text as data and never evaluates it.")
            return value, written
    return None, None


def whole_number(value) -> int | None:
    """``value`` as an int when it is a whole number (6 or 6.0, not True), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value)


def check_preprocess(min_size, max_size, size_divisor, mean, std) -> str | None:
    """What is wrong with test-time settings read from a checkpoint (None: nothing), as the end of a sentence."""
    for name, value, top in (("min_size", min_size, MAX_TEST_SIDE), ("max_size", max_size, MAX_TEST_SIDE),
                             ("size_divisor", size_divisor, MAX_SIZE_DIVISOR)):
        if whole_number(value) is None or not 1 <= value <= top:
            return f"{name} is {value!r}; it must be a whole number from 1 to {top}"
    for name, values in (("mean", mean), ("std", std)):
        numbers = list(values) if isinstance(values, (list, tuple)) else []
        if (len(numbers) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers)
                or not all(math.isfinite(v) for v in numbers) or (name == "std" and min(numbers) <= 0)):
            return f"{name} is {values!r}; it must be three {'positive' if name == 'std' else 'finite'} numbers"
    return None


def preprocess_hints(config_text: str | None) -> dict:
    """Test-time resize scale, padding divisor and normalisation from the config text stored in ``meta``.

    The text is never executed: it is read as data (:mod:`gradlens.models.formats.config_text`), and a value that is no
    literal (``mean=[123.675*1, ...]``), or out of range (a test side
    outside 1..8192, a size divisor outside 1..8192, a standard deviation of zero or less, not three
    numbers) is refused in one sentence naming the setting.
    """
    if not config_text:
        return {}
    config = read_config(config_text)
    hints: dict = {}
    divisor, written = _first(config, "size_divisor", start="test_pipeline")
    if written is not None and divisor is not None:
        d = whole_number(divisor)
        if d is None or not 1 <= d <= MAX_SIZE_DIVISOR:
            raise CheckpointError(f"The checkpoint's config sets size_divisor={shorten(written)}; it must be a whole number "
                                  f"from 1 to {MAX_SIZE_DIVISOR}.")
        hints["size_divisor"] = d
    scale, written = _first(config, "img_scale", start="test_pipeline")
    several = isinstance(scale, (list, tuple)) and bool(scale) and all(isinstance(v, (list, tuple)) for v in scale)
    if written is not None and several and "test_pipeline" in config:
        raise CheckpointError(f"The checkpoint's config sets img_scale={shorten(written)}, several test scales "
                              "(test-time augmentation); gradlens runs one scale, written as (long side, short side).")
    if written is not None and not several:  # (several scales without a test pipeline: the training ones, no hint)
        sides = [whole_number(v) for v in scale] if isinstance(scale, (list, tuple)) else []
        if len(sides) != 2 or any(v is None or not 1 <= v <= MAX_TEST_SIDE for v in sides):
            raise CheckpointError(f"The checkpoint's config sets the test scale img_scale={shorten(written)}; it must be two "
                                  f"whole numbers of pixels from 1 to {MAX_TEST_SIDE}.")
        hints["min_size"], hints["max_size"] = min(sides), max(sides)
    norm = config.get("img_norm_cfg")
    if isinstance(norm, Opaque):
        raise CheckpointError(f"The checkpoint's config sets img_norm_cfg={shorten(norm.source)}, which is not a literal "
                              "value; gradlens reads config text as data and never evaluates it.")
    if isinstance(norm, dict):
        norm_names = ConfigDict(norm=norm)
        to_rgb, _ = _first(norm_names, "to_rgb", "img_norm_cfg to_rgb")
        if to_rgb is False:
            # caffe-style models see BGR images; gradlens feeds RGB, so their detections would be silently wrong
            raise CheckpointError("The checkpoint's config normalises BGR images (img_norm_cfg to_rgb=False); "
                                  "gradlens runs RGB models only.")
        for name in ("mean", "std"):
            value, written = _first(norm_names, name, f"img_norm_cfg {name}")
            if written is None:
                continue
            numbers = list(value) if isinstance(value, (list, tuple)) else []
            if (len(numbers) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers)
                    or not all(math.isfinite(v) for v in numbers) or (name == "std" and min(numbers) <= 0)):
                rule = "three positive numbers" if name == "std" else "three finite numbers"
                raise CheckpointError(f"The checkpoint's config sets img_norm_cfg {name}={shorten(written)}; it must be "
                                      f"{rule} (in 0..255 units).")
            # in 0..255 units, as mmdetection writes them; gradlens keeps [0, 1] units
            hints[name] = tuple(float(v) / 255 for v in numbers)
    return hints


def backbone_type_hint(config_text: str | None) -> str | None:
    """The backbone ``type`` the config names (a hint only; the keys decide; text it cannot read gives none)."""
    if not config_text:
        return None
    try:
        model = read_config(config_text).get("model")
    except CheckpointError:
        return None
    backbone = model.get("backbone") if isinstance(model, dict) else None
    kind = backbone.get("type") if isinstance(backbone, dict) else None
    return kind if isinstance(kind, str) else None
