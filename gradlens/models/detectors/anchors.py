"""Anchors exactly as mmdetection 2.x places them.

torchvision's :class:`~torchvision.models.detection.anchor_utils.AnchorGenerator`
rounds its base anchors to whole pixels; mmdetection keeps the fractional
sizes (``octave_base_scale * 2**(i/scales_per_octave) * stride``) and centres
them on the stride grid with offset 0. A checkpoint trained with one layout
decodes boxes wrongly with the other, so gradlens generates mmdetection's
numbers and keeps torchvision's interface (``forward(image_list, features)``),
so that torchvision's RetinaNet loss and matching code can use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator


@dataclass(frozen=True)
class AnchorConfig:
    """mmdetection's ``AnchorGenerator`` settings (the RetinaNet defaults of the paper)."""

    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    center_offset: float = 0.0

    @property
    def scales(self) -> list[float]:
        return [self.octave_base_scale * 2 ** (i / self.scales_per_octave) for i in range(self.scales_per_octave)]

    @property
    def num_anchors(self) -> int:
        return len(self.ratios) * self.scales_per_octave


def base_anchors(stride: int, config: AnchorConfig, dtype=torch.float32) -> Tensor:
    """The ``A`` anchors of one level centred at the origin, ratio-major then scale, as mmdetection orders them."""
    size = float(stride)
    ratios = torch.tensor(config.ratios, dtype=torch.float64)
    scales = torch.tensor(config.scales, dtype=torch.float64)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (size * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (size * h_ratios[:, None] * scales[None, :]).reshape(-1)
    cx = cy = config.center_offset * size
    anchors = torch.stack([cx - 0.5 * ws, cy - 0.5 * hs, cx + 0.5 * ws, cy + 0.5 * hs], dim=-1)
    return anchors.to(dtype)


def grid_anchors(base: Tensor, feature_size: tuple[int, int], stride: int) -> Tensor:
    """All anchors of a level: position-major (row, column), then the base anchors."""
    height, width = feature_size
    shift_x = torch.arange(width, device=base.device, dtype=base.dtype) * stride
    shift_y = torch.arange(height, device=base.device, dtype=base.dtype) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack([xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)], dim=1)
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)


class MMDetAnchorGenerator(AnchorGenerator):
    """Drop-in for torchvision's generator that yields mmdetection's anchors.

    Subclasses torchvision's class only so that torchvision's ``RetinaNet``
    accepts it; none of the parent's rounded cell anchors are used.
    """

    def __init__(self, config: AnchorConfig | None = None):
        nn.Module.__init__(self)
        self.config = config or AnchorConfig()
        self.sizes = tuple((s,) for s in self.config.strides)  # informative only
        self.aspect_ratios = tuple(self.config.ratios for _ in self.config.strides)
        self.cell_anchors = [base_anchors(s, self.config) for s in self.config.strides]
        self._cache: dict[tuple, list[Tensor]] = {}

    def num_anchors_per_location(self) -> list[int]:
        return [self.config.num_anchors for _ in self.config.strides]

    def level_anchors(self, feature_sizes: list[tuple[int, int]], device, dtype=torch.float32) -> list[Tensor]:
        """Per-level anchors for a padded batch whose feature maps have ``feature_sizes``."""
        if len(feature_sizes) != len(self.config.strides):
            raise ValueError(f"expected {len(self.config.strides)} feature levels, got {len(feature_sizes)}")
        key = (tuple(feature_sizes), str(device), dtype)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = [
                grid_anchors(base.to(device=device, dtype=dtype), size, stride)
                for base, size, stride in zip(self.cell_anchors, feature_sizes, self.config.strides)
            ]
        return self._cache[key]

    def forward(self, image_list, feature_maps: list[Tensor]) -> list[Tensor]:
        sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        levels = self.level_anchors(sizes, feature_maps[0].device, feature_maps[0].dtype)
        anchors = torch.cat(levels)
        return [anchors for _ in range(feature_maps[0].shape[0])]


def mmdet_delta_decode(anchors: Tensor, deltas: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
    """mmdetection's ``DeltaXYWHBBoxCoder.decode`` (means 0, stds 1) with its exact arithmetic and clipping."""
    max_ratio = abs(math.log(16 / 1000))
    pxy = (anchors[:, :2] + anchors[:, 2:]) * 0.5
    pwh = anchors[:, 2:] - anchors[:, :2]
    dxy = deltas[:, :2]
    dwh = deltas[:, 2:].clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + pwh * dxy
    gwh = pwh * dwh.exp()
    x1y1 = gxy - gwh * 0.5
    x2y2 = gxy + gwh * 0.5
    boxes = torch.cat([x1y1, x2y2], dim=-1)
    if max_shape is not None:
        height, width = max_shape
        boxes = torch.stack(
            [boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height), boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)],
            dim=-1,
        )
    return boxes


def mmdet_delta_encode(anchors: Tensor, boxes: Tensor) -> Tensor:
    """mmdetection's ``DeltaXYWHBBoxCoder.encode`` (means 0, stds 1): the regression targets of ``boxes``.

    Centres are ``(x1 + x2) * 0.5`` (torchvision's coder uses ``x1 + 0.5 * w``,
    which rounds differently), so the box loss is mmdetection's to the last bit.
    """
    pxy = (anchors[:, :2] + anchors[:, 2:]) * 0.5
    pwh = anchors[:, 2:] - anchors[:, :2]
    gxy = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    gwh = boxes[:, 2:] - boxes[:, :2]
    return torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=-1)
