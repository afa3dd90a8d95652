"""RevCol (reversible column networks, RevCol-T/S/B) in plain PyTorch.

The reference implementation (github.com/megvii-research/RevCol) imports timm and, for
detection, mmcv/mmdet. This module rebuilds the ImageNet network (``models/revcol.py``, class
``FullNet``, with ``models/modules.py``) and the detection backbone
(``Detection/mmdet/models/backbones/revcol.py``, class ``RevCol``, with ``revcol_module.py``)
without them. Attribute names, registration order and tensor shapes are the reference's on
purpose: released checkpoints load with ``load_state_dict(strict=True)`` without a renaming table
(detector checkpoints after stripping the ``backbone.`` prefix), and eval outputs equal the
reference's for the same weights and input (the test-suite checks both against tensors produced by
the reference code, ``scripts/make_revcol_reference.py``).

Architecture, briefly: a 4x4 stride-4 conv + LayerNorm stem feeds ``num_subnet`` identical
*columns* (``subnet{i}``), each a 4-level ConvNeXt-style network with ``channels[l]`` channels and
``layers[l]`` blocks at level ``l`` (strides 4, 8, 16, 32). Level ``l`` of column ``i`` reads
level ``l - 1`` of the same column (2x2 stride-2 conv + LayerNorm; the stem's map for ``l = 0``)
plus, from the second column on, level ``l + 1`` of the previous column (``Linear`` +
LayerNorm over channels, then 2x nearest upsampling), and adds ``alpha{l}`` times its own level in
the previous column (the reversible connection)::

    c_l <- alpha_l * c_l + blocks_l(up(c_{l+1}) + down(c_{l-1}))

The classifier pools the last column's ``c3``; the detection backbone returns the last column's
``(c0, c1, c2, c3)``.

**Released ImageNet checkpoints** (``revcol_{tiny,small,base}_1k.pth``) are training checkpoints:
the reference's evaluation loads ``checkpoint["model"]`` (the file also holds ``optimizer``,
``lr_scheduler``, ``state_dict_ema``, ... as written by its ``utils.save_checkpoint``). They were
trained with intermediate supervision (``INTER_SUPV: True`` in ``configs/revcol_*_1k.yaml``), so the
state dict carries four classifier heads (``cls_blocks.0-3``) and three image-reconstruction
decoders (``decoder_blocks.0-2``). They are kept here (``inter_supv=True``, the default) so that
the checkpoint loads strict, but **inference uses only the last head**, ``cls_blocks[3]`` on the
last column (the reference's evaluation reads ``outputs[-1]``); the other heads and the decoders
are used only by :meth:`RevCol.forward_training`.

Behaviour that is the reference's, kept on purpose (it changes outputs or names):

* **Plain autograd only.** The reference trains with ``save_memory=True``, a custom
  ``autograd.Function`` that recomputes (reverses) column activations in the backward pass to save
  memory; its forward arithmetic is the non-reversible path's. gradlens needs ordinary autograd
  (input gradients), so only the plain path (the reference's ``_forward_nonreverse``, which its
  detection configs use, ``save_memory=False``) is implemented. ``save_memory`` is not accepted;
* the reference clamps every ``alpha`` in place before each column's forward so that
  ``|alpha| >= 1e-3`` (sign kept; 0 stays 0). Here the same clamp is applied to the value used,
  without writing to the parameter (same outputs; loaded weights stay as loaded);
* the first column has no ``up`` modules (``fusion.up``) and no previous column: its levels are
  ``blocks_l(down(c_{l-1}))`` (the reference adds ``alpha * 0``, which changes no value);
  level 3 never has an ``up`` (an ``nn.Identity`` without parameters in the reference);
* channels-first norms are the hand-computed ``LayerNorm`` of :mod:`gradlens.models.backbones.layers`
  (``eps=1e-6``); the blocks' norms (after the permutation to channels-last) are ``nn.LayerNorm``;
* block layout: depthwise ``kernel_size`` conv, LayerNorm, 4x MLP with GELU, layer scale
  ``gamma``, residual (the decoders' blocks have a 1x MLP);
* sizes: the stem floors ``H / 4`` and each ``down`` halves by flooring, while ``up`` doubles, so
  with more than one column the stride-4 map must have height and width divisible by 8 (input
  height/width ``32k + 0..3``). The reference then fails with a broadcasting error; here
  :class:`ValueError` says so up front;
* drop-path rates are ``linspace(0, drop_path_rate, sum(layers))``, the same list for every
  column (block ``j`` of level ``l`` has rate ``sum(layers[:l]) + j``). Rates only matter in
  training; drop path is ``torchvision.ops.StochasticDepth(p, "row")``.

The detection backbone (:class:`RevColBackbone`) has no norms on its outputs and no extra modules:
its state dict is the classifier's minus the heads and decoders (the reference's detection
``init_weights`` loads an ImageNet checkpoint with ``strict=False``). Its ``out_indices`` is
recorded but, as in the reference, does not change what is returned: always all four levels of
the last column (strides 4, 8, 16, 32; ``out_channels == channels``).

RevCol-L/XL/H (22K-pretrained, and RevCol-H's extra bottom-to-top branch) are not provided; the
classifier does build the 22K heads' ``SimDecoder`` when ``num_classes > 1000``, as the reference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from gradlens.errors import CheckpointError
from gradlens.models.backbones.layers import LayerNorm

__all__ = [
    "REVCOL_VARIANTS",
    "TINY_REVCOL",
    "RevCol",
    "RevColBackbone",
    "is_revcol_checkpoint",
    "recognise",
    "revcol_base",
    "revcol_base_backbone",
    "revcol_small",
    "revcol_small_backbone",
    "revcol_tiny",
    "revcol_tiny_backbone",
]

_EPS = 1e-6
_ALPHA_MIN = 1e-3  # the reference's _clamp_abs value
_ALPHA_INIT = 0.5  # the reference's shortcut_scale_init_value
_LAYER_SCALE_INIT = 1e-6
_LEVELS = 4


def _channels_first_norm(dim: int) -> LayerNorm:
    return LayerNorm(dim, eps=_EPS, data_format="channels_first")


def _clamped(alpha: torch.Tensor) -> torch.Tensor:
    """``alpha`` with magnitudes below 1e-3 raised to 1e-3, sign kept (0 stays 0): the value the reference's
    in-place ``_clamp_abs`` leaves in the parameter before using it."""
    return torch.where(alpha.abs() >= _ALPHA_MIN, alpha, alpha.sign() * _ALPHA_MIN)


class ConvNextBlock(nn.Module):
    """The reference's ``ConvNextBlock``: depthwise conv, ``nn.LayerNorm`` (channels-last), MLP with GELU,
    layer scale ``gamma`` of shape ``(out_channel,)``, residual. ``in_channel`` must equal ``out_channel``."""

    def __init__(
        self,
        in_channel: int,
        hidden_dim: int,
        out_channel: int,
        kernel_size: int = 3,
        layer_scale_init_value: float = _LAYER_SCALE_INIT,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(in_channel, in_channel, kernel_size=kernel_size, padding=(kernel_size - 1) // 2, groups=in_channel)
        self.norm = nn.LayerNorm(in_channel, eps=_EPS)
        self.pwconv1 = nn.Linear(in_channel, hidden_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden_dim, out_channel)
        if layer_scale_init_value > 0:
            self.gamma = nn.Parameter(torch.full((out_channel,), float(layer_scale_init_value)))
        else:
            self.register_parameter("gamma", None)
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # N C H W -> N H W C
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class UpSampleConvnext(nn.Module):
    """Channel change (``Linear`` + LayerNorm over channels, ``channel_reschedule``) then nearest upsampling by ``2**ratio``."""

    def __init__(self, ratio: int, inchannel: int, outchannel: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.channel_reschedule = nn.Sequential(nn.Linear(inchannel, outchannel), LayerNorm(outchannel, eps=_EPS, data_format="channels_last"))
        self.upsample = nn.Upsample(scale_factor=2**ratio, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_reschedule(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.upsample(x)


class Fusion(nn.Module):
    """A level's input: ``down`` (2x2 stride-2 conv + LayerNorm of the finer level; identity at level 0)
    plus, outside the first column and below level 3, ``up`` of the previous column's coarser level."""

    def __init__(self, level: int, channels: Sequence[int], first_col: bool) -> None:
        super().__init__()
        self.level = level
        self.first_col = first_col
        if level > 0:
            self.down = nn.Sequential(nn.Conv2d(channels[level - 1], channels[level], kernel_size=2, stride=2), _channels_first_norm(channels[level]))
        else:
            self.down = nn.Identity()
        if not first_col:
            self.up = UpSampleConvnext(1, channels[level + 1], channels[level]) if level < _LEVELS - 1 else nn.Identity()

    def forward(self, c_down: torch.Tensor, c_up: torch.Tensor | None) -> torch.Tensor:
        if self.first_col or self.level == _LEVELS - 1:
            return self.down(c_down)
        return self.up(c_up) + self.down(c_down)


class Level(nn.Module):
    """``fusion`` then ``layers[level]`` ConvNeXt blocks (``blocks``)."""

    def __init__(self, level: int, channels: Sequence[int], layers: Sequence[int], kernel_size: int, first_col: bool, dp_rates: Sequence[float]) -> None:
        super().__init__()
        start = sum(layers[:level])
        dim = channels[level]
        self.fusion = Fusion(level, channels, first_col)
        self.blocks = nn.Sequential(
            *[ConvNextBlock(dim, 4 * dim, dim, kernel_size, _LAYER_SCALE_INIT, dp_rates[start + j]) for j in range(layers[level])]
        )

    def forward(self, c_down: torch.Tensor, c_up: torch.Tensor | None) -> torch.Tensor:
        return self.blocks(self.fusion(c_down, c_up))


class SubNet(nn.Module):
    """One column: reversible-connection scales ``alpha0..3`` of shape ``(1, C, 1, 1)``, then ``level0..3``."""

    def __init__(self, channels: Sequence[int], layers: Sequence[int], kernel_size: int, first_col: bool, dp_rates: Sequence[float]) -> None:
        super().__init__()
        self.first_col = first_col
        for i in range(_LEVELS):
            self.register_parameter(f"alpha{i}", nn.Parameter(torch.full((1, channels[i], 1, 1), _ALPHA_INIT)))
        for i in range(_LEVELS):
            self.add_module(f"level{i}", Level(i, channels, layers, kernel_size, first_col, dp_rates))

    def forward(self, x: torch.Tensor, prev: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        """``x``: the stem's map; ``prev``: the previous column's ``(c0, c1, c2, c3)`` (None for the first column)."""
        outs: list[torch.Tensor] = []
        below = x
        for i in range(_LEVELS):
            above = prev[i + 1] if prev is not None and i < _LEVELS - 1 else None
            c = getattr(self, f"level{i}")(below, above)
            if prev is not None:  # the first column's shortcut is alpha * 0 in the reference: no change
                c = _clamped(getattr(self, f"alpha{i}")) * prev[i] + c
            outs.append(c)
            below = c
        return tuple(outs)


class _Head(nn.Module):
    """The reference's ``Classifier``: global average pool, ``nn.LayerNorm``, ``Linear`` (``classifier.0/1``)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.LayerNorm(in_channels, eps=_EPS), nn.Linear(in_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(x).flatten(1))


class Decoder(nn.Module):
    """Intermediate-supervision image decoder (training only): three times 1x1 conv + LayerNorm + GELU, 2x
    bilinear upsampling (``align_corners=True``) and ``depth[i]`` 1x-MLP blocks, from stride 32 to 4, then a
    1x1 conv to 48 channels and ``PixelShuffle(4)`` (an RGB image). ``dim`` lists the widths coarse to fine."""

    def __init__(self, depth: Sequence[int], dim: Sequence[int], kernel_size: int = 3) -> None:
        super().__init__()
        self.depth = list(depth)
        self.dim = list(dim)
        self.normal_layers = nn.ModuleList()
        self.upsample_layers = nn.ModuleList()
        self.proj_layers = nn.ModuleList()
        for i in range(1, len(dim)):
            self.normal_layers.append(nn.Sequential(*[ConvNextBlock(dim[i], dim[i], dim[i], kernel_size) for _ in range(depth[i])]))
            self.upsample_layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))
            self.proj_layers.append(nn.Sequential(nn.Conv2d(dim[i - 1], dim[i], 1, 1), _channels_first_norm(dim[i]), nn.GELU()))
        self.projback = nn.Sequential(nn.Conv2d(dim[-1], 4**2 * 3, kernel_size=1), nn.PixelShuffle(4))

    def forward(self, c3: torch.Tensor) -> torch.Tensor:
        x = c3
        for proj, up, blocks in zip(self.proj_layers, self.upsample_layers, self.normal_layers):
            x = blocks(up(proj(x)))
        return self.projback(x)


class SimDecoder(nn.Module):
    """The 22K models' decoder (``num_classes > 1000``): LayerNorm, 1x1 conv, ``PixelShuffle(encoder_stride)``."""

    def __init__(self, in_channel: int, encoder_stride: int) -> None:
        super().__init__()
        self.projback = nn.Sequential(
            _channels_first_norm(in_channel),
            nn.Conv2d(in_channel, encoder_stride**2 * 3, kernel_size=1),
            nn.PixelShuffle(encoder_stride),
        )

    def forward(self, c3: torch.Tensor) -> torch.Tensor:
        return self.projback(c3)


def _check_settings(channels: Sequence[int], layers: Sequence[int], num_subnet: int, kernel_size: int) -> tuple[list[int], list[int]]:
    channels, layers = [int(c) for c in channels], [int(n) for n in layers]
    if len(channels) != _LEVELS or len(layers) != _LEVELS:
        raise ValueError(f"RevCol has {_LEVELS} levels; got channels={channels}, layers={layers}")
    if num_subnet < 1:
        raise ValueError(f"num_subnet must be >= 1, got {num_subnet}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    return channels, layers


class _RevColTrunk(nn.Module):
    """``stem`` and the columns ``subnet0..`` shared by :class:`RevCol` and :class:`RevColBackbone` (registered first, as in the reference)."""

    def __init__(self, channels: Sequence[int], layers: Sequence[int], num_subnet: int, kernel_size: int, drop_path_rate: float, in_chans: int = 3) -> None:
        super().__init__()
        channels, layers = _check_settings(channels, layers, num_subnet, kernel_size)
        self.channels = channels
        self.layers = layers
        self.num_subnet = int(num_subnet)
        self.kernel_size = int(kernel_size)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, channels[0], kernel_size=4, stride=4), _channels_first_norm(channels[0]))
        rates = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()  # as the reference; meta-safe
        for i in range(self.num_subnet):
            self.add_module(f"subnet{i}", SubNet(channels, layers, kernel_size, i == 0, rates))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h, w = x.shape[-2:]
        if self.num_subnet > 1 and (h % 8 or w % 8):
            # Otherwise a column's upsampled coarser levels would not line up with its finer ones.
            raise ValueError(
                f"RevCol needs input height and width whose stride-4 maps (floor(size / 4)) are divisible by 8 "
                f"(multiples of 32 always are); the stride-4 map is {h}x{w}"
            )
        return x

    def forward_columns(self, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """``(c0, c1, c2, c3)`` after each column."""
        x = self._stem(x)
        outs: list[tuple[torch.Tensor, ...]] = []
        prev = None
        for i in range(self.num_subnet):
            prev = getattr(self, f"subnet{i}")(x, prev)
            outs.append(prev)
        return outs

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The last column's ``(c0, c1, c2, c3)`` at strides 4, 8, 16, 32 with ``channels`` channels."""
        x = self._stem(x)
        prev = None
        for i in range(self.num_subnet):
            prev = getattr(self, f"subnet{i}")(x, prev)
        return prev


class RevCol(_RevColTrunk):
    """RevCol image classifier (the reference's ``models/revcol.py::FullNet``), plain-autograd forward.

    Args:
        channels, layers: widths and block counts of the four levels.
        num_subnet: number of columns; with ``inter_supv`` a multiple of 4 (a head every ``num_subnet // 4`` columns).
        kernel_size: depthwise kernel of the columns' blocks (the decoders' blocks always use 3).
        num_classes: classes; above 1000 the decoders are the 22K models' ``SimDecoder`` s.
        drop_path_rate: the reference's ``drop_path``.
        inter_supv: build four heads ``cls_blocks`` and three decoders ``decoder_blocks`` (the released
            checkpoints' layout); otherwise one head ``cls``.
        head_init_scale: scales the initial weights of ``cls`` (only without ``inter_supv``, as in the reference).

    ``forward`` in eval mode returns ``(N, num_classes)`` logits of the last head on the last column
    (what the reference evaluates). In training mode it returns the reference's pair
    ``(logits, images)``: with ``inter_supv`` one logit tensor per head (columns ``k * num_subnet // 4``)
    and one ``(N, 3, H, W)`` reconstruction per decoder (the first three heads' columns); without,
    ``([logits], [])``. ``features`` returns the last column's four maps.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 96, 128),
        layers: Sequence[int] = (2, 3, 6, 3),
        num_subnet: int = 5,
        kernel_size: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        inter_supv: bool = True,
        head_init_scale: float | None = None,
        in_chans: int = 3,
    ) -> None:
        if inter_supv and num_subnet % 4:
            raise ValueError(f"intermediate supervision (inter_supv=True) needs num_subnet to be a multiple of 4, got {num_subnet}")
        super().__init__(channels, layers, num_subnet, kernel_size, drop_path_rate, in_chans)
        self.inter_supv = bool(inter_supv)
        self.num_classes = int(num_classes)
        top = self.channels[-1]
        if not inter_supv:
            self.cls = _Head(top, num_classes)
        else:
            self.cls_blocks = nn.ModuleList([_Head(top, num_classes) for _ in range(4)])
            if num_classes <= 1000:
                coarse_to_fine = self.channels[::-1]
                self.decoder_blocks = nn.ModuleList([Decoder(depth=[1, 1, 1, 1], dim=coarse_to_fine, kernel_size=3) for _ in range(3)])
            else:
                self.decoder_blocks = nn.ModuleList([SimDecoder(in_channel=top, encoder_stride=32) for _ in range(3)])
        self.apply(self._init_weights)
        if head_init_scale:
            if inter_supv:
                raise ValueError("head_init_scale applies to the single head 'cls' (inter_supv=False), as in the reference")
            with torch.no_grad():
                self.cls.classifier[1].weight.mul_(head_init_scale)
                self.cls.classifier[1].bias.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @property
    def head(self) -> _Head:
        """The head inference uses: ``cls_blocks[3]`` (or ``cls``)."""
        return self.cls_blocks[-1] if self.inter_supv else self.cls

    def forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[-1])

    def forward_training(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        columns = self.forward_columns(x)
        if not self.inter_supv:
            return [self.cls(columns[-1][-1])], []
        interval = self.num_subnet // 4
        logits, images = [], []
        for i, feats in enumerate(columns):
            if (i + 1) % interval == 0:
                logits.append(self.cls_blocks[i // interval](feats[-1]))
                if i != self.num_subnet - 1:
                    images.append(self.decoder_blocks[i // interval](feats[-1]))
        return logits, images

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.forward_training(x) if self.training else self.forward_inference(x)


class RevColBackbone(_RevColTrunk):
    """RevCol detection backbone (the reference's ``Detection/mmdet/models/backbones/revcol.py::RevCol``).

    Args:
        channels, layers, num_subnet, kernel_size: as :class:`RevCol`.
        drop_path_rate: the reference's ``drop_path``.
        out_indices: recorded only; the reference returns all four levels whatever it says (its
            detection configs all use ``[0, 1, 2, 3]``).

    ``forward(x)`` returns the last column's ``(c0, c1, c2, c3)``, ``(N, channels[l], H / 2**(l+2), W / 2**(l+2))``
    (sizes floored from ``floor(H / 4)``), without output norms; ``out_channels == channels``. State-dict
    keys equal the reference module's (a detector checkpoint's ``backbone.*`` keys without the prefix).
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 96, 128),
        layers: Sequence[int] = (2, 3, 6, 3),
        num_subnet: int = 5,
        kernel_size: int = 3,
        drop_path_rate: float = 0.0,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        in_chans: int = 3,
    ) -> None:
        out_indices = [int(i) for i in out_indices]
        if any(i not in range(_LEVELS) for i in out_indices) or len(set(out_indices)) != len(out_indices):
            raise ValueError(f"out_indices must be distinct level indices in 0..3, got {out_indices}")
        super().__init__(channels, layers, num_subnet, kernel_size, drop_path_rate, in_chans)
        self.out_indices = tuple(out_indices)
        self.out_channels = list(self.channels)  # every level is returned
        self.strides = (4, 8, 16, 32)
        self.init_weights()

    def init_weights(self) -> None:
        """The reference's from-scratch initialisation: truncated-normal (std 0.02) ``Linear`` weights, zero biases,
        ``nn.LayerNorm`` at 1/0; convolutions keep PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.features(x))


# ---------------------------------------------------------------------------------------------
# variants


REVCOL_VARIANTS: dict[str, dict] = {
    # Detection/configs/revcol/cascade_mask_rcnn_revcol_{tiny,small,base}_3x_in1k.py (the classifiers in
    # models/revcol.py have the same channels/layers/num_subnet, and drop_path 0.1/0.3/0.4)
    "revcol_tiny": dict(channels=(64, 128, 256, 512), layers=(2, 2, 4, 2), num_subnet=4, kernel_size=3, drop_path_rate=0.3),
    "revcol_small": dict(channels=(64, 128, 256, 512), layers=(2, 2, 4, 2), num_subnet=8, kernel_size=3, drop_path_rate=0.4),
    "revcol_base": dict(channels=(72, 144, 288, 576), layers=(1, 1, 3, 2), num_subnet=16, kernel_size=3, drop_path_rate=0.4),
}

# The reference's ImageNet training drop-path rates (models/revcol.py defaults, configs/revcol_*_1k.yaml).
_CLASSIFIER_DROP_PATH = {"revcol_tiny": 0.1, "revcol_small": 0.3, "revcol_base": 0.4}

# A tiny detection backbone for fast tests (forward + backward at 64x64 in milliseconds on a CPU).
TINY_REVCOL: dict = dict(channels=(8, 12, 16, 20), layers=(1, 1, 1, 1), num_subnet=2, kernel_size=3, drop_path_rate=0.0)


def _variant(name: str) -> dict:
    if name not in REVCOL_VARIANTS:
        raise ValueError(f"unknown RevCol variant {name!r}; known: {', '.join(REVCOL_VARIANTS)}")
    return dict(REVCOL_VARIANTS[name])


def _classifier(name: str, kwargs: dict) -> RevCol:
    cfg = {k: v for k, v in _variant(name).items() if k != "drop_path_rate"}
    return RevCol(**{**cfg, "drop_path_rate": _CLASSIFIER_DROP_PATH[name], **kwargs})


def revcol_tiny(**kwargs) -> RevCol:
    """RevCol-T classifier (4 columns, channels 64..512, layers 2/2/4/2); kwargs override (drop_path_rate defaults to 0.1).
    Loads ``revcol_tiny_1k.pth``'s ``["model"]`` strict."""
    return _classifier("revcol_tiny", kwargs)


def revcol_small(**kwargs) -> RevCol:
    """RevCol-S classifier (8 columns, channels 64..512, layers 2/2/4/2); drop_path_rate defaults to 0.3.
    Loads ``revcol_small_1k.pth``'s ``["model"]`` strict."""
    return _classifier("revcol_small", kwargs)


def revcol_base(**kwargs) -> RevCol:
    """RevCol-B classifier (16 columns, channels 72..576, layers 1/1/3/2); drop_path_rate defaults to 0.4.
    Loads ``revcol_base_1k.pth``'s ``["model"]`` strict."""
    return _classifier("revcol_base", kwargs)


def _backbone(name: str, kwargs: dict) -> RevColBackbone:
    return RevColBackbone(**{**_variant(name), "out_indices": (0, 1, 2, 3), **kwargs})


def revcol_tiny_backbone(**kwargs) -> RevColBackbone:
    """RevCol-T detection backbone; keyword arguments override (``out_indices`` defaults to (0, 1, 2, 3), as the reference's configs)."""
    return _backbone("revcol_tiny", kwargs)


def revcol_small_backbone(**kwargs) -> RevColBackbone:
    """RevCol-S detection backbone; ``out_indices`` defaults to (0, 1, 2, 3)."""
    return _backbone("revcol_small", kwargs)


def revcol_base_backbone(**kwargs) -> RevColBackbone:
    """RevCol-B detection backbone; ``out_indices`` defaults to (0, 1, 2, 3)."""
    return _backbone("revcol_base", kwargs)


# ---------------------------------------------------------------------------------------------
# recognising detector checkpoints

_SIGNATURE = "backbone.subnet0.level0.blocks.0.dwconv.weight"
_PREFIX = "backbone."


def is_revcol_checkpoint(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when the state dict's backbone is a RevCol (it has columns ``backbone.subnet{i}.level{l}.*``)."""
    return _SIGNATURE in sd and f"{_PREFIX}subnet0.alpha0" in sd


def _count(keys, pattern: str) -> int:
    """1 + the largest ``N`` for which a key matches ``pattern`` (a regex with one ``(\\d+)`` group) at its start; 0 if none."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def recognise(sd: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
    """``(f"retinanet_{variant}", options)`` for an mmdetection RetinaNet state dict with a RevCol backbone.

    The variant is read from the backbone's layout (channels from ``subnet0.alpha{l}``, blocks per level,
    columns, depthwise kernel size). ``options`` is always ``{}``: a RevCol backbone has nothing the keys
    could vary beyond the variant (no output norms; ``out_indices`` changes nothing). Raises
    :class:`CheckpointError` when the layout matches none of RevCol-T/S/B.
    """
    if not is_revcol_checkpoint(sd):
        raise CheckpointError("The checkpoint's backbone has no RevCol columns (no backbone.subnet0.level0 weights).")
    keys = [k[len(_PREFIX):] for k in sd if k.startswith(_PREFIX)]
    try:
        channels = [int(sd[f"{_PREFIX}subnet0.alpha{i}"].shape[1]) for i in range(_LEVELS)]
        kernel = int(sd[_SIGNATURE].shape[-1])
    except KeyError as err:  # a tensor of another shape is named by the caller (mmdet.recognise)
        raise CheckpointError(f"The checkpoint's RevCol backbone is incomplete (missing {err}).") from None
    layers = [_count(keys, rf"subnet0\.level{i}\.blocks\.(\d+)\.") for i in range(_LEVELS)]
    columns = _count(keys, r"subnet(\d+)\.")
    layout = dict(channels=channels, layers=layers, num_subnet=columns, kernel_size=kernel)
    for variant, settings in REVCOL_VARIANTS.items():
        wanted = dict(
            channels=list(settings["channels"]), layers=list(settings["layers"]), num_subnet=settings["num_subnet"], kernel_size=settings["kernel_size"]
        )
        if layout == wanted:
            return f"retinanet_{variant}", {}
    raise CheckpointError(
        f"The checkpoint's RevCol backbone (channels {channels}, layers {layers}, {columns} columns, kernel {kernel}) "
        f"matches none of RevCol-T/S/B."
    )
