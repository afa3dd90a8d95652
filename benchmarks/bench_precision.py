"""Precision judged on what the user reads: the area curve, the selection, then the map.

A map differs from its float64 value by a few percent under any float32
arithmetic (gradients of a deep network are ill-conditioned), so comparing
maps alone would rule out every fast setting. What a user reads is the area
curve (Figure A2) and the selected images. For each arithmetic setting this
script measures, against a reference (float64 on the CPU; fp32 on a GPU for
--arch full-size detectors there):

- the area curve's largest deviation over the threshold grid, in area fraction
  (the grid is the reference's, as ``gradlens area-curve`` builds it);
- the top-K selection: how many of the reference's top-K images stay in it;
- the map's relative L2 error (mean and max over images), and the IoU of the
  important regions at the grid's middle threshold;
- gradient-map throughput, to name the fastest setting within the tolerance.

Settings: fp32; fp32 with channels-last; tf32 (real on a GPU; on the CPU
*emulated*: every convolution's and matrix product's inputs, and its output
gradient, rounded to TF32's 10-bit mantissa as tensor cores do, accumulation in
float32); bf16 autocast (loss in float32); fp16 autocast on a GPU.

    python benchmarks/bench_precision.py                    # bundled pair, CPU, float64 reference
    python benchmarks/bench_precision.py --arch retinanet_cednet_next_tiny --min-size 320 --images 12 --top 8
    python benchmarks/bench_precision.py --device cuda --arch retinanet_cednet_next_tiny --images 64 --top 32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from gradlens.attribution.methods import frozen_inference_mode, gradient_maps
from gradlens.attribution.targets import image_targets
from gradlens.data.coco import load_ground_truth
from gradlens.data.detections import detections_from_records
from gradlens.data.images import read_image, to_tensor
from gradlens.data.synthetic import CATEGORIES, make_synthetic_coco
from gradlens.inference import AUTO_CURVE_TOLERANCE, InferenceSettings, detect_images
from gradlens.models.bundled import bundled_detector_path
from gradlens.models.formats.checkpoints import load_detector
from gradlens.models.registry import build_detector, with_preprocess
from gradlens.regions.area import area_curve, threshold_grid
from gradlens.regions.run import DEFAULT_T_MAX_PERCENTILE
from gradlens.scoring.quality import quality_scores
from gradlens.selection.improvement import select_images

TOLERANCE = AUTO_CURVE_TOLERANCE  # area fraction: the tolerance --precision auto was chosen by


# -------------------------------------------------------------------------------------------------
# TF32 emulation on the CPU


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (10 explicit mantissa bits), to nearest even, as tensor cores read their inputs."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    finite = torch.isfinite(x)
    return torch.where(finite, rounded.view(torch.float32), x).view_as(x)


class _Tf32Input(torch.autograd.Function):
    """Forward: the input rounded to TF32. Backward: straight through (the product accumulates in float32)."""

    @staticmethod
    def forward(ctx, x):
        return _round_tf32(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Tf32OutputGradient(torch.autograd.Function):
    """Forward: identity. Backward: the output gradient rounded to TF32 (the backward product's input)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()  # not a view: the next op may work in place (ReLU)

    @staticmethod
    def backward(ctx, grad):
        return _round_tf32(grad)


_PRODUCTS = {F.conv2d, F.linear, torch.matmul, torch.Tensor.__matmul__, torch.bmm, torch.baddbmm, torch.addmm}


class EmulatedTf32(TorchFunctionMode):
    """Every convolution and matrix product with TF32 inputs (both passes), accumulating in float32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _PRODUCTS:
            return func(*args, **kwargs)
        rounded = [_Tf32Input.apply(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a for a in args]
        out = func(*rounded, **kwargs)
        return _Tf32OutputGradient.apply(out) if isinstance(out, torch.Tensor) and out.requires_grad else out


# -------------------------------------------------------------------------------------------------


def make_detectors(args, device):
    """A and B: the bundled pair, or two full-size architectures with random weights (calibrated to detect)."""
    if not args.arch:
        pair = [load_detector(bundled_detector_path(n), device=device) for n in ("cednet", "convnext")]
        if args.min_size:
            for det in pair:
                with_preprocess(det, min_size=args.min_size, max_size=int(args.min_size * det.preprocess.max_size / det.preprocess.min_size))
        return pair
    out = []
    for seed, arch in enumerate([args.arch, args.arch_b or args.arch]):
        torch.manual_seed(seed)
        det = build_detector(arch, len(CATEGORIES))
        det.categories = [dict(c) for c in CATEGORIES]
        with torch.no_grad():  # random heads score ~0.01: raise the prior so that some anchors pass score_thr 0.05
            det.head.classification_head.cls_logits.bias.fill_(-2.0)
        if args.min_size:
            with_preprocess(det, min_size=args.min_size, max_size=int(args.min_size * 1333 / 800))
        out.append(det.to(device).eval())
    return out


def clone_as(detector, dtype=None, channels_last=False):
    """A copy of ``detector`` in ``dtype`` (its ``detect`` casting the loader's float32 images) and memory layout."""
    det = copy.deepcopy(detector)
    if dtype is not None:
        det = det.to(dtype)
        detect = det.detect
        det.detect = lambda images: detect([im.to(dtype) for im in images])
    if channels_last:
        det.use_channels_last()
    return det.eval()


def settings_for(device):
    """(name, dtype, channels_last, precision, emulate_tf32) of every setting measured on this device."""
    rows = [("fp32", None, False, "fp32", False), ("fp32 channels-last", None, True, "fp32", False)]
    if device.type == "cuda":
        rows += [("tf32", None, False, "tf32", False), ("tf32 channels-last", None, True, "tf32", False),
                 ("bf16", None, False, "bf16", False), ("fp16", None, False, "fp16", False)]
    else:
        rows += [("tf32 (emulated)", None, False, "fp32", True), ("bf16", None, False, "bf16", False)]
    return rows


def selection(detectors, gt, precision, top, emulate=False, batch_size=4):
    """Top-K image ids by improvement of A over B under one arithmetic setting (what ``select`` does)."""
    scope = EmulatedTf32() if emulate else contextlib.nullcontext()
    tables = []
    # a torch function mode holds in its own thread only: inference runs in this thread when emulating
    saved = os.environ.get("GRADLENS_INFERENCE_THREADS")
    os.environ["GRADLENS_INFERENCE_THREADS"] = "1" if emulate else (saved or str(os.cpu_count() or 1))
    with scope:
        for det in detectors:
            records = detect_images(det, gt, settings=InferenceSettings(batch_size=batch_size, workers=0, precision=precision),
                                    progress=False)
            dets = detections_from_records([r for i in sorted(records) for r in records[i]], gt)
            tables.append(quality_scores(dets, gt).images)
    if saved is None:
        del os.environ["GRADLENS_INFERENCE_THREADS"]
    else:
        os.environ["GRADLENS_INFERENCE_THREADS"] = saved
    return select_images(tables[0], [tables[1]], top)["image_id"].tolist()


def maps_of(detector, images, targets, precision, emulate=False, batch_size=4):
    scope = EmulatedTf32() if emulate else contextlib.nullcontext()
    start = time.perf_counter()
    with scope:
        maps = gradient_maps(detector, images, targets, precision=precision, batch_size=batch_size)
    if images[0].device.type == "cuda":
        torch.cuda.synchronize()
    return [m.double().cpu().numpy() for m in maps], time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120, help="synthetic images scored for the selection")
    parser.add_argument("--top", type=int, default=40, help="selected images whose maps and curve are compared")
    parser.add_argument("--arch", default=None, help="a full-size architecture with random weights instead of the bundled pair")
    parser.add_argument("--arch-b", default=None, help="B's architecture with --arch (default: the same, another seed)")
    parser.add_argument("--min-size", type=int, default=None, help="test scale (shorter side); default: the detector's own")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--thresholds", type=int, default=200)
    parser.add_argument("--log-decades", type=float, default=4.0)
    parser.add_argument("--reference", choices=["auto", "float64", "fp32"], default="auto",
                        help="auto: float64 on the CPU, fp32 on a GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reference = args.reference if args.reference != "auto" else ("fp32" if device.type == "cuda" else "float64")

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_synthetic_coco(f"{tmp}/coco", num_images=args.images, seed=101, progress=False)
        gt = load_ground_truth(paths)
        detectors = make_detectors(args, device)
        a = detectors[0]
        print(f"input: {args.images} synthetic images, top {args.top}; A {a.arch_name}, B {detectors[1].arch_name}, "
              f"test scale {a.preprocess.min_size}")
        print(f"machine: {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
        print(f"reference: {reference}" + (" (CPU)" if reference == "float64" else ""))

        ref_dtype = torch.float64 if reference == "float64" else None
        ref_device = torch.device("cpu") if reference == "float64" else device
        ref_detectors = [clone_as(d.to(ref_device), ref_dtype) for d in detectors]
        for d in detectors:
            d.to(device)
        ref_top = selection(ref_detectors, gt, "fp32", args.top)
        load = lambda i, dev, dt: to_tensor(read_image(gt.image_path(i))).to(dev, dt or torch.float32)  # noqa: E731
        targets = [image_targets(gt, i, a.categories).as_dict() for i in ref_top]
        ref_targets = [{k: (v.to(ref_dtype) if v.is_floating_point() and ref_dtype else v) for k, v in t.items()} for t in targets]
        ref_maps, _ = maps_of(ref_detectors[0], [load(i, ref_device, ref_dtype) for i in ref_top], ref_targets, "fp32",
                              batch_size=args.batch_size)
        pooled = np.concatenate([m.ravel() for m in ref_maps])
        grid = threshold_grid(float(np.percentile(pooled, DEFAULT_T_MAX_PERCENTILE)), args.thresholds, "log", args.log_decades)
        ref_curve = area_curve([m.astype(np.float32) for m in ref_maps], grid)
        middle = grid[len(grid) // 2]

        images = [load(i, device, None) for i in ref_top]
        rows = []
        for name, dtype, channels_last, precision, emulate in settings_for(device):
            det = clone_as(a, dtype, channels_last)
            maps_of(det, images[:2], targets[:2], precision, emulate, args.batch_size)  # warm-up
            maps, seconds = maps_of(det, images, targets, precision, emulate, args.batch_size)
            curve = area_curve([m.astype(np.float32) for m in maps], grid)
            rel = [np.linalg.norm(m - r) / np.linalg.norm(r) for m, r in zip(maps, ref_maps)]
            ious = []
            for m, r in zip(maps, ref_maps):
                x, y = m > middle, r > middle
                union = np.logical_or(x, y).sum()
                ious.append(np.logical_and(x, y).sum() / union if union else 1.0)
            top = selection([clone_as(d, dtype, channels_last) for d in detectors], gt, precision, args.top, emulate, args.batch_size)
            rows.append({"setting": name, "curve": float(np.abs(curve - ref_curve).max()),
                         "kept": len(set(top) & set(ref_top)), "rel_mean": float(np.mean(rel)), "rel_max": float(np.max(rel)),
                         "iou": float(np.mean(ious)), "img_s": len(images) / seconds})

        print(f"\n{'setting':22s} {'curve max |d|':>13s} {'top-K kept':>10s} {'map rel L2 mean/max':>20s} {'IoU@mid':>8s} {'img/s':>7s}")
        for r in rows:
            print(f"{r['setting']:22s} {r['curve']:13.5f} {r['kept']:>5d}/{args.top:<4d} {r['rel_mean']:9.4f}/{r['rel_max']:<10.4f} "
                  f"{r['iou']:8.3f} {r['img_s']:7.2f}")
        within = [r for r in rows if r["curve"] <= TOLERANCE]
        if within:
            best = max(within, key=lambda r: r["img_s"])
            print(f"\nfastest setting whose curve stays within {TOLERANCE} of the reference: {best['setting']} "
                  f"({best['img_s']:.2f} img/s; fp32 {rows[0]['img_s']:.2f})")
        else:
            print(f"\nno setting keeps the curve within {TOLERANCE} of the reference")
    return rows


if __name__ == "__main__":
    main()
