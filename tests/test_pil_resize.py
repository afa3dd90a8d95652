"""Pillow's uint8 bilinear resize in torch (gradlens.models.preprocessing.pil_resize): bit for bit against the installed
Pillow, and its gradient against the unrounded two-pass filter.

The reference for the gradient is written here from Pillow's ``src/libImaging/Resample.c``
(``precompute_coeffs``, ``normalize_coeffs_8bpc``) in plain Python loops, independently of the module.
"""

from __future__ import annotations

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from gradlens.models.preprocessing import pil_resize as pr

# (src h, w) -> (dst h, w): up, down (antialiased supports of up to 11 taps), one axis only, 1-pixel sides,
# COCO-like upscales to detectron2's 800 short side, a shrink by exactly 2, aspect changes both ways
SIZES = [
    ((1, 1), (5, 7)), ((7, 1), (3, 9)), ((1, 9), (1, 4)), ((1, 1), (1, 1)), ((2, 2), (1, 1)), ((5, 5), (1, 1)),
    ((10, 10), (20, 20)), ((20, 20), (10, 10)), ((37, 53), (11, 13)), ((93, 13), (23, 5)), ((121, 9), (2, 38)),
    ((9, 5), (4, 5)), ((5, 5), (5, 9)), ((64, 48), (32, 24)), ((100, 300), (7, 1000)), ((250, 30), (60, 29)),
    ((480, 640), (800, 1067)), ((427, 640), (800, 1199)), ((600, 400), (1333, 889)), ((700, 350), (467, 233)),
]


def _pil(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What detectron2's ResizeTransform.apply_image does to a uint8 HWC image."""
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def _ours(image: np.ndarray, size: tuple[int, int], rule=None) -> np.ndarray:
    return pr.pil_resize_uint8(torch.from_numpy(image).permute(2, 0, 1), size, rule).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("src, dst", SIZES)
def test_bit_exact_against_installed_pillow(src, dst):
    rng = np.random.default_rng(src[0] * 1000 + dst[1])
    image = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_ours(image, dst), _pil(image, dst))


def test_bit_exact_random_sizes_and_one_channel():
    rng = np.random.default_rng(7)
    for _ in range(40):
        src = tuple(int(v) for v in rng.integers(1, 160, 2))
        dst = tuple(int(v) for v in rng.integers(1, 160, 2))
        image = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
        np.testing.assert_array_equal(_ours(image, dst), _pil(image, dst), err_msg=f"{src} -> {dst}")
    gray = rng.integers(0, 256, (31, 17), dtype=np.uint8)  # mode "L" (image8): the same arithmetic
    ours = pr.pil_resize_uint8(torch.from_numpy(gray)[None], (12, 40))[0].numpy()
    np.testing.assert_array_equal(ours, np.asarray(Image.fromarray(gray).resize((40, 12), Image.BILINEAR)))


def test_pass_order_rules():
    """Pillow 13 runs the vertical pass first when the height shrinks by more than twice the width's pixels;
    Pillow 12 and older always run the horizontal pass first. Each rule equals Pillow's own single-axis
    passes composed in its order (a one-axis resize is exactly one pass), and the installed Pillow's rule is
    the default."""
    assert pr.VERTICAL_FIRST_RULE == ("pillow13" if int(PIL.__version__.split(".")[0]) >= 13 else "pillow12")
    assert pr.vertical_first((93, 13), (23, 5), "pillow13") and not pr.vertical_first((93, 13), (23, 5), "pillow12")
    assert not pr.vertical_first((37, 53), (11, 13), "pillow13")  # 26 rows vs 2 x 40 columns
    assert not pr.vertical_first((480, 640), (800, 1067), "pillow13")  # COCO upscales: horizontal first
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (93, 13, 3), dtype=np.uint8)
    h_then_v = _pil(_pil(image, (93, 5)), (23, 5))
    v_then_h = _pil(_pil(image, (23, 13)), (23, 5))
    assert (h_then_v != v_then_h).any()  # the uint8 rounding between the passes makes the order matter
    np.testing.assert_array_equal(_ours(image, (23, 5), "pillow12"), h_then_v)
    np.testing.assert_array_equal(_ours(image, (23, 5), "pillow13"), v_then_h)
    with pytest.raises(ValueError, match="pass-order rule"):
        pr.vertical_first((2, 2), (1, 1), "pillow7")


# -- the gradient ---------------------------------------------------------------------------------------


def _reference_weights(in_size: int, out_size: int) -> np.ndarray:
    """Resample.c's precompute_coeffs (bilinear, box = the whole axis) + normalize_coeffs_8bpc, loop by loop,
    as the (out, in) matrix of fixed-point weights / 2**22."""
    matrix = np.zeros((out_size, in_size))
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ww, k = 0.0, []
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        for x in range(xmax):
            arg = abs((x + xmin - center + 0.5) * (1.0 / filterscale))
            w = 1.0 - arg if arg < 1.0 else 0.0
            k.append(w)
            ww += w
        for x in range(xmax):
            w = k[x] / ww if ww != 0.0 else k[x]
            matrix[xx, x + xmin] = int(0.5 + w * (1 << 22)) / (1 << 22)
    return matrix


@pytest.mark.parametrize("src, dst", [((5, 7), (3, 9)), ((9, 4), (4, 11)), ((1, 6), (3, 2)), ((6, 6), (6, 3)), ((4, 5), (4, 5))])
def test_jacobian_is_the_unrounded_filter(src, dst):
    """Autograd through pil_resize (float64) equals the finite differences of the unrounded two-pass filter
    (exact for a linear map), times 255; the identity "resize" passes 255 straight through."""
    rows = _reference_weights(src[0], dst[0]) if src[0] != dst[0] else np.eye(src[0])
    cols = _reference_weights(src[1], dst[1]) if src[1] != dst[1] else np.eye(src[1])

    def unrounded(x: np.ndarray) -> np.ndarray:  # (C, H, W) in 0..255
        return np.einsum("oh,chw,pw->cop", rows, x, cols)

    base = np.random.default_rng(0).random((2, *src)) * 255
    numeric = np.zeros((2, *dst, 2, *src))
    for idx in np.ndindex(2, *src):
        step = np.zeros_like(base)
        step[idx] = 1.0
        numeric[(...,) + idx] = unrounded(base + step) - unrounded(base)
    image = torch.rand(2, *src, dtype=torch.float64)
    autograd = torch.autograd.functional.jacobian(lambda x: pr.pil_resize(x, dst), image)
    np.testing.assert_allclose(autograd.numpy(), numeric * 255, rtol=0, atol=1e-9)
    np.testing.assert_allclose(pr.linear_matrix(src[1], dst[1]), cols, rtol=0, atol=0)


def test_forward_is_pillows_and_backward_paths_agree():
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (40, 23, 3), dtype=np.uint8)
    image = (torch.from_numpy(pixels).permute(2, 0, 1).double() / 255).requires_grad_(True)
    out = pr.pil_resize(image, (17, 61))
    np.testing.assert_array_equal(out.detach().permute(1, 2, 0).numpy().astype(np.uint8), _pil(pixels, (17, 61)))
    grad = torch.randn_like(out)
    out.backward(grad)
    dense = pr.backward_dense(grad, (40, 23))  # the GPU path, here on the CPU
    torch.testing.assert_close(image.grad, dense, rtol=1e-12, atol=1e-12)
    # the forward is the unrounded filter up to the two passes' roundings (half a grey level each)
    assert float((out.detach() - pr.pil_linear(image.detach() * 255, (17, 61))).abs().max()) <= 1.0 + 1e-9
