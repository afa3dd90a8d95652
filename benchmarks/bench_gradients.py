"""Gradient-map throughput against the naive way, in one run.

Naive: one image at a time in the main process — decode the JPEG, captum
``Saliency`` on the detector's total loss with every parameter requiring grad
(so autograd also computes every weight gradient), default memory layout.
gradlens: ``compute_maps`` — JPEG decoding in DataLoader workers, parameters
frozen, images batched by padded canvas, channels-last convolutions on the
CPU, each map reduced, compressed and written to the store as it is done.
Both must give the same maps (checked before the ratio is printed).
``--target object``: one map per ground-truth object instead, against captum
on one object's loss at a time. ``--repeat`` interleaved rounds, medians shown.

Also measured: the error of bf16 autocast maps against fp32 (``--precision``
of ``gradients``/``area-curve``), as relative L2 error and as the IoU of the
important regions at three thresholds.

    python benchmarks/bench_gradients.py [--images 32] [--arch retinanet_cednet_next_tiny --min-size 320] [--device cuda]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch

from gradlens.attribution.compute import compute_maps, map_store_key
from gradlens.attribution.objects import compute_object_maps
from gradlens.attribution.methods import AttributionConfig, TotalLoss, gradient_maps, reduce_channels
from gradlens.attribution.store import MapStore
from gradlens.attribution.targets import image_targets, needs_masks
from gradlens.data.coco import load_ground_truth
from gradlens.data.images import read_image, to_tensor
from gradlens.data.synthetic import CATEGORIES, make_synthetic_coco
from gradlens.models.bundled import bundled_detector_path
from gradlens.models.formats.checkpoints import load_detector
from gradlens.models.detectors.mask2former import MASK2FORMER_ARCHITECTURES, build_mask2former
from gradlens.models.registry import DETR_ARCHITECTURES, build_deformable_detr, build_detector, with_preprocess


def make_detector(args, device):
    if args.arch:
        torch.manual_seed(0)
        build = (build_deformable_detr if args.arch in DETR_ARCHITECTURES else
                 build_mask2former if args.arch in MASK2FORMER_ARCHITECTURES else build_detector)
        det = build(args.arch, len(CATEGORIES))
        det.categories = [dict(c) for c in CATEGORIES]
        if args.min_size:
            with_preprocess(det, min_size=args.min_size, max_size=int(args.min_size * 1333 / 800))
        return det.to(device).eval()
    return load_detector(bundled_detector_path(args.bundled), device=device)


def naive(detector, gt, ids, device, per_object=False):
    """One map at a time: per image, or (``per_object``) per object of each image, named by annotation id."""
    from captum.attr import Saliency

    detector.eval()
    for p in detector.parameters():
        p.requires_grad_(True)
    maps = {}
    for image_id in ids:
        image = to_tensor(read_image(gt.image_path(image_id))).to(device)
        targets = image_targets(gt, image_id, detector.categories, masks=needs_masks(detector))
        losses = ([(ann, targets.for_object(j)) for j, ann in enumerate(targets.ann_ids)] if per_object
                  else [(image_id, targets.as_dict())])
        for name, target in losses:
            grad = Saliency(TotalLoss(detector, [target])).attribute(image[None].requires_grad_(True), abs=False)[0]
            maps[name] = reduce_channels(grad.detach(), "max").cpu().numpy()
            detector.zero_grad(set_to_none=True)
    return maps


def region_iou(a, b, t):
    x, y = a > t, b > t
    union = np.logical_or(x, y).sum()
    return float(np.logical_and(x, y).sum() / union) if union else 1.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--arch", default=None, help="a paper architecture with random weights instead of the bundled detector")
    parser.add_argument("--bundled", choices=["cednet", "convnext"], default="cednet", help="which bundled detector (without --arch)")
    parser.add_argument("--min-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-precision", action="store_true")
    parser.add_argument("--target", choices=["total", "object"], default="total",
                        help="object: one map per ground-truth object (compute_object_maps against one object at a time)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved rounds of naive then gradlens; the medians are reported (a 2-core machine drifts by 20 %%)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="NHWC convolutions for gradlens (auto: on the CPU only, as the commands do)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_synthetic_coco(f"{tmp}/coco", num_images=args.images, seed=11, progress=False)
        gt = load_ground_truth(paths)
        ids = [int(i) for i in gt.image_ids if (gt.obj_image_id == i).any()]
        detector = make_detector(args, device)
        print(f"input: {len(ids)} synthetic images with objects; detector {detector.arch_name} "
              f"({sum(p.numel() for p in detector.parameters()) / 1e6:.2f}M params), test scale {detector.preprocess.min_size}")
        print(f"machine: {platform.machine()}, torch {torch.__version__} threads {torch.get_num_threads()}, device {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))

        per_object = args.target == "object"
        fast_detector = make_detector(args, device)
        if args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cpu"):
            fast_detector.use_channels_last()
        config = AttributionConfig(target=args.target)
        compute = compute_object_maps if per_object else compute_maps

        def fast_run(folder: str, image_ids, workers: int) -> MapStore:
            store = MapStore(folder, map_store_key(fast_detector, "bench", gt, config))
            compute(fast_detector, gt, image_ids, store, config, args.batch_size, workers=workers, progress=False)
            return store

        naive(detector, gt, ids[:2], device, per_object)  # warm-up (allocator, kernels)
        fast_run(f"{tmp}/warm", ids[:2], 0)
        naive_s, fast_s = [], []
        for round_ in range(max(1, args.repeat)):  # interleaved, so a drift of the machine hits both alike
            start = time.perf_counter()
            reference = naive(detector, gt, ids, device, per_object)
            if device.type == "cuda":
                torch.cuda.synchronize()
            naive_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            store = fast_run(f"{tmp}/maps{round_}", ids, args.workers)
            if device.type == "cuda":
                torch.cuda.synchronize()
            fast_s.append(time.perf_counter() - start)
        t_naive, t_fast = float(np.median(naive_s)), float(np.median(fast_s))

        names = list(reference)
        errors = [float(np.abs(store.read(i) - reference[i]).max() / reference[i].max()) for i in names]
        unit, what = ("obj/s", "1 object") if per_object else ("img/s", "1 image")
        fast = "compute_object_maps" if per_object else "compute_maps"
        print(f"\n{len(names)} maps\n{'method':58s} {'seconds':>8s} {unit:>7s}  ratio")
        print(f"{'naive: captum Saliency, ' + what + ', all params require grad':58s} {t_naive:8.2f} {len(names) / t_naive:7.2f}")
        print(f"{'gradlens ' + fast + ' (batched, frozen, stored float16)':58s} {t_fast:8.2f} {len(names) / t_fast:7.2f}"
              f"  {t_naive / t_fast:.2f}x")
        print(f"(medians of {len(naive_s)} interleaved rounds; ratio per round: "
              + ", ".join(f"{a / b:.2f}x" for a, b in zip(naive_s, fast_s)) + ")")
        rel = [float(np.linalg.norm(store.read(i) - reference[i]) / np.linalg.norm(reference[i])) for i in names]
        print(f"agreement: max |stored - naive| / max(naive map) = median {np.median(errors):.1e}, max {max(errors):.1e} "
              f"(float16 storage: <= 4.9e-4 expected); relative L2 median {np.median(rel):.1e}, max {max(rel):.1e}")
        print("  (a larger max comes from an image where a pre-activation within round-off of zero flips sign between "
              "batch and single-image summation order: the network's own discontinuity, not a gradlens difference)")

        # precision: low-precision arithmetic against fp32, one image at a time
        precisions = [] if args.skip_precision or per_object else ["bf16"] + (["tf32", "fp16"] if device.type == "cuda" else [])
        for precision in precisions:
            rel, ious = [], {0.01: [], 0.1: [], 0.5: []}
            for image_id in ids[: min(8, len(ids))]:
                image = to_tensor(read_image(gt.image_path(image_id))).to(device)
                target = image_targets(gt, image_id, detector.categories, masks=needs_masks(detector)).as_dict()
                exact = gradient_maps(fast_detector, [image], [target])[0].float().cpu().numpy()
                low = gradient_maps(fast_detector, [image], [target], precision=precision)[0].float().cpu().numpy()
                rel.append(float(np.linalg.norm(low - exact) / np.linalg.norm(exact)))
                for q in ious:
                    ious[q].append(region_iou(low, exact, q * exact.max()))
            print(f"{precision} vs fp32 maps: relative L2 error mean {np.mean(rel):.4f} (max {np.max(rel):.4f}); important-region IoU "
                  + ", ".join(f"{np.mean(v):.3f} at t={q:g}*max" for q, v in ious.items()))

if __name__ == "__main__":
    main()
