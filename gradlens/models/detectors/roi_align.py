"""RoIAlign whose backward pass is one sparse matrix product.

mmdetection's ``RoIAlign(aligned=True, sampling_ratio=0)`` (mmcv's kernel) and ``torchvision.ops.roi_align`` with the
same settings compute the same forward values; gradlens uses torchvision's kernel for them. Its CPU backward,
though, walks every RoI, channel, bin and sample point in one thread, adding into the feature map's gradient
four values at a time: on a two-stage detector's expected loss (a thousand RoIs and more) it was 45 % of the
whole gradient pass. The backward of RoIAlign is linear in the output gradient with weights that depend only on
the boxes: ``grad_features[c] = S @ grad_out[:, c]``, ``S`` the ``(H*W, RoIs*bins)`` matrix of bilinear weights
of every sample point divided by its bin's sample count. :func:`roi_align` builds ``S`` with the kernel's own
arithmetic (sample coordinates in float32 from ``box * spatial_scale - 0.5`` in double, the same boundary rules)
and multiplies; the result equals the kernel's up to the order of its additions (float32 round-off).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align as _tv_roi_align


def roi_align(features: Tensor, rois: Tensor, output_size, spatial_scale: float, sampling_ratio: int = 0,
              aligned: bool = True) -> Tensor:
    """``torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)``
    (``rois``: ``(R, 5)`` batch index and box; a square output) with a fast backward to ``features`` (no gradient
    to the boxes, as neither kernel gives one)."""
    sides = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if not features.requires_grad or features.device.type != "cpu" or sides[0] != sides[1]:
        return _tv_roi_align(features, rois, output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                             aligned=aligned)
    return _RoIAlign.apply(features, rois.detach(), int(sides[0]), float(spatial_scale), int(sampling_ratio), bool(aligned))


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.shape = features.shape
        ctx.settings = (output_size, spatial_scale, sampling_ratio, aligned)
        return _tv_roi_align(features, rois, output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                             aligned=aligned)

    @staticmethod
    def backward(ctx, grad_out):
        (rois,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        grad = grad_out.new_zeros((n, c, h, w))
        if rois.shape[0] == 0:
            return grad, None, None, None, None, None
        size, scale, sampling_ratio, aligned = ctx.settings
        for b in range(n):
            mine = (rois[:, 0] == b).nonzero().squeeze(1)
            if mine.numel() == 0:
                continue
            matrix = bilinear_matrix(rois[mine, 1:], size, scale, h, w, grad_out.dtype, sampling_ratio, aligned)
            flat = grad_out[mine].permute(0, 2, 3, 1).reshape(-1, c)  # (RoIs * bins, C)
            grad[b] = torch.sparse.mm(matrix, flat).t().reshape(c, h, w)
        return grad, None, None, None, None, None


def bilinear_matrix(boxes: Tensor, size: int, spatial_scale: float, height: int, width: int, dtype,
                    sampling_ratio: int = 0, aligned: bool = True) -> Tensor:
    """The sparse ``(height * width, len(boxes) * size * size)`` matrix taking RoIAlign's bins back to the map:
    each sample point's four bilinear weights over its bin's sample count (torchvision's ``roi_align`` CPU
    kernel: ``aligned`` shifts boxes by half a pixel, else they are at least one pixel wide; ``sampling_ratio``
    points per bin side, or ``ceil(box side / size)`` when 0)."""
    device = boxes.device
    t = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    start = (boxes.double() * spatial_scale - (0.5 if aligned else 0.0)).to(t)  # T roi_start = roi * scale - offset
    x0, y0, x1, y1 = start.unbind(1)
    roi_w, roi_h = x1 - x0, y1 - y0
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / size, roi_h / size
    if sampling_ratio > 0:
        grid_w = torch.full_like(roi_w, sampling_ratio, dtype=torch.int64)
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.int64)
    else:
        grid_w = torch.ceil(roi_w / size).to(torch.int64).clamp(min=0)
        grid_h = torch.ceil(roi_h / size).to(torch.int64).clamp(min=0)
    per_roi = size * size * grid_h * grid_w
    total = int(per_roi.sum())
    if total == 0:
        return torch.sparse_coo_tensor(torch.zeros((2, 0), dtype=torch.int64, device=device), torch.zeros(0, dtype=dtype, device=device),
                                       (height * width, boxes.shape[0] * size * size), check_invariants=False)
    roi = torch.repeat_interleave(torch.arange(boxes.shape[0], device=device), per_roi)
    first = torch.cumsum(per_roi, 0) - per_roi
    k = torch.arange(total, device=device) - first[roi]
    gh, gw = grid_h[roi], grid_w[roi]
    samples = gh * gw
    bin_index, within = k // samples, k % samples
    ph, pw = bin_index // size, bin_index % size
    iy, ix = within // gw, within % gw
    # y = roi_start_h + ph * bin_size_h + (T)(iy + .5f) * bin_size_h / (T)roi_bin_grid_h, left to right
    y = (y0[roi] + ph.to(t) * bin_h[roi]) + (iy.to(t) + 0.5) * bin_h[roi] / gh.to(t)
    x = (x0[roi] + pw.to(t) * bin_w[roi]) + (ix.to(t) + 0.5) * bin_w[roi] / gw.to(t)
    inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y, x = y.clamp(min=0), x.clamp(min=0)
    y_low, x_low = y.to(torch.int64), x.to(torch.int64)
    y_edge, x_edge = y_low >= height - 1, x_low >= width - 1
    y_low = torch.where(y_edge, height - 1, y_low)
    x_low = torch.where(x_edge, width - 1, x_low)
    y = torch.where(y_edge, y_low.to(t), y)
    x = torch.where(x_edge, x_low.to(t), x)
    y_high = torch.where(y_edge, y_low, y_low + 1)
    x_high = torch.where(x_edge, x_low, x_low + 1)
    ly, lx = y - y_low.to(t), x - x_low.to(t)
    hy, hx = 1.0 - ly, 1.0 - lx
    count = samples.to(t)
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx]) / count  # (4, samples)
    rows = torch.stack([y_low * width + x_low, y_low * width + x_high, y_high * width + x_low, y_high * width + x_high])
    cols = (roi * size * size + bin_index).expand(4, -1)
    keep = inside.expand(4, -1)
    indices = torch.stack([rows[keep], cols[keep]])
    matrix = torch.sparse_coo_tensor(indices, weights[keep].to(dtype), (height * width, boxes.shape[0] * size * size),
                                     check_invariants=False)  # in range by construction
    return matrix.coalesce()


def multiscale_roi_align(pooler, features: dict, boxes: Tensor, image_sizes) -> Tensor:
    """torchvision's ``MultiScaleRoIAlign`` (``pooler(features, [boxes], image_sizes)``) for one image's boxes,
    the same levels and values, with :func:`roi_align`'s backward."""
    if pooler.scales is None or pooler.map_levels is None:
        pooler(features, [boxes[:0]], image_sizes)  # lets the pooler infer its scales and level mapper
    maps = [features[name] for name in pooler.featmap_names]
    rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], 1)
    size, ratio = pooler.output_size, pooler.sampling_ratio
    if len(maps) == 1:
        return roi_align(maps[0], rois, size, pooler.scales[0], ratio, aligned=False)
    levels = pooler.map_levels([boxes])
    out = maps[0].new_zeros((boxes.shape[0], maps[0].shape[1], *size))
    for level, (level_map, scale) in enumerate(zip(maps, pooler.scales)):
        idx = torch.where(levels == level)[0]
        out[idx] = roi_align(level_map, rois[idx], size, scale, ratio, aligned=False).to(out.dtype)
    return out
