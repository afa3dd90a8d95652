"""Parameters and FLOPs of the Table A1 backbones and of the detectors (Table A1's Param/FLOPs columns).

FLOPs are counted with torch's own ``FlopCounterMode`` on a real forward pass
in eval mode and reported as multiply-accumulates (one fused multiply-add
counts once), the convention of the paper's tables (fvcore/mmcv counters).
Parameters count only what that forward pass uses: CEDNet's ImageNet model
carries a classifier per stage for training but infers with the last one only,
and the paper counts only that one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Table A1 of the paper (ImageNet-1K, 224x224): (params in M, FLOPs in G).
TABLE_A1 = {
    "ConvNeXt-T": (29, 4.5), "ConvNeXt-S": (50, 8.7), "ConvNeXt-B": (89, 15.4),
    "Swin-T": (28, 4.4), "Swin-S": (50, 8.7), "Swin-B": (88, 15.4),
    "CEDNet-NeXt-T": (34, 5.7), "CEDNet-NeXt-S": (55, 9.8), "CEDNet-NeXt-B": (95, 16.2),
    "CEDNet-NeXt-T (FPN-style)": (34, 5.7), "CEDNet-NeXt-T (UNet-style)": (34, 5.7),
    "CEDNet-NeXt-T (Hourglass-style)": (34, 5.7),
}


def _classifiers() -> dict[str, callable]:
    from torchvision import models as tv

    from gradlens.models import cednet

    return {
        "ConvNeXt-T": tv.convnext_tiny, "ConvNeXt-S": tv.convnext_small, "ConvNeXt-B": tv.convnext_base,
        "Swin-T": tv.swin_t, "Swin-S": tv.swin_s, "Swin-B": tv.swin_b,
        "CEDNet-NeXt-T": cednet.cednet_next_tiny, "CEDNet-NeXt-S": cednet.cednet_next_small,
        "CEDNet-NeXt-B": cednet.cednet_next_base,
        "CEDNet-NeXt-T (FPN-style)": cednet.cednet_next_tiny_fpn,
        "CEDNet-NeXt-T (UNet-style)": cednet.cednet_next_tiny_unet,
        "CEDNet-NeXt-T (Hourglass-style)": cednet.cednet_next_tiny_hourglass,
    }


CLASSIFIERS = tuple(TABLE_A1)


@dataclass
class Profile:
    name: str
    kind: str  # "classifier" or "detector"
    input_size: tuple[int, int]  # (height, width)
    params: int
    macs: int
    paper_params_m: float | None = None
    paper_flops_g: float | None = None

    def row(self) -> dict:
        return {
            "model": self.name, "kind": self.kind, "input": f"{self.input_size[1]}x{self.input_size[0]}",
            "params_M": round(self.params / 1e6, 2), "flops_G": round(self.macs / 1e9, 2),
            "paper_params_M": self.paper_params_m, "paper_flops_G": self.paper_flops_g,
        }


def count(model: nn.Module, run) -> tuple[int, int]:
    """(parameters used, multiply-accumulates) of one call ``run()`` of ``model`` in eval mode."""
    used: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: used.add(id(mod))) for m in model.modules()]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            run()
    finally:
        for h in hooks:
            h.remove()
    params = 0
    seen: set[int] = set()
    for module in model.modules():
        if id(module) in used:
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    params += p.numel()
    return params, counter.get_total_flops() // 2


def profile_classifier(name: str, size: int = 224) -> Profile:
    model = _classifiers()[name]().eval()
    x = torch.zeros(1, 3, size, size)
    params, macs = count(model, lambda: model(x))
    paper = TABLE_A1.get(name, (None, None))
    return Profile(name, "classifier", (size, size), params, macs, *paper)


def profile_detector(arch: str, height: int = 800, width: int = 1280, num_classes: int = 80) -> Profile:
    """Backbone, neck and head of a detector on one ``width`` x ``height`` input (no pre/post-processing)."""
    from gradlens.models.registry import build_detector

    detector = build_detector(arch, num_classes)
    x = torch.zeros(1, 3, height, width)
    params, macs = count(detector, lambda: detector.head(detector.backbone(x)))
    return Profile(arch, "detector", (height, width), params, macs)
