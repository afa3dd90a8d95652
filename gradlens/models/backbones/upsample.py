"""2x bilinear upsampling whose backward is deterministic on every device.

CEDNet's decoders upsample with ``nn.Upsample(scale_factor=2, mode="bilinear",
align_corners=False)``. On a GPU PyTorch's backward of that kernel adds the
gradient of neighbouring outputs into each input with atomics, so an input
gradient map changes in its last bits from run to run; asking PyTorch for
deterministic algorithms instead (what gradlens did before) falls back to a
much slower path for the whole network.

Here the forward is PyTorch's own kernel (so the values are upstream's, bit
for bit), and the backward is the adjoint of the same linear map written with
slices and additions only: for a factor of exactly 2 every output row is
``0.75 * x[i] + 0.25 * x[i -/+ 1]`` (the border clamped as PyTorch clamps it),
so its transpose is a fixed, separable stencil, deterministic and cheap on
every device. On the CPU PyTorch's backward is already sequential and is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _adjoint_axis(grad: Tensor, dim: int) -> Tensor:
    """Transpose of one axis' 2x upsampling (length 2n -> n) applied to ``grad``.

    Forward, per axis of length n (PyTorch's source index ``(j + 0.5) / 2 - 0.5``
    clamped at 0, its second tap clamped at n - 1): ``out[2i] = 0.25 x[i-1] +
    0.75 x[i]`` for i >= 1 and ``out[0] = x[0]``; ``out[2i+1] = 0.75 x[i] +
    0.25 x[i+1]``, the last one reading ``x[n-1]`` twice.
    """
    n = grad.shape[dim] // 2
    pairs = grad.unflatten(dim, (n, 2))
    even, odd = pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)
    zero = torch.zeros_like(even.narrow(dim, 0, 1))
    # x[i] receives 0.75 of even[i] and odd[i], 0.25 of even[i+1] and of odd[i-1]
    result = (even + odd) * 0.75
    result = result + torch.cat([even.narrow(dim, 1, n - 1), zero], dim) * 0.25
    result = result + torch.cat([zero, odd.narrow(dim, 0, n - 1)], dim) * 0.25
    # borders: out[0] is x[0] itself (weight 1, not 0.75), and out[2n-1] reads x[n-1] with both taps
    first = torch.cat([even.narrow(dim, 0, 1) * 0.25, torch.zeros_like(result.narrow(dim, 1, n - 1))], dim)
    last = torch.cat([torch.zeros_like(result.narrow(dim, 0, n - 1)), odd.narrow(dim, n - 1, 1) * 0.25], dim)
    return result + first + last


def upsample2x_backward(grad: Tensor) -> Tensor:
    """The vector-Jacobian product of 2x bilinear upsampling (``align_corners=False``) of an NCHW map."""
    return _adjoint_axis(_adjoint_axis(grad, 3), 2)


class _Upsample2x(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return upsample2x_backward(grad)


def _native_backward_is_deterministic(x: Tensor) -> bool:
    return x.device.type == "cpu"


def upsample2x(x: Tensor) -> Tensor:
    """``F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)`` with a deterministic GPU backward."""
    if _native_backward_is_deterministic(x) or not (x.requires_grad and torch.is_grad_enabled()):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return _Upsample2x.apply(x)


class Upsample2x(nn.Module):
    """Drop-in for ``nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)`` (no parameters,
    so checkpoints keep their keys), with :func:`upsample2x`'s deterministic backward."""

    def forward(self, x: Tensor) -> Tensor:
        return upsample2x(x)

    def extra_repr(self) -> str:
        return "scale_factor=2, mode='bilinear', align_corners=False, deterministic backward"
