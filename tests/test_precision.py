"""Precision: a float64 reference changes the arithmetic, not the assignment; TF32 emulation; the precision benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlens.attribution.methods import gradient_maps
from gradlens.attribution.targets import image_targets
from gradlens.data.images import read_image, to_tensor
from gradlens.models.bundled import bundled_detector_path
from gradlens.models.formats.checkpoints import load_detector
from gradlens.models.registry import with_preprocess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_precision  # noqa: E402


def test_float64_keeps_mmdetections_float32_anchors_and_assignment(synthetic_gt):
    """mmdetection builds anchors and assigns in float32 whatever the model's dtype; so does gradlens, so a
    float64 run is the same function in more precise arithmetic (its map within float32 rounding)."""
    a32 = with_preprocess(load_detector(bundled_detector_path("cednet")), min_size=160, max_size=260)
    a64 = with_preprocess(load_detector(bundled_detector_path("cednet")), min_size=160, max_size=260).double()
    checked = 0
    for image_id in [int(i) for i in synthetic_gt.image_ids][:6]:
        target = image_targets(synthetic_gt, image_id, a32.categories).as_dict()
        if not len(target["boxes"]):
            continue
        image = to_tensor(read_image(synthetic_gt.image_path(image_id)))
        t64 = {k: v.double() if v.is_floating_point() else v for k, v in target.items()}
        with torch.no_grad():
            l32, l64 = a32.image_losses([image], [target]), a64.image_losses([image.double()], [t64])
        assert float(l32["num_foreground"][0]) == float(l64["num_foreground"][0])
        m32 = gradient_maps(a32, [image], [target])[0].double()
        m64 = gradient_maps(a64, [image.double()], [t64])[0]
        assert float(torch.linalg.norm(m32 - m64) / torch.linalg.norm(m64)) < 1e-3
        checked += 1
    assert checked >= 3


def _tf32_reference(values: np.ndarray) -> np.ndarray:
    """Round to 11 significant bits (10 stored), ties to even, by frexp arithmetic in float64."""
    mantissa, exponent = np.frexp(values.astype(np.float64))
    return (np.round(mantissa * 2.0**11) / 2.0**11 * 2.0**exponent).astype(np.float32)


def test_tf32_rounding_matches_a_direct_computation():
    g = np.random.default_rng(0)
    values = np.concatenate([g.standard_normal(10000) * 10.0 ** g.integers(-20, 20, 10000),
                             [0.0, -0.0, 1.0, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-12]]).astype(np.float32)
    ours = bench_precision._round_tf32(torch.from_numpy(values)).numpy()
    np.testing.assert_array_equal(ours, _tf32_reference(values))
    assert ours[-3] == np.float32(1.0) and ours[-2] == np.float32(1 + 4 * 2.0**-11)  # ties go to even
    inf = bench_precision._round_tf32(torch.tensor([np.inf, -np.inf, np.nan]))
    assert torch.isinf(inf[:2]).all() and torch.isnan(inf[2])


def test_emulated_tf32_rounds_the_products_inputs_in_both_passes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 9, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g)
    up = torch.randn(2, 4, 7, 7, generator=g)
    with bench_precision.EmulatedTf32():
        out = torch.nn.functional.conv2d(x, w)
        (grad,) = torch.autograd.grad(out, x, up)
    r = bench_precision._round_tf32
    expected_out = torch.nn.functional.conv2d(r(x.detach()), r(w))
    expected_grad = torch.nn.grad.conv2d_input(x.shape, r(w), r(up))
    assert torch.equal(out, expected_out)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)
    assert not torch.equal(expected_out, torch.nn.functional.conv2d(x.detach(), w))  # the rounding is visible


def test_precision_benchmark_at_tiny_scale(capsys):
    rows = {r["setting"]: r for r in bench_precision.main(["--images", "12", "--top", "4", "--thresholds", "50", "--min-size", "160"])}
    assert set(rows) == {"fp32", "fp32 channels-last", "tf32 (emulated)", "bf16"}
    assert rows["fp32"]["curve"] < 1e-3 and rows["fp32"]["rel_mean"] < 1e-3  # fp32 is the float64 curve
    assert rows["bf16"]["rel_mean"] > rows["fp32"]["rel_mean"]
    assert all(r["kept"] <= 4 and r["img_s"] > 0 for r in rows.values())
    assert "fastest setting" in capsys.readouterr().out


def test_auto_precision_is_fp32_on_the_cpu_and_the_measured_default_on_cuda(monkeypatch):
    from gradlens.inference import GPU_DEFAULT_PRECISION, PRECISIONS, resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert GPU_DEFAULT_PRECISION in PRECISIONS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("auto", "auto") == GPU_DEFAULT_PRECISION
    assert resolve_precision("fp32", "cuda") == "fp32"
