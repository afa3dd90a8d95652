"""MSG-Transformer (messenger-token Transformer) classifier and detection backbone, in plain PyTorch.

The official code (github.com/hustvl/MSG-Transformer, ``models/msg_transformer.py``, configs
``configs/msg_{tiny,small,base}_p4_win7_224.yaml``) publishes only the ImageNet classifier. This
module rebuilds it without timm: parameter names, registration order and shapes are the
official ones, so an official state dict loads with ``load_state_dict(strict=True)`` (after
:func:`drop_relative_position_index`), and eval logits equal the official model's for the same
weights and input. The official training script saves ``{"model": state_dict, "optimizer": ...,
"lr_scheduler": ..., "max_accuracy": ..., "epoch": ..., "config": ...}`` (``utils.save_checkpoint``):
take ``checkpoint["model"]``. (The README links no released weights.)

Architecture, briefly: a 7x7 stride-4 convolution (padding 2) embeds the image; every stage
works on ``window_size x window_size`` windows, each with one extra **MSG token**; a block is
LayerNorm, multi-head attention inside each window over its ``ws*ws`` patch tokens plus its MSG
token (relative position bias for patch pairs, two learned biases per head ``rel_pos_msg`` for
patch->MSG and MSG->anything), residual, then the **shuffle**: inside each region of
``shuffle_size[i] x shuffle_size[i]`` windows the MSG tokens swap channel groups (window ``i``'s
new token holds group ``i`` of every window's old token; a pure permutation, no MACs), then
LayerNorm + MLP, residual. Between stages one ``Conv2d(C, 2C, 3, stride 2, padding 1)`` + LayerNorm
(``downsample.reduction`` / ``downsample.norm``) is applied to the patch-token map *and*, with the
same weights, to the map of MSG tokens (one per window). The classifier reads the single MSG
token left after the last stage (``norm``, ``head``); there is no average pooling.

MSG tokens: the learned parameter ``msg_tokens`` has shape ``(1, shuffle_size[0]**2, 1, C)``:
one token per window *position inside a shuffle region*, shared by all regions. Its size does not
depend on the 224x224 input; at 224 the 8x8 window grid holds 2x2 regions of 4x4 windows. Here
the window at grid position ``(i, j)`` starts with ``msg_tokens[0, (i % s) * s + j % s]``
(``s = shuffle_size[0]``), which is the official assignment at 224 and extends it unchanged to
any window grid.

Detection backbone (:class:`MSGBackbone`) -- **gradlens' own layout**. The authors published no
detection code: their README's MS-COCO table gives box *and mask* AP (51.4 / 44.6 for MSG-T,
83M params, 731G FLOPs), i.e. a Mask R-CNN-family detector -- the paper's Cascade Mask R-CNN, the
same setting as Swin's detection results (Swin-T: 86M, 745G) -- but no backbone file or config,
so there is no official detection backbone to copy. The official code is Swin-Transformer-derived; :class:`MSGBackbone` is built the way
Swin's detection backbone (Swin-Transformer-Object-Detection, as in the CEDNet fork's
``ced-mmdet/mmdet/models/backbones/swin_transformer.py`` and :mod:`gradlens.models.backbones.swin`) adapts
the Swin classifier:

* parameter names are the classifier's (``msg_tokens``, ``patch_embed.*``, ``layers.*``), so
  ImageNet weights load into it (``strict=False``: the classifier's ``norm``/``head`` are not
  used, the ``norm{i}`` are new); the classifier's final ``norm`` and ``head`` are dropped and a
  LayerNorm ``norm{i}`` is added for each stage in ``out_indices`` (default ``(0, 1, 2, 3)``),
  registered after ``layers`` in the order given;
* ``forward`` returns the patch-token maps of the stages in ``out_indices`` (stage order), each
  passed through its ``norm{i}``, as ``(N, C_i, H_i, W_i)`` at strides 4, 8, 16, 32; MSG tokens
  are not returned;
* padding, for any input size: the image is zero-padded right/bottom to a multiple of the patch
  size (4) before the embedding (so maps are ``ceil(H / 4)``, then ceil-halved by each stride-2
  convolution); inside every block the *normed* patch tokens are zero-padded right/bottom to
  whole windows and cropped after attention (padded tokens take part in attention, as in Swin's
  detection backbone); the window grid of a stage is ``ceil(h / ws) x ceil(w / ws)``, one MSG token
  per window (the stride-2 convolution of the MSG map gives exactly the next stage's grid, since
  ``ceil(ceil(h / ws) / 2) == ceil(ceil(h / 2) / ws)``); for the shuffle the MSG-token grid is
  zero-padded right/bottom to whole regions and cropped after it (a real token then receives zeros
  for the channel groups of the missing windows);
* windows are never shrunk to the map size (the classifier's ``min(input_resolution) <=
  window_size`` rule, which only fires below 224 input, is dropped, as Swin's detection backbone
  drops it).

At inputs whose stage-0 map is a multiple of ``window_size * 8`` tokens in both directions
(multiples of 224 pixels for the released configurations) nothing is padded and each returned map
equals ``norm{i}`` of the official classifier's stage-``i`` patch tokens.

Consequently an "mmdetection 2.x checkpoint" of MSG-Transformer is, for gradlens, a RetinaNet
state dict whose ``backbone.*`` keys are :class:`MSGBackbone`'s state-dict keys (plus, optionally,
the ``relative_position_index`` buffers, which the official classifier stores): ``backbone.msg_tokens``,
``backbone.patch_embed.*``, ``backbone.layers.{i}.blocks.{j}.{norm1,attn.{relative_position_bias_table,
rel_pos_msg,qkv,proj},norm2,mlp.fc1,mlp.fc2}.*``, ``backbone.layers.{i}.downsample.{reduction,norm}.*``,
``backbone.norm{i}.*``. :func:`recognise` reads the variant from those keys and ``out_indices``
from the ``norm{i}`` present.

Other differences from the official code, none of which changes eval outputs at 224:

* ``relative_position_index`` is a non-persistent buffer (recomputed); drop it from official state
  dicts with :func:`drop_relative_position_index`;
* drop path is ``torchvision.ops.StochasticDepth(p, "row")`` per image, applied separately to the
  patch-token and MSG-token branches (the official timm ``DropPath`` draws one mask per *shuffle
  region* of the ``(B * regions, windows, tokens, C)`` tensor); dropout layers (rate 0 in all
  configs) are omitted; absolute position embedding (``ape``) is not supported;
* the classifier goes through the same padding rules as the detection backbone, so it also accepts
  inputs that the official model refuses (it asserts the 224 input), as long as the last stage has a
  single window (inputs up to ``32 * window_size`` pixels a side); larger inputs raise ``ValueError``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from gradlens.errors import CheckpointError
from gradlens.models.backbones.layers import Mlp
from gradlens.models.backbones.swin import drop_relative_position_index

__all__ = [
    "MSG_VARIANTS",
    "TINY_MSG",
    "MSGBackbone",
    "MSGTransformer",
    "drop_relative_position_index",
    "is_msg_checkpoint",
    "msg_base",
    "msg_base_backbone",
    "msg_small",
    "msg_small_backbone",
    "msg_tiny",
    "msg_tiny_backbone",
    "recognise",
    "shuffle_msg",
]


# ----------------------------------------------------------------------------------- helpers


def _relative_position_index(ws: int) -> torch.Tensor:
    """``(ws*ws, ws*ws)`` index into the ``(2ws-1)**2`` bias table for every (query, key) patch pair."""
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :] + ws - 1) * (2 * ws - 1) + (xs[:, None] - xs[None, :] + ws - 1)


def _to_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``(B, H, W, C)``, H and W multiples of ``ws`` -> ``(B * nW, ws * ws, C)``, windows row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _from_windows(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_to_windows`."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shuffle_msg(msg: torch.Tensor, shuffle_size: int) -> torch.Tensor:
    """The official MSG shuffle on a ``(B, gh, gw, C)`` map of MSG tokens (one per window).

    Inside every region of ``s x s`` windows (``s = shuffle_size``, regions row-major, windows
    row-major inside a region) the token of window ``i`` is replaced by the concatenation over
    windows ``j`` of channel group ``i`` (of ``s*s`` groups) of window ``j``'s token. A grid that is
    not a multiple of ``s`` is zero-padded right/bottom for the shuffle and cropped after it.
    """
    if shuffle_size == 1:
        return msg
    b, gh, gw, c = msg.shape
    s, g = shuffle_size, shuffle_size * shuffle_size
    ph, pw = (-gh) % s, (-gw) % s
    if ph or pw:
        msg = F.pad(msg, (0, 0, 0, pw, 0, ph))
    rh, rw = (gh + ph) // s, (gw + pw) // s
    m = msg.reshape(b, rh, s, rw, s, g, c // g).permute(0, 1, 3, 2, 4, 5, 6).reshape(b, rh, rw, g, g, c // g)
    m = m.transpose(3, 4).reshape(b, rh, rw, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, rh * s, rw * s, c)
    return m[:, :gh, :gw] if ph or pw else m


# ----------------------------------------------------------------------------------- modules


class MSGAttention(nn.Module):
    """Multi-head attention inside a window over ``1 + ws*ws`` tokens (token 0: the window's MSG token)."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True, qk_scale: float | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.rel_pos_msg = nn.Parameter(torch.zeros(num_heads, 2, 1, 1))  # [:, 0]: patch -> MSG, [:, 1]: MSG -> all
        # the official checkpoints carry this buffer; it is recomputed here, so not persistent
        self.register_buffer("relative_position_index", _relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        nn.init.trunc_normal_(self.rel_pos_msg, std=0.02)

    def position_bias(self) -> torch.Tensor:
        """``(heads, 1 + n, 1 + n)`` additive bias, ``n = ws*ws``."""
        n = self.window_size**2
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        to_msg = self.rel_pos_msg[:, 0].expand(-1, n, 1)
        from_msg = self.rel_pos_msg[:, 1].expand(-1, 1, n + 1)
        return torch.cat((from_msg, torch.cat((to_msg, table), dim=-1)), dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B * nW, 1 + ws*ws, C)``."""
        bn, n, c = x.shape
        qkv = self.qkv(x).reshape(bn, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = (attn + self.position_bias().unsqueeze(0)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bn, n, c))


class MSGBlock(nn.Module):
    """Window attention with MSG tokens, MSG shuffle, MLP; on a patch map and a MSG-token map."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shuffle_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_path: float = 0.0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.window_size, self.shuffle_size, self.shuffle = window_size, shuffle_size, shuffle
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MSGAttention(dim, window_size, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, msg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``(B, h, w, C)`` patch tokens; ``msg``: ``(B, ceil(h/ws), ceil(w/ws), C)``."""
        b, h, w, c = x.shape
        ws = self.window_size
        gh, gw = msg.shape[1:3]
        hp, wp = gh * ws, gw * ws
        if not (0 <= hp - h < ws and 0 <= wp - w < ws):
            raise ValueError(f"a {h}x{w} map needs a {math.ceil(h / ws)}x{math.ceil(w / ws)} MSG grid, got {gh}x{gw}")
        y = self.norm1(x)
        if hp != h or wp != w:
            y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h))  # zeros after the norm, as Swin's detection backbone
        tokens = torch.cat((self.norm1(msg).reshape(-1, 1, c), _to_windows(y, ws)), dim=1)
        tokens = self.attn(tokens)
        msg = msg + self.drop_path(tokens[:, 0].reshape(b, gh, gw, c))
        y = _from_windows(tokens[:, 1:], ws, hp, wp)
        if hp != h or wp != w:
            y = y[:, :h, :w]
        x = x + self.drop_path(y)
        if self.shuffle:
            msg = shuffle_msg(msg, self.shuffle_size)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        msg = msg + self.drop_path(self.mlp(self.norm2(msg)))
        return x, msg


class PatchMerging(nn.Module):
    """``Conv2d(C, 2C, 3, stride 2, padding 1)`` + LayerNorm on a channels-last map (patch or MSG tokens)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, 2, 1)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, h, w, C)`` -> ``(B, ceil(h/2), ceil(w/2), 2C)``."""
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class MSGStage(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        shuffle_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        drop_path: Sequence[float],
        downsample: bool,
        shuffle: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                MSGBlock(dim, num_heads, window_size, shuffle_size, mlp_ratio, qkv_bias, qk_scale, drop_path[i], shuffle)
                for i in range(depth)
            ]
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, msg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(stage patch tokens, stage MSG tokens, next stage's patch tokens, next stage's MSG tokens)."""
        for blk in self.blocks:
            x, msg = blk(x, msg)
        if self.downsample is None:
            return x, msg, x, msg
        return x, msg, self.downsample(x), self.downsample(msg)


class PatchEmbed(nn.Module):
    """``Conv2d(in, C, 7, stride=patch_size, padding=2)`` and LayerNorm; returns a channels-last map."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=patch_size, padding=2)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:  # as Swin's detection PatchEmbed: maps are ceil(H / p) x ceil(W / p)
            x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class _MSGTrunk(nn.Module):
    """``msg_tokens``, ``patch_embed`` and ``layers``, shared by the classifier and the backbone."""

    def __init__(
        self,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int,
        shuffle_size: Sequence[int],
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        drop_path_rate: float,
        patch_norm: bool,
        patch_size: int,
        in_chans: int,
        manip_type: str,
        ape: bool,
    ) -> None:
        super().__init__()
        if ape:
            raise NotImplementedError("absolute position embedding (ape=True) is not supported")
        if manip_type not in ("shuf", "none"):
            raise ValueError(f"manip_type must be 'shuf' or 'none', got {manip_type!r}")
        depths, num_heads, shuffle_size = [int(d) for d in depths], [int(h) for h in num_heads], [int(s) for s in shuffle_size]
        n = len(depths)
        if not (len(num_heads) == len(shuffle_size) == n):
            raise ValueError(f"depths, num_heads and shuffle_size differ in length: {depths}, {num_heads}, {shuffle_size}")
        self.num_layers = n
        self.embed_dim = embed_dim
        self.window_size = window_size
        self.shuffle_size = tuple(shuffle_size)
        self.num_features = [int(embed_dim * 2**i) for i in range(n)]
        shuffle = manip_type == "shuf"
        for dim, s in zip(self.num_features, shuffle_size):
            if s < 1 or (shuffle and dim % (s * s)):
                raise ValueError(f"stage width {dim} must be a multiple of shuffle_size**2 = {s * s}")

        self.msg_tokens = nn.Parameter(torch.zeros(1, shuffle_size[0] ** 2, 1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # meta-safe
        self.layers = nn.ModuleList(
            [
                MSGStage(
                    self.num_features[i], depths[i], num_heads[i], window_size, shuffle_size[i], mlp_ratio, qkv_bias,
                    qk_scale, rates[sum(depths[:i]) : sum(depths[: i + 1])], downsample=i < n - 1, shuffle=shuffle,
                )
                for i in range(n)
            ]
        )
        nn.init.trunc_normal_(self.msg_tokens, std=0.02)

    def _init_weights(self) -> None:
        """The official initialisation of Linear and LayerNorm layers (convolutions keep PyTorch's)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def initial_msg(self, batch: int, h: int, w: int) -> torch.Tensor:
        """``(B, ceil(h/ws), ceil(w/ws), C)``: window ``(i, j)`` gets ``msg_tokens[0, (i % s) * s + j % s]``."""
        s, ws = self.shuffle_size[0], self.window_size
        gh, gw = -(-h // ws), -(-w // ws)
        tile = self.msg_tokens.reshape(s, s, -1)
        grid = tile.repeat(-(-gh // s), -(-gw // s), 1)[:gh, :gw]
        return grid.unsqueeze(0).expand(batch, -1, -1, -1)

    def stages(self, x: torch.Tensor):
        """Yields (stage index, patch tokens ``(B, h, w, C)``, MSG tokens) after each stage's blocks."""
        x = self.patch_embed(x)
        msg = self.initial_msg(x.shape[0], x.shape[1], x.shape[2])
        for i, layer in enumerate(self.layers):
            out, out_msg, x, msg = layer(x, msg)
            yield i, out, out_msg


class MSGTransformer(_MSGTrunk):
    """The official ImageNet classifier ``MSGTransformer`` (state-dict and logit compatible).

    ``forward(x)`` -> ``(N, num_classes)`` logits from the last stage's single MSG token
    (``norm`` then ``head``); ``x`` is 224x224 for the released models.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        shuffle_size: Sequence[int] = (4, 4, 2, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_path_rate: float = 0.1,
        patch_norm: bool = True,
        patch_size: int = 4,
        in_chans: int = 3,
        manip_type: str = "shuf",
        ape: bool = False,
    ) -> None:
        super().__init__(
            embed_dim, depths, num_heads, window_size, shuffle_size, mlp_ratio, qkv_bias, qk_scale, drop_path_rate,
            patch_norm, patch_size, in_chans, manip_type, ape,
        )
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(self.num_features[-1])
        self.head = nn.Linear(self.num_features[-1], num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_last)``: the normed MSG token of the last stage."""
        for i, _, msg in self.stages(x):
            if i == self.num_layers - 1:
                if msg.shape[1:3] != (1, 1):
                    raise ValueError(
                        f"the classifier reads the single MSG token of its last stage, but a {tuple(x.shape[-2:])} "
                        f"input leaves a {msg.shape[1]}x{msg.shape[2]} window grid there (inputs up to "
                        f"{self.patch_embed.patch_size * 2 ** (self.num_layers - 1) * self.window_size} pixels a side)"
                    )
                return self.norm(msg[:, 0, 0])
        raise AssertionError("unreachable")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class MSGBackbone(_MSGTrunk):
    """MSG-Transformer detection backbone (gradlens' own layout, see the module docstring).

    Args: as :class:`MSGTransformer` (no ``num_classes``), plus ``out_indices``: the stages whose
    patch-token maps are returned, each through a LayerNorm ``norm{i}``. ``forward(x)`` returns a
    tuple of ``(N, embed_dim * 2**i, ceil(H / 2**(i+2)), ...)`` maps (``ceil`` applied per stage) in
    stage order; ``out_channels`` lists their channels.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        shuffle_size: Sequence[int] = (4, 4, 2, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_path_rate: float = 0.1,
        patch_norm: bool = True,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        patch_size: int = 4,
        in_chans: int = 3,
        manip_type: str = "shuf",
        ape: bool = False,
    ) -> None:
        super().__init__(
            embed_dim, depths, num_heads, window_size, shuffle_size, mlp_ratio, qkv_bias, qk_scale, drop_path_rate,
            patch_norm, patch_size, in_chans, manip_type, ape,
        )
        n = self.num_layers
        out_indices = [int(i) for i in out_indices]
        if not out_indices or any(i not in range(n) for i in out_indices) or len(set(out_indices)) != len(out_indices):
            raise ValueError(f"out_indices must be distinct stage indices in 0..{n - 1}, got {out_indices}")
        self.out_indices = tuple(out_indices)
        for i in out_indices:  # registration order = the order given, as in Swin's detection backbone
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.out_channels = [self.num_features[i] for i in sorted(out_indices)]
        self._init_weights()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        last = max(self.out_indices)
        for i, out, _ in self.stages(x):
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous())
            if i == last:
                break
        return tuple(outs)


# ----------------------------------------------------------------------------------- variants

# configs/msg_{tiny,small,base}_p4_win7_224.yaml (window 7, shuffle [4, 4, 2, 1]; drop path of the
# ImageNet configs, as no detection config exists; gradlens passes drop_path_rate=0.0)
MSG_VARIANTS: dict[str, dict] = {
    "msg_tiny": dict(embed_dim=64, depths=(2, 4, 12, 4), num_heads=(2, 4, 8, 16), window_size=7, shuffle_size=(4, 4, 2, 1), drop_path_rate=0.1),
    "msg_small": dict(embed_dim=96, depths=(2, 4, 12, 4), num_heads=(3, 6, 12, 24), window_size=7, shuffle_size=(4, 4, 2, 1), drop_path_rate=0.3),
    "msg_base": dict(embed_dim=96, depths=(2, 4, 28, 4), num_heads=(3, 6, 12, 24), window_size=7, shuffle_size=(4, 4, 2, 1), drop_path_rate=0.5),
}

# Runs a forward+backward at 64x64 in a few milliseconds on CPU; stage maps 16, 8, 4, 2 with 2x2
# windows: the window grids (8, 4, 2, 1) are whole shuffle regions at 64x64 and padded otherwise.
TINY_MSG: dict = dict(
    embed_dim=4, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=2, shuffle_size=(2, 2, 2, 1), drop_path_rate=0.0
)


def _classifier(name: str, kwargs: dict) -> MSGTransformer:
    return MSGTransformer(**{**MSG_VARIANTS[name], **kwargs})


def msg_tiny(**kwargs) -> MSGTransformer:
    """MSG-Transformer-T classifier (64, [2,4,12,4], [2,4,8,16], window 7, shuffle [4,4,2,1]); 25.09M params, 3.82G MACs."""
    return _classifier("msg_tiny", kwargs)


def msg_small(**kwargs) -> MSGTransformer:
    """MSG-Transformer-S classifier (96, [2,4,12,4], [3,6,12,24], window 7, shuffle [4,4,2,1]); 55.97M params, 8.46G MACs."""
    return _classifier("msg_small", kwargs)


def msg_base(**kwargs) -> MSGTransformer:
    """MSG-Transformer-B classifier (96, [2,4,28,4], [3,6,12,24], window 7, shuffle [4,4,2,1]); 84.39M params, 14.24G MACs."""
    return _classifier("msg_base", kwargs)


def _backbone(name: str, kwargs: dict) -> MSGBackbone:
    return MSGBackbone(**{**MSG_VARIANTS[name], **kwargs})


def msg_tiny_backbone(**kwargs) -> MSGBackbone:
    """MSG-Transformer-T detection backbone; ``out_indices`` defaults to (0, 1, 2, 3), channels 64/128/256/512."""
    return _backbone("msg_tiny", kwargs)


def msg_small_backbone(**kwargs) -> MSGBackbone:
    """MSG-Transformer-S detection backbone; ``out_indices`` defaults to (0, 1, 2, 3), channels 96/192/384/768."""
    return _backbone("msg_small", kwargs)


def msg_base_backbone(**kwargs) -> MSGBackbone:
    """MSG-Transformer-B detection backbone; ``out_indices`` defaults to (0, 1, 2, 3), channels 96/192/384/768."""
    return _backbone("msg_base", kwargs)


# ----------------------------------------------------------------------------------- checkpoints

_DEFAULT_OUT_INDICES = [0, 1, 2, 3]
_REL_POS_MSG = re.compile(r"^backbone\.layers\.\d+\.blocks\.\d+\.attn\.rel_pos_msg$")


def is_msg_checkpoint(sd: Mapping[str, object]) -> bool:
    """Whether a RetinaNet state dict's backbone is an MSG-Transformer (``backbone.msg_tokens`` or the
    MSG-only ``attn.rel_pos_msg`` biases; no other family gradlens knows has either)."""
    return "backbone.msg_tokens" in sd or any(isinstance(k, str) and _REL_POS_MSG.match(k) for k in sd)


def _count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def recognise(sd: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
    """``(f"retinanet_{variant}", backbone overrides)`` of an mmdetection RetinaNet state dict with an
    MSG-Transformer backbone; overrides are ``{"out_indices": [...]}`` when its ``norm{i}`` are not
    those of (0, 1, 2, 3), else ``{}``. Raises :class:`CheckpointError` if no variant matches."""
    if "backbone.msg_tokens" not in sd:
        raise CheckpointError("The checkpoint's MSG-Transformer backbone lacks backbone.msg_tokens (its messenger tokens).")
    keys = [k[len("backbone."):] for k in sd if k.startswith("backbone.")]
    tokens = sd["backbone.msg_tokens"]
    embed = int(tokens.shape[-1])
    shuffle0 = math.isqrt(int(tokens.shape[1]))
    n = _count(keys, "layers")
    depths = [_count(keys, f"layers.{i}.blocks") for i in range(n)]
    try:
        heads = [int(sd[f"backbone.layers.{i}.blocks.0.attn.rel_pos_msg"].shape[0]) for i in range(n)]
        table = int(sd["backbone.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0])
    except KeyError as exc:
        raise CheckpointError(f"The checkpoint's MSG-Transformer backbone lacks {exc.args[0]}.") from None
    window = (math.isqrt(table) + 1) // 2
    out_indices = [i for i in range(n) if f"backbone.norm{i}.weight" in sd]
    for variant, settings in MSG_VARIANTS.items():
        if (
            settings["embed_dim"] == embed
            and list(settings["depths"]) == depths
            and list(settings["num_heads"]) == heads
            and settings["window_size"] == window
            and settings["shuffle_size"][0] == shuffle0
        ):
            if not out_indices:
                raise CheckpointError(f"The checkpoint's {variant} backbone has no output norms (backbone.norm{{i}}).")
            return f"retinanet_{variant}", ({} if out_indices == _DEFAULT_OUT_INDICES else {"out_indices": out_indices})
    raise CheckpointError(
        f"The checkpoint's MSG-Transformer backbone (embed {embed}, depths {depths}, heads {heads}, window {window}, "
        f"{shuffle0 * shuffle0} MSG tokens) matches none of MSG-Transformer-T/S/B."
    )
