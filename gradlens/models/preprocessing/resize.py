"""mmcv's image resize, bit for bit, as differentiable tensor operations.

mmdetection resizes the decoded *uint8* image with OpenCV (``cv2.resize``,
``INTER_LINEAR``) before it normalises. OpenCV's uint8 path is fixed-point:
each axis has two taps with weights rounded to 1/2048 (11 bits), the
horizontal pass sums in 32-bit integers, and the vertical pass rounds back to
uint8 as its vector code does, dropping 4 + 16 low bits of each tap before
adding (``(S >> 4) * b >> 16``, then ``(v + 2) >> 2``). A float resize differs
from it by up to 0.78 grey levels, enough to move boxes by tens of pixels, so
gradlens reproduces the integer arithmetic here (checked against
``cv2.resize`` in the tests) rather than approximating it.

The forward value is that uint8 image; the gradient is the Jacobian of the
same linear interpolation (the fixed-point weights as fractions), the uint8
rounding passing it straight through. The forward pass is integer arithmetic;
the backward pass scatters each tap back on the CPU and is two dense matrix
products with precomputed weights on a GPU, so both are deterministic on
every device (no atomics); measured in ``benchmarks/bench_fidelity.py``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

COEF_BITS = 11
COEF_SCALE = 1 << COEF_BITS  # OpenCV's INTER_RESIZE_COEF_SCALE


def _taps(src: int, dst: int, clamp_fraction: bool) -> tuple[np.ndarray, np.ndarray]:
    """Source index of the first tap and the two fixed-point weights of every output position on one axis.

    OpenCV computes the source coordinate in double, rounds it to float, and
    rounds the float weights ``1 - f`` and ``f`` times 2048 to the nearest
    integer (ties to even). Horizontally, a coordinate outside the image is
    clamped to the border pixel with weights (2048, 0); vertically it is not —
    both taps are clipped to the image but keep their fractional weights,
    which changes how the vertical pass rounds.
    """
    scale = 1.0 / (dst / src)  # OpenCV: inv_scale = (double)dsize / ssize; scale = 1. / inv_scale
    coord = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(coord).astype(np.int64)
    frac = (coord - first.astype(np.float32)).astype(np.float32)
    if clamp_fraction:
        low = first < 0
        frac[low], first[low] = 0, 0
        high = first >= src - 1
        frac[high], first[high] = 0, src - 1
    w0 = np.rint((np.float32(1) - frac) * np.float32(COEF_SCALE)).astype(np.int64)
    w1 = np.rint(frac * np.float32(COEF_SCALE)).astype(np.int64)
    return first, np.stack([w0, w1], axis=1)


@lru_cache(maxsize=64)
def _plan(src_h: int, src_w: int, dst_h: int, dst_w: int):
    """Integer tap indices and weights of both axes (cached: one image size recurs across a dataset)."""
    x0, xw = _taps(src_w, dst_w, clamp_fraction=True)
    y0, yw = _taps(src_h, dst_h, clamp_fraction=False)
    xi = np.stack([x0, np.minimum(x0 + 1, src_w - 1)], axis=1)
    yi = np.clip(np.stack([y0, y0 + 1], axis=1), 0, src_h - 1)
    return xi, xw, yi, yw


def _interpolation_matrix(index: np.ndarray, weight: np.ndarray, src: int) -> np.ndarray:
    """The (dst, src) matrix of one axis' linear interpolation with the fixed-point weights as fractions."""
    matrix = np.zeros((index.shape[0], src), dtype=np.float64)
    rows = np.arange(index.shape[0])
    np.add.at(matrix, (rows, index[:, 0]), weight[:, 0] / COEF_SCALE)
    np.add.at(matrix, (rows, index[:, 1]), weight[:, 1] / COEF_SCALE)
    return matrix


@lru_cache(maxsize=32)
def _matrices(src_h: int, src_w: int, dst_h: int, dst_w: int) -> tuple[np.ndarray, np.ndarray]:
    xi, xw, yi, yw = _plan(src_h, src_w, dst_h, dst_w)
    return _interpolation_matrix(yi, yw, src_h), _interpolation_matrix(xi, xw, src_w)


def _is_area_fast_2x(src_h: int, src_w: int, dst_h: int, dst_w: int) -> bool:
    """OpenCV switches INTER_LINEAR to its fast INTER_AREA path when both axes shrink by exactly 2."""
    sx, sy = 1.0 / (dst_w / src_w), 1.0 / (dst_h / src_h)
    return abs(sx - 2) < np.finfo(float).eps and abs(sy - 2) < np.finfo(float).eps


def cv2_resize_uint8(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``cv2.resize(hwc_uint8, (w, h), interpolation=cv2.INTER_LINEAR)`` of a ``(C, H, W)`` integer image.

    Returns an int32 ``(C, h, w)`` tensor with values in 0..255, equal to
    OpenCV's output element for element (checked against OpenCV 4.10, 4.12 and 5.0).
    """
    channels, src_h, src_w = image.shape
    dst_h, dst_w = size
    pixels = image.to(torch.int32)
    if (dst_h, dst_w) == (src_h, src_w):
        return pixels.clone()
    if _is_area_fast_2x(src_h, src_w, dst_h, dst_w):
        return _area_fast_2x(pixels, dst_h, dst_w)
    xi, xw, yi, yw = _plan_tensors(src_h, src_w, dst_h, dst_w, pixels.device)
    # horizontal pass, exact in int32 (at most 255 * 2048 per value); in place, as big temporaries cost more than arithmetic
    rows = pixels.index_select(2, xi[0]).mul_(xw[0])
    rows.add_(pixels.index_select(2, xi[1]).mul_(xw[1]))
    # the vertical pass as OpenCV's vector code does it (for every value of the row, tail included):
    # int16 high-half multiplies of the values shifted right by 4, then a rounding shift by 2
    rows.bitwise_right_shift_(4)
    out = rows.index_select(1, yi[0]).mul_(yw[0]).bitwise_right_shift_(16)
    out.add_(rows.index_select(1, yi[1]).mul_(yw[1]).bitwise_right_shift_(16))
    return out.add_(2).bitwise_right_shift_(2).clamp_(0, 255)


@lru_cache(maxsize=64)
def _plan_tensors(src_h: int, src_w: int, dst_h: int, dst_w: int, device):
    """The plan as tensors on ``device``: tap indices ``(2, n)`` and int32 weights, broadcastable per axis."""
    xi, xw, yi, yw = _plan(src_h, src_w, dst_h, dst_w)
    as_index = lambda a: torch.from_numpy(a.T.copy()).to(device)  # noqa: E731
    xw_t = torch.from_numpy(xw.T.astype(np.int32).copy()).to(device).view(2, 1, 1, dst_w)
    yw_t = torch.from_numpy(yw.T.astype(np.int32).copy()).to(device).view(2, 1, dst_h, 1)
    return as_index(xi), xw_t, as_index(yi), yw_t


def _area_fast_2x(pixels: Tensor, dst_h: int, dst_w: int) -> Tensor:
    """OpenCV's exact-2x shrink: the mean of each 2x2 block, rounded half up."""
    channels = pixels.shape[0]
    block = pixels[:, : 2 * dst_h, : 2 * dst_w].reshape(channels, dst_h, 2, dst_w, 2).sum(dim=(2, 4), dtype=torch.int32)
    return (block + 2) >> 2


def quantise(image: Tensor) -> Tensor:
    """A [0, 1] float image as the uint8 values it was decoded from (``round(255 x)``, clamped)."""
    return image.detach().mul(255).round_().clamp_(0, 255).to(torch.int32)


@lru_cache(maxsize=32)
def _matrix_tensors(src_h: int, src_w: int, dst_h: int, dst_w: int, dtype, device) -> tuple[Tensor, Tensor]:
    rows, cols = _matrices(src_h, src_w, dst_h, dst_w)
    return (torch.from_numpy(rows).to(device=device, dtype=dtype), torch.from_numpy(cols).to(device=device, dtype=dtype))


class _MMCVResize(torch.autograd.Function):
    """Forward: OpenCV's uint8 result. Backward: the transposed fixed-point linear map (two matrix products)."""

    @staticmethod
    def forward(ctx, image: Tensor, size: tuple[int, int]) -> Tensor:
        ctx.source = tuple(image.shape[-2:])
        return cv2_resize_uint8(quantise(image), size).to(image.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        backward = resize_backward_scatter if grad.device.type == "cpu" else resize_backward_dense
        return backward(grad, ctx.source), None


def resize_backward_scatter(grad: Tensor, source: tuple[int, int]) -> Tensor:
    """The resize's vector-Jacobian product, scattering each of the two taps back (``index_add_``).

    Sequential, so deterministic, on the CPU (on CUDA it would add with atomics).
    """
    (src_h, src_w), (dst_h, dst_w) = source, grad.shape[-2:]
    xi, xw, yi, yw = _plan_tensors(src_h, src_w, dst_h, dst_w, grad.device)
    scale = 255.0 / COEF_SCALE
    cols = grad.new_zeros(grad.shape[0], src_h, dst_w)
    cols.index_add_(1, yi[0], grad * (yw[0] * scale)).index_add_(1, yi[1], grad * (yw[1] * scale))
    result = grad.new_zeros(grad.shape[0], src_h, src_w)
    xs = xw / COEF_SCALE
    return result.index_add_(2, xi[0], cols * xs[0]).index_add_(2, xi[1], cols * xs[1])


def resize_backward_dense(grad: Tensor, source: tuple[int, int]) -> Tensor:
    """The same product as two dense matrix products (deterministic and fast on a GPU)."""
    (src_h, src_w), (dst_h, dst_w) = source, grad.shape[-2:]
    rows, cols = _matrix_tensors(src_h, src_w, dst_h, dst_w, grad.dtype, grad.device)
    # the cheaper association of rows^T @ grad @ cols
    if dst_h * src_w * (dst_w + src_h) <= src_h * dst_w * (dst_h + src_w):
        result = rows.t() @ (grad @ cols)
    else:
        result = (rows.t() @ grad) @ cols
    return result.mul_(255)


def mmcv_resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a ``(C, H, W)`` float image in [0, 1] as mmcv does; returns float values in 0..255.

    Forward: exactly ``cv2.resize`` of the uint8 image. Backward: the
    Jacobian of the same fixed-point linear interpolation (times 255), the
    rounding to uint8 passing the gradient straight through. (The identity
    "resize" of an image already at its test size is a copy: gradient 255.)
    """
    if tuple(image.shape[-2:]) == tuple(size):
        exact = quantise(image).to(image.dtype)
        if not (image.requires_grad and torch.is_grad_enabled()):
            return exact
        linear = image * 255
        return exact + (linear - linear.detach())  # value: the uint8 image; gradient: 255
    return _MMCVResize.apply(image, tuple(size))
