"""CSWin Transformer detection backbone, parameter-compatible with the CEDNet mmdetection fork.

The CEDNet CSWin RetinaNet and Mask R-CNN (``ced-mmdet/configs/cednet/cswin/*_cswin_tiny_*``) use
the backbone registered as ``CSwinTransformer`` by ``ced-mmdet/mmdet/models/backbones/cswin.py``
(the official CSWin-Transformer segmentation backbone, adapted by the fork to mmdetection). This
module rebuilds it in plain PyTorch: parameter names, registration order and shapes equal the
fork's, so its state dict loads with ``strict=True``, and eval outputs equal the fork's for the same
weights and input (checked by ``tests/test_cswin.py`` against answers recorded from the fork's own
code by ``scripts/make_cswin_reference.py``).

:class:`LePEAttention` (cross-shaped window attention with the locally-enhanced positional
encoding) is public and takes ``q, k, v`` as three ``(B, C, H, W)`` maps, so that the same module
serves both the fork's ``cswin.py`` blocks (whose ``LePEAttention.forward`` takes a ``(B, 3, C, H, W)``
slice) and the CSwin blocks of its ``cednet.py`` (whose ``LePEAttention.forward(qkv, H, W)`` takes
``(3, B, H*W, C)`` tokens): both compute the same arithmetic, with the same parameter ``get_v``.

**Variants.** CSwin-T is the fork's config (``retinanet_cswin_tiny_*``: ``embed_dim=64``,
``depth=[1, 2, 21, 1]``, ``num_heads=[2, 4, 8, 16]``, ``split_size=[1, 2, 7, 7]``,
``drop_path_rate=0.1``). The fork has no CSwin-S/B configs; the official repository
(microsoft/CSWin-Transformer) defines them (``CSWin_64_24322_small_224``, ``CSWin_96_24322_base_224``)
and uses them for dense prediction only in its segmentation configs
(``segmentation/configs/cswin/upernet_cswin_{small,base}.py``: the same depths, heads and
``split_size=[1, 2, 7, 7]``, ``drop_path_rate`` 0.4 / 0.6), which :data:`CSWIN_VARIANTS` follows.
CSWin-L is not offered: its heads are ``[6, 12, 24, 24]``, and the official code widens each merge by
``heads[i + 1] // heads[i]`` (so its last merge keeps 576 channels) while the fork always doubles,
so the fork's class cannot hold CSWin-L's weights.

Behaviour that is the fork's, kept on purpose:

* the stem is ``stage1_conv_embed``: a 7x7 stride-4 convolution with padding 2 (stage 0 is
  ``floor((H - 3) / 4) + 1`` high, 56 for 224: odd input sizes are floored, never padded), then a
  LayerNorm over tokens. The fork's ``nn.Sequential`` holds an einops
  ``Rearrange('b c h w -> b (h w) c', h=56, w=56)`` between the two, which *asserts* a 224x224
  input (einops checks the given axis lengths); the fork's ``forward`` never calls it (it calls
  ``stage1_conv_embed[0]`` and ``[2]`` and flattens in between), so any input size runs. Here
  index 1 is a parameterless flatten without the size check (:class:`MapToTokens`), kept so that
  the LayerNorm's keys stay ``stage1_conv_embed.2.*``; :meth:`CSwinBackbone.forward` also skips it;
* stages 0-2 split every block into two branches of ``C / 2`` channels and ``heads / 2`` heads:
  branch 0 attends inside vertical stripes (full height, ``split_size`` wide: ``idx=0``), branch 1
  inside horizontal stripes (``split_size`` high, full width: ``idx=1``). **Every block of the last
  stage** attends over the whole map with one branch (``idx=-1``, all channels and heads), whatever
  the map size;
* inside :class:`LePEAttention` q, k and v are zero-padded to multiples of the stripe, **centred**
  (``pad // 2`` before, the rest after) and cropped back after attention. Padded tokens are not
  masked: their keys (zero, so logit 0) take part in every softmax of their stripe. The positional
  encoding (``get_v``, a depthwise 3x3 convolution of v) runs on each stripe separately, so it sees
  zeros at stripe borders as well as in the padding;
* the block's ``qkv`` always has a bias: the fork's ``qkv_bias`` reaches only ``LePEAttention``,
  which has no qkv projection, so it changes nothing (accepted here for the same reason);
* merges are a 3x3 stride-2 convolution with padding 1 (next stage ``ceil(H / 2)``) and a LayerNorm;
  channels always double;
* outputs: stage 0 is returned only when 0 is in ``out_indices`` (through ``norm0``); stages 1-3
  are **always** returned, through ``norm1``-``norm3``. So the fork returns four maps for
  ``out_indices=[0, 1, 2, 3]`` (its configs) and three (strides 8, 16, 32) for ``[1, 2, 3]``; it
  never returns an un-normed stage. The fork registers ``norm{i}`` only for ``i`` in
  ``out_indices`` (in the order given) but calls ``norm1``-``norm3`` unconditionally, so any
  ``out_indices`` without 1, 2 and 3 fails in its ``forward`` (AttributeError); here it is refused
  at construction. The normed map does not feed the next stage.

Dropout layers (all rate 0 in the configs, no parameters) are omitted; drop path is
``torchvision.ops.StochasticDepth(p, "row")``. The fork's ``use_chk`` (gradient checkpointing) and
its empty ``atten_mask_matrix`` buffer (``None``: not in the state dict) are not reproduced.
Weights are initialised as the fork's ``init_weights()`` does (Linear: truncated normal, std 0.02,
zero bias; LayerNorm: 1 / 0; convolutions: PyTorch's default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from gradlens.models.backbones.layers import Mlp

__all__ = [
    "CSWIN_VARIANTS",
    "CSWinBlock",
    "CSwinBackbone",
    "CSwinClassifier",
    "LePEAttention",
    "MapToTokens",
    "MergeBlock",
    "cswin_base_backbone",
    "cswin_classifier",
    "cswin_small_backbone",
    "cswin_tiny_backbone",
]

_IDX = (-1, 0, 1)


class LePEAttention(nn.Module):
    """Multi-head attention inside cross-shaped stripes, with the locally-enhanced positional encoding.

    Args:
        dim: channels of this branch (``C`` of ``q``, ``k``, ``v``).
        idx: stripe orientation: ``0`` vertical stripes (full height, ``split_size`` wide), ``1``
            horizontal stripes (``split_size`` high, full width), ``-1`` the whole map as one window.
        split_size: stripe width (ignored for ``idx=-1``).
        num_heads: attention heads (``dim`` must be a multiple).
        qk_scale: overrides the logit scale ``(dim // num_heads) ** -0.5`` (a falsy value keeps the
            default, as in the fork).

    ``get_v`` is the fork's depthwise 3x3 convolution of v (its parameter name and shapes).
    ``forward(q, k, v)`` takes three ``(B, dim, H, W)`` maps and returns ``(B, H*W, dim)`` tokens,
    row-major. Its arithmetic is both forks' (``cswin.py`` and ``cednet.py``), in their order: pad
    q, k, v with zeros to multiples of the stripe, centred; cut into stripes; per stripe and head
    ``softmax((q * scale) @ k^T) @ v + get_v(v)`` (``get_v`` on each stripe separately); put the
    stripes back and crop the padding.
    """

    def __init__(self, dim: int, idx: int, split_size: int = 7, num_heads: int = 8, qk_scale: float | None = None) -> None:
        super().__init__()
        if idx not in _IDX:
            raise ValueError(f"idx must be one of {_IDX}, got {idx!r}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if idx != -1 and split_size < 1:
            raise ValueError(f"split_size must be at least 1, got {split_size}")
        self.dim, self.idx, self.split_size, self.num_heads = dim, idx, split_size, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def stripe(self, h: int, w: int) -> tuple[int, int]:
        """The window ``(H_sp, W_sp)`` for an ``h x w`` map."""
        if self.idx == -1:
            return h, w
        if self.idx == 0:
            return h, self.split_size
        return self.split_size, w

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
            shapes = ", ".join(str(tuple(t.shape)) for t in (q, k, v))
            raise ValueError(f"q, k, v must be (B, C, H, W) maps of one shape, got {shapes}")
        b, c, h, w = q.shape
        if c != self.dim:
            raise ValueError(f"expected {self.dim} channels, got {c}")
        hs, ws = self.stripe(h, w)
        pad_h, pad_w = (-h) % hs, (-w) % ws
        top, left = pad_h // 2, pad_w // 2  # centred, as the fork
        pad = (left, pad_w - left, top, pad_h - top)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        hp, wp = h + pad_h, w + pad_w
        nh, nw, n = hp // hs, wp // ws, hs * ws
        heads, d = self.num_heads, c // self.num_heads

        def windows(t: torch.Tensor) -> torch.Tensor:  # (B, C, hp, wp) -> (B * nW, heads, n, d)
            t = t.reshape(b, c, nh, hs, nw, ws).permute(0, 2, 4, 3, 5, 1).contiguous().reshape(-1, n, heads, d)
            return t.permute(0, 2, 1, 3).contiguous()

        q, k = windows(q), windows(k)
        # stripes as contiguous maps (as the fork: the convolution's summation order follows the layout)
        v = v.reshape(b, c, nh, hs, nw, ws).permute(0, 2, 4, 1, 3, 5).contiguous().reshape(-1, c, hs, ws)
        lepe = self.get_v(v).reshape(-1, heads, d, n).permute(0, 1, 3, 2).contiguous()
        v = v.reshape(-1, heads, d, n).permute(0, 1, 3, 2).contiguous()

        attn = (q * self.scale) @ k.transpose(-2, -1)  # B * nW, heads, n, n
        attn = attn.softmax(dim=-1)
        x = (attn @ v) + lepe
        x = x.transpose(1, 2).reshape(-1, n, c)
        x = x.view(b, nh, nw, hs, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return x[:, top : top + h, left : left + w, :].reshape(b, h * w, c)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, idx={self.idx}, split_size={self.split_size}, num_heads={self.num_heads}"


class CSWinBlock(nn.Module):
    """The fork's ``CSWinBlock`` on ``(B, H*W, C)`` tokens: LN, qkv, two stripe branches (or one
    full-map branch in the last stage), proj, residual; LN, MLP, residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: int = 7,
        mlp_ratio: float = 4.0,
        qk_scale: float | None = None,
        drop_path: float = 0.0,
        last_stage: bool = False,
    ) -> None:
        super().__init__()
        # registration order = the fork's: qkv, norm1, proj, attns, mlp, norm2
        self.qkv = nn.Linear(dim, dim * 3, bias=True)  # always biased, as in the fork
        self.norm1 = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        if last_stage:
            self.attns = nn.ModuleList([LePEAttention(dim, -1, split_size, num_heads, qk_scale)])
        else:
            if dim % 2:
                raise ValueError(f"a two-branch block needs an even dim, got {dim}")
            self.attns = nn.ModuleList([LePEAttention(dim // 2, i, split_size, num_heads // 2, qk_scale) for i in (0, 1)])
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"expected {h}x{w} tokens, got {n}")
        q, k, v = self.qkv(self.norm1(x)).reshape(b, h, w, 3, c).permute(3, 0, 4, 1, 2).unbind(0)  # each B, C, H, W
        if len(self.attns) == 1:
            y = self.attns[0](q, k, v)
        else:
            half = c // 2
            y = torch.cat(
                [self.attns[0](q[:, :half], k[:, :half], v[:, :half]), self.attns[1](q[:, half:], k[:, half:], v[:, half:])], dim=2
            )
        x = x + self.drop_path(self.proj(y))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MergeBlock(nn.Module):
    """The fork's ``Merge_Block``: 3x3 stride-2 convolution (padding 1) and a LayerNorm, on tokens."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        b, n, c = x.shape
        x = self.conv(x.transpose(-2, -1).contiguous().view(b, c, h, w))
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(-2, -1).contiguous()
        return self.norm(x), h, w


class MapToTokens(nn.Module):
    """``(B, C, H, W)`` -> ``(B, H*W, C)``: the slot of the fork's einops ``Rearrange`` in
    ``stage1_conv_embed`` (no parameters; unlike the fork's, no 224x224 size check; the forward
    path does not call it, as the fork's does not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class CSwinBackbone(nn.Module):
    """The fork's ``CSwinTransformer`` detection backbone (state-dict and output compatible).

    Args:
        embed_dim: channels of stage 0 (stage ``i`` has ``embed_dim * 2**i``).
        depth, num_heads: blocks and attention heads per stage (four each).
        split_size: stripe width of stages 0-2 (``split_size[0..2]``; the fork passes ``split_size[-1]``
            to the last stage, which ignores it: it attends over the whole map).
        mlp_ratio: block MLP width ratio.
        qkv_bias: accepted for config compatibility and ignored, as in the fork (``qkv`` always has a bias).
        drop_path_rate: stochastic-depth rate of the last block (linear from 0 over all blocks).
        out_indices: must contain 1, 2 and 3; 0 adds stage 0 (see the module docstring). ``norm{i}``
            is registered in the order given.
        in_chans: input channels.
        qk_scale: overrides the attention logit scale (the fork's ``qk_scale``).

    ``forward(x)`` returns a tuple of ``(B, embed_dim * 2**i, H_i, W_i)`` maps, every one normed:
    stages 0-3 (strides 4, 8, 16, 32) when 0 is in ``out_indices``, else stages 1-3;
    ``out_channels`` lists their channels. ``H_0 = floor((H - 3) / 4) + 1``, then ``ceil``-halved.
    """

    def __init__(
        self,
        embed_dim: int,
        depth: Sequence[int],
        num_heads: Sequence[int],
        split_size: Sequence[int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        in_chans: int = 3,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        depth, num_heads, split_size = [int(v) for v in depth], [int(v) for v in num_heads], [int(v) for v in split_size]
        if not len(depth) == len(num_heads) == 4 or len(split_size) < 3:
            raise ValueError(f"depth and num_heads need 4 entries, split_size 3 or more: {depth}, {num_heads}, {split_size}")
        out_indices = [int(i) for i in out_indices]
        distinct = len(set(out_indices)) == len(out_indices)
        if any(i not in range(4) for i in out_indices) or not distinct or not {1, 2, 3} <= set(out_indices):
            raise ValueError(
                f"out_indices must be distinct stage indices in 0..3 including 1, 2 and 3 (the fork's forward uses "
                f"norm1..norm3 whatever out_indices says), got {out_indices}"
            )
        self.embed_dim = embed_dim
        self.qkv_bias = qkv_bias  # unused, as in the fork
        self.out_indices = tuple(out_indices)
        self.num_features = [embed_dim * 2**i for i in range(4)]
        self.out_channels = [self.num_features[i] for i in range(4) if i > 0 or 0 in out_indices]

        self.stage1_conv_embed = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 7, 4, 2), MapToTokens(), nn.LayerNorm(embed_dim))
        rates = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()  # as the fork; meta-safe
        starts = [sum(depth[:i]) for i in range(4)]
        for i in range(4):  # registration order = the fork's: stage1, merge1, stage2, ..., stage4
            if i > 0:
                self.add_module(f"merge{i}", MergeBlock(self.num_features[i - 1], self.num_features[i]))
            blocks = [
                CSWinBlock(
                    self.num_features[i],
                    num_heads[i],
                    split_size=split_size[i] if i < 3 else split_size[-1],
                    mlp_ratio=mlp_ratio,
                    qk_scale=qk_scale,
                    drop_path=rates[starts[i] + j],
                    last_stage=i == 3,
                )
                for j in range(depth[i])
            ]
            self.add_module(f"stage{i + 1}", nn.ModuleList(blocks))
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(_init_weights)

    def stages(self, x: torch.Tensor):
        """``(i, tokens, h, w)`` after each stage ``i`` (tokens ``(B, h*w, C)``, before any output norm)."""
        x = self.stage1_conv_embed[0](x)
        b, c, h, w = x.shape
        x = self.stage1_conv_embed[2](x.reshape(b, c, -1).transpose(-1, -2).contiguous())
        for i in range(4):
            if i > 0:
                x, h, w = getattr(self, f"merge{i}")(x, h, w)
            for blk in getattr(self, f"stage{i + 1}"):
                x = blk(x, h, w)
            yield i, x, h, w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for i, tokens, h, w in self.stages(x):
            if i > 0 or 0 in self.out_indices:
                out = getattr(self, f"norm{i}")(tokens)
                outs.append(out.transpose(1, 2).reshape(x.shape[0], -1, h, w).contiguous())
        return tuple(outs)


class CSwinClassifier(nn.Module):
    """The official ImageNet CSWin (microsoft/CSWin-Transformer ``models/cswin.py``) for ``gradlens profile``: the
    backbone's stages, a LayerNorm over the last stage's tokens, their mean and a linear head. The backbone's output
    norms are never called here, so the profile (which counts the parameters a forward reaches) leaves them out."""

    def __init__(self, num_classes: int = 1000, **settings) -> None:
        super().__init__()
        self.backbone = CSwinBackbone(**settings)
        dim = self.backbone.num_features[-1]
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *_, (_, tokens, _, _) = self.backbone.stages(x)
        return self.head(self.norm(tokens).mean(1))


def _init_weights(m: nn.Module) -> None:
    """The fork's ``init_weights()`` (``pretrained=None``)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


CSWIN_VARIANTS: dict[str, dict] = {
    # tiny: ced-mmdet/configs/cednet/cswin/retinanet_cswin_tiny_*.py (the fork's only CSWin);
    # small/base: the official CSWin_64_24322_small_224 / CSWin_96_24322_base_224, drop path rates of the
    # official dense-prediction configs (segmentation/configs/cswin/upernet_cswin_{small,base}.py)
    "cswin_tiny": dict(
        embed_dim=64, depth=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7), mlp_ratio=4.0, drop_path_rate=0.1
    ),
    "cswin_small": dict(
        embed_dim=64, depth=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7), mlp_ratio=4.0, drop_path_rate=0.4
    ),
    "cswin_base": dict(
        embed_dim=96, depth=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), split_size=(1, 2, 7, 7), mlp_ratio=4.0, drop_path_rate=0.6
    ),
}


def _build(name: str, kwargs: dict) -> CSwinBackbone:
    return CSwinBackbone(**{**CSWIN_VARIANTS[name], **kwargs})


def cswin_tiny_backbone(**kwargs) -> CSwinBackbone:
    """CSwin-T (64, [1,2,21,1], heads [2,4,8,16], split [1,2,7,7], drop path 0.1); keyword arguments
    override, ``out_indices`` defaults to (0, 1, 2, 3) as in the fork's configs."""
    return _build("cswin_tiny", kwargs)


def cswin_small_backbone(**kwargs) -> CSwinBackbone:
    """CSwin-S (64, [2,4,32,2], heads [2,4,8,16], split [1,2,7,7], drop path 0.4); ``out_indices`` defaults to (0, 1, 2, 3)."""
    return _build("cswin_small", kwargs)


def cswin_base_backbone(**kwargs) -> CSwinBackbone:
    """CSwin-B (96, [2,4,32,2], heads [4,8,16,32], split [1,2,7,7], drop path 0.6); ``out_indices`` defaults to (0, 1, 2, 3)."""
    return _build("cswin_base", kwargs)


def cswin_classifier(variant: str, num_classes: int = 1000) -> CSwinClassifier:
    """The ImageNet classifier of a :data:`CSWIN_VARIANTS` name (``"cswin_tiny"``, ...), for profiling."""
    return CSwinClassifier(num_classes, **{**CSWIN_VARIANTS[variant], "drop_path_rate": 0.0})
