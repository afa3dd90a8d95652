"""Anchors against values computed by hand from the paper's config; resize conventions; the box decoder."""

from __future__ import annotations

import math

import pytest
import torch

from gradlens.models.detectors.anchors import AnchorConfig, MMDetAnchorGenerator, base_anchors, mmdet_delta_decode
from gradlens.models.preprocessing.transform import PreprocessConfig, batch_images, padded_size, resized_size


def test_base_anchors_match_hand_computation():
    # stride 8, octave_base_scale 4, 3 scales per octave, ratios 0.5/1/2 (mmdetection RetinaNet)
    anchors = base_anchors(8, AnchorConfig()).double()
    assert anchors.shape == (9, 4)
    # index = ratio * 3 + scale; ratio 0.5 means h/w = 0.5: w = 8 * sqrt(2) * 4, h = 8 / sqrt(2) * 4
    w, h = 8 * math.sqrt(2) * 4, 8 / math.sqrt(2) * 4
    assert anchors[0].tolist() == pytest.approx([-w / 2, -h / 2, w / 2, h / 2], abs=1e-5)
    # ratio 1, largest scale: side 8 * 4 * 2**(2/3) = 50.7968...
    side = 8 * 4 * 2 ** (2 / 3)
    assert anchors[5].tolist() == pytest.approx([-side / 2, -side / 2, side / 2, side / 2], abs=1e-5)
    # ratio 2, middle scale: w = 8 / sqrt(2) * 4 * 2**(1/3), h = 8 * sqrt(2) * 4 * 2**(1/3)
    w, h = 8 / math.sqrt(2) * 4 * 2 ** (1 / 3), 8 * math.sqrt(2) * 4 * 2 ** (1 / 3)
    assert anchors[7].tolist() == pytest.approx([-w / 2, -h / 2, w / 2, h / 2], abs=1e-5)
    # mmdetection keeps fractions where torchvision rounds to whole pixels
    assert anchors[0, 0].item() == pytest.approx(-22.627417, abs=1e-5)


def test_grid_order_and_offsets():
    gen = MMDetAnchorGenerator()
    sizes = [(3, 4), (2, 2), (1, 1), (1, 1), (1, 1)]
    levels = gen.level_anchors(sizes, "cpu")
    assert [lvl.shape[0] for lvl in levels] == [3 * 4 * 9, 4 * 9, 9, 9, 9]
    base = base_anchors(8, AnchorConfig())
    row, col = 2, 3  # position-major (row, column), then the 9 base anchors, anchors centred at stride * index
    block = levels[0][(row * 4 + col) * 9:(row * 4 + col + 1) * 9]
    assert torch.allclose(block, base + torch.tensor([col * 8, row * 8, col * 8, row * 8], dtype=torch.float32))
    assert torch.allclose(levels[4], base_anchors(128, AnchorConfig()))


def test_decode_identity_and_clamp():
    anchors = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    assert torch.allclose(mmdet_delta_decode(anchors, torch.zeros(1, 4)), anchors)
    # dx = 0.5 moves the centre by half the width; dw = log 2 doubles the width
    out = mmdet_delta_decode(anchors, torch.tensor([[0.5, 0.0, math.log(2), 0.0]]))
    assert out[0].tolist() == pytest.approx([10.0, 20.0, 90.0, 40.0])
    # huge dw is clamped at log(1000/16); boxes are clipped to the image
    big = mmdet_delta_decode(anchors, torch.tensor([[0.0, 0.0, 50.0, 0.0]]), max_shape=(60, 70))
    assert big[0, 0].item() == 0.0 and big[0, 2].item() == 70.0


def test_resize_conventions_differ_by_one_pixel():
    mmdet = PreprocessConfig(convention="mmcv")
    torchvision_style = PreprocessConfig(convention="torchvision")
    # 640 x 480: scale 800/480 = 1.6667; width 1066.67 rounds to 1067 (mmcv) and floors to 1066 (torchvision)
    assert resized_size(480, 640, mmdet) == (800, 1067)
    assert resized_size(480, 640, torchvision_style) == (800, 1066)
    # the long side bounds the scale: 500 x 2000 -> 1333 / 2000
    assert resized_size(500, 2000, mmdet) == (333, 1333)
    assert padded_size(480, 640, PreprocessConfig(size_divisor=128)) == (896, 1152)


def test_batch_pads_bottom_right_with_zeros_and_is_differentiable():
    cfg = PreprocessConfig(min_size=32, max_size=64, size_divisor=16)
    a = torch.rand(3, 20, 30, requires_grad=True)
    b = torch.rand(3, 30, 20)
    batch, sizes = batch_images([a, b], cfg)
    assert sizes == [(32, 48), (48, 32)]
    assert batch.shape == (2, 3, 48, 48)
    assert torch.all(batch[0, :, 32:, :] == 0) and torch.all(batch[1, :, :, 32:] == 0)
    batch.sum().backward()
    assert a.grad is not None and a.grad.shape == a.shape and a.grad.abs().sum() > 0


def test_grayscale_like_input_and_identity_resize():
    cfg = PreprocessConfig(min_size=20, max_size=40, size_divisor=1)
    img = torch.full((3, 20, 30), 128 / 255)
    batch, sizes = batch_images([img], cfg)
    assert sizes == [(20, 30)]
    expected = (128 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])  # mmdetection's
    assert torch.allclose(batch[0, :, 5, 5], expected)
