"""Swin Transformer detection backbone, parameter-compatible with the CEDNet mmdetection fork.

The CEDNet Swin RetinaNet (``ced-mmdet/configs/cednet/swin/retinanet_swin_*``) uses the backbone
registered as ``SwinTransformer`` by ``ced-mmdet/mmdet/models/backbones/swin_transformer.py`` (the
Swin-Transformer-Object-Detection code; the fork's ``swin.py`` also defines a ``SwinTransformer``
but is never imported by the registry). This module rebuilds it in plain PyTorch: parameter names,
registration order and shapes equal the fork's, and eval outputs equal the fork's for the same
weights and input.

**Loading checkpoints.** The fork registers ``layers.{i}.blocks.{j}.attn.relative_position_index``
as a persistent buffer, so its checkpoints carry it. Here it is a *non-persistent* buffer
(recomputed from ``window_size``), so drop those keys before ``load_state_dict(strict=True)``, e.g.
with :func:`drop_relative_position_index`. Since loading never touches it, a model built on the
``meta`` device and materialised with ``to_empty()`` holds garbage there: build on a real device
(or rebuild the buffers) before loading.

Behaviour that is the fork's, kept on purpose:

* the input is zero-padded on the right/bottom to a multiple of the patch size;
* inside every block the *normed* tokens are zero-padded to multiples of the window; padded
  tokens take part in attention (only the cyclic-shift regions are masked, with ``-100``);
* odd blocks always roll by ``window_size // 2`` and use the shift mask, even when the feature
  map is no larger than one window (torchvision's Swin drops the shift there);
* patch merging zero-pads odd heights/widths; the next stage is ``((H + 1) // 2, (W + 1) // 2)``;
* **all four stages are returned**, whatever ``out_indices`` says: ``out_indices`` only selects
  which stages get an output norm ``norm{i}``; the others are returned un-normed. (The fork's
  RetinaNet feeds all four maps to an FPN with ``start_level=1``, which ignores stage 0.)

Dropout layers (all rate 0 in the configs, no parameters) are omitted; drop path is
``torchvision.ops.StochasticDepth(p, "row")``. Absolute position embedding (``ape=True``) is not
supported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from gradlens.models.backbones.layers import Mlp

__all__ = [
    "SWIN_VARIANTS",
    "SwinBackbone",
    "WindowAttention",
    "drop_relative_position_index",
    "from_windows",
    "shift_mask",
    "shifted_window_attention",
    "swin_base_backbone",
    "swin_small_backbone",
    "swin_tiny_backbone",
    "to_windows",
]

_MASK_VALUE = -100.0


def drop_relative_position_index(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without the fork's ``relative_position_index`` buffers (recomputed here)."""
    return {k: v for k, v in state_dict.items() if not k.endswith("relative_position_index")}


def _relative_position_index(ws: int) -> torch.Tensor:
    """``(ws*ws, ws*ws)`` index into the ``(2ws-1)**2`` bias table for every (query, key) pair."""
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + (ws - 1)
    dx = xs[:, None] - xs[None, :] + (ws - 1)
    return dy * (2 * ws - 1) + dx


def to_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``(B, H, W, C)`` with H, W multiples of ``ws`` -> ``(B * nW, ws * ws, C)``, windows row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def from_windows(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shift_mask(hp: int, wp: int, ws: int, shift: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(nW, ws*ws, ws*ws)`` additive mask (0 / -100) separating the regions that the cyclic shift
    brings together, for a padded ``hp x wp`` map; the same regions as the fork's three slices per
    axis ``[0, -ws)``, ``[-ws, -shift)``, ``[-shift, end)``, computed on ``hp, wp`` even when a
    map is a single window."""

    def region(n: int) -> torch.Tensor:
        r = torch.zeros(n, dtype=torch.long, device=device)
        r[max(n - ws, 0) :] = 1
        r[max(n - shift, 0) :] = 2
        return r

    label = region(hp)[:, None] * 3 + region(wp)[None, :]  # hp x wp region ids
    win = to_windows(label[None, :, :, None], ws).squeeze(-1)  # nW, ws*ws
    same = win[:, None, :] == win[:, :, None]
    return torch.zeros(same.shape, device=device, dtype=dtype).masked_fill(~same, _MASK_VALUE)


def shifted_window_attention(attn: nn.Module, y: torch.Tensor, ws: int, shift: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The fork's (shifted-)window attention of normed ``(B, H, W, C)`` tokens, returned as ``(B, H, W, C)``.

    Zero-pads right/bottom to multiples of ``ws`` (after the norm, as in the fork), rolls by ``-shift``,
    attends inside windows (``mask``: :func:`shift_mask` of the padded size, used only when shifted; None
    computes it), rolls back and crops. Swin's blocks and CEDNet's Swin blocks share it.
    """
    b, h, w, c = y.shape
    pad_b, pad_r = (-h) % ws, (-w) % ws
    y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = h + pad_b, w + pad_r
    if shift > 0:
        if mask is None:
            mask = shift_mask(hp, wp, ws, shift, y.device, y.dtype)
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
    y = attn(to_windows(y, ws), mask=mask if shift > 0 else None)
    y = from_windows(y, ws, hp, wp)
    if shift > 0:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    return y[:, :h, :w, :]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``ws x ws`` windows with a relative position bias table."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True, qk_scale: float | None = None) -> None:
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # the fork's checkpoints carry this buffer; it is recomputed here, so not persistent
        self.register_buffer("relative_position_index", _relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B * nW, N, C)``; ``mask``: ``(nW, N, N)`` additive, or None."""
        bn, n, c = x.shape
        qkv = self.qkv(x).reshape(bn, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # bn, heads, n, n
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bn // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(bn, n, c)
        return self.proj(x)


class SwinBlock(nn.Module):
    """(Shifted-)window attention block on ``(B, H*W, C)`` tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size}")
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int, shift_mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"expected {h}x{w} tokens, got {n}")
        y = shifted_window_attention(self.attn, self.norm1(x).view(b, h, w, c), self.window_size, self.shift_size, shift_mask)
        x = x + self.drop_path(y.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation (zero-padding odd sizes), LayerNorm(4C), Linear(4C -> 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)  # registered before norm, as in the fork
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = x.reshape(b, -1, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``blocks`` (alternately unshifted / shifted) and an optional ``downsample`` (patch merging)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        drop_path: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window_size, self.shift_size = window_size, window_size // 2
        self.blocks = nn.ModuleList(
            [
                SwinBlock(
                    dim,
                    num_heads,
                    window_size=window_size,
                    shift_size=0 if i % 2 == 0 else window_size // 2,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop_path=drop_path[i],
                )
                for i in range(depth)
            ]
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Returns (stage output tokens, next-stage tokens, next h, next w)."""
        ws = self.window_size
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        mask = shift_mask(hp, wp, ws, self.shift_size, x.device, x.dtype)
        for blk in self.blocks:
            x = blk(x, h, w, mask)
        if self.downsample is None:
            return x, x, h, w
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, embed_dim, ceil(H/p), ceil(W/p))``, zero-padding right/bottom."""
        p = self.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        x = self.proj(x)
        if self.norm is not None:
            b, c, hh, ww = x.shape
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, hh, ww)
        return x


class SwinBackbone(nn.Module):
    """The fork's ``SwinTransformer`` detection backbone (state-dict and output compatible).

    Args:
        embed_dim: channels of stage 0 (stage ``i`` has ``embed_dim * 2**i``).
        depths, num_heads: blocks and attention heads per stage.
        window_size: attention window (shift is ``window_size // 2`` in odd blocks).
        mlp_ratio, qkv_bias, qk_scale: block MLP width ratio, qkv bias, attention scale override.
        drop_path_rate: stochastic-depth rate of the last block (linear from 0 over all blocks).
        patch_norm: LayerNorm after the patch embedding.
        out_indices: stages that get an output norm ``norm{i}``.
        patch_size, in_chans: patch embedding.
        ape: must be False (absolute position embedding is not supported).

    ``forward(x)`` returns a tuple of **all** stage maps, ``(N, embed_dim * 2**i, ...)`` at strides
    4, 8, 16, 32 (sizes ceil-halved from ``ceil(H / 4)``), normed for the stages in
    ``out_indices``; ``out_channels`` lists their channels. Fork checkpoints load with
    ``strict=True`` after :func:`drop_relative_position_index`.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_path_rate: float = 0.2,
        patch_norm: bool = True,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        patch_size: int = 4,
        in_chans: int = 3,
        ape: bool = False,
    ) -> None:
        super().__init__()
        if ape:
            raise NotImplementedError("absolute position embedding (ape=True) is not supported")
        depths, num_heads = list(depths), list(num_heads)
        if len(depths) != len(num_heads):
            raise ValueError(f"depths and num_heads differ in length: {depths} vs {num_heads}")
        n = len(depths)
        out_indices = [int(i) for i in out_indices]
        if any(i not in range(n) for i in out_indices) or len(set(out_indices)) != len(out_indices):
            raise ValueError(f"out_indices must be distinct stage indices in 0..{n - 1}, got {out_indices}")
        self.num_layers = n
        self.embed_dim = embed_dim
        self.window_size = window_size
        self.out_indices = tuple(out_indices)
        self.num_features = [int(embed_dim * 2**i) for i in range(n)]
        self.out_channels = list(self.num_features)  # every stage is returned

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # as the fork; meta-safe
        self.layers = nn.ModuleList()
        for i in range(n):
            self.layers.append(
                SwinStage(
                    self.num_features[i],
                    depths[i],
                    num_heads[i],
                    window_size,
                    mlp_ratio,
                    qkv_bias,
                    qk_scale,
                    rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=i < n - 1,
                )
            )
        for i in out_indices:  # registration order = the order given, as in the fork
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, layer in enumerate(self.layers):
            out, x, nh, nw = layer(x, h, w)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
            outs.append(out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            h, w = nh, nw
        return tuple(outs)


SWIN_VARIANTS: dict[str, dict] = {
    # tiny: ced-mmdet/configs/cednet/swin/retinanet_swin_tiny_*.py; small/base: the standard Swin values
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2),
    "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7, drop_path_rate=0.2),
}


def _build(name: str, kwargs: dict) -> SwinBackbone:
    return SwinBackbone(**{**SWIN_VARIANTS[name], "out_indices": (1, 2, 3), **kwargs})


def swin_tiny_backbone(**kwargs) -> SwinBackbone:
    """Swin-T (96, [2,2,6,2], [3,6,12,24], window 7); keyword arguments override, ``out_indices`` defaults to (1, 2, 3)."""
    return _build("swin_tiny", kwargs)


def swin_small_backbone(**kwargs) -> SwinBackbone:
    """Swin-S (96, [2,2,18,2], [3,6,12,24], window 7); ``out_indices`` defaults to (1, 2, 3)."""
    return _build("swin_small", kwargs)


def swin_base_backbone(**kwargs) -> SwinBackbone:
    """Swin-B (128, [2,2,18,2], [4,8,16,32], window 7); ``out_indices`` defaults to (1, 2, 3)."""
    return _build("swin_base", kwargs)
