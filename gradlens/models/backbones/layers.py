"""Layers shared by the backbones that mirror the official reference code (ConvNeXt/CEDNet norms, the transformer MLP).

ConvNeXt, and CEDNet after it, ship their own ``LayerNorm`` instead of using ``nn.LayerNorm``
because their feature maps are channels-first (N, C, H, W) and normalising over C needs either a
permutation or a hand-written reduction. The reference code picks the hand-written reduction, and
its float32 results differ from ``F.layer_norm`` by round-off. To load released weights *and*
reproduce released outputs bit for bit, this module keeps both the parameter names (``weight``,
``bias``) and the exact arithmetic of that class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["EvalBatchNorm2d", "LayerNorm", "LayerNorm2d", "Mlp", "channels_last_mode"]

_DATA_FORMATS = ("channels_last", "channels_first")


class EvalBatchNorm2d(FrozenBatchNorm2d):
    """Batch norm on running statistics as mmdetection runs it in a detector (``norm_eval``: ``nn.BatchNorm2d``
    in eval mode, so ``F.batch_norm(training=False)``), with torchvision's frozen-norm buffers and state keys.

    torchvision's ``FrozenBatchNorm2d`` computes ``x * scale + shift``; the fused kernel rounds differently, and
    in a ReLU network with max-pooling the float32 input gradient follows those last bits by whole per cent
    (a tied max-pool window, a pre-activation at round-off distance from zero): the upstream's arithmetic it is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps)


class LayerNorm(nn.Module):
    """Layer normalisation over one channel dimension, as in the ConvNeXt / CEDNet code.

    Args:
        normalized_shape: number of channels (an int).
        eps: added to the variance.
        data_format: ``"channels_last"`` normalises the last dimension with ``F.layer_norm``
            (input ``(..., C)``); ``"channels_first"`` normalises dimension 1 of an ``(N, C, H, W)``
            map with the reference code's explicit mean / biased variance, in its order of
            operations (so results match it exactly, not just to round-off).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last") -> None:
        super().__init__()
        if data_format not in _DATA_FORMATS:
            raise ValueError(f"data_format must be one of {_DATA_FORMATS}, got {data_format!r}")
        channels = int(normalized_shape)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (channels,)
        # the speed mode of a channels-last detector (RetinaNetDetector.use_channels_last): the same
        # normalisation as one fused kernel over the NHWC layout, equal to the reference up to round-off
        self.fused_channels_first = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if self.fused_channels_first:
            return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
        # Keep this sequence of operations: it is the reference's, and F.layer_norm differs by round-off.
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, data_format={self.data_format}"


def channels_last_mode(model: nn.Module, enabled: bool = True) -> bool:
    """Put a detector in (or out of) the CPU's speed mode: its weights in NHWC layout and its channel
    LayerNorms as one fused kernel over it; equal to the reference arithmetic up to round-off. A model with a
    module that ``needs_contiguous_memory`` stays contiguous. Returns whether the mode is on (the caller then
    makes its inputs channels-last too)."""
    if enabled and any(getattr(module, "needs_contiguous_memory", False) for module in model.modules()):
        enabled = False
    for module in model.modules():
        if isinstance(module, LayerNorm) and module.data_format == "channels_first":
            module.fused_channels_first = enabled
    model.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
    return enabled


class LayerNorm2d(LayerNorm):
    """:class:`LayerNorm` defaulting to ``data_format="channels_first"`` (for ``(N, C, H, W)`` maps)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_first") -> None:
        super().__init__(normalized_shape, eps=eps, data_format=data_format)


class Mlp(nn.Module):
    """The transformer MLP of Swin, FocalNet and MSG-Transformer (``fc1``, GELU, ``fc2``: their parameter names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
