"""RoIAlign as mmdetection's two-stage heads run it: ``torchvision.ops.roi_align(aligned=True, sampling_ratio=0)``
against mmcv 1.7.2's own compiled kernel (fixture ``tests/data/mmcv_roi_align_reference.pt``, made by
``scripts/make_roi_align_reference.py`` in the fork's environment: boxes partly and wholly outside the map, under
a pixel, larger than the map, on pixel borders, of zero width or height, on both images; output sizes 7, 14 and
28; scales 1/4 to 1; and ``mask_target``'s crop of binary masks), and gradlens' sparse-matrix backward
(:mod:`gradlens.models.detectors.roi_align`) against that kernel's backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from gradlens.models.detectors.roi_align import roi_align

REFERENCE = torch.load(Path(__file__).parent / "data" / "mmcv_roi_align_reference.pt", weights_only=True)
CASES = sorted(REFERENCE["cases"])


def _case(name):
    case = REFERENCE["cases"][name]
    feat = REFERENCE["feats"][case["feat"]][:, : case["channels"]].contiguous()
    return case, feat


@pytest.mark.parametrize("name", CASES)
def test_torchvision_forward_and_backward_are_mmcvs_bit_for_bit(name):
    case, feat = _case(name)
    x = feat.clone().requires_grad_(True)
    out = tv_roi_align(x, case["rois"], case["output_size"], case["spatial_scale"], 0, True)
    assert torch.equal(out, case["output"])
    (grad,) = torch.autograd.grad(out, x, case["grad_output"])
    assert torch.equal(grad, case["grad_input"])


@pytest.mark.parametrize("name", CASES)
def test_sparse_backward_equals_mmcvs_up_to_summation_order(name):
    case, feat = _case(name)
    x = feat.clone().requires_grad_(True)
    out = roi_align(x, case["rois"], case["output_size"], case["spatial_scale"])
    assert torch.equal(out, case["output"])  # the forward is torchvision's kernel
    (grad,) = torch.autograd.grad(out, x, case["grad_output"])
    ref = case["grad_input"]
    assert bool((ref != 0).any())
    # the same float32 products added in another order: each element is a sum of at most a few hundred terms of
    # magnitude <= max|grad_output| (< 2), so 1e-5 absolute is ~100 ulps of the largest partial sums
    assert torch.allclose(grad, ref, rtol=0, atol=1e-5), float((grad - ref).abs().max())
    # and the same function exactly, in float64 (weights from the same float32 coordinates)
    x64 = feat.double().requires_grad_(True)
    out64 = tv_roi_align(x64, case["rois"].double(), case["output_size"], case["spatial_scale"], 0, True)
    (ref64,) = torch.autograd.grad(out64, x64, case["grad_output"].double())
    mine = roi_align(x64, case["rois"].double(), case["output_size"], case["spatial_scale"])
    (grad64,) = torch.autograd.grad(mine, x64, case["grad_output"].double())
    assert torch.allclose(grad64, ref64, rtol=0, atol=1e-12)


def test_mask_targets_are_mmdetections_crop_and_resize():
    mask = REFERENCE["mask"]
    boxes = mask["bboxes"]
    index = torch.arange(len(boxes), dtype=boxes.dtype)[:, None]
    out = tv_roi_align(mask["masks"][mask["inds"]][:, None].float(), torch.cat([index, boxes], 1), 28, 1.0, 0, True)[:, 0]
    assert torch.equal(out, mask["output"])
    assert torch.equal(out >= 0.5, mask["target"])


def test_no_gradient_needed_runs_torchvisions_kernel_and_empty_rois_work():
    feat = torch.randn(1, 3, 10, 12)
    rois = torch.tensor([[0.0, 1.0, 1.0, 30.0, 20.0]])
    assert torch.equal(roi_align(feat, rois, 7, 0.5), tv_roi_align(feat, rois, 7, 0.5, 0, True))
    x = feat.clone().requires_grad_(True)
    out = roi_align(x, torch.zeros(0, 5), 7, 0.5)
    assert out.shape == (0, 3, 7, 7)
    (grad,) = torch.autograd.grad(out.sum() + x.sum() * 0, x)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (0, False), (2, True)])
def test_sparse_backward_for_torchvisions_other_settings(sampling_ratio, aligned):
    """torchvision's Faster/Mask R-CNN pool with sampling_ratio=2, aligned=False: the same backward, in float64."""
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 20, 30, dtype=torch.float64, generator=g)
    xy = torch.rand(40, 2, generator=g, dtype=torch.float64) * torch.tensor([130.0, 90.0], dtype=torch.float64) - 10
    wh = torch.rand(40, 2, generator=g, dtype=torch.float64) * 50
    rois = torch.cat([(torch.arange(40) % 2).double()[:, None], xy, xy + wh], 1)
    x = feat.clone().requires_grad_(True)
    ref_out = tv_roi_align(x, rois, (7, 7), 0.25, sampling_ratio, aligned)
    grad_out = torch.randn(ref_out.shape, dtype=torch.float64, generator=g)
    (ref,) = torch.autograd.grad(ref_out, x, grad_out)
    out = roi_align(x, rois, (7, 7), 0.25, sampling_ratio, aligned)
    assert torch.equal(out, ref_out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert bool((ref != 0).any())
    assert torch.allclose(grad, ref, rtol=0, atol=1e-12)
