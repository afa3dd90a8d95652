"""Feature pyramids: torchvision's FPN with mmdetection's RetinaNet extra levels.

mmdetection's RetinaNet neck (``start_level=1, add_extra_convs='on_input'``)
computes P6 from the last backbone map (C5) and P7 from P6 **without** a ReLU
in between; torchvision's ``LastLevelP6P7`` applies one. The extra block here
reproduces mmdetection, and ``relu_before_p7=True`` gives torchvision's.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork


class P6P7(ExtraFPNBlock):
    """Two stride-2 3x3 convs after the pyramid; P6 reads C5 (``on_input``) or P5."""

    def __init__(self, in_channels: int, out_channels: int, from_p5: bool = False, relu_before_p7: bool = False):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        self.from_p5 = from_p5
        self.relu_before_p7 = relu_before_p7

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]):
        source = p[-1] if self.from_p5 else c[-1]
        p6 = self.p6(source)
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        return p + [p6, p7], names + ["p6", "p7"]


class BackboneWithPyramid(nn.Module):
    """A backbone body whose maps (from ``start_level`` on) feed an FPN with P6/P7.

    ``body`` returns a tuple of maps; ``in_channels`` lists the channels of the
    maps the FPN uses. The output is the list of five maps P3..P7.
    """

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int = 256, start_level: int = 0,
                 from_p5: bool = False, relu_before_p7: bool = False):
        super().__init__()
        self.body = body
        self.start_level = start_level
        extra_in = out_channels if from_p5 else in_channels[-1]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=P6P7(extra_in, out_channels, from_p5, relu_before_p7))
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = self.body(x)
        if isinstance(maps, dict):
            maps = list(maps.values())
        used = OrderedDict((str(i), m) for i, m in enumerate(list(maps)[self.start_level:]))
        return list(self.fpn(used).values())


class PyramidBackbone(nn.Module):
    """A backbone that already returns the five pyramid maps (CEDNet: its decoder replaces the FPN)."""

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.body = body
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x))
