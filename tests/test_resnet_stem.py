"""The ResNet stem breaks max-pool ties as mmdetection and torchvision do (issue 29).

On flat image areas many 3x3 windows of the stem's max-pool hold equal maxima, and the element that gets the
gradient is the one the pooling kernel picks among them, which follows the last bits of the convolution before
it. The upstream runs the stem in contiguous (NCHW) memory; gradlens does too in its channels-last speed mode.
Compared bit for bit in float64, where tie-breaking is the point (and in float32, as the pipeline runs).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from gradlens.models.registry import ResNet50Features, build_detector


def flat_image(dtype, h=96, w=128) -> torch.Tensor:
    """Constant patches on a constant background (a photograph's sky or wall), one channel different."""
    x = torch.zeros(2, 3, h, w, dtype=dtype)
    x[:, :, 10:50, 20:90] = 0.7
    x[:, 1, 60:90, 30:60] = -0.3
    x[:, :, 70:80, 100:120] = 1.2
    x[1] = x[1].flip(-1) * 0.5
    return x


def upstream_stem(body, x):
    """torchvision's (and mmdetection's) ResNet stem as they run it: conv, norm, ReLU, max-pool, all NCHW."""
    return body.maxpool(body.relu(body.bn1(body.conv1(x))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stem_gradient_equals_the_upstream_stem_in_channels_last_mode(dtype):
    torch.manual_seed(0)
    body = ResNet50Features().to(dtype).eval()
    x = flat_image(dtype)
    # the test has something to break: many windows of the stem's max-pool tie
    with torch.no_grad():
        pre = body.relu(body.bn1(body.conv1(x)))
        windows = F.unfold(F.pad(pre, (1, 1, 1, 1), value=float("-inf")).reshape(-1, 1, *[s + 2 for s in pre.shape[-2:]]),
                           3, stride=2)
        tied = ((windows == windows.max(dim=1, keepdim=True).values).sum(dim=1) > 1).sum()
    assert int(tied) > 1000
    out_shape = upstream_stem(body, x).shape
    g = torch.randn(out_shape, dtype=dtype)
    reference = x.clone().requires_grad_(True)
    upstream_stem(copy.deepcopy(body), reference).backward(g)

    fast = copy.deepcopy(body).to(memory_format=torch.channels_last)  # what use_channels_last() does to the weights
    mine = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = fast.stem(mine)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the rest of the network keeps its speed mode
    out.backward(g.contiguous(memory_format=torch.channels_last))
    assert torch.equal(mine.grad.contiguous(), reference.grad)
    plain = x.clone().requires_grad_(True)  # and in contiguous mode, the upstream arithmetic itself
    body.stem(plain).backward(g)
    assert torch.equal(plain.grad, reference.grad)


def test_detector_input_gradient_does_not_depend_on_the_speed_mode():
    """The whole ResNet-50 RetinaNet in float64: channels-last and contiguous give the same input gradient up to
    float64 rounding once the stem's ties are broken alike (a flipped tie moves it by whole per cent)."""
    torch.manual_seed(1)
    detector = build_detector("retinanet_resnet50", 3).double().eval()
    detector.preprocess = replace(detector.preprocess, min_size=96, max_size=128)
    for p in detector.parameters():
        p.requires_grad_(False)
    image = (flat_image(torch.float64)[0] * 0.3 + 0.4).clamp(0, 1)
    target = {"boxes": torch.tensor([[20.0, 10.0, 90.0, 50.0]]), "labels": torch.tensor([1])}

    def gradient(model):
        x = image.clone().requires_grad_(True)
        losses = model.image_losses([x], [target])
        (losses["classification"] + losses["bbox_regression"]).sum().backward()
        return x.grad

    reference = gradient(detector)
    fast = gradient(copy.deepcopy(detector).use_channels_last())
    assert reference.abs().max() > 0
    assert float((fast - reference).norm() / reference.norm()) < 1e-10


def test_stores_of_the_old_stem_are_not_reused():
    from gradlens.attribution.compute import detector_identity
    from gradlens.models.bundled import bundled_detector_path
    from gradlens.models.formats.checkpoints import load_detector

    class GT:
        sha256, images_dir, exif_orientation = "0" * 64, None, "ignore"

    resnet = detector_identity(build_detector("retinanet_resnet50", 3), "x", GT())
    assert resnet["arithmetic_revisions"] == {"ResNet50Features": 2}
    cednet = detector_identity(load_detector(bundled_detector_path("cednet"), device="cpu"), "x", GT())
    assert "arithmetic_revisions" not in cednet  # every other store keeps its key
