"""FocalNet (focal modulation networks), ImageNet classifier and detection backbone, in plain PyTorch.

The official code (github.com/microsoft/FocalNet) builds the ImageNet network in
``classification/focalnet.py`` (class ``FocalNet``) and the mmdetection backbone in
``detection/mmdet/models/backbones/focalnet.py`` (also ``FocalNet``), both on top of timm. This
module rebuilds both without timm: parameter names, registration order and shapes are the
official ones, so released weights load with ``load_state_dict(strict=True)`` without a renaming
table, and eval outputs equal the official code's for the same weights and input (checked by
``tests/test_focalnet.py`` against answers recorded by ``scripts/make_focalnet_reference.py``).

**Variants.** The paper's Table A1 rows are FocalNet-T (SRF), FocalNet-S (SRF) and FocalNet-B
(LRF), judged by their ImageNet top-1 (82.1 / 83.4 / 83.9 equal the official README's SRF / SRF /
LRF rows), so those are the defaults here:

* SRF ("small receptive field"): ``focal_levels=(2, 2, 2, 2)``; LRF: ``focal_levels=(3, 3, 3, 3)``;
  the first focal kernel is ``focal_windows[i]`` (3 in the ImageNet models, 9 in the official
  Mask R-CNN configs, ``[11, 9, 9, 7]`` in the ATSS / Cascade / Sparse R-CNN configs) and each
  further level adds 2 (``focal_factor``);
* the other receptive field is a constructor option, e.g. ``focalnet_tiny(focal_levels=(3, 3, 3, 3))``
  builds the released ``focalnet_tiny_lrf`` model (:data:`FOCALNET_SRF` / :data:`FOCALNET_LRF`
  hold those overrides).

**Checkpoints.** The released ImageNet-1K files (``focalnet_{tiny,small,base}_{srf,lrf}.pth``) wrap
the state dict as ``{"model": state_dict, ...}`` (:func:`imagenet_state_dict` unwraps it); the
official mmdetection 2.x detector files store the backbone under ``state_dict["backbone.*"]``.
Neither carries buffers: every key is a parameter. (The official detection code loads ImageNet
weights into a detection backbone with bigger focal kernels by zero-padding the kernels and the
``modulation.f`` rows, ``detection/mmcv_custom/checkpoint.py``; that conversion is not provided.)

Behaviour that is the official code's, kept on purpose:

* the classifier does not pad: a stem or patch-merging convolution floors odd sizes (its
  ``PatchEmbed`` has no padding); the detection backbone zero-pads the input on the right/bottom to
  a multiple of 4 and every odd stage map by one row/column before its stride-2 patch merge
  (next stage ``((H + 1) // 2, (W + 1) // 2)``);
* patch merging (``layers.{i}.downsample``) always has a LayerNorm ``norm``; ``patch_norm`` only
  controls the stem's (``patch_embed.norm``);
* ``use_conv_embed`` (overlapping 7x7/s4 stem, 3x3/s2 merges) pads the stem by 2 in the classifier
  and by 3 in the detection backbone;
* the detection backbone returns only the stages in ``out_indices``, each through its own
  LayerNorm ``norm{i}`` (registered in the order ``out_indices`` is given); the normed map does not
  feed the next stage;
* the global context is ``GELU(mean over H, then over W)`` of the last focal level; the gates are
  the last ``focal_level + 1`` channels of ``modulation.f``;
* the detection code has no post-LN options and no modulator normalisation (its
  ``FocalModulation`` has a ``use_postln`` argument that its block never sets); only the
  classifier accepts ``use_postln``, ``use_postln_in_modulation`` and ``normalize_modulator``
  (all off in the T/S/B models, on in the isotropic / large ones).

Dropout layers (rate 0 in every configuration, no parameters) are omitted; drop path is
``torchvision.ops.StochasticDepth(p, "row")``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from gradlens.errors import CheckpointError
from gradlens.models.backbones.layers import Mlp

__all__ = [
    "FOCALNET_CLASSIFIERS",
    "FOCALNET_LRF",
    "FOCALNET_SRF",
    "FOCALNET_VARIANTS",
    "TINY_FOCALNET",
    "FocalNet",
    "FocalNetBackbone",
    "focalnet_base",
    "focalnet_base_backbone",
    "focalnet_small",
    "focalnet_small_backbone",
    "focalnet_tiny",
    "focalnet_tiny_backbone",
    "imagenet_state_dict",
    "is_focalnet_checkpoint",
    "recognise",
]

_FOCAL_FACTOR = 2  # kernel growth per focal level, fixed in both official files


def _drop_path(p: float) -> nn.Module:
    return StochasticDepth(p, "row") if p > 0 else nn.Identity()


def _init_weights(m: nn.Module) -> None:
    """The official initialisation: truncated-normal Linear weights (std 0.02), zero biases, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class FocalModulation(nn.Module):
    """Focal modulation on ``(B, H, W, C)``: a linear layer gives query, context and ``focal_level + 1``
    gates; the context passes through ``focal_level`` depthwise convs (kernels ``focal_window + 2k``,
    each with GELU); the gated sum of every level plus the gated global context goes through the 1x1
    conv ``h`` and multiplies the query; a final linear layer ``proj``."""

    def __init__(
        self,
        dim: int,
        focal_window: int,
        focal_level: int,
        use_postln_in_modulation: bool = False,
        normalize_modulator: bool = False,
    ) -> None:
        super().__init__()
        if focal_level < 1:
            raise ValueError(f"focal_level must be at least 1, got {focal_level}")
        self.dim, self.focal_window, self.focal_level = dim, focal_window, focal_level
        self.normalize_modulator = normalize_modulator
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList()
        for k in range(focal_level):
            kernel = _FOCAL_FACTOR * k + focal_window
            self.focal_layers.append(
                nn.Sequential(nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False), nn.GELU())
            )
        self.ln = nn.LayerNorm(dim) if use_postln_in_modulation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        x = self.f(x).permute(0, 3, 1, 2).contiguous()
        q, ctx, gates = torch.split(x, (c, c, self.focal_level + 1), 1)
        ctx_all = 0
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, level : level + 1]
        ctx_global = self.act(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level :]
        if self.normalize_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        out = (q * self.h(ctx_all)).permute(0, 2, 3, 1).contiguous()
        if self.ln is not None:
            out = self.ln(out)
        return self.proj(out)


class FocalNetBlock(nn.Module):
    """Pre-norm (or, with ``use_postln``, post-norm) focal-modulation block on ``(B, H*W, C)`` tokens,
    with optional layer scale ``gamma_1``/``gamma_2``."""

    def __init__(
        self,
        dim: int,
        focal_level: int,
        focal_window: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        use_layerscale: bool = False,
        layerscale_value: float = 1e-4,
        use_postln: bool = False,
        use_postln_in_modulation: bool = False,
        normalize_modulator: bool = False,
    ) -> None:
        super().__init__()
        self.use_postln = use_postln
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, focal_window, focal_level, use_postln_in_modulation, normalize_modulator)
        self.drop_path = _drop_path(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if use_layerscale:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layerscale_value)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layerscale_value)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"expected {h}x{w} tokens, got {n}")
        y = x if self.use_postln else self.norm1(x)
        y = self.modulation(y.view(b, h, w, c)).view(b, n, c)
        if self.use_postln:
            y = self.norm1(y)
        if self.gamma_1 is not None:
            y = self.gamma_1 * y
        x = x + self.drop_path(y)
        y = self.norm2(self.mlp(x)) if self.use_postln else self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        return x + self.drop_path(y)


class PatchEmbed(nn.Module):
    """Stem (``patch_size`` 4) or patch merge (2): non-overlapping conv (or, with ``use_conv_embed``,
    7x7/s4 resp. 3x3/s2), then an optional LayerNorm over channels. ``forward`` returns tokens
    ``(B, h*w, C)`` and ``(h, w)``. ``pad``: zero-pad right/bottom to a multiple of ``patch_size``
    first (the detection code); without it odd sizes are floored (the classifier)."""

    def __init__(
        self,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        norm: bool,
        use_conv_embed: bool = False,
        is_stem: bool = False,
        pad: bool = False,
        stem_padding: int = 2,
    ) -> None:
        super().__init__()
        self.patch_size, self.pad = patch_size, pad
        if use_conv_embed:
            kernel, stride, padding = (7, 4, stem_padding) if is_stem else (3, 2, 1)
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=padding)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if self.pad:
            p = self.patch_size
            h, w = x.shape[-2:]
            if w % p:
                x = F.pad(x, (0, p - w % p))
            if h % p:
                x = F.pad(x, (0, 0, 0, p - h % p))
        x = self.proj(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, h, w


class BasicLayer(nn.Module):
    """One stage: ``blocks`` and an optional ``downsample`` (a :class:`PatchEmbed` to twice the width)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        focal_level: int,
        focal_window: int,
        drop_path: Sequence[float],
        downsample: bool,
        pad: bool,
        use_conv_embed: bool,
        block_kwargs: dict,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [FocalNetBlock(dim, focal_level, focal_window, drop_path=drop_path[i], **block_kwargs) for i in range(depth)]
        )
        self.downsample = (
            PatchEmbed(2, dim, 2 * dim, norm=True, use_conv_embed=use_conv_embed, is_stem=False, pad=pad) if downsample else None
        )

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Returns (stage output tokens, next-stage tokens, next h, next w)."""
        for blk in self.blocks:
            x = blk(x, h, w)
        if self.downsample is None:
            return x, x, h, w
        y, nh, nw = self.downsample(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
        return x, y, nh, nw


def _as_list(name: str, values, n: int) -> list[int]:
    values = [int(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{name} needs one value per stage ({n}), got {values}")
    return values


class _FocalNetTrunk(nn.Module):
    """``patch_embed`` and ``layers``, shared by the classifier and the detection backbone."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depths: Sequence[int],
        mlp_ratio: float,
        drop_path_rate: float,
        patch_norm: bool,
        focal_levels: Sequence[int],
        focal_windows: Sequence[int],
        use_conv_embed: bool,
        patch_size: int,
        in_chans: int,
        detection: bool,
        block_kwargs: dict,
    ) -> None:
        super().__init__()
        depths = [int(d) for d in depths]
        n = len(depths)
        self.focal_levels = _as_list("focal_levels", focal_levels, n)
        self.focal_windows = _as_list("focal_windows", focal_windows, n)
        self.num_layers, self.embed_dim, self.depths = n, int(embed_dim), depths
        self.num_features = [int(embed_dim * 2**i) for i in range(n)]
        self.patch_embed = PatchEmbed(
            patch_size, in_chans, self.num_features[0], norm=patch_norm, use_conv_embed=use_conv_embed, is_stem=True,
            pad=detection, stem_padding=3 if detection else 2,
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # as the official code; meta-safe
        self.layers = nn.ModuleList(
            [
                BasicLayer(
                    self.num_features[i], depths[i], self.focal_levels[i], self.focal_windows[i],
                    rates[sum(depths[:i]) : sum(depths[: i + 1])], downsample=i < n - 1, pad=detection,
                    use_conv_embed=use_conv_embed, block_kwargs=dict(block_kwargs, mlp_ratio=mlp_ratio),
                )
                for i in range(n)
            ]
        )


class FocalNet(_FocalNetTrunk):
    """The official ImageNet ``FocalNet`` (``classification/focalnet.py``), state-dict and output compatible.

    Args:
        embed_dim: channels of stage 0 (stage ``i`` has ``embed_dim * 2**i``).
        depths: blocks per stage.
        focal_levels, focal_windows: focal levels and first focal kernel, per stage.
        mlp_ratio: block MLP width ratio.
        drop_path_rate: stochastic-depth rate of the last block (linear from 0 over all blocks).
        patch_norm: LayerNorm after the stem.
        use_conv_embed: overlapping convolutional stem and patch merges.
        use_layerscale, layerscale_value: layer scale ``gamma_1``/``gamma_2`` and its initial value.
        use_postln, use_postln_in_modulation, normalize_modulator: the official large-model options.
        num_classes: classes of the ``head`` (0: no head, ``forward`` returns the pooled features).
        patch_size, in_chans: stem.

    ``forward(x)`` returns ``(N, num_classes)`` logits; ``forward_features(x)`` the pooled, normed
    ``(N, num_features[-1])`` vector. Released checkpoints are ``{"model": state_dict}``.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        focal_levels: Sequence[int] = (2, 2, 2, 2),
        focal_windows: Sequence[int] = (3, 3, 3, 3),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        patch_norm: bool = True,
        use_conv_embed: bool = False,
        use_layerscale: bool = False,
        layerscale_value: float = 1e-4,
        use_postln: bool = False,
        use_postln_in_modulation: bool = False,
        normalize_modulator: bool = False,
        num_classes: int = 1000,
        patch_size: int = 4,
        in_chans: int = 3,
    ) -> None:
        super().__init__(
            embed_dim=embed_dim, depths=depths, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, patch_norm=patch_norm,
            focal_levels=focal_levels, focal_windows=focal_windows, use_conv_embed=use_conv_embed, patch_size=patch_size,
            in_chans=in_chans, detection=False,
            block_kwargs=dict(
                use_layerscale=use_layerscale, layerscale_value=layerscale_value, use_postln=use_postln,
                use_postln_in_modulation=use_postln_in_modulation, normalize_modulator=normalize_modulator,
            ),
        )
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(self.num_features[-1])
        self.head = nn.Linear(self.num_features[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = self.patch_embed(x)
        for layer in self.layers:
            _, x, h, w = layer(x, h, w)
        x = self.norm(x)  # B, L, C
        return F.adaptive_avg_pool1d(x.transpose(1, 2), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class FocalNetBackbone(_FocalNetTrunk):
    """The official mmdetection ``FocalNet`` backbone (``detection/mmdet/models/backbones/focalnet.py``).

    Args:
        embed_dim, depths, focal_levels, focal_windows, mlp_ratio, drop_path_rate, patch_norm,
        use_conv_embed, patch_size, in_chans: as :class:`FocalNet`.
        use_layerscale, layerscale_value: layer scale (the official detection code always
            initialises it to 1e-4).
        out_indices: stages returned, each through its output norm ``norm{i}``.

    ``forward(x)`` returns a tuple with one ``(N, embed_dim * 2**i, h_i, w_i)`` map per stage in
    ``out_indices`` (in stage order; strides 4, 8, 16, 32; ``h_0 = ceil(H / 4)``, then ceil-halved);
    ``out_channels`` lists their channels. Detector checkpoints' ``backbone.*`` tensors (prefix
    removed) load with ``strict=True``.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        focal_levels: Sequence[int] = (2, 2, 2, 2),
        focal_windows: Sequence[int] = (9, 9, 9, 9),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        patch_norm: bool = True,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        use_conv_embed: bool = False,
        use_layerscale: bool = False,
        layerscale_value: float = 1e-4,
        patch_size: int = 4,
        in_chans: int = 3,
    ) -> None:
        super().__init__(
            embed_dim=embed_dim, depths=depths, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, patch_norm=patch_norm,
            focal_levels=focal_levels, focal_windows=focal_windows, use_conv_embed=use_conv_embed, patch_size=patch_size,
            in_chans=in_chans, detection=True,
            block_kwargs=dict(use_layerscale=use_layerscale, layerscale_value=layerscale_value),
        )
        n = self.num_layers
        out_indices = [int(i) for i in out_indices]
        if not out_indices or any(i not in range(n) for i in out_indices) or len(set(out_indices)) != len(out_indices):
            raise ValueError(f"out_indices must be distinct stage indices in 0..{n - 1}, got {out_indices}")
        self.out_indices = tuple(out_indices)
        for i in out_indices:  # registration order = the order given, as in the official code
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.out_channels = [self.num_features[i] for i in range(n) if i in self.out_indices]
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, h, w = self.patch_embed(x)
        outs = []
        for i, layer in enumerate(self.layers):
            out, x, nh, nw = layer(x, h, w)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            h, w = nh, nw
        return tuple(outs)


# --------------------------------------------------------------------------------------------- variants

FOCALNET_SRF: dict = {"focal_levels": (2, 2, 2, 2)}
FOCALNET_LRF: dict = {"focal_levels": (3, 3, 3, 3)}

_T = dict(embed_dim=96, depths=(2, 2, 6, 2))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2))

FOCALNET_VARIANTS: dict[str, dict] = {
    # Detection backbones: the Table A1 receptive fields (T, S: SRF; B: LRF) with the official Mask R-CNN
    # configs' focal windows 9 (detection/configs/focalnet/mask_rcnn_focalnet_*_1x_coco_{srf,lrf}.py,
    # whose drop_path_rate is given; the 3x configs use 0.3 / 0.5 / 0.5).
    "focalnet_tiny": dict(_T, focal_levels=(2, 2, 2, 2), focal_windows=(9, 9, 9, 9), drop_path_rate=0.1),
    "focalnet_small": dict(_S, focal_levels=(2, 2, 2, 2), focal_windows=(9, 9, 9, 9), drop_path_rate=0.2),
    "focalnet_base": dict(_B, focal_levels=(3, 3, 3, 3), focal_windows=(9, 9, 9, 9), drop_path_rate=0.3),
}

FOCALNET_CLASSIFIERS: dict[str, dict] = {
    # ImageNet-1K: configs/focalnet_{tiny,small}_srf.yaml and configs/focalnet_base_lrf.yaml
    # (released as focalnet_tiny_srf.pth, focalnet_small_srf.pth, focalnet_base_lrf.pth).
    "focalnet_tiny": dict(_T, focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3), drop_path_rate=0.2),
    "focalnet_small": dict(_S, focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3), drop_path_rate=0.3),
    "focalnet_base": dict(_B, focal_levels=(3, 3, 3, 3), focal_windows=(3, 3, 3, 3), drop_path_rate=0.5),
}

# A detection backbone that runs a 64x64 forward + backward in milliseconds (pipeline tests).
TINY_FOCALNET: dict = dict(
    embed_dim=8, depths=(1, 1, 1, 1), focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3), drop_path_rate=0.0,
    out_indices=(1, 2, 3),
)


def imagenet_state_dict(checkpoint: Mapping) -> Mapping[str, torch.Tensor]:
    """The model state dict of a released ImageNet checkpoint (``{"model": state_dict, ...}``), or the mapping itself."""
    inner = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    return inner if isinstance(inner, Mapping) else checkpoint


def focalnet_tiny(**kwargs) -> FocalNet:
    """FocalNet-T (SRF) classifier: 96, [2,2,6,2], focal levels 2, kernels [3,5] (``focalnet_tiny_srf.pth``);
    ``focal_levels=(3, 3, 3, 3)`` gives the LRF model (``focalnet_tiny_lrf.pth``)."""
    return FocalNet(**{**FOCALNET_CLASSIFIERS["focalnet_tiny"], **kwargs})


def focalnet_small(**kwargs) -> FocalNet:
    """FocalNet-S (SRF) classifier: 96, [2,2,18,2], focal levels 2 (``focalnet_small_srf.pth``); LRF via ``focal_levels``."""
    return FocalNet(**{**FOCALNET_CLASSIFIERS["focalnet_small"], **kwargs})


def focalnet_base(**kwargs) -> FocalNet:
    """FocalNet-B (LRF) classifier: 128, [2,2,18,2], focal levels 3, kernels [3,5,7] (``focalnet_base_lrf.pth``);
    ``focal_levels=(2, 2, 2, 2)`` gives the SRF model (``focalnet_base_srf.pth``)."""
    return FocalNet(**{**FOCALNET_CLASSIFIERS["focalnet_base"], **kwargs})


def _backbone(name: str, kwargs: dict) -> FocalNetBackbone:
    return FocalNetBackbone(**{**FOCALNET_VARIANTS[name], **kwargs})


def focalnet_tiny_backbone(**kwargs) -> FocalNetBackbone:
    """FocalNet-T (SRF) detection backbone, focal windows 9, ``out_indices`` (0, 1, 2, 3); kwargs override."""
    return _backbone("focalnet_tiny", kwargs)


def focalnet_small_backbone(**kwargs) -> FocalNetBackbone:
    """FocalNet-S (SRF) detection backbone, focal windows 9, ``out_indices`` (0, 1, 2, 3); kwargs override."""
    return _backbone("focalnet_small", kwargs)


def focalnet_base_backbone(**kwargs) -> FocalNetBackbone:
    """FocalNet-B (LRF) detection backbone, focal windows 9, ``out_indices`` (0, 1, 2, 3); kwargs override."""
    return _backbone("focalnet_base", kwargs)


# --------------------------------------------------------------------------------------------- checkpoints

_SIGNATURE = re.compile(r"^backbone\.layers\.\d+\.blocks\.\d+\.modulation\.f\.weight$")
_BACKBONE_DEFAULTS = dict(out_indices=(0, 1, 2, 3), use_layerscale=False, patch_norm=True, use_conv_embed=False, mlp_ratio=4.0)


def _tuple(value):
    """``value`` as a tuple when it is a list or tuple (settings compare equal whatever sequence type they use)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def is_focalnet_checkpoint(sd: Mapping[str, object]) -> bool:
    """Whether an mmdetection state dict's backbone is a FocalNet (it has ``layers.N.blocks.N.modulation.f``)."""
    return any(isinstance(k, str) and _SIGNATURE.match(k) for k in sd)


def _count(keys: Sequence[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def recognise(sd: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
    """``(f"retinanet_{variant}", options)`` of an mmdetection RetinaNet state dict with a FocalNet backbone.

    The variant is fixed by the stem width and the blocks per stage; ``options`` are the
    ``<variant>_backbone`` overrides that rebuild the stored backbone exactly (focal levels and
    windows, i.e. SRF vs LRF, ``out_indices``, layer scale, ...; ``{}`` when it is the default).
    Raises :class:`CheckpointError` when no variant matches or the stored tensors differ from the
    rebuilt backbone's.
    """
    if not is_focalnet_checkpoint(sd):
        raise CheckpointError("The checkpoint's backbone has no FocalNet modulation layers (backbone.layers.N.blocks.N.modulation.f).")
    keys = [k[len("backbone."):] for k in sd if k.startswith("backbone.")]
    if "backbone.patch_embed.proj.weight" not in sd:
        raise CheckpointError("The checkpoint's FocalNet backbone has no stem (backbone.patch_embed.proj.weight).")
    stem = sd["backbone.patch_embed.proj.weight"].shape
    embed = int(stem[0])
    depths = [_count(keys, f"layers.{i}.blocks") for i in range(_count(keys, "layers"))]
    levels, windows = [], []
    for i in range(len(depths)):
        prefix = f"layers.{i}.blocks.0.modulation.focal_layers"
        levels.append(_count(keys, prefix))
        first = sd.get(f"backbone.{prefix}.0.0.weight")
        windows.append(int(first.shape[-1]) if first is not None else 0)
    found = dict(
        focal_levels=tuple(levels),
        focal_windows=tuple(windows),
        out_indices=tuple(i for i in range(len(depths)) if f"backbone.norm{i}.weight" in sd),
        use_layerscale="backbone.layers.0.blocks.0.gamma_1" in sd,
        patch_norm="backbone.patch_embed.norm.weight" in sd,
        use_conv_embed=int(stem[-1]) == 7,
        mlp_ratio=int(sd["backbone.layers.0.blocks.0.mlp.fc1.weight"].shape[0]) / embed
        if "backbone.layers.0.blocks.0.mlp.fc1.weight" in sd else 4.0,
    )
    for variant, settings in FOCALNET_VARIANTS.items():
        if settings["embed_dim"] != embed or list(settings["depths"]) != depths:
            continue
        defaults = {**_BACKBONE_DEFAULTS, **settings}
        options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in found.items() if v != _tuple(defaults[k])}
        if int(stem[1]) != 3:
            options["in_chans"] = int(stem[1])
        try:
            with torch.device("meta"):
                expected = _backbone(variant, options).state_dict()
        except ValueError as err:  # e.g. no output norms, a stage without focal layers
            raise CheckpointError(f"The checkpoint's FocalNet backbone ({variant}) cannot be rebuilt: {err}.") from None
        stored = {k: tuple(sd["backbone." + k].shape) for k in keys}
        wanted = {k: tuple(v.shape) for k, v in expected.items()}
        if stored != wanted:
            odd = sorted(set(stored) ^ set(wanted)) or sorted(k for k in stored if stored[k] != wanted[k])
            raise CheckpointError(
                f"The checkpoint's FocalNet backbone ({variant}, {options or 'default options'}) does not fit the "
                f"official layout: first differing tensor backbone.{odd[0]}."
            )
        return f"retinanet_{variant}", options
    raise CheckpointError(
        f"The checkpoint's FocalNet backbone (embed {embed}, depths {depths}) matches none of FocalNet-T/S/B."
    )
