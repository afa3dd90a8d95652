"""The gradient engine: finite differences, a plain autograd call, batching, modes, methods, targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradlens.attribution.methods import (
    AttributionConfig,
    TotalLoss,
    frozen_inference_mode,
    gradient_maps,
    input_gradients,
    reduce_channels,
)
from gradlens.attribution.targets import image_targets
from gradlens.data.coco import ground_truth_from_dict
from gradlens.data.synthetic import CATEGORIES
from gradlens.errors import GradlensError
from gradlens.models.registry import build_detector
from gradlens.models.preprocessing.transform import PreprocessConfig, batch_images, canvas_groups, padded_size
from tests.conftest import make_gt_dict

SMALL = PreprocessConfig(min_size=64, max_size=96, size_divisor=32)
# mmcv's uint8 resize makes the loss piecewise constant in the pixels (its gradient is defined as the linear
# interpolation's Jacobian); checks of the calculus itself (finite differences, completeness) use torchvision's
# continuous float resize
CONTINUOUS = PreprocessConfig(min_size=64, max_size=96, size_divisor=32, convention="torchvision")


def tiny_detector(arch="retinanet_cednet_mini", seed=0, dtype=torch.float32, options=None, preprocess=SMALL):
    torch.manual_seed(seed)
    det = build_detector(arch, len(CATEGORIES), options=options, preprocess=preprocess)
    with torch.no_grad():
        for p in det.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        det.head.classification_head.cls_logits.bias.fill_(-1.0)
    det.categories = [dict(c) for c in CATEGORIES]
    return det.to(dtype).eval()


def scene(h, w, seed, dtype=torch.float32):
    """An image with two labelled boxes inside it."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g, dtype=torch.float64).to(dtype)
    boxes = torch.tensor([[0.1 * w, 0.15 * h, 0.6 * w, 0.7 * h], [0.5 * w, 0.4 * h, 0.95 * w, 0.9 * h]], dtype=dtype)
    return image, {"boxes": boxes, "labels": torch.tensor([1, 3])}


def plain_loss(det, image, target):
    losses = det.image_losses([image], [target])
    return (losses["classification"] + losses["bbox_regression"]).sum()


def test_gradient_matches_finite_differences_in_float64():
    det = tiny_detector(dtype=torch.float64, preprocess=CONTINUOUS)
    image, target = scene(48, 70, seed=1, dtype=torch.float64)  # resized to 64 x 93, padded to 64 x 96
    grad = input_gradients(det, [image], [target])[0]
    assert grad.dtype == torch.float64 and grad.shape == image.shape
    g = torch.Generator().manual_seed(5)
    eps = 1e-7  # the loss has kinks (ReLU, L1): a larger step can straddle one
    with torch.no_grad():
        for _ in range(3):
            direction = torch.randn(image.shape, generator=g, dtype=torch.float64)
            numeric = (plain_loss(det, image + eps * direction, target) - plain_loss(det, image - eps * direction, target)) / (2 * eps)
            analytic = (grad * direction).sum()
            assert float(abs(numeric - analytic)) <= 1e-5 * float(abs(analytic)) + 1e-9, (numeric, analytic)
        # and single pixels, where the gradient is largest
        for index in torch.topk(grad.abs().reshape(-1), 2).indices.tolist():
            e = torch.zeros(image.numel(), dtype=torch.float64)
            e[index] = 1.0
            e = e.view_as(image)
            numeric = (plain_loss(det, image + eps * e, target) - plain_loss(det, image - eps * e, target)) / (2 * eps)
            assert float(abs(numeric - grad.reshape(-1)[index])) <= 1e-5 * float(abs(numeric)) + 1e-9


def test_gradient_equals_a_plain_autograd_call_with_every_parameter_requiring_grad():
    # float64: the same function either way; float32 kernels (and their order of sums) may differ per CPU
    det = tiny_detector("retinanet_convnext_mini", dtype=torch.float64)
    image, target = scene(60, 80, seed=2, dtype=torch.float64)
    x = image.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(plain_loss(det, x, target), x)  # parameters require grad here
    got = input_gradients(det, [image], [target])[0]
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
    assert all(p.requires_grad for p in det.parameters())  # restored


def _mixed_images(dtype=torch.float32):
    sizes = [(50, 70), (52, 74), (48, 70), (70, 50), (30, 90), (64, 96)]
    return [scene(h, w, seed=10 + k, dtype=dtype) for k, (h, w) in enumerate(sizes)]


@pytest.mark.parametrize("arch", ["retinanet_cednet_mini", "retinanet_convnext_mini"])
def test_batched_equals_one_image_at_a_time(arch):
    # float64: batch mates only reorder sums; in float32 that moves the last bits (and can tip a ReLU) differently per CPU
    det = tiny_detector(arch, dtype=torch.float64)
    pairs = _mixed_images(torch.float64)
    images, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    canvases = [padded_size(*im.shape[-2:], det.preprocess) for im in images]
    assert len(set(canvases)) > 1 and len(set(canvases)) < len(images)  # both sharing and differing canvases
    together = input_gradients(det, images, targets, batch_size=8)
    for image, target, g in zip(images, targets, together):
        alone = input_gradients(det, [image], [target])[0]
        assert torch.allclose(g, alone, rtol=0, atol=1e-10 * float(alone.abs().max())), float((g - alone).abs().max())


def test_padding_to_a_larger_canvas_would_change_the_gradient():
    """Why images are grouped by canvas: the same image padded further gets another gradient."""
    det = tiny_detector()
    image, target = scene(50, 70, seed=3)
    other, other_target = scene(70, 50, seed=4)  # portrait: forces a taller canvas when batched naively
    x = image.clone().requires_grad_(True)
    with frozen_inference_mode(det):
        batch, _ = batch_images([x, other], det.preprocess)
        assert batch.shape[-2] > padded_size(50, 70, det.preprocess)[0]
        losses = det.image_losses([x, other], [target, other_target])
        (naive,) = torch.autograd.grad(losses["classification"][0] + losses["bbox_regression"][0], x)
    exact = input_gradients(det, [image, other], [target, other_target])[0]
    assert float((naive - exact).abs().max()) > 1e-3 * float(exact.abs().max())


def test_same_map_twice_in_train_mode_with_drop_path_and_modes_restored():
    det = tiny_detector(options={"drop_path_rate": 0.5})
    image, target = scene(50, 70, seed=6)
    reference = input_gradients(det, [image], [target])[0]
    det.train()
    first = input_gradients(det, [image], [target])[0]
    second = input_gradients(det, [image], [target])[0]
    assert torch.equal(first, second) and torch.equal(first, reference)
    assert all(m.training for m in det.modules())
    assert all(p.requires_grad for p in det.parameters())


def test_input_x_gradient_and_integrated_gradients_agree_with_captum_on_one_image():
    from captum.attr import IntegratedGradients

    det = tiny_detector(dtype=torch.float64)
    pairs = _mixed_images()[:3]
    images, targets = [p[0].double() for p in pairs], [{**p[1], "boxes": p[1]["boxes"].double()} for p in pairs]
    grads = input_gradients(det, images, targets)
    ixg = input_gradients(det, images, targets, method="input_x_gradient")
    for x, g, a in zip(images, grads, ixg):
        assert torch.allclose(a, x * g)
    ig = input_gradients(det, images, targets, method="integrated_gradients", steps=8, baseline="black", batch_size=4)
    for x, t, a in zip(images, targets, ig):
        forward = TotalLoss(det, [t])
        with frozen_inference_mode(det):
            expected = IntegratedGradients(forward).attribute(x[None], baselines=torch.zeros_like(x)[None], n_steps=8)[0]
        assert torch.allclose(a, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("baseline, tolerance", [("white", 0.03), ("mean", 0.03), ("blur", 0.05)])
def test_integrated_gradients_completeness(baseline, tolerance):
    """Sum of attributions = loss(image) - loss(baseline), up to the path integral's discretisation.

    The loss has kinks (ReLU, L1), so the quadrature converges slowly; 128
    points bring each baseline within a few percent (the black baseline's
    loss difference is too small here for a relative check; captum's own IG
    checks it above).
    """
    from gradlens.attribution.methods import _baseline

    det = tiny_detector(dtype=torch.float64, preprocess=CONTINUOUS)
    image, target = scene(50, 70, seed=7, dtype=torch.float64)
    attr = input_gradients(det, [image], [target], method="integrated_gradients", steps=128, baseline=baseline, batch_size=32)[0]
    base = _baseline(image, baseline, det.preprocess.mean)
    with torch.no_grad():
        delta = plain_loss(det, image, target) - plain_loss(det, base, target)
    assert float(abs(attr.sum() - delta)) <= tolerance * float(abs(delta)), (float(attr.sum()), float(delta))


def test_smoothgrad_is_deterministic_batch_independent_and_reduces_to_the_gradient():
    # float64: the copies of a pass and the batch mates only reorder sums, whose float32 last bits depend on the CPU
    det = tiny_detector(dtype=torch.float64)
    pairs = _mixed_images(torch.float64)[:3]
    images, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    plain = input_gradients(det, images, targets)
    zero = input_gradients(det, images, targets, method="smoothgrad", noise=0.0, samples=3)
    for p, z in zip(plain, zero):
        assert torch.allclose(p, z, rtol=0, atol=1e-10 * float(p.abs().max()))
    together = input_gradients(det, images, targets, method="smoothgrad", samples=4, batch_size=8)
    alone = [input_gradients(det, [im], [t], method="smoothgrad", samples=4, batch_size=1)[0] for im, t in zip(images, targets)]
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, rtol=0, atol=1e-10 * float(b.abs().max()))
    again = input_gradients(det, images, targets, method="smoothgrad", samples=4, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(together, again))
    other_seed = input_gradients(det, images[:1], targets[:1], method="smoothgrad", samples=4, seed=1)[0]
    assert not torch.allclose(other_seed, together[0])


def test_manual_smoothgrad_reference():
    """SmoothGrad = mean of plain gradients at the same noisy copies."""
    from gradlens.attribution.methods import _generator_for

    det = tiny_detector(dtype=torch.float64)  # float64: 3 copies in one batch vs alone only reorder sums
    image, target = scene(50, 70, seed=8, dtype=torch.float64)
    got = input_gradients(det, [image], [target], method="smoothgrad", samples=3, noise=0.1, seed=4)[0]
    g = _generator_for(image, 4)
    noise = [torch.randn(image.shape, generator=g).to(image.dtype) for _ in range(3)]  # drawn in float32, as gradlens does
    expected = torch.stack([input_gradients(det, [image + 0.1 * n], [target])[0] for n in noise]).mean(0)
    assert torch.allclose(got, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


def test_channel_reductions_match_numpy():
    a = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    x = a.numpy()
    assert np.allclose(reduce_channels(a, "max").numpy(), np.abs(x).max(axis=1))
    assert np.allclose(reduce_channels(a, "l1").numpy(), np.abs(x).sum(axis=1))
    assert np.allclose(reduce_channels(a, "l2").numpy(), np.sqrt((x**2).sum(axis=1)))
    with pytest.raises(GradlensError, match="channel reduction"):
        reduce_channels(a, "mean")


def test_gradient_maps_are_the_reduced_gradients():
    det = tiny_detector()
    image, target = scene(50, 70, seed=9)
    g = input_gradients(det, [image], [target])[0]
    m = gradient_maps(det, [image], [target], channel_reduce="l2")[0]
    assert m.shape == image.shape[1:] and torch.allclose(m, g.norm(dim=0))


def test_image_without_objects_has_a_finite_nonzero_gradient():
    det = tiny_detector()
    image, _ = scene(50, 70, seed=10)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    g = input_gradients(det, [image], [empty])[0]
    assert torch.isfinite(g).all() and float(g.abs().max()) > 0


def test_grayscale_image_as_three_equal_channels():
    det = tiny_detector()
    image, target = scene(50, 70, seed=11)
    gray = image[:1].expand(3, -1, -1).contiguous()
    m = gradient_maps(det, [gray], [target])[0]
    assert torch.isfinite(m).all() and m.shape == gray.shape[1:]


def test_bf16_maps_stay_close_to_fp32():
    det = tiny_detector()
    image, target = scene(50, 70, seed=12)
    exact = gradient_maps(det, [image], [target])[0]
    low = gradient_maps(det, [image], [target], precision="bf16")[0]
    assert torch.isfinite(low).all()
    rel = float((low - exact).norm() / exact.norm())
    assert rel < 0.2, rel


def test_canvas_groups_cover_every_index_once():
    det = tiny_detector()
    sizes = [(50, 70), (52, 74), (48, 70), (70, 50), (30, 90)] * 3
    groups = canvas_groups(sizes, det.preprocess, batch_size=4)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    for g in groups:
        assert len(g) <= 4 and len({padded_size(*sizes[i], det.preprocess) for i in g}) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "deeplift"}, "Unknown attribution method"),
        ({"baseline": "grey"}, "Unknown baseline"),
        ({"steps": 0}, "at least 1"),
        ({"precision": "fp8"}, "Unknown precision"),
        ({"noise": -1.0}, "non-negative"),
    ],
)
def test_bad_options_are_one_sentence_errors(kwargs, message):
    det = tiny_detector()
    image, target = scene(50, 70, seed=13)
    with pytest.raises(GradlensError, match=message):
        input_gradients(det, [image], [target], **kwargs)


def test_shape_and_length_errors():
    det = tiny_detector()
    image, target = scene(50, 70, seed=13)
    with pytest.raises(GradlensError, match="2 images but 1 targets"):
        input_gradients(det, [image, image], [target])
    with pytest.raises(GradlensError, match=r"\[3, H, W\]"):
        input_gradients(det, [image[:1]], [target])
    with pytest.raises(GradlensError, match="needs a CUDA device"):
        AttributionConfig(precision="fp16").check(torch.device("cpu"))


def test_targets_skip_crowds_and_sub_pixel_boxes_and_map_categories():
    data = make_gt_dict(
        [1, 2],
        [(1, 3, [10, 10, 20, 30], 0), (1, 9, [0, 0, 50, 50], 1), (1, 4, [5, 5, 0.5, 10], 0), (1, 7, [40, 5, 8, 8], 0),
         (1, 3, [100, 10, 5, 5], 0),  # beside the 100 x 80 image: mmdetection's CocoDataset skips it
         (1, 3, [90, 70, 20, 20], 0),  # partly inside: kept
         (1, 3, [30, 30, 5, 5], 0)],  # its annotated area is set to 0 below: skipped as upstream
        categories=CATEGORIES,
    )
    data["annotations"][-1]["area"] = 0.0
    gt = ground_truth_from_dict(data)
    t = image_targets(gt, 1, CATEGORIES)
    assert t.boxes.tolist() == [[10, 10, 30, 40], [40, 5, 48, 13], [90, 70, 110, 90]]
    assert t.labels.tolist() == [1, 3, 1]  # category 3 -> label 1, category 7 -> label 3
    assert t.num_too_small == 3
    empty = image_targets(gt, 2, CATEGORIES)
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
    with pytest.raises(GradlensError, match="does not know"):
        image_targets(gt, 1, CATEGORIES[:2])
    with pytest.raises(GradlensError, match="not in the annotation file"):
        image_targets(gt, 99, CATEGORIES)
