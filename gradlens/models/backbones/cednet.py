"""CEDNet (cascade encoder-decoder network) in plain PyTorch: the NeXt variants and the fork's ResNet, Swin and CSwin ones.

The reference implementation (github.com/zhanggang001/CEDNet) builds its modules through mmcv's
norm registry and timm, and picks block types, activation and layer-scale value through
module-level globals that each constructor overwrites. This module rebuilds the ImageNet network
(``models/cednet.py``, class ``CEDNet``) and the detection backbone
(``ced-mmdet/mmdet/models/backbones/cednet.py``, class ``CEDNetWrapper``) without either
dependency. Attribute names, registration order and tensor shapes are the reference's on purpose:
released checkpoints then load with ``load_state_dict(strict=True)`` without a renaming table
(detector checkpoints after stripping the ``backbone.`` prefix), and eval outputs equal the
reference's for the same weights and input (the test-suite checks both against tensors produced
by the reference code, ``scripts/make_cednet_reference.py``).

Architecture, briefly: a stride-4 stem and a "p2" stage (``p2_block`` blocks, then a stride-2
patch merge) produce a stride-8 map ``c3``. Each of ``num_stages`` stages is an encoder (three
levels at strides 8/16/32; the stride-32 level uses dilated ``DNeXtBlock`` s) followed, except in
the last stage, by a top-down decoder. The next stage's encoder starts again from the decoder's
``c3``. The classifier reads the last stage's ``c5``; the detection backbone projects the last
stage's three maps to ``out_chans`` channels and appends stride-2 convolutions (``add_blocks``)
instead of an FPN.

Behaviour that is the reference's, kept on purpose (it changes outputs or names):

* with LN, every norm on a map is the channels-first ``LayerNorm`` of :mod:`gradlens.models.backbones.layers`
  (hand-computed mean / biased variance, ``eps=1e-6``) and the transformer blocks' token norms its
  channels-last form; only the classifier's ``norms`` (on pooled ``(N, 2048)`` vectors) are ``nn.LayerNorm``;
* ``Encoder`` given a tuple uses only its first element (the decoder's ``c4``/``c5`` reach the next
  stage only through ``c3``); ``EncoderFPN`` adds the tuple's second and third maps after each
  downsampling;
* with ``Decoder``/``DecoderFPN`` every block of a stage is in its encoder; with
  ``DecoderUNet``/``DecoderHourglass`` the stride-8 and stride-16 blocks are split in half between
  encoder (floor) and decoder (rest); the last stage has no decoder (``CEDNetBackbone`` can add one
  with ``last_decoder=True``), so its decoder blocks do not exist;
* drop-path rates are ``linspace(0, drop_path_rate)`` over p2 + all stage blocks; inside the
  UNet/Hourglass decoders the second level reuses the first level's rates (the reference indexes
  both from offset 0) and the Hourglass ``lateral`` blocks have none. Rates only matter in training;
* in eval mode the classifier uses only ``final_layers[-1]``, ``norms[-1]`` and ``heads[-1]``; in
  training mode it returns one logit tensor per stage (deep supervision);
* the head width (2048) and the stem's first width (32) are fixed, as in the reference.

Every block type of the reference is implemented: ``NeXtBlock``/``DNeXtBlock`` (CEDNet-NeXt),
``Bottleneck``/``DBottleneck`` (CED-ResNet: bias-free convolutions, batch norm for the configs' SyncBN, ReLU),
``SwinBlock``/``DSwinBlock`` (CED-Swin: 7x7 windows, ``dim // 32`` heads, shifted at odd ``widx``) and
``CSwinBlock`` under ``CSwinEncoder`` (CED-CSwin; the stride-32 level attends over the whole map). What each
layer's norm, activation and layer scale are is the :class:`Style` that ``norm_cfg``, ``act_type`` and
``layer_scale_init_value`` give, as mmcv's registry and the reference's globals decide them; combinations the
reference cannot build (CSwin blocks outside ``CSwinEncoder``, Swin blocks with batch norm) raise ``ValueError``.
The reference's other detection wrappers are :class:`CEDNetTwoStageBackbone` (``CEDNetWrapperTwoStage``, which adds a
stride-4 output for the Mask R-CNN configs) and :class:`CEDNetMask2FormerBackbone` (``CEDNetWrapperMask2Former``: the
raw c2..c5 maps); the Deformable DETR configs use ``CEDNetWrapper`` itself with one added block.
Drop path is ``torchvision.ops.StochasticDepth(p, "row")``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from gradlens.models.backbones.layers import LayerNorm
from gradlens.models.backbones.swin import WindowAttention, shifted_window_attention
from gradlens.models.backbones.upsample import Upsample2x

BlockFactory = Callable[..., nn.Module]  # (channels, drop-path rate, widx=...) -> block

__all__ = [
    "CEDNET_VARIANTS",
    "CEDNet",
    "CEDNetBackbone",
    "DNeXtBlock",
    "NeXtBlock",
    "cednet_backbone",
    "cednet_next_base",
    "cednet_next_small",
    "cednet_next_tiny",
    "cednet_next_tiny_fpn",
    "cednet_next_tiny_hourglass",
    "cednet_next_tiny_unet",
]

_STEM_WIDTH = 32  # first stem conv, fixed in the reference
_HEAD_WIDTH = 2048  # classifier's 1x1 conv, fixed in the reference
_FOCAL_DILATION = 3
_SWIN_WINDOW = 7  # the reference's SwinBlock default; its configs never change it
_SWIN_HEAD_DIM = 32  # the reference's SwinBlock has dim // 32 heads
_CSWIN_LEVELS = ((4, 2), (8, 7), (10, 7))  # CSwinEncoder's (num_heads, split_size) per level, its defaults
_CSWIN_P2 = (2, 1)  # CSwinBlock's own defaults, which the p2 stage gets


@dataclass(frozen=True)
class Style:
    """What the reference decides for every layer through ``norm_cfg``, ``act_type`` and
    ``layer_scale_init_value`` (mmcv's norm registry and its module-level globals).

    ``norm`` is ``"LN"`` (the channels-first :class:`LayerNorm`) or ``"BN"`` (mmcv's ``SyncBN``/``BN``:
    batch norm, which a detector runs in eval mode on its running statistics); the transformer blocks
    normalise their tokens with the same ``norm_cfg`` in channels-last format, which only LN has.
    """

    norm: str = "LN"
    eps: float = 1e-6
    act: type[nn.Module] = nn.GELU
    layer_scale: float = 1e-6

    def map_norm(self, dim: int) -> nn.Module:
        if self.norm == "BN":
            return nn.BatchNorm2d(dim, eps=self.eps)
        return LayerNorm(dim, eps=self.eps, data_format="channels_first")

    def token_norm(self, dim: int) -> LayerNorm:
        if self.norm != "LN":
            raise ValueError("CEDNet's Swin and CSwin blocks need norm_cfg type 'LN' (they normalise tokens channels-last)")
        return LayerNorm(dim, eps=self.eps, data_format="channels_last")


_NEXT = Style()


def _drop_path(p: float) -> nn.Module:
    return StochasticDepth(p, "row") if p > 0 else nn.Identity()


def _conv_norm(c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, style: Style) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size, stride, padding), style.map_norm(c_out))


def _layer_scale(dim: int, value: float) -> nn.Parameter | None:
    # Absent (no state-dict entry) when disabled, as in the reference.
    return nn.Parameter(torch.full((dim,), float(value))) if value > 0 else None


def _focal_dwconv(dim: int, dilation: int) -> nn.Conv2d:
    """The focal blocks' dilated depthwise 7x7 convolution (with bias)."""
    return nn.Conv2d(dim, dim, kernel_size=7, padding=3 * dilation, dilation=dilation, groups=dim)


class _PointwiseMLP(nn.Module):
    """The tail both NeXt blocks share (``pwconv1``, ``act``, ``pwconv2``, ``gamma``, registered by each
    block in the reference's order): 4x MLP over channels, run channels-last as ``nn.Linear``, then layer scale."""

    def _mlp(self, y: torch.Tensor) -> torch.Tensor:
        y = y.permute(0, 2, 3, 1)  # N C H W -> N H W C
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma * y
        return y.permute(0, 3, 1, 2)


class NeXtBlock(_PointwiseMLP):
    """ConvNeXt block: depthwise 7x7, norm, 4x pointwise MLP, layer scale, residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, style: Style = _NEXT, **_level) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = style.map_norm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = style.act()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = _layer_scale(dim, style.layer_scale)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self._mlp(self.norm(self.dwconv(x))))


class DNeXtBlock(_PointwiseMLP):
    """The "focal" block of the stride-32 level: two residual depthwise 7x7 convs (the second dilated
    by ``dilation`` for a larger receptive field), each with norm and activation, then the NeXt MLP."""

    def __init__(self, dim: int, drop_path: float = 0.0, style: Style = _NEXT, dilation: int = _FOCAL_DILATION, **_level) -> None:
        super().__init__()
        self.dwconv1 = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim), style.map_norm(dim), style.act())
        self.dwconv2 = nn.Sequential(_focal_dwconv(dim, dilation), style.map_norm(dim), style.act())
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = style.act()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = _layer_scale(dim, style.layer_scale)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv1(x) + x
        y = self.dwconv2(y) + y
        return x + self.drop_path(self._mlp(y))


def _conv_norm_act(c_in: int, c_out: int, kernel_size: int, style: Style, act: bool = True) -> nn.Sequential:
    """A bias-free convolution (mmcv's ``build_conv_layer(None, ..., bias=False)``), norm and activation."""
    layers = [nn.Conv2d(c_in, c_out, kernel_size, 1, kernel_size // 2, bias=False), style.map_norm(c_out)]
    return nn.Sequential(*layers, style.act()) if act else nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """CED-ResNet's block: 3x3 conv, 1x1 expansion to 4x, 1x1 back (each with norm), residual, activation after the sum."""

    def __init__(self, dim: int, drop_path: float = 0.0, style: Style = _NEXT, **_level) -> None:
        super().__init__()
        self.conv1 = _conv_norm_act(dim, dim, 3, style)
        self.conv2 = _conv_norm_act(dim, 4 * dim, 1, style)
        self.conv3 = _conv_norm_act(4 * dim, dim, 1, style, act=False)
        self.act = style.act()
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop_path(self.conv3(self.conv2(self.conv1(x)))) + x)


class DBottleneck(nn.Module):
    """CED-ResNet's focal block: a residual 3x3 conv and a residual dilated depthwise 7x7 before the bottleneck's 1x1 pair."""

    def __init__(self, dim: int, drop_path: float = 0.0, style: Style = _NEXT, dilation: int = _FOCAL_DILATION, **_level) -> None:
        super().__init__()
        self.conv1 = _conv_norm_act(dim, dim, 3, style)
        self.dwconv1 = nn.Sequential(_focal_dwconv(dim, dilation), style.map_norm(dim), style.act())
        self.conv2 = _conv_norm_act(dim, 4 * dim, 1, style)
        self.conv3 = _conv_norm_act(4 * dim, dim, 1, style, act=False)
        self.act = style.act()
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x) + x
        y = self.dwconv1(y) + y
        return self.act(self.drop_path(self.conv3(self.conv2(y))) + x)


class _TokenMLP(nn.Module):
    """The transformer blocks' tail (``norm2``, ``pwconv1``, ``act``, ``pwconv2``): residual 4x MLP on ``(..., C)`` tokens."""

    def _mlp_residual(self, t: torch.Tensor) -> torch.Tensor:
        return t + self.drop_path(self.pwconv2(self.act(self.pwconv1(self.norm2(t)))))


class SwinBlock(_TokenMLP):
    """CED-Swin's block on a channels-first map: (shifted) 7x7-window attention with ``dim // 32`` heads, then the MLP.

    Odd ``widx`` (the block's index within its run) shifts the windows by half a window, as the reference does."""

    def __init__(self, dim: int, drop_path: float = 0.0, style: Style = _NEXT, widx: int = 0, **_level) -> None:
        super().__init__()
        self.window_size = _SWIN_WINDOW
        self.shift_size = (0, _SWIN_WINDOW // 2)[widx % 2]
        self.norm1 = style.token_norm(dim)
        self.attn = WindowAttention(dim, _SWIN_WINDOW, max(dim // _SWIN_HEAD_DIM, 1))
        self.norm2 = style.token_norm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = style.act()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = _drop_path(drop_path)

    def _attention(self, t: torch.Tensor) -> torch.Tensor:
        return shifted_window_attention(self.attn, t, self.window_size, self.shift_size)

    def _mix(self, t: torch.Tensor) -> torch.Tensor:
        return self._attention(self.norm1(t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.permute(0, 2, 3, 1)  # N C H W -> N H W C
        t = t + self.drop_path(self._mix(t))
        return self._mlp_residual(t).permute(0, 3, 1, 2)


class DSwinBlock(SwinBlock):
    """CED-Swin's focal block: the window attention's output (normed, activated) and a dilated depthwise 7x7
    (normed, activated) are each added residually to the normed tokens before the block's own residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, style: Style = _NEXT, widx: int = 0, dilation: int = _FOCAL_DILATION,
                 **_level) -> None:
        super().__init__(dim, drop_path, style, widx)
        self.norm_act1 = nn.Sequential(style.token_norm(dim), style.act())
        self.dwconv2 = _focal_dwconv(dim, dilation)
        self.norm_act2 = nn.Sequential(style.token_norm(dim), style.act())

    def _mix(self, t: torch.Tensor) -> torch.Tensor:
        y = self.norm1(t)
        y = self.norm_act1(self._attention(y)) + y
        return self.norm_act2(self.dwconv2(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)) + y


class CSwinBlock(_TokenMLP):
    """CED-CSwin's block: cross-shaped window attention (half the channels in horizontal stripes of height
    ``split_size``, half in vertical ones) or, with ``dilation > 1`` (the focal level), one attention over the
    whole map; then the MLP."""

    def __init__(self, dim: int, drop_path: float = 0.0, style: Style = _NEXT, num_heads: int = _CSWIN_P2[0],
                 split_size: int = _CSWIN_P2[1], dilation: int = 1, **_level) -> None:
        super().__init__()
        from gradlens.models.backbones.cswin import LePEAttention

        self.norm1 = style.token_norm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if dilation > 1:
            self.attns = nn.ModuleList([LePEAttention(dim, idx=-1, split_size=split_size, num_heads=num_heads)])
        else:
            self.attns = nn.ModuleList(
                [LePEAttention(dim // 2, idx=i, split_size=split_size, num_heads=num_heads // 2) for i in range(2)])
        self.norm2 = style.token_norm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = style.act()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.reshape(b, c, h * w).transpose(1, 2)  # B, HW, C
        qkv = self.qkv(self.norm1(t)).reshape(b, h * w, 3, c).permute(2, 0, 3, 1)  # 3, B, C, HW
        width = c // len(self.attns)
        parts = []
        for i, attn in enumerate(self.attns):
            q, k, v = qkv[:, :, i * width:(i + 1) * width].reshape(3, b, width, h, w).unbind(0)
            parts.append(attn(q, k, v))
        t = t + self.drop_path(self.proj(torch.cat(parts, dim=2)))
        return self._mlp_residual(t).transpose(1, 2).reshape(b, c, h, w)


_BLOCK_TYPES: dict[str, type[nn.Module]] = {
    "NeXtBlock": NeXtBlock, "DNeXtBlock": DNeXtBlock, "Bottleneck": Bottleneck, "DBottleneck": DBottleneck,
    "SwinBlock": SwinBlock, "DSwinBlock": DSwinBlock, "CSwinBlock": CSwinBlock,
}
_FOCAL_BLOCKS = ("DNeXtBlock", "DBottleneck", "DSwinBlock", "CSwinBlock")  # take ``dilation``


def _run_blocks(factory: BlockFactory, dim: int, count: int, rates: Sequence[float], start: int = 0) -> nn.Sequential:
    """``count`` blocks of ``dim`` channels with drop-path rates ``rates[start:start + count]``; the index within the
    run is the block's ``widx`` (Swin blocks alternate their window shift with it)."""
    return nn.Sequential(*[factory(dim, rates[start + i], widx=i) for i in range(count)])


# ---------------------------------------------------------------------------------------------
# Encoders and decoders: one stage is an encoder (strides 8 -> 16 -> 32) plus a top-down decoder.
# ---------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Bottom-up half of a stage: blocks at stride 8, patch merge, blocks at 16, merge, focal blocks at 32.

    ``blocks`` gives the block count per level and ``dp_rates`` their drop-path rates, level after
    level. A tuple input (a previous stage's ``(c3, c4, c5)``) contributes only ``c3``.
    """

    def __init__(
        self,
        dims: Sequence[int],
        blocks: Sequence[int],
        dp_rates: Sequence[float],
        base: BlockFactory,
        focal: BlockFactory,
        style: Style,
    ) -> None:
        super().__init__()
        n0, n1, n2 = blocks
        level = self._level_blocks(base, focal)
        self.encoder = nn.ModuleList(
            [
                _run_blocks(level[0], dims[0], n0, dp_rates),
                _run_blocks(level[1], dims[1], n1, dp_rates, start=n0),
                _run_blocks(level[2], dims[2], n2, dp_rates, start=n0 + n1),
            ]
        )
        self.encoder_downsample = nn.ModuleList(
            [_conv_norm(dims[0], dims[1], 2, 2, 0, style), _conv_norm(dims[1], dims[2], 2, 2, 0, style)]
        )

    @staticmethod
    def _level_blocks(base: BlockFactory, focal: BlockFactory) -> tuple[BlockFactory, BlockFactory, BlockFactory]:
        return base, base, partial(focal, dilation=_FOCAL_DILATION)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(x, tuple):
            x = x[0]
        c3 = self.encoder[0](x)
        c4 = self.encoder[1](self.encoder_downsample[0](c3))
        c5 = self.encoder[2](self.encoder_downsample[1](c4))
        return c3, c4, c5


class EncoderFPN(Encoder):
    """:class:`Encoder` that also adds the previous stage's ``c4`` and ``c5`` after each downsampling."""

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(x, tuple):
            return super().forward(x)
        c3 = self.encoder[0](x[0])
        c4 = self.encoder[1](x[1] + self.encoder_downsample[0](c3))
        c5 = self.encoder[2](x[2] + self.encoder_downsample[1](c4))
        return c3, c4, c5


class CSwinEncoder(Encoder):
    """:class:`Encoder` of CED-CSwin: its levels' blocks get (heads, stripe width) (4, 2), (8, 7) and (10, 7), the
    reference's defaults, which its configs never change; the focal level's block attends over the whole map."""

    @staticmethod
    def _level_blocks(base: BlockFactory, focal: BlockFactory) -> tuple[BlockFactory, BlockFactory, BlockFactory]:
        (h0, s0), (h1, s1), (h2, s2) = _CSWIN_LEVELS
        return (partial(base, num_heads=h0, split_size=s0), partial(base, num_heads=h1, split_size=s1),
                partial(focal, num_heads=h2, split_size=s2, dilation=_FOCAL_DILATION))


class _TopDown(nn.Module):
    """What all decoders share: 1x1 conv + 2x bilinear upsampling of the coarser map, added to the
    finer one, then LayerNorm (``decoder_upsample[i]`` / ``decoder_norm[i]``; i=0 is 32->16, i=1 is 16->8)."""

    def __init__(self, dims: Sequence[int], style: Style) -> None:
        super().__init__()
        self.decoder_upsample = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(dims[2], dims[1], 1), Upsample2x()),
                nn.Sequential(nn.Conv2d(dims[1], dims[0], 1), Upsample2x()),
            ]
        )
        self.decoder_norm = nn.Sequential(style.map_norm(dims[1]), style.map_norm(dims[0]))

    def _merge(self, level: int, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return self.decoder_norm[level](fine + self.decoder_upsample[level](coarse))


class Decoder(_TopDown):
    """Top-down path only (no blocks): ``c4 <- norm(c4 + up(c5))``, ``c3 <- norm(c3 + up(c4))``."""

    def __init__(self, dims: Sequence[int], style: Style, **_unused) -> None:
        super().__init__(dims, style)

    def forward(self, x: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3, c4, c5 = x
        c4 = self._merge(0, c4, c5)
        c3 = self._merge(1, c3, c4)
        return c3, c4, c5


class DecoderFPN(_TopDown):
    """:class:`Decoder` followed by a 3x3 conv + LayerNorm on each of the three maps (FPN-style output convs)."""

    def __init__(self, dims: Sequence[int], style: Style, **_unused) -> None:
        super().__init__(dims, style)
        self.decoder_conv = nn.Sequential(*[_conv_norm(d, d, 3, 1, 1, style) for d in dims])

    def forward(self, x: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3, c4, c5 = x
        c4 = self._merge(0, c4, c5)
        c3 = self._merge(1, c3, c4)
        return self.decoder_conv[0](c3), self.decoder_conv[1](c4), self.decoder_conv[2](c5)


def _decoder_levels(dims: Sequence[int], blocks: Sequence[int], dp_rates: Sequence[float], base: BlockFactory) -> nn.Sequential:
    # The reference offsets both levels' rates by cum_sum[0] == 0, so level 1 reuses level 0's rates.
    return nn.Sequential(_run_blocks(base, dims[1], blocks[0], dp_rates), _run_blocks(base, dims[0], blocks[1], dp_rates))


class DecoderUNet(_TopDown):
    """Top-down path with blocks after each merge: ``blocks[0]`` at stride 16, ``blocks[1]`` at stride 8."""

    def __init__(self, dims: Sequence[int], blocks: Sequence[int], dp_rates: Sequence[float], base: BlockFactory, style: Style, **_unused) -> None:
        super().__init__(dims, style)
        self.decoder = _decoder_levels(dims, blocks, dp_rates, base)

    def forward(self, x: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3, c4, c5 = x
        c4 = self.decoder[0](self._merge(0, c4, c5))
        c3 = self.decoder[1](self._merge(1, c3, c4))
        return c3, c4, c5


class DecoderHourglass(_TopDown):
    """:class:`DecoderUNet` whose lateral (skip) inputs first pass through one block each (``lateral``)."""

    def __init__(self, dims: Sequence[int], blocks: Sequence[int], dp_rates: Sequence[float], base: BlockFactory, style: Style, **_unused) -> None:
        super().__init__(dims, style)
        self.lateral = nn.Sequential(base(dims[1], 0.0), base(dims[0], 0.0))
        self.decoder = _decoder_levels(dims, blocks, dp_rates, base)

    def forward(self, x: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3, c4, c5 = x
        c4 = self.decoder[0](self._merge(0, self.lateral[0](c4), c5))
        c3 = self.decoder[1](self._merge(1, self.lateral[1](c3), c4))
        return c3, c4, c5


_ENCODERS: dict[str, type[Encoder]] = {"Encoder": Encoder, "EncoderFPN": EncoderFPN, "CSwinEncoder": CSwinEncoder}
_DECODERS: dict[str, type[_TopDown]] = {
    "Decoder": Decoder,
    "DecoderFPN": DecoderFPN,
    "DecoderUNet": DecoderUNet,
    "DecoderHourglass": DecoderHourglass,
}
_ALL_BLOCKS_IN_ENCODER = ("Decoder", "DecoderFPN")  # decoders without blocks


def _choice(kind: str, value: str, table: Mapping[str, object], note: str = "") -> None:
    if value not in table:
        raise ValueError(f"unsupported CEDNet {kind} {value!r}; supported: {', '.join(table)}{note}")


_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


def _style(norm_cfg: Mapping | None, act_type: str, layer_scale_init_value: float) -> Style:
    """The :class:`Style` mmcv's ``build_norm_layer`` and the reference's globals give for these settings.

    ``LN`` must be channels-first (the reference's own ``LayerNorm``); ``SyncBN`` and ``BN`` are batch norm.
    mmcv's ``build_norm_layer`` defaults eps to 1e-5; ``None`` is the NeXt variants' LN with eps 1e-6.
    """
    _choice("act_type", act_type, _ACTIVATIONS)
    if norm_cfg is None:
        return Style(act=_ACTIVATIONS[act_type], layer_scale=float(layer_scale_init_value))
    cfg = dict(norm_cfg)
    kind = cfg.get("type")
    if kind == "LN" and cfg.get("data_format") == "channels_first":
        norm = "LN"
    elif kind in ("SyncBN", "BN", "BN2d"):
        norm = "BN"
    else:
        raise ValueError("unsupported CEDNet norm_cfg: dict(type='LN', data_format='channels_first', eps=...), "
                         f"dict(type='SyncBN') or dict(type='BN') are supported, got {norm_cfg!r}")
    return Style(norm=norm, eps=float(cfg.get("eps", 1e-5)), act=_ACTIVATIONS[act_type], layer_scale=float(layer_scale_init_value))


def _check_blocks(base_block: str, focal_block: str, encoder_type: str, decoder_type: str) -> None:
    """Refuse the combinations the reference cannot build: its CSwin blocks take (heads, stripe width) that only
    ``CSwinEncoder`` passes, and its decoders with blocks would give them a drop-path rate as a head count."""
    _choice("block type", base_block, _BLOCK_TYPES)
    _choice("block type", focal_block, _BLOCK_TYPES)
    _choice("encoder type", encoder_type, _ENCODERS)
    _choice("decoder type", decoder_type, _DECODERS)
    cswin = "CSwinBlock" in (base_block, focal_block)
    if cswin != (encoder_type == "CSwinEncoder") or (cswin and base_block != focal_block):
        raise ValueError("CEDNet's CSwinBlock goes with encoder_type 'CSwinEncoder' as both base and focal block, "
                         f"and that encoder only with it; got {base_block}/{focal_block} with {encoder_type}")
    if cswin and decoder_type not in _ALL_BLOCKS_IN_ENCODER:
        raise ValueError(f"CEDNet's CSwinBlock cannot run in the blocks of a {decoder_type} (the reference passes it no head count)")


class _CEDNetTrunk(nn.Module):
    """Stem, p2 stage and the cascade of encoder-decoder stages (``stem``, ``stages``), shared by
    :class:`CEDNet` and :class:`CEDNetBackbone` so both register these modules first, as the reference does."""

    def __init__(
        self,
        *,
        in_chans: int,
        num_stages: int,
        encoder_type: str,
        decoder_type: str,
        base_block: str,
        focal_block: str,
        p2_dim: int,
        p2_block: int,
        dims: Sequence[int],
        blocks: Sequence[int] | Sequence[Sequence[int]],
        layer_scale_init_value: float,
        drop_path_rate: float,
        norm_cfg: Mapping | None,
        act_type: str,
        last_decoder: bool,
    ) -> None:
        super().__init__()
        _check_blocks(base_block, focal_block, encoder_type, decoder_type)
        style = _style(norm_cfg, act_type, layer_scale_init_value)
        dims = [int(d) for d in dims]
        if len(dims) != 3:
            raise ValueError(f"CEDNet has three levels (strides 8, 16, 32); got dims={dims}")
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        if isinstance(blocks[0], int):
            blocks = [list(blocks) for _ in range(num_stages)]
        blocks = [[int(n) for n in b] for b in blocks]
        if len(blocks) != num_stages or any(len(b) != 3 for b in blocks):
            raise ValueError(f"blocks must be 3 counts, or {num_stages} lists of 3 counts; got {blocks}")

        self.num_stages = num_stages
        self.dims = dims
        self.style = style
        if style.norm == "BN":
            # CED-ResNet (batch norm, ReLU): its float32 input gradient follows the kernels' last bits by whole
            # per cent (pre-activations at round-off distance from zero), as ResNet-50's does, so it runs in
            # contiguous memory on PyTorch's kernels as the fork runs it, whatever the detector's speed mode
            self.needs_contiguous_memory = True
            self.arithmetic_revision = 2  # 2: never channels-last (stores of the speed mode are not reused)
        self.encoder_type, self.decoder_type = encoder_type, decoder_type
        self._has_decoder = num_stages > 1 or last_decoder

        base = partial(_BLOCK_TYPES[base_block], style=style)
        focal = partial(_BLOCK_TYPES[focal_block], style=style)
        if style.norm != "LN" and {base_block, focal_block} & {"SwinBlock", "DSwinBlock", "CSwinBlock"}:
            style.token_norm(1)  # the one-sentence refusal, before any layer is built

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, _STEM_WIDTH, 3, 2, 1),
            style.map_norm(_STEM_WIDTH),
            style.act(),
            nn.Conv2d(_STEM_WIDTH, p2_dim, 3, 2, 1),
            style.map_norm(p2_dim),
            style.act(),
        )

        # One linear drop-path schedule over the p2 blocks and every stage block (decoder blocks included);
        # on the CPU explicitly, so that building under a meta-device context works.
        rates = torch.linspace(0, drop_path_rate, p2_block + sum(map(sum, blocks)), device="cpu").tolist()

        self.stages = nn.ModuleList()
        self.stages.append(nn.Sequential(*_run_blocks(base, p2_dim, p2_block, rates), _conv_norm(p2_dim, dims[0], 2, 2, 0, style)))
        start = p2_block
        for sidx, (n3, n4, n5) in enumerate(blocks):
            stage_rates = rates[start : start + n3 + n4 + n5]
            start += n3 + n4 + n5
            if decoder_type in _ALL_BLOCKS_IN_ENCODER:
                enc_blocks, dec_blocks = [n3, n4, n5], []
            else:  # split stride-8/16 blocks: floor half in the encoder, the rest in the decoder
                enc_blocks, dec_blocks = [n3 // 2, n4 // 2, n5], [n4 - n4 // 2, n3 - n3 // 2]
            n_enc = sum(enc_blocks)
            parts: list[nn.Module] = [_ENCODERS[encoder_type](dims, enc_blocks, stage_rates[:n_enc], base, focal, style)]
            if sidx < num_stages - 1 or last_decoder:
                parts.append(
                    _DECODERS[decoder_type](dims=dims, blocks=dec_blocks, dp_rates=stage_rates[n_enc:], base=base, style=style)
                )
            self.stages.append(nn.Sequential(*parts))

    def _to_stride8(self, x: torch.Tensor) -> torch.Tensor:
        return self._checked_stride8(self.stages[0](self.stem(x)))

    def stride4_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``c2`` (the p2 stage's blocks' output, stride 4, before its downsampling) and the last stage's
        ``(c3, c4, c5)``: what the fork's two-stage and Mask2Former wrappers read."""
        c2 = self.stages[0][:-1](self.stem(x))
        x = self._checked_stride8(self.stages[0][-1](c2))
        for stage in self.stages[1:]:
            x = stage(x)
        return c2, x

    def _checked_stride8(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self._has_decoder and (h % 4 or w % 4):
            # Otherwise a decoder's upsampled coarse maps would not line up with the finer ones.
            raise ValueError(
                f"CEDNet needs input height and width that give stride-8 maps divisible by 4 "
                f"(multiples of 32 always do); the stride-8 map is {h}x{w}"
            )
        return x

    def forward_stages(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(c3, c4, c5)`` after each stage (after its decoder, if it has one)."""
        x = self._to_stride8(x)
        outs = []
        for stage in self.stages[1:]:
            x = stage(x)
            outs.append(x)
        return outs

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last stage's ``(c3, c4, c5)`` at strides 8, 16, 32 with ``dims`` channels."""
        x = self._to_stride8(x)
        for stage in self.stages[1:]:
            x = stage(x)
        return x


class CEDNet(_CEDNetTrunk):
    """CEDNet image classifier (the reference's ``models/cednet.py::CEDNet``, NeXt variants).

    Arguments are the reference's; ``base_block``/``focal_block``, ``norm_cfg`` and ``act_type`` are
    accepted so reference configurations pass through, but only their NeXt / LN / GELU values.

    ``forward`` in eval mode returns ``(N, num_classes)`` logits from the last stage's head; in
    training mode a list with one logit tensor per stage (the reference's deep supervision).
    ``features`` returns the last stage's ``(c3, c4, c5)``.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_stages: int = 3,
        encoder_type: str = "Encoder",
        decoder_type: str = "Decoder",
        base_block: str = "NeXtBlock",
        focal_block: str = "DNeXtBlock",
        p2_dim: int = 96,
        p2_block: int = 3,
        dims: Sequence[int] = (192, 352, 512),
        blocks: Sequence[int] | Sequence[Sequence[int]] = (2, 4, 2),
        layer_scale_init_value: float = 1e-6,
        drop_path_rate: float = 0.1,
        norm_cfg: Mapping | None = None,
        act_type: str = "gelu",
        num_classes: int = 1000,
        head_init_scale: float = 1.0,
    ) -> None:
        super().__init__(
            in_chans=in_chans, num_stages=num_stages, encoder_type=encoder_type, decoder_type=decoder_type,
            base_block=base_block, focal_block=focal_block, p2_dim=p2_dim, p2_block=p2_block, dims=dims, blocks=blocks,
            layer_scale_init_value=layer_scale_init_value, drop_path_rate=drop_path_rate, norm_cfg=norm_cfg,
            act_type=act_type, last_decoder=False,
        )
        style = self.style
        self.num_classes = num_classes
        self.final_layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.heads = nn.ModuleList()
        for _ in range(num_stages):  # one head per stage; eval uses only the last
            self.final_layers.append(nn.Sequential(nn.Conv2d(self.dims[-1], _HEAD_WIDTH, 1, 1, 0), style.map_norm(_HEAD_WIDTH), style.act()))
            self.norms.append(nn.LayerNorm(_HEAD_WIDTH, eps=1e-6))  # plain nn.LayerNorm in the reference too
            self.heads.append(nn.Linear(_HEAD_WIDTH, num_classes))

        self.apply(self._init_weights)
        with torch.no_grad():
            for head in self.heads:
                head.weight.mul_(head_init_scale)
                head.bias.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="linear")
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _logits(self, i: int, c5: torch.Tensor) -> torch.Tensor:
        return self.heads[i](self.norms[i](self.final_layers[i](c5).mean([-2, -1])))

    def forward_training(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self._logits(i, feats[-1]) for i, feats in enumerate(self.forward_stages(x))]

    def forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(-1, self.features(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.forward_training(x) if self.training else self.forward_inference(x)


class CEDNetBackbone(_CEDNetTrunk):
    """CEDNet detection backbone (the reference's ``CEDNetWrapper``; its configs use ``neck=None``).

    Each of the last stage's maps goes through a 1x1 conv + LayerNorm to ``out_chans`` channels
    (``reduce_convs``), then ``num_add_blocks`` stride-2 3x3 conv + LayerNorm layers extend the
    pyramid from the coarsest map (``add_blocks``). ``forward`` returns a tuple of
    ``3 + num_add_blocks`` maps at strides 8, 16, 32, 64, ... (``strides``), all with
    ``out_channels`` channels. ``last_decoder=True`` gives the last stage a decoder too.

    State-dict keys equal the reference module's (a detector checkpoint's ``backbone.*`` keys
    without the prefix). No classifier heads: ImageNet checkpoints carry ``final_layers``/``norms``/
    ``heads`` and no ``reduce_convs``/``add_blocks``, so they load only with ``strict=False``, as the
    reference's ``init_weights`` does.
    """

    def __init__(
        self,
        out_chans: int = 256,
        num_add_blocks: int = 2,
        *,
        in_chans: int = 3,
        num_stages: int = 3,
        encoder_type: str = "Encoder",
        decoder_type: str = "Decoder",
        base_block: str = "NeXtBlock",
        focal_block: str = "DNeXtBlock",
        p2_dim: int = 96,
        p2_block: int = 3,
        dims: Sequence[int] = (192, 352, 512),
        blocks: Sequence[int] | Sequence[Sequence[int]] = (2, 4, 2),
        last_decoder: bool = False,
        layer_scale_init_value: float = 1e-6,
        drop_path_rate: float = 0.1,
        norm_cfg: Mapping | None = None,
        act_type: str = "gelu",
    ) -> None:
        super().__init__(
            in_chans=in_chans, num_stages=num_stages, encoder_type=encoder_type, decoder_type=decoder_type,
            base_block=base_block, focal_block=focal_block, p2_dim=p2_dim, p2_block=p2_block, dims=dims, blocks=blocks,
            layer_scale_init_value=layer_scale_init_value, drop_path_rate=drop_path_rate, norm_cfg=norm_cfg,
            act_type=act_type, last_decoder=last_decoder,
        )
        style = self.style
        self.reduce_convs = nn.ModuleList([_conv_norm(d, out_chans, 1, 1, 0, style) for d in self.dims])
        self.add_blocks = nn.ModuleList([_conv_norm(out_chans, out_chans, 3, 2, 1, style) for _ in range(num_add_blocks)])
        self.out_channels = int(out_chans)
        self.strides = tuple(8 * 2**i for i in range(len(self.dims) + num_add_blocks))
        self.init_weights()

    def init_weights(self) -> None:
        """The reference's from-scratch initialisation (Kaiming-normal fan-out, zero bias; 1-output layers untouched)."""

        def init(m: nn.Module) -> None:
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[0] > 1:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="linear")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = [reduce(f) for reduce, f in zip(self.reduce_convs, self.features(x))]
        for add_block in self.add_blocks:
            feats.append(add_block(feats[-1]))
        return tuple(feats)


class CEDNetTwoStageBackbone(CEDNetBackbone):
    """CEDNet for the fork's two-stage detectors (its ``CEDNetWrapperTwoStage``; Mask R-CNN and Cascade Mask R-CNN
    configs with ``neck=None``, ``num_add_blocks=1``): :class:`CEDNetBackbone`'s pyramid plus a stride-4 map.

    P2 is ``merge_c2(upsample(P3) + reduce_c2(c2))``, ``c2`` being the p2 stage's blocks' output before its
    stride-2 downsampling, ``upsample`` bilinear x2 (``align_corners=False``), ``reduce_c2`` a 1x1 conv +
    channels-first LayerNorm and ``merge_c2`` a LayerNorm + 3x3 conv -- LayerNorms whatever the backbone's own
    norm (the reference writes them out). ``forward`` returns P2..P(4 + num_add_blocks), strides 4, 8, ...
    """

    def __init__(self, out_chans: int = 256, num_add_blocks: int = 1, **kwargs) -> None:
        super().__init__(out_chans, num_add_blocks, **kwargs)
        p2_dim = int(self.stages[0][-1][0].in_channels)
        self.upsample_p3 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.reduce_c2 = nn.Sequential(nn.Conv2d(p2_dim, out_chans, 1, 1, 0), LayerNorm(out_chans, eps=1e-6, data_format="channels_first"))
        self.merge_c2 = nn.Sequential(LayerNorm(out_chans, eps=1e-6, data_format="channels_first"), nn.Conv2d(out_chans, out_chans, 3, 1, 1))
        self.strides = (4,) + self.strides
        for module in (self.reduce_c2, self.merge_c2):  # as the wrapper's init_weights initialises them
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="linear")
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c2, x = self.stride4_and_features(x)
        feats = [reduce(f) for reduce, f in zip(self.reduce_convs, x)]
        for add_block in self.add_blocks:
            feats.append(add_block(feats[-1]))
        p2 = self.merge_c2(self.upsample_p3(feats[0]) + self.reduce_c2(c2))
        return (p2, *feats)


_COMMON = dict(encoder_type="Encoder", decoder_type="Decoder", p2_block=3)

CEDNET_VARIANTS: dict[str, dict] = {
    # The reference's CEDNet_* registrations in models/cednet.py (the mmdet configs use the same).
    "next_tiny": dict(_COMMON, num_stages=3, p2_dim=96, dims=(192, 352, 512), blocks=(2, 4, 2)),
    "next_small": dict(_COMMON, num_stages=4, p2_dim=96, dims=(192, 352, 512), blocks=(2, 7, 2)),
    "next_base": dict(_COMMON, num_stages=4, p2_dim=128, dims=(256, 448, 704), blocks=(2, 7, 2)),
    # Ablation variants (other encoder/decoder designs, ImageNet only in the reference).
    "next_tiny_fpn": dict(
        _COMMON, encoder_type="EncoderFPN", decoder_type="DecoderFPN", num_stages=3, p2_dim=96, dims=(160, 304, 448), blocks=(2, 4, 2)
    ),
    "next_tiny_unet": dict(_COMMON, decoder_type="DecoderUNet", num_stages=3, p2_dim=96, dims=(192, 352, 512), blocks=(2, 4, 2)),
    "next_tiny_hourglass": dict(_COMMON, decoder_type="DecoderHourglass", num_stages=3, p2_dim=96, dims=(160, 320, 512), blocks=(2, 4, 2)),
    # The fork's other RetinaNet backbones (ced-mmdet/configs/cednet/{resnet,swin,cswin}/retinanet_ced_*), detection only.
    "resnet_50": dict(_COMMON, num_stages=3, base_block="Bottleneck", focal_block="DBottleneck", p2_dim=64, dims=(128, 256, 384),
                      blocks=(1, 4, 2), norm_cfg=dict(type="SyncBN", requires_grad=True), act_type="relu"),
    "swin_tiny": dict(_COMMON, num_stages=3, base_block="SwinBlock", focal_block="DSwinBlock", p2_dim=96, dims=(160, 288, 416),
                      blocks=(2, 4, 2)),
    "cswin_tiny": dict(_COMMON, encoder_type="CSwinEncoder", num_stages=3, base_block="CSwinBlock", focal_block="CSwinBlock",
                       p2_dim=64, dims=(128, 256, 320), blocks=(2, 8, 1), layer_scale_init_value=1.0),
}
DETECTION_ONLY = ("resnet_50", "swin_tiny", "cswin_tiny")  # no ImageNet classifier of these in the reference


def _variant(name: str) -> dict:
    if name not in CEDNET_VARIANTS:
        raise ValueError(f"unknown CEDNet variant {name!r}; known: {', '.join(CEDNET_VARIANTS)}")
    return dict(CEDNET_VARIANTS[name])


def cednet_next_tiny(**kwargs) -> CEDNet:
    """CEDNet-NeXt-T classifier (3 stages, dims 192/352/512, blocks 2/4/2); kwargs override (the reference trains it with drop_path_rate=0.1)."""
    return CEDNet(**{**_variant("next_tiny"), **kwargs})


def cednet_next_small(**kwargs) -> CEDNet:
    """CEDNet-NeXt-S classifier (4 stages, dims 192/352/512, blocks 2/7/2; trained with drop_path_rate=0.4)."""
    return CEDNet(**{**_variant("next_small"), **kwargs})


def cednet_next_base(**kwargs) -> CEDNet:
    """CEDNet-NeXt-B classifier (4 stages, p2 128, dims 256/448/704, blocks 2/7/2; trained with drop_path_rate=0.5)."""
    return CEDNet(**{**_variant("next_base"), **kwargs})


def cednet_next_tiny_fpn(**kwargs) -> CEDNet:
    """CEDNet-NeXt-T ablation with FPN-style encoder/decoder (dims 160/304/448)."""
    return CEDNet(**{**_variant("next_tiny_fpn"), **kwargs})


def cednet_next_tiny_unet(**kwargs) -> CEDNet:
    """CEDNet-NeXt-T ablation with UNet-style decoders (blocks split between encoder and decoder)."""
    return CEDNet(**{**_variant("next_tiny_unet"), **kwargs})


def cednet_next_tiny_hourglass(**kwargs) -> CEDNet:
    """CEDNet-NeXt-T ablation with hourglass decoders (dims 160/320/512, a block on each lateral)."""
    return CEDNet(**{**_variant("next_tiny_hourglass"), **kwargs})


def cednet_backbone(variant: str, out_chans: int = 256, num_add_blocks: int = 2, **overrides) -> CEDNetBackbone:
    """Detection backbone for a :data:`CEDNET_VARIANTS` name (``"next_tiny"``, ...).

    The reference's RetinaNet configs use ``num_add_blocks=2`` (strides 8..128), its Deformable DETR configs
    ``num_add_blocks=1``; its two-stage and Mask2Former detectors use :class:`CEDNetTwoStageBackbone` and
    :class:`CEDNetMask2FormerBackbone`.
    """
    return CEDNetBackbone(out_chans, num_add_blocks, **{**_variant(variant), **overrides})


class CEDNetMask2FormerBackbone(CEDNetBackbone):
    """CEDNet for the fork's Mask2Former (its ``CEDNetWrapperMask2Former``): the trunk's raw maps, no reduction.

    The wrapper deletes ``CEDNetWrapper``'s ``reduce_convs`` and ``add_blocks``; its pixel decoder reads ``c2`` (the
    p2 stage's blocks' output before the stride-2 downsampling, ``p2_dim`` channels) and the last stage's ``(c3, c4,
    c5)`` (``dims`` channels). ``forward`` returns those four maps at strides 4, 8, 16, 32; state-dict keys equal the
    reference module's (a checkpoint's ``backbone.*`` keys without the prefix).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(256, 0, **{"drop_path_rate": 0.0, **kwargs})
        del self.reduce_convs, self.add_blocks
        p2_dim = int(self.stages[0][-1][0].in_channels)
        self.out_channels = [p2_dim, *self.dims]
        self.strides = (4, 8, 16, 32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c2, feats = self.stride4_and_features(x)
        return (c2, *feats)
