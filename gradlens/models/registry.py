"""The detector zoo: every architecture gradlens can build, by name.

A name fixes the network's structure, its test-time preprocessing and its
anchors; ``options`` carries what a checkpoint may vary within it (which
backbone stages are normed outputs, custom sizes of the small bundled
detectors). Checkpoints store the name and the options, so a ``.pth`` is
enough to rebuild its detector.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from gradlens.errors import GradlensError
from gradlens.models.backbones.layers import EvalBatchNorm2d
from gradlens.models.formats import detectron2
from gradlens.models.detectors.anchors import AnchorConfig, MMDetAnchorGenerator
from gradlens.models.detectors.fpn import BackboneWithPyramid, PyramidBackbone
from gradlens.models.detectors.retinanet import RetinaNetDetector, TestConfig
from gradlens.models.preprocessing.transform import IMAGENET_MEAN, PreprocessConfig

PAPER_PREPROCESS = PreprocessConfig(min_size=800, max_size=1333, size_divisor=128, convention="mmcv")
TORCHVISION_PREPROCESS = PreprocessConfig(min_size=800, max_size=1333, size_divisor=32, convention="torchvision")
MINI_PREPROCESS = PreprocessConfig(min_size=256, max_size=416, size_divisor=32, convention="mmcv")
# detectron2's defaults.py: INPUT.MIN/MAX_SIZE_TEST 800/1333, PIXEL_MEAN (BGR) 103.53/116.28/123.675 and
# PIXEL_STD 1/1/1 in 0..255 units (given here in RGB order for [0, 1] images), the FPN's size_divisibility 32
DETECTRON2_PREPROCESS = PreprocessConfig(min_size=800, max_size=1333, mean=IMAGENET_MEAN, std=(1 / 255,) * 3,
                                         size_divisor=32, convention="detectron2")


@dataclass(frozen=True)
class Architecture:
    """One buildable detector: how to make its backbone (P3..P7 maps) and how it sees images."""

    name: str
    family: str
    description: str
    build_backbone: Callable[[dict], nn.Module]
    preprocess: PreprocessConfig = PAPER_PREPROCESS
    anchors: str = "mmdet"  # whose anchors: "mmdet", "torchvision" or "detectron2" (which also runs its arithmetic)
    test_cfg: TestConfig = field(default_factory=TestConfig)
    default_options: dict = field(default_factory=dict)
    # the backbone needs input sides that are multiples of this (HRNet's fusions, RevCol's columns: 32)
    size_multiple: int = 1


def _cednet(variant: str | None):
    def build(options: dict) -> nn.Module:
        from gradlens.models.backbones.cednet import CEDNetBackbone, cednet_backbone

        opts = dict(options)
        out_chans = int(opts.pop("out_chans", 256))
        opts.setdefault("drop_path_rate", 0.0)  # only training uses it; the module is an identity in eval mode
        if variant is not None:
            body = cednet_backbone(variant, out_chans=out_chans, **opts)
        else:
            body = CEDNetBackbone(out_chans=out_chans, **opts)
        return PyramidBackbone(body, out_chans)

    return build


def _convnext(variant: str | None):
    def build(options: dict) -> nn.Module:
        from gradlens.models.backbones.convnext import CONVNEXT_VARIANTS, ConvNeXtBackbone

        opts = dict(options)
        out_chans = int(opts.pop("out_chans", 256))
        settings = {**(CONVNEXT_VARIANTS[variant] if variant else {}), **opts, "drop_path_rate": 0.0}
        settings["out_indices"] = tuple(settings.get("out_indices", (0, 1, 2, 3)))
        body = ConvNeXtBackbone(**settings)
        return _with_fpn(body, out_chans)

    return build


def _swin(variant: str):
    def build(options: dict) -> nn.Module:
        from gradlens.models.backbones.swin import SWIN_VARIANTS, SwinBackbone

        opts = dict(options)
        out_chans = int(opts.pop("out_chans", 256))
        settings = {**SWIN_VARIANTS[variant], **opts, "drop_path_rate": 0.0}
        settings["out_indices"] = tuple(settings.get("out_indices", (0, 1, 2, 3)))
        return _with_fpn(SwinBackbone(**settings), out_chans)

    return build


def _table_a1(module: str, variant: str):
    """HRNet, FocalNet, MSG-Transformer, RevCol: ``gradlens.models.<module>.<variant>_backbone`` under mmdetection's FPN."""

    def build(options: dict) -> nn.Module:
        from importlib import import_module

        opts = dict(options)
        out_chans = int(opts.pop("out_chans", 256))
        if "out_indices" in opts:
            opts["out_indices"] = tuple(opts["out_indices"])
        body = getattr(import_module(f"gradlens.models.backbones.{module}"), f"{variant}_backbone")(**{**opts, "drop_path_rate": 0.0})
        return _with_fpn(body, out_chans)

    return build


class TooFewBackboneMaps(GradlensError):
    """A backbone built with fewer than the three output maps the RetinaNet FPN reads."""


def _with_fpn(body: nn.Module, out_chans: int) -> nn.Module:
    """mmdetection's RetinaNet neck: the last three backbone maps (C3..C5), P6 from C5, no ReLU before P7."""
    channels = list(body.out_channels)
    if len(channels) < 3:
        raise TooFewBackboneMaps(f"The backbone returns {len(channels)} map(s), but mmdetection's RetinaNet FPN reads the "
                                 "last three (C3..C5): build it with at least three output stages (out_indices).")
    start = len(channels) - 3
    return BackboneWithPyramid(body, channels[start:], out_chans, start_level=start)


def _resnet50(torchvision_style: bool):
    def build(options: dict) -> nn.Module:
        return BackboneWithPyramid(ResNet50Features(torchvision_norm=torchvision_style), [512, 1024, 2048], 256,
                                   start_level=0, from_p5=torchvision_style, relu_before_p7=torchvision_style)

    return build


class ResNet50Features(ResNet):
    """torchvision's ResNet-50 returning C3..C5, without its classifier.

    Parameter names stay torchvision's (which mmdetection's ResNet shares); batch norm is frozen, as in both
    libraries' detectors, and computed as each library computes it: torchvision's ``FrozenBatchNorm2d``
    (``x * scale + shift``) for torchvision's detectors, ``F.batch_norm`` for mmdetection's
    (:class:`~gradlens.models.backbones.layers.EvalBatchNorm2d`).
    """

    # Where the stem's 3x3 max-pool windows tie (flat image areas: thousands of windows on a photograph), the
    # element that receives the gradient is the maximum the pooling kernel picks, and which one that is depends on
    # the last bits of the convolution and norm before it; and pre-activations at round-off distance from zero
    # switch ReLUs. So the float32 input gradient of this network follows the kernels' rounding by whole per cent.
    # mmdetection and torchvision run it in contiguous (NCHW) memory on PyTorch's kernels, and so does gradlens:
    # its channels-last speed mode leaves this network alone (needs_contiguous_memory), and a gradient through
    # tied maxima goes to the element PyTorch's contiguous kernel picks.
    arithmetic_revision = 3  # 2: the stem in NCHW; 3: the whole network in NCHW, mmdetection's norm as F.batch_norm
    needs_contiguous_memory = True

    def __init__(self, torchvision_norm: bool = False):
        super().__init__(Bottleneck, [3, 4, 6, 3], norm_layer=FrozenBatchNorm2d if torchvision_norm else EvalBatchNorm2d)
        del self.fc, self.avgpool
        self.out_channels = [512, 1024, 2048]

    def stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x):
        x = self.stem(x)
        c3 = self.layer2(self.layer1(x))
        c4 = self.layer3(c3)
        return c3, c4, self.layer4(c4)


ARCHITECTURES: dict[str, Architecture] = {}


def _register(arch: Architecture) -> None:
    ARCHITECTURES[arch.name] = arch


for _size in ("tiny", "small", "base"):
    _register(Architecture(f"retinanet_cednet_next_{_size}", "cednet", f"RetinaNet, CEDNet-NeXt-{_size[0].upper()} (no neck)", _cednet(f"next_{_size}")))
for _style in ("fpn", "unet", "hourglass"):
    _register(Architecture(f"retinanet_cednet_next_tiny_{_style}", "cednet", f"RetinaNet, CEDNet-NeXt-T {_style}-style decoder (no neck)", _cednet(f"next_tiny_{_style}")))
for _variant, _label in (("resnet_50", "CED-ResNet-50"), ("swin_tiny", "CED-Swin-T"), ("cswin_tiny", "CED-CSwin-T")):
    _register(Architecture(f"retinanet_ced_{_variant}", "cednet", f"RetinaNet, {_label} (the CEDNet fork's CEDNetWrapper, no neck)",
                           _cednet(_variant)))
for _size in ("tiny", "small", "base"):
    _register(Architecture(f"retinanet_convnext_{_size}", "convnext", f"RetinaNet, ConvNeXt-{_size[0].upper()} + FPN", _convnext(f"convnext_{_size}")))
for _size in ("tiny", "small", "base"):
    _register(Architecture(f"retinanet_swin_{_size}", "swin", f"RetinaNet, Swin-{_size[0].upper()} + FPN", _swin(f"swin_{_size}")))
_register(Architecture("retinanet_cswin_tiny", "cswin", "RetinaNet, CSWin-T (the CEDNet fork's CSwinTransformer) + FPN",
                       _table_a1("cswin", "cswin_tiny")))
_register(Architecture("retinanet_hrnet_w32", "hrnet", "RetinaNet, HRNet-W32 (mmdetection's HRNet) + FPN",
                       _table_a1("hrnet", "hrnet_w32"), size_multiple=32))
_TABLE_A1_LABELS = {
    "focalnet": ("FocalNet", {"tiny": " (SRF)", "small": " (SRF)", "base": " (LRF)"}),
    "msg": ("MSG-Transformer", {s: " (gradlens' Swin-style detection layout)" for s in ("tiny", "small", "base")}),
    "revcol": ("RevCol", {s: " (last column's maps)" for s in ("tiny", "small", "base")}),
}
for _family, (_label, _notes) in _TABLE_A1_LABELS.items():
    for _size in ("tiny", "small", "base"):
        _register(Architecture(f"retinanet_{_family}_{_size}", _family,
                               f"RetinaNet, {_label}-{_size[0].upper()}{_notes[_size]} + FPN",
                               _table_a1(_family, f"{_family}_{_size}"), size_multiple=32 if _family == "revcol" else 1))
_register(Architecture("retinanet_resnet50", "resnet", "RetinaNet, ResNet-50 + FPN (mmdetection layout)", _resnet50(False)))
_register(Architecture(
    "torchvision_retinanet_resnet50_fpn", "resnet",
    "torchvision's retinanet_resnet50_fpn (P6 from P5, ReLU before P7, rounded anchors, floor resize)",
    _resnet50(True), preprocess=TORCHVISION_PREPROCESS, anchors="torchvision",
    test_cfg=TestConfig(max_per_img=300),  # torchvision's detections_per_img
))
_register(Architecture(
    detectron2.ARCH, "detectron2",
    "detectron2's retinanet_R_50_FPN (MSRA ResNet-50: stride in the 1x1 convs; P6 from res5, ReLU before P7; "
    "Pillow resize, BGR)",
    detectron2.build_backbone, preprocess=DETECTRON2_PREPROCESS, anchors="detectron2", size_multiple=32,
    default_options={"stride_in_1x1": True},
))
_register(Architecture(
    "retinanet_cednet_mini", "cednet", "small CEDNet-style RetinaNet for the demo and tests",
    _cednet(None), preprocess=MINI_PREPROCESS,
    default_options={"out_chans": 48, "p2_dim": 16, "p2_block": 1, "dims": [32, 48, 64], "blocks": [1, 1, 1], "num_stages": 2},
))
_register(Architecture(
    "retinanet_convnext_mini", "convnext", "small ConvNeXt-style RetinaNet for the demo and tests",
    _convnext(None), preprocess=MINI_PREPROCESS,
    default_options={"out_chans": 48, "depths": [1, 1, 2, 1], "dims": [16, 32, 64, 128], "out_indices": [1, 2, 3],
                     "layer_scale_init_value": 1.0},
))


def architecture(name: str) -> Architecture:
    """Look up a name, with a one-sentence error listing the known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise GradlensError(f"Unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}.") from None


def _torchvision_anchors():
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def build_detector(name: str, num_classes: int, options: dict | None = None, preprocess: PreprocessConfig | None = None,
                   test_cfg: TestConfig | None = None) -> RetinaNetDetector:
    """A randomly initialised detector of a registered architecture, in eval mode."""
    arch = architecture(name)
    preprocess = preprocess or arch.preprocess
    if preprocess.size_divisor % arch.size_multiple:
        raise GradlensError(f"{name} needs images padded to a multiple of {arch.size_multiple} pixels; "
                            f"this one pads to {preprocess.size_divisor} (its config's Pad size_divisor).")
    opts = {**arch.default_options, **(options or {})}
    backbone = arch.build_backbone(opts)
    if arch.anchors == "detectron2":  # detectron2's anchors, inference and loss
        anchors, cls = detectron2.Detectron2AnchorGenerator(), detectron2.Detectron2RetinaNet
    else:
        anchors = _torchvision_anchors() if arch.anchors == "torchvision" else MMDetAnchorGenerator(AnchorConfig())
        cls = RetinaNetDetector
    detector = cls(backbone, num_classes, preprocess=preprocess, test_cfg=test_cfg or arch.test_cfg, anchor_generator=anchors)
    detector.arch_name = name
    detector.arch_options = opts
    return detector.eval()


def with_preprocess(detector: RetinaNetDetector, **changes) -> RetinaNetDetector:
    """The same detector seeing images differently (e.g. a smaller test size for quick checks)."""
    detector.preprocess = replace(detector.preprocess, **changes)
    return detector


# -- mmdetection 2.x two-stage detectors of the CEDNet fork (Mask R-CNN, Cascade Mask R-CNN) ---------------------

_TWO_STAGE_BODIES = {  # backbone name -> (family, variant, label)
    "cednet_next_tiny": ("cednet", "next_tiny", "CEDNet-NeXt-T (CEDNetWrapperTwoStage, no neck)"),
    "cednet_next_small": ("cednet", "next_small", "CEDNet-NeXt-S (CEDNetWrapperTwoStage, no neck)"),
    "cednet_next_base": ("cednet", "next_base", "CEDNet-NeXt-B (CEDNetWrapperTwoStage, no neck)"),
    "ced_swin_tiny": ("cednet", "swin_tiny", "CED-Swin-T (CEDNetWrapperTwoStage, no neck)"),
    "ced_cswin_tiny": ("cednet", "cswin_tiny", "CED-CSwin-T (CEDNetWrapperTwoStage, no neck)"),
    "convnext_tiny": ("convnext", "convnext_tiny", "ConvNeXt-T + FPN"),
    "convnext_small": ("convnext", "convnext_small", "ConvNeXt-S + FPN"),
    "convnext_base": ("convnext", "convnext_base", "ConvNeXt-B + FPN"),
    "swin_tiny": ("swin", "swin_tiny", "Swin-T + FPN"),
    "swin_small": ("swin", "swin_small", "Swin-S + FPN"),
    "cswin_tiny": ("cswin", "cswin_tiny", "CSWin-T (the fork's CSwinTransformer) + FPN"),
}
TWO_STAGE_ARCHITECTURES: dict[str, str] = {}  # name -> description
for _body, (_family, _variant, _label) in _TWO_STAGE_BODIES.items():
    TWO_STAGE_ARCHITECTURES[f"mask_rcnn_{_body}"] = f"Mask R-CNN, {_label} (loss: the expectation over its samplers)"
    TWO_STAGE_ARCHITECTURES[f"cascade_mask_rcnn_{_body}"] = (
        f"Cascade Mask R-CNN 4conv1f GIoU, {_label} (loss: the expectation over its samplers)")


def _two_stage_body(body: str, options: dict) -> tuple[nn.Module, nn.Module | None]:
    """The backbone (and FPN neck) a two-stage detector's pyramid P2..P6 comes from."""
    from gradlens.models.detectors.mmdet_rcnn import MMDetFPN

    family, variant, _ = _TWO_STAGE_BODIES[body]
    opts = dict(options)
    out_chans = int(opts.pop("out_chans", 256))
    if family == "cednet":
        from gradlens.models.backbones.cednet import CEDNET_VARIANTS, CEDNetTwoStageBackbone

        return CEDNetTwoStageBackbone(out_chans, 1, **{**CEDNET_VARIANTS[variant], **opts, "drop_path_rate": 0.0}), None
    opts["out_indices"] = tuple(opts.get("out_indices", (0, 1, 2, 3)))
    if family == "convnext":
        from gradlens.models.backbones.convnext import CONVNEXT_VARIANTS, ConvNeXtBackbone

        body_module = ConvNeXtBackbone(**{**CONVNEXT_VARIANTS[variant], **opts, "drop_path_rate": 0.0})
    elif family == "swin":
        from gradlens.models.backbones.swin import SWIN_VARIANTS, SwinBackbone

        body_module = SwinBackbone(**{**SWIN_VARIANTS[variant], **opts, "drop_path_rate": 0.0})
    else:
        from gradlens.models.backbones.cswin import cswin_tiny_backbone

        body_module = cswin_tiny_backbone(**{**opts, "drop_path_rate": 0.0})
    channels = list(body_module.out_channels)
    if len(channels) != 4:
        raise TooFewBackboneMaps(f"The backbone returns {len(channels)} map(s), but the fork's two-stage FPN reads four "
                                 "(C2..C5): build it with out_indices 0, 1, 2, 3.")
    return body_module, MMDetFPN(channels, out_chans)


def build_two_stage(name: str, num_classes: int, options: dict | None = None,
                    preprocess: PreprocessConfig | None = None) -> nn.Module:
    """A randomly initialised Mask R-CNN or Cascade Mask R-CNN of :data:`TWO_STAGE_ARCHITECTURES`, in eval mode."""
    from gradlens.models.detectors.mmdet_rcnn import MMDetTwoStage

    if name not in TWO_STAGE_ARCHITECTURES:
        raise GradlensError(f"Unknown two-stage architecture {name!r}; known: {', '.join(TWO_STAGE_ARCHITECTURES)}.")
    cascade = name.startswith("cascade_")
    body = name.removeprefix("cascade_").removeprefix("mask_rcnn_")
    backbone, neck = _two_stage_body(body, options or {})
    detector = MMDetTwoStage(backbone, num_classes, neck=neck, cascade=cascade, preprocess=preprocess or PAPER_PREPROCESS,
                             arch_name=name)
    detector.arch_options = dict(options or {})
    return detector.eval()


# -- mmdetection 2.x Deformable DETR of the CEDNet fork ---------------------------------------------------------

_DETR_BODIES = {  # backbone name -> (family, variant, label)
    "cednet_next_tiny": ("cednet", "next_tiny", "CEDNet-NeXt-T (CEDNetWrapper, one added block, no neck)"),
    "cednet_next_small": ("cednet", "next_small", "CEDNet-NeXt-S (CEDNetWrapper, one added block, no neck)"),
    "cednet_next_base": ("cednet", "next_base", "CEDNet-NeXt-B (CEDNetWrapper, one added block, no neck)"),
    "ced_resnet_50": ("cednet", "resnet_50", "CED-ResNet-50 (CEDNetWrapper, one added block, no neck)"),
    "resnet50": ("resnet", "resnet50", "ResNet-50 + ChannelMapper"),
    "convnext_tiny": ("convnext", "convnext_tiny", "ConvNeXt-T + ChannelMapper"),
    "convnext_small": ("convnext", "convnext_small", "ConvNeXt-S + ChannelMapper"),
}
DETR_ARCHITECTURES: dict[str, str] = {
    f"deformable_detr_{body}": f"Deformable DETR, {label} (loss: after Hungarian matching, every decoder layer)"
    for body, (_family, _variant, label) in _DETR_BODIES.items()
}


def _detr_body(body: str, options: dict) -> tuple[nn.Module, nn.Module | None]:
    """The backbone (and ChannelMapper neck) a Deformable DETR's four 256-channel maps come from."""
    from gradlens.models.detectors.deformable_detr import ChannelMapper

    family, variant, _ = _DETR_BODIES[body]
    opts = dict(options)
    if family == "cednet":
        from gradlens.models.backbones.cednet import CEDNET_VARIANTS, CEDNetBackbone

        return CEDNetBackbone(int(opts.pop("out_chans", 256)), 1, **{**CEDNET_VARIANTS[variant], **opts,
                                                                      "drop_path_rate": 0.0}), None
    if family == "resnet":
        return ResNet50Features(), ChannelMapper([512, 1024, 2048])
    from gradlens.models.backbones.convnext import CONVNEXT_VARIANTS, ConvNeXtBackbone

    opts["out_indices"] = tuple(opts.get("out_indices", (1, 2, 3)))
    body_module = ConvNeXtBackbone(**{**CONVNEXT_VARIANTS[variant], **opts, "drop_path_rate": 0.0})
    channels = list(body_module.out_channels)
    if len(channels) != 3:
        raise TooFewBackboneMaps(f"The backbone returns {len(channels)} map(s), but the fork's Deformable DETR "
                                 "ChannelMapper reads three (C3..C5): build it with out_indices 1, 2, 3.")
    return body_module, ChannelMapper(channels)


def build_deformable_detr(name: str, num_classes: int, options: dict | None = None,
                          preprocess: PreprocessConfig | None = None) -> nn.Module:
    """A randomly initialised Deformable DETR of :data:`DETR_ARCHITECTURES`, in eval mode. ``options`` may set the
    backbone's (``out_chans``, ``out_indices``) and the head's ``num_query``, ``encoder_layers``, ``decoder_layers``."""
    from gradlens.models.detectors.deformable_detr import DETR_PREPROCESS, MMDetDeformableDETR

    if name not in DETR_ARCHITECTURES:
        raise GradlensError(f"Unknown Deformable DETR architecture {name!r}; known: {', '.join(DETR_ARCHITECTURES)}.")
    opts = dict(options or {})
    head = {k: int(opts.pop(k)) for k in ("num_query", "encoder_layers", "decoder_layers") if k in opts}
    backbone, neck = _detr_body(name.removeprefix("deformable_detr_"), opts)
    detector = MMDetDeformableDETR(backbone, num_classes, neck=neck, preprocess=preprocess or DETR_PREPROCESS,
                                   arch_name=name, **head)
    detector.arch_options = dict(options or {})
    return detector.eval()
