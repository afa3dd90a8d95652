"""The ResNet backbones break max-pool ties as mmdetection and torchvision do (issue 29).

On flat image areas many 3x3 windows of the stem's max-pool hold equal maxima, and the element that gets the
gradient is the one the pooling kernel picks among them, which follows the last bits of the convolution and norm
before it. The upstream runs the network in contiguous (NCHW) memory with mmdetection's batch norm as
``F.batch_norm``; gradlens does the same, in its channels-last speed mode too. Compared bit for bit in float64
and in float32 (as the pipeline runs), against torchvision's ResNet built with ``nn.BatchNorm2d`` in eval mode.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from gradlens.models.backbones.layers import EvalBatchNorm2d
from gradlens.models.registry import ResNet50Features, build_detector


def flat_image(dtype, h=96, w=128) -> torch.Tensor:
    """Constant patches on a constant background (a photograph's sky or wall), one channel different."""
    x = torch.zeros(2, 3, h, w, dtype=dtype)
    x[:, :, 10:50, 20:90] = 0.7
    x[:, 1, 60:90, 30:60] = -0.3
    x[:, :, 70:80, 100:120] = 1.2
    x[1] = x[1].flip(-1) * 0.5
    return x


def upstream_body(body: ResNet50Features) -> ResNet:
    """The same weights in the module mmdetection builds for its ResNet-50 (``norm_eval``: ``nn.BatchNorm2d`` in
    eval mode), run as it runs: contiguous memory, PyTorch's kernels."""
    reference = ResNet(Bottleneck, [3, 4, 6, 3], norm_layer=nn.BatchNorm2d)
    missing, unexpected = reference.load_state_dict(body.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") or k.startswith("fc.") for k in missing)
    return reference.to(next(body.parameters()).dtype).eval()


def upstream_features(reference: ResNet, x):
    x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
    c3 = reference.layer2(reference.layer1(x))
    c4 = reference.layer3(c3)
    return c3, c4, reference.layer4(c4)


def calibrated_body(dtype) -> ResNet50Features:
    """Random weights with batch-norm statistics that keep activations O(1), as a trained network's do."""
    torch.manual_seed(0)
    body = ResNet50Features()
    with torch.no_grad():
        for module in body.modules():
            if isinstance(module, EvalBatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.2, 1.0)
                module.bias.normal_(0, 0.1)
    return body.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_equals_mmdetection_resnet_bit_for_bit(dtype):
    body = calibrated_body(dtype)
    x = flat_image(dtype)
    # the test has something to break: many windows of the stem's max-pool tie
    with torch.no_grad():
        pre = body.relu(body.bn1(body.conv1(x)))
        windows = F.unfold(F.pad(pre, (1, 1, 1, 1), value=float("-inf")).reshape(-1, 1, *[s + 2 for s in pre.shape[-2:]]),
                           3, stride=2)
        tied = ((windows == windows.max(dim=1, keepdim=True).values).sum(dim=1) > 1).sum()
    assert int(tied) > 1000
    reference = upstream_body(body)
    weights = [torch.randn(shape, dtype=dtype) for shape in (f.shape for f in upstream_features(reference, x))]

    def gradient(run):
        image = x.clone().requires_grad_(True)
        sum((f * w).sum() for f, w in zip(run(image), weights)).backward()
        return image.grad

    expected = gradient(lambda image: upstream_features(reference, image))
    assert expected.abs().max() > 0
    assert torch.equal(gradient(body), expected)  # the features and F.batch_norm, as mmdetection computes them
    stem_reference = x.clone().requires_grad_(True)
    reference.maxpool(reference.relu(reference.bn1(reference.conv1(stem_reference)))).sum().backward()
    stem = x.clone().requires_grad_(True)
    body.stem(stem).sum().backward()
    assert torch.equal(stem.grad, stem_reference.grad)


def test_torchvision_detector_keeps_torchvision_frozen_norm():
    """torchvision's detectors compute their frozen norm as ``x * scale + shift``: kept for them."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    norms = {type(m) for m in build_detector("torchvision_retinanet_resnet50_fpn", 3).modules() if type(m).__name__.endswith("Norm2d")}
    assert norms == {FrozenBatchNorm2d}
    norms = {type(m) for m in build_detector("retinanet_resnet50", 3).modules() if type(m).__name__.endswith("Norm2d")}
    assert norms == {EvalBatchNorm2d}


@pytest.mark.parametrize("arch", ["retinanet_resnet50", "torchvision_retinanet_resnet50_fpn", "retinanet_ced_resnet_50"])
def test_speed_mode_leaves_batch_norm_backbones_contiguous(arch):
    """The channels-last speed mode would change these float32 gradients by whole per cent (tied max-pool windows,
    ReLUs at round-off distance from zero): it leaves them alone, so the gradient is bit for bit the NCHW one."""
    torch.manual_seed(2)
    detector = build_detector(arch, 3).eval()
    detector.preprocess = replace(detector.preprocess, min_size=96, max_size=128)
    for p in detector.parameters():
        p.requires_grad_(False)
    image = (flat_image(torch.float32)[0] * 0.3 + 0.4).clamp(0, 1)
    target = {"boxes": torch.tensor([[20.0, 10.0, 90.0, 50.0]]), "labels": torch.tensor([1])}

    def gradient(model):
        x = image.clone().requires_grad_(True)
        losses = model.image_losses([x], [target])
        sum(v.sum() for v in losses.values()).backward()
        return x.grad

    reference = gradient(detector)
    fast = copy.deepcopy(detector).use_channels_last()
    assert fast.channels_last is False
    assert all(p.is_contiguous() for p in fast.parameters())
    assert torch.equal(gradient(fast), reference)


def test_stores_of_the_old_stem_are_not_reused():
    from gradlens.attribution.compute import detector_identity
    from gradlens.models.bundled import bundled_detector_path
    from gradlens.models.formats.checkpoints import load_detector

    class GT:
        sha256, images_dir, exif_orientation = "0" * 64, None, "ignore"

    resnet = detector_identity(build_detector("retinanet_resnet50", 3), "x", GT())
    assert resnet["arithmetic_revisions"] == {"ResNet50Features": 3}
    ced_resnet = detector_identity(build_detector("retinanet_ced_resnet_50", 3), "x", GT())
    assert list(ced_resnet["arithmetic_revisions"].values()) == [2]
    cednet = detector_identity(load_detector(bundled_detector_path("cednet"), device="cpu"), "x", GT())
    assert "arithmetic_revisions" not in cednet  # every other store keeps its key
