"""ConvNeXt detection backbone, parameter-compatible with the CEDNet mmdetection fork.

The CEDNet RetinaNets (``ced-mmdet/configs/cednet/convnext/retinanet_convnext_*``) use the fork's
``ConvNeXt`` backbone (``ced-mmdet/mmdet/models/backbones/convnext.py``). This module rebuilds that
backbone in plain PyTorch so that a detector checkpoint's ``backbone.*`` tensors load with
``strict=True`` once the ``backbone.`` prefix is removed: parameter names, registration order and
shapes equal the fork's, and eval outputs equal the fork's for the same weights and input.

Behaviour that is the fork's, kept on purpose:

* every norm is the channels-first ``LayerNorm`` (mean and biased variance over the channel
  dimension, computed by hand, ``eps=1e-6``), including the one inside each block, which runs
  before the permutation to channels-last;
* an output stage ``i`` is passed through ``norm{i}`` and the *normed* map is what the next
  stage receives, so ``out_indices`` changes the features of later stages, not just which maps are
  returned (a checkpoint trained with ``out_indices=[0, 1, 2, 3]`` must be built with the same
  ``out_indices``: it also carries the ``norm0`` weights);
* ``norm{i}`` modules are registered in the order ``out_indices`` is given; outputs are returned
  in stage order;
* layer scale ``gamma`` has shape ``(dim,)`` and is absent when ``layer_scale_init_value <= 0``.

The fork's ``conv_stem`` and ``dilation_c5`` options (unused by the RetinaNet configs) are not
supported. Dropout-free drop path is ``torchvision.ops.StochasticDepth(p, "row")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from gradlens.models.backbones.layers import LayerNorm

__all__ = [
    "CONVNEXT_VARIANTS",
    "ConvNeXtBackbone",
    "convnext_base_backbone",
    "convnext_small_backbone",
    "convnext_tiny_backbone",
]

_EPS = 1e-6


def _channels_first_norm(dim: int) -> LayerNorm:
    return LayerNorm(dim, eps=_EPS, data_format="channels_first")


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, channels-first LayerNorm, 4x MLP, layer scale, residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = _channels_first_norm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if layer_scale_init_value > 0:
            self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.register_parameter("gamma", None)
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x))
        y = y.permute(0, 2, 3, 1)  # N C H W -> N H W C
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma * y
        y = y.permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class ConvNeXtBackbone(nn.Module):
    """The fork's ``ConvNeXt`` backbone (state-dict and output compatible).

    Args:
        in_chans: input channels.
        depths: blocks per stage (4 stages).
        dims: channels per stage.
        drop_path_rate: stochastic-depth rate of the last block (linear from 0 over all blocks).
        layer_scale_init_value: initial layer-scale value; ``<= 0`` disables layer scale.
        out_indices: stages whose (normed) maps are returned.

    ``forward(x)`` returns a tuple with one ``(N, dims[i], H / 2**(i+2), W / 2**(i+2))`` map per
    index in ``out_indices`` (in stage order); ``out_channels`` lists their channels.
    """

    def __init__(
        self,
        in_chans: int = 3,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1.0,
        out_indices: Sequence[int] = (0, 1, 2, 3),
    ) -> None:
        super().__init__()
        depths, dims = list(depths), list(dims)
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt has 4 stages; got depths={depths}, dims={dims}")
        out_indices = [int(i) for i in out_indices]
        if not out_indices or any(i not in range(4) for i in out_indices) or len(set(out_indices)) != len(out_indices):
            raise ValueError(f"out_indices must be distinct stage indices in 0..3, got {out_indices}")
        self.depths, self.dims = depths, dims
        self.out_indices = tuple(out_indices)

        # stem (conv 4x4 s4 + norm), then 3 downsamplers (norm + conv 2x2 s2)
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), _channels_first_norm(dims[0]))]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(_channels_first_norm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
            )

        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # as the fork; meta-safe
        self.stages = nn.ModuleList()
        start = 0
        for i in range(4):
            self.stages.append(
                nn.Sequential(
                    *[ConvNeXtBlock(dims[i], rates[start + j], layer_scale_init_value) for j in range(depths[i])]
                )
            )
            start += depths[i]

        for i in out_indices:  # registration order = the order given, as in the fork
            self.add_module(f"norm{i}", _channels_first_norm(dims[i]))

        self.out_channels = [dims[i] for i in range(4) if i in self.out_indices]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in self.out_indices:
                x = getattr(self, f"norm{i}")(x)  # the normed map also feeds the next stage
                outs.append(x)
        return tuple(outs)


CONVNEXT_VARIANTS: dict[str, dict] = {
    # from ced-mmdet/configs/cednet/convnext/retinanet_convnext_{tiny,small,base}_*.py
    "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), drop_path_rate=0.4, layer_scale_init_value=1.0),
    "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), drop_path_rate=0.6, layer_scale_init_value=1.0),
    "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), drop_path_rate=0.7, layer_scale_init_value=1.0),
}


def _build(name: str, kwargs: dict) -> ConvNeXtBackbone:
    cfg = {**CONVNEXT_VARIANTS[name], "out_indices": (1, 2, 3), **kwargs}
    return ConvNeXtBackbone(**cfg)


def convnext_tiny_backbone(**kwargs) -> ConvNeXtBackbone:
    """ConvNeXt-T (depths 3,3,9,3; dims 96..768); keyword arguments override, ``out_indices`` defaults to (1, 2, 3)."""
    return _build("convnext_tiny", kwargs)


def convnext_small_backbone(**kwargs) -> ConvNeXtBackbone:
    """ConvNeXt-S (depths 3,3,27,3; dims 96..768); the fork's RetinaNet config uses ``out_indices=(0, 1, 2, 3)``."""
    return _build("convnext_small", kwargs)


def convnext_base_backbone(**kwargs) -> ConvNeXtBackbone:
    """ConvNeXt-B (depths 3,3,27,3; dims 128..1024); the fork's RetinaNet config uses ``out_indices=(0, 1, 2, 3)``."""
    return _build("convnext_base", kwargs)
