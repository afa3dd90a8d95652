"""mmcv 1.x's transformer bricks (and the group-norm conv beside them) in plain PyTorch, under mmcv's own names.

The query-based detectors of the CEDNet fork (Deformable DETR, Mask2Former) are built from mmcv's
``MultiScaleDeformableAttention``, ``MultiheadAttention``, ``FFN`` and ``BaseTransformerLayer`` and mmdetection's
``SinePositionalEncoding``. These modules compute what those do in inference mode (every dropout off) with the
same operations in the same order, so that losses and gradients agree with the framework's to float32 round-off,
and they register the same parameter names, so that checkpoints load without a renaming table.

Multi-scale deformable attention is :func:`multi_scale_deformable_attn`: bilinear ``grid_sample`` of each level's
values at the sampling locations, weighted and summed. It is mmcv's ``multi_scale_deformable_attn_pytorch``, which is
also what mmcv itself runs on a CPU (its compiled kernel is CUDA-only); on a GPU mmcv's kernel differs from it only by
round-off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """mmdetection's ``inverse_sigmoid``: ``log(x / (1 - x))`` with both clamped away from zero."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def multi_scale_deformable_attn(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor,
                                weights: Tensor) -> Tensor:
    """Deformable attention over several feature levels (mmcv's ``multi_scale_deformable_attn_pytorch``).

    ``value`` ``(bs, sum(h*w), heads, d)``; ``locations`` ``(bs, queries, heads, levels, points, 2)`` in [0, 1]
    (x, y) of each level's map; ``weights`` ``(bs, queries, heads, levels, points)``. Returns
    ``(bs, queries, heads * d)``. Outside the map the values are zero (``padding_mode="zeros"``), and pixel centres
    sit at ``(i + 0.5) / size`` (``align_corners=False``).
    """
    bs, _, heads, dims = value.shape
    _, queries, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        level_value = per_level[level].flatten(2).transpose(1, 2).reshape(bs * heads, dims, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = weights.transpose(1, 2).reshape(bs * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(bs, heads * dims, queries)
    return out.transpose(1, 2).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    """mmcv's ``MultiScaleDeformableAttention`` (sequence-first, as mmdetection 2.x calls it)."""

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})")
        self.embed_dims, self.num_heads, self.num_levels, self.num_points = embed_dims, num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's ``init_weights``: zero offsets with a bias that points each head a different way."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, value: Tensor | None, query_pos: Tensor | None, reference_points: Tensor,
                shapes: list[tuple[int, int]], key_padding_mask: Tensor | None = None,
                identity: Tensor | None = None) -> Tensor:
        """``query`` ``(queries, bs, C)``; ``value`` ``(sum(h*w), bs, C)`` (``None``: the query itself, before its
        position is added); ``reference_points`` ``(bs, queries, levels, 2)``; ``key_padding_mask`` ``(bs,
        sum(h*w))``, true at padding, whose values are zeroed."""
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        query, value = query.permute(1, 0, 2), value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        num_value = value.shape[1]
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, self.num_heads, -1)
        offsets = self.sampling_offsets(query).view(bs, num_query, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(bs, num_query, self.num_heads, self.num_levels * self.num_points)
        weights = weights.softmax(-1).view(bs, num_query, self.num_heads, self.num_levels, self.num_points)
        if reference_points.shape[-1] != 2:
            raise ValueError("gradlens' deformable attention takes (x, y) reference points")
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=reference_points.dtype,
                                  device=reference_points.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = self.output_proj(multi_scale_deformable_attn(value, shapes, locations, weights))
        return out.permute(1, 0, 2) + identity


class MultiheadAttention(nn.Module):
    """mmcv's ``MultiheadAttention``: ``torch.nn.MultiheadAttention`` (sequence-first) with positions added to query
    and key and a residual."""

    def __init__(self, embed_dims: int = 256, num_heads: int = 8):
        super().__init__()
        self.embed_dims = embed_dims
        self.attn = nn.MultiheadAttention(embed_dims, num_heads)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                query_pos: Tensor | None = None, key_pos: Tensor | None = None, attn_mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None, identity: Tensor | None = None) -> Tensor:
        key = query if key is None else key
        value = key if value is None else value
        identity = query if identity is None else identity
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        out = self.attn(query=query, key=key, value=value, attn_mask=attn_mask, key_padding_mask=key_padding_mask)[0]
        return identity + out


class FFN(nn.Module):
    """mmcv's ``FFN`` with two layers: ``Linear, ReLU, Linear`` plus the residual (keys ``layers.0.0``,
    ``layers.1``)."""

    def __init__(self, embed_dims: int = 256, feedforward_channels: int = 1024):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True)),
                                    nn.Linear(feedforward_channels, embed_dims))

    def forward(self, x: Tensor, identity: Tensor | None = None) -> Tensor:
        return (x if identity is None else identity) + self.layers(x)


class DeformableEncoderLayer(nn.Module):
    """mmcv's ``BaseTransformerLayer`` with ``('self_attn', 'norm', 'ffn', 'norm')`` and deformable self-attention:
    the encoder layer of Deformable DETR and of Mask2Former's pixel decoder."""

    def __init__(self, dims: int = 256, heads: int = 8, levels: int = 4, points: int = 4, ffn: int = 1024):
        super().__init__()
        self.attentions = nn.ModuleList([MultiScaleDeformableAttention(dims, heads, levels, points)])
        self.ffns = nn.ModuleList([FFN(dims, ffn)])
        self.norms = nn.ModuleList([nn.LayerNorm(dims), nn.LayerNorm(dims)])

    def forward(self, query: Tensor, pos: Tensor, reference: Tensor, shapes: list[tuple[int, int]],
                padding: Tensor | None = None) -> Tensor:
        query = self.norms[0](self.attentions[0](query, None, pos, reference, shapes, padding))
        return self.norms[1](self.ffns[0](query))


class LayerStack(nn.Module):
    """mmcv's ``TransformerLayerSequence``: its ``layers`` (the checkpoint's ``encoder.layers.*``), and a decoder's
    ``post_norm`` where it has one."""

    def __init__(self, layers: list[nn.Module], post_norm: int | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if post_norm is not None:
            self.post_norm = nn.LayerNorm(post_norm)


class ConvGN(nn.Module):
    """mmcv's ``ConvModule`` with group norm (32 groups; keys ``conv``, ``gn``) and an optional ReLU, as the DETR
    necks and Mask2Former's pixel decoder build it."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, bias: bool = False, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=bias)
        self.gn = nn.GroupNorm(32, c_out)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.gn(self.conv(x))
        return F.relu(x) if self.relu else x


class SinePositionalEncoding(nn.Module):
    """mmdetection's ``SinePositionalEncoding`` (normalised): sines and cosines of each pixel's position among the
    unpadded pixels, ``(bs, 2 * num_feats, h, w)`` from a padding mask ``(bs, h, w)`` (true at padding)."""

    def __init__(self, num_feats: int = 128, temperature: float = 10000, normalize: bool = True,
                 scale: float = 2 * math.pi, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.num_feats, self.temperature, self.normalize = num_feats, temperature, normalize
        self.scale, self.eps, self.offset = scale, eps, offset

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = 1 - mask.to(torch.int)
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        b, h, w = mask.shape
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).view(b, h, w, -1)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).view(b, h, w, -1)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def padding_masks(batch_shape: tuple[int, int], sizes: list[tuple[int, int]], maps: list[Tensor]) -> list[Tensor]:
    """mmdetection's padding mask (true at padding) of each image at each map's size: the input-sized mask
    resized by nearest neighbour (``F.interpolate``'s default), as the DETR heads make it."""
    full = maps[0].new_ones((len(sizes), *batch_shape))
    for i, (h, w) in enumerate(sizes):
        full[i, :h, :w] = 0
    return [F.interpolate(full[None], size=m.shape[-2:]).to(torch.bool).squeeze(0) for m in maps]


def valid_ratios(mask: Tensor) -> Tensor:
    """mmdetection's ``get_valid_ratio``: the unpadded fraction of a mask's width and height, ``(bs, 2)``."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)
