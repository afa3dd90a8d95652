"""Deterministic GPU formulations, checked on the CPU: CEDNet's 2x upsampling, cuDNN's policy, batch threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradlens.attribution.methods import cudnn_benchmark, frozen_inference_mode, gradient_maps
from gradlens.data.coco import load_ground_truth
from gradlens.errors import GradlensError
from gradlens.inference import InferenceSettings, detect_images
from gradlens.models.backbones import upsample
from gradlens.models.registry import build_detector
from gradlens.models.backbones.upsample import Upsample2x, _Upsample2x, upsample2x_backward
from tests.test_gradients import scene, tiny_detector
from tests.test_inference import _arrays, float64_detector, random_detector

SHAPES = [(2, 8, 5, 7), (1, 3, 1, 1), (1, 4, 2, 9), (3, 16, 33, 17), (1, 2, 1, 6), (2, 5, 7, 1)]


def _interpolate(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def _dense_upsampling_matrix(n: int) -> np.ndarray:
    """One axis' 2x bilinear map (align_corners=False) written out from the formula, as a (2n, n) matrix."""
    matrix = np.zeros((2 * n, n))
    for j in range(2 * n):
        source = max((j + 0.5) / 2 - 0.5, 0.0)
        i0 = int(np.floor(source))
        frac = source - i0
        matrix[j, i0] += 1 - frac
        matrix[j, min(i0 + 1, n - 1)] += frac
    return matrix


@pytest.mark.parametrize("shape", SHAPES)
def test_upsampling_forward_is_pytorchs_own_bit_for_bit(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_Upsample2x.apply(x.clone().requires_grad_(True)).detach(), _interpolate(x))
    assert torch.equal(Upsample2x()(x), _interpolate(x))


@pytest.mark.parametrize("shape", SHAPES)
def test_upsampling_backward_is_the_adjoint_of_the_written_out_map(shape):
    g = torch.Generator().manual_seed(2)
    n, c, h, w = shape
    grad = torch.randn(n, c, 2 * h, 2 * w, generator=g, dtype=torch.float64)
    rows, cols = _dense_upsampling_matrix(h), _dense_upsampling_matrix(w)
    expected = np.einsum("jh,ncjk,kw->nchw", rows, grad.numpy(), cols)
    np.testing.assert_allclose(upsample2x_backward(grad).numpy(), expected, rtol=1e-13, atol=1e-13)
    # and it is what PyTorch's own backward computes: in float64, since the two add up to 16 weighted terms per element
    # in different orders, and in float32 that rounding is bounded only by ~16 * 2**-24 * 4 = 4e-6 of the largest gradient
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(_Upsample2x.apply(x), x, grad)[0]
    theirs = torch.autograd.grad(_interpolate(x), x, grad)[0]
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-13


def test_upsampling_backward_is_bit_identical_twice_and_batch_independent():
    grad = torch.randn(4, 6, 18, 26, generator=torch.Generator().manual_seed(3))
    first, second = upsample2x_backward(grad), upsample2x_backward(grad.clone())
    assert torch.equal(first, second)
    assert torch.equal(upsample2x_backward(grad[2:3]), first[2:3])


def test_cednet_uses_it_without_changing_its_keys():
    det = build_detector("retinanet_cednet_mini", 3)
    modules = [m for m in det.modules() if isinstance(m, Upsample2x)]
    assert modules and not any(isinstance(m, torch.nn.Upsample) for m in det.modules())
    keys = [k for k in det.state_dict() if "decoder_upsample" in k]
    assert keys and all(k.split("decoder_upsample.")[1].split(".")[1] == "0" for k in keys)  # only the 1x1 convs


def test_a_cednet_map_through_the_deterministic_backward_equals_the_native_one(monkeypatch):
    det = tiny_detector(dtype=torch.float64)  # float64: the same function; float32's last bits differ per CPU
    images, targets = zip(*[scene(70, 90, 5, dtype=torch.float64), scene(64, 100, 6, dtype=torch.float64)])
    native = gradient_maps(det, list(images), list(targets), batch_size=2)
    monkeypatch.setattr(upsample, "_native_backward_is_deterministic", lambda x: False)  # the GPU's path, on the CPU
    calls = []
    original = upsample2x_backward
    monkeypatch.setattr(upsample, "upsample2x_backward", lambda g: calls.append(1) or original(g))
    ours = gradient_maps(det, list(images), list(targets), batch_size=2)
    assert calls  # the deterministic backward really ran
    for a, b in zip(native, ours):
        assert float((a - b).abs().max() / a.max()) < 1e-10


def test_cudnn_policy_is_set_and_restored(monkeypatch):
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    det = tiny_detector()
    monkeypatch.setenv("GRADLENS_CUDNN_BENCHMARK", "1")
    with frozen_inference_mode(det):
        assert torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == saved
    monkeypatch.delenv("GRADLENS_CUDNN_BENCHMARK")
    with frozen_inference_mode(det):
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    monkeypatch.setenv("GRADLENS_CUDNN_BENCHMARK", "fast")
    with pytest.raises(GradlensError, match="GRADLENS_CUDNN_BENCHMARK is 'fast'"):
        cudnn_benchmark()


@pytest.fixture(scope="module")
def gt(synthetic_coco):
    return load_ground_truth(synthetic_coco)


def test_inference_in_batch_threads_equals_one_thread(gt, monkeypatch):
    # float64 network: single-threaded operators reorder sums, and in float32 that can swap two near-equal detections
    # (at the top-100 cut or in NMS) or change how many there are, as often as the CPU's kernels make it
    det = float64_detector(random_detector())
    settings = InferenceSettings(batch_size=3, workers=0)
    monkeypatch.setenv("GRADLENS_INFERENCE_THREADS", "1")
    one = detect_images(det, gt, settings=settings, progress=False)
    monkeypatch.setenv("GRADLENS_INFERENCE_THREADS", "3")
    threaded = detect_images(det, gt, settings=settings, progress=False)
    assert one.keys() == threaded.keys()
    assert sum(len(v) for v in one.values()) > 0
    matched = total = 0
    for image_id in one:
        a, b = _arrays(one[image_id]), _arrays(threaded[image_id])
        assert a.shape == b.shape
        # as sets: an ulp of the float32 post-processing may still swap two equal-looking scores in the output order
        close = (np.abs(a[:, None, :] - b[None, :, :]) <= 1e-3).all(axis=2)
        matched += int(close.any(axis=1).sum())
        total += len(a)
    assert matched == total, (matched, total)
    monkeypatch.setenv("GRADLENS_INFERENCE_THREADS", "many")
    with pytest.raises(GradlensError, match="GRADLENS_INFERENCE_THREADS is 'many'"):
        detect_images(det, gt, settings=settings, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a lent GPU machine)")
@pytest.mark.parametrize("arch", ["retinanet_cednet_mini", "retinanet_convnext_mini"])
def test_gpu_maps_are_bit_identical_twice_and_batched_equals_one_at_a_time(arch):
    det = tiny_detector(arch).cuda()
    images, targets = zip(*[scene(70, 90, s) for s in (7, 8, 9)])
    images = [im.cuda() for im in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    first = gradient_maps(det, images, targets, batch_size=3)
    second = gradient_maps(det, images, targets, batch_size=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for image, target, batched in zip(images, targets, first):
        alone = gradient_maps(det, [image], [target], batch_size=1)[0]
        assert float((alone - batched).abs().max() / alone.max()) < 1e-5
