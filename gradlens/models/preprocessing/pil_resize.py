"""Pillow's uint8 bilinear resize, bit for bit, as differentiable tensor operations.

detectron2 resizes the decoded *uint8* image with Pillow (``ResizeTransform.apply_image``:
``Image.fromarray(img).resize((new_w, new_h), Image.BILINEAR)``). Pillow's resampling
(``src/libImaging/Resample.c``) is not OpenCV's two-tap interpolation:

- **the support widens when shrinking** (antialiasing): each axis' filter is the triangle
  ``1 - |x|`` stretched by ``scale = in / out`` when ``scale > 1``, so an output pixel of a 4000 -> 800
  resize averages about 10 input pixels (``precompute_coeffs``: ``support = 1 * max(scale, 1)``, taps
  ``xmin = (int)(center - support + 0.5)`` to ``(int)(center + support + 0.5)`` clipped to the image,
  weights ``filter((x + xmin - center + 0.5) / filterscale)`` normalised to sum 1, all in double);
- **fixed point, two passes**: the normalised weights become integers ``(int)(0.5 + w * 2**22)``
  (``normalize_coeffs_8bpc``, ``PRECISION_BITS = 32 - 8 - 2``); the horizontal pass
  (``ImagingResampleHorizontal_8bpc``) sums ``2**21 + sum(pixel * weight)`` in integers and keeps
  ``clip8(sum >> 22)`` as uint8, and the vertical pass (``ImagingResampleVertical_8bpc``) does the same on
  the columns. An axis whose size does not change is not resampled (``need_horizontal`` /
  ``need_vertical``), and an image already at the requested size is copied (``Image.resize``).
- **the order of the passes depends on Pillow's version** (``ImagingResampleInner``): up to Pillow 12 the
  horizontal pass always runs first; Pillow 13.0 runs the vertical pass first when the height shrinks by
  more than twice as many pixels as the width (``in_h - out_h > 0 and in_h - out_h > (in_w - out_w) * 2``).
  The uint8 rounding between the passes makes the two orders differ by one grey level here and there.
  :data:`VERTICAL_FIRST_RULE` follows the installed Pillow, since detectron2 resizes with whatever Pillow
  it runs with (``pil_resize_uint8(..., rule=...)`` picks either).

The forward value here is that uint8 image, computed in integers (checked against the installed Pillow in
``tests/test_pil_resize.py``). The gradient is the Jacobian of the same two-pass linear filter without
rounding: each pass a linear map whose weights are Pillow's fixed-point weights as fractions
(``weight / 2**22``), the uint8 rounding of both passes and the ``clip8`` passing the gradient straight
through, as :mod:`gradlens.models.preprocessing.resize` does for OpenCV.

Only Pillow's default path is reproduced: no ``box``, no ``reducing_gap`` (detectron2 passes neither),
3-channel (or 1-channel) 8-bit images. (Pillow's main branch, after 13.0, has other pass-order rules in
open work; they are not reproduced.)
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from gradlens.models.preprocessing.resize import quantise

PRECISION_BITS = 32 - 8 - 2  # Resample.c
BILINEAR_SUPPORT = 1.0
PASS_ORDER_RULES = ("pillow12", "pillow13")  # horizontal pass always first; Pillow 13.0's rule


def _installed_rule() -> str:
    import PIL

    try:
        major = int(PIL.__version__.split(".")[0])
    except ValueError:  # an unparsable version: the newest rule known
        return PASS_ORDER_RULES[-1]
    return "pillow13" if major >= 13 else "pillow12"


VERTICAL_FIRST_RULE = _installed_rule()  # the pass order of the Pillow detectron2 would run with here


def vertical_first(src: tuple[int, int], dst: tuple[int, int], rule: str | None = None) -> bool:
    """Whether Pillow runs the vertical pass first for a ``src`` -> ``dst`` ((h, w) each) resize."""
    rule = rule or VERTICAL_FIRST_RULE
    if rule not in PASS_ORDER_RULES:
        raise ValueError(f"unknown pass-order rule {rule!r}; use one of {', '.join(PASS_ORDER_RULES)}")
    if rule == "pillow12":
        return False
    shrink_h, shrink_w = src[0] - dst[0], src[1] - dst[1]
    return shrink_h > 0 and shrink_h > shrink_w * 2


def _bilinear(x: np.ndarray) -> np.ndarray:
    """Resample.c's ``bilinear_filter``: ``1 - |x|`` inside (-1, 1), else 0."""
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


@lru_cache(maxsize=128)
def pil_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for one axis (``box`` = the whole axis).

    Returns ``xmin`` (first tap) and ``count`` (number of taps) per output position, and the
    ``(out_size, ksize)`` fixed-point weights (int64; unused taps 0). The double arithmetic follows the C
    code operation for operation, so the integers are Pillow's.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"cannot resize an axis of {in_size} pixels to {out_size}")
    in0, in1 = 0.0, float(np.float32(in_size))  # box[0], box[2]: C floats
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = BILINEAR_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv_filterscale = 1.0 / filterscale
    centers = in0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.trunc(centers - support + 0.5).astype(np.int64)  # C's (int) truncates toward zero
    xmin = np.maximum(xmin, 0)
    xmax = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), in_size)
    count = xmax - xmin
    taps = np.arange(ksize, dtype=np.int64)
    used = taps[None, :] < count[:, None]
    # (x + xmin - center + 0.5) * inv_filterscale: the int sum first, then minus the double center, plus 0.5
    arg = ((taps[None, :] + xmin[:, None]).astype(np.float64) - centers[:, None] + 0.5) * inv_filterscale
    weights = np.where(used, _bilinear(arg), 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for x in range(ksize):  # ww += w, tap by tap (unused taps add 0.0, which changes no sum)
        total = total + weights[:, x]
    weights = np.where((total != 0.0)[:, None], weights / np.where(total != 0.0, total, 1.0)[:, None], weights)
    scaled = weights * float(1 << PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return xmin, count, np.where(used, fixed, 0)


@lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int, device) -> tuple[Tensor, Tensor]:
    """Tap indices ``(ksize, out)`` (unused taps point at a valid pixel with weight 0) and int32 weights."""
    xmin, count, fixed = pil_coefficients(in_size, out_size)
    ksize = fixed.shape[1]
    index = np.minimum(xmin[:, None] + np.arange(ksize)[None, :], in_size - 1)
    return (torch.from_numpy(np.ascontiguousarray(index.T)).to(device),
            torch.from_numpy(np.ascontiguousarray(fixed.T.astype(np.int32))).to(device))


def _pass(pixels: Tensor, dim: int, out_size: int) -> Tensor:
    """One fixed-point pass along ``dim`` (1: vertical, over rows; 2: horizontal, over columns) of a
    ``(C, H, W)`` int32 image: ``clip8((2**21 + sum(pixel * weight)) >> 22)`` per output value."""
    index, weight = _taps(pixels.shape[dim], out_size, pixels.device)
    if dim == 2 and index.shape[0] > 3:  # many taps (a shrink): gathering whole rows of the transpose is faster
        return _pass(pixels.transpose(1, 2).contiguous(), 1, out_size).transpose(1, 2).contiguous()
    shape = [1, 1, 1]
    shape[dim] = out_size
    # 2**21 + sum(pixel * weight) <= 2**21 + 255 * (2**22 + ksize): exact in int32, as in Pillow's int
    acc = pixels.index_select(dim, index[0]).mul_(weight[0].view(shape))
    for t in range(1, index.shape[0]):
        acc.add_(pixels.index_select(dim, index[t]).mul_(weight[t].view(shape)))
    return acc.add_(1 << (PRECISION_BITS - 1)).bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255)  # clip8


def pil_resize_uint8(image: Tensor, size: tuple[int, int], rule: str | None = None) -> Tensor:
    """``Image.fromarray(hwc_uint8).resize((w, h), Image.BILINEAR)`` of a ``(C, H, W)`` integer image.

    Returns an int32 ``(C, h, w)`` tensor with values in 0..255, equal to Pillow's output element for element.
    ``rule`` is the pass order (:data:`PASS_ORDER_RULES`; default: the installed Pillow's).
    """
    pixels = image.to(torch.int32)
    src_h, src_w = pixels.shape[-2:]
    dst_h, dst_w = int(size[0]), int(size[1])
    if (dst_h, dst_w) == (src_h, src_w):
        return pixels.clone()
    passes = [(2, dst_w)] if dst_w != src_w else []  # need_horizontal
    if dst_h != src_h:  # need_vertical
        passes.insert(0, (1, dst_h)) if vertical_first((src_h, src_w), (dst_h, dst_w), rule) else passes.append((1, dst_h))
    for dim, out_size in passes:
        pixels = _pass(pixels, dim, out_size)
    return pixels


@lru_cache(maxsize=32)
def linear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The ``(out, in)`` matrix of one pass without rounding: Pillow's fixed-point weights as fractions
    (the identity where the axis keeps its size, as Pillow then skips the pass)."""
    if in_size == out_size:
        return np.eye(in_size)
    xmin, count, fixed = pil_coefficients(in_size, out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for t in range(fixed.shape[1]):
        used = count > t
        rows = np.flatnonzero(used)
        matrix[rows, xmin[used] + t] += fixed[used, t] / float(1 << PRECISION_BITS)
    return matrix


@lru_cache(maxsize=32)
def _matrix_tensors(src_h: int, src_w: int, dst_h: int, dst_w: int, dtype, device) -> tuple[Tensor, Tensor]:
    return (torch.from_numpy(linear_matrix(src_h, dst_h)).to(device=device, dtype=dtype),
            torch.from_numpy(linear_matrix(src_w, dst_w)).to(device=device, dtype=dtype))


def pil_linear(image: Tensor, size: tuple[int, int]) -> Tensor:
    """The unrounded two-pass filter of a ``(C, H, W)`` float image (what the gradient differentiates)."""
    rows, cols = _matrix_tensors(*image.shape[-2:], *size, image.dtype, image.device)
    return rows @ image @ cols.t()


def backward_scatter(grad: Tensor, source: tuple[int, int]) -> Tensor:
    """The vector-Jacobian product of :func:`pil_linear` (times 255), tap by tap with ``index_add_``
    (sequential on the CPU, so deterministic)."""
    (src_h, src_w), (dst_h, dst_w) = source, tuple(grad.shape[-2:])
    scale = 255.0 / (1 << PRECISION_BITS)
    if dst_h != src_h:
        index, weight = _taps(src_h, dst_h, grad.device)
        cols = grad.new_zeros(grad.shape[0], src_h, dst_w)
        for t in range(index.shape[0]):
            cols.index_add_(1, index[t], grad * (weight[t].to(grad.dtype) * scale).view(1, dst_h, 1))
    else:
        cols = grad * 255.0
    if dst_w == src_w:
        return cols
    index, weight = _taps(src_w, dst_w, grad.device)
    result = grad.new_zeros(grad.shape[0], src_h, src_w)
    for t in range(index.shape[0]):
        result.index_add_(2, index[t], cols * (weight[t].to(grad.dtype) / (1 << PRECISION_BITS)).view(1, 1, dst_w))
    return result


def backward_dense(grad: Tensor, source: tuple[int, int]) -> Tensor:
    """The same product as two dense matrix products (deterministic and fast on a GPU)."""
    (src_h, src_w), (dst_h, dst_w) = source, tuple(grad.shape[-2:])
    rows, cols = _matrix_tensors(src_h, src_w, dst_h, dst_w, grad.dtype, grad.device)
    if dst_h * src_w * (dst_w + src_h) <= src_h * dst_w * (dst_h + src_w):
        result = rows.t() @ (grad @ cols)
    else:
        result = (rows.t() @ grad) @ cols
    return result.mul_(255)


class _PILResize(torch.autograd.Function):
    """Forward: Pillow's uint8 result. Backward: the transposed unrounded two-pass linear map."""

    @staticmethod
    def forward(ctx, image: Tensor, size: tuple[int, int]) -> Tensor:
        ctx.source = tuple(image.shape[-2:])
        return pil_resize_uint8(quantise(image), size).to(image.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        backward = backward_scatter if grad.device.type == "cpu" else backward_dense
        return backward(grad.contiguous(), ctx.source), None


def pil_resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a ``(C, H, W)`` float image in [0, 1] as detectron2 does a uint8 image; float values in 0..255.

    Forward: exactly Pillow's bilinear resize of the uint8 image (``round(255 x)``). Backward: the Jacobian of
    the same two-pass linear filter with Pillow's weights as fractions (times 255), the rounding passing the
    gradient straight through. An image already at ``size`` is copied (gradient 255), as Pillow copies it.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        exact = quantise(image).to(image.dtype)
        if not (image.requires_grad and torch.is_grad_enabled()):
            return exact
        linear = image * 255
        return exact + (linear - linear.detach())
    return _PILResize.apply(image, size)
