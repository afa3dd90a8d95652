"""Batched inference against the naive way, in one run.

Naive: one image at a time in the main process — decode the JPEG, run the
detector, next image (what a first script would do). gradlens: JPEG decoding
in DataLoader workers, batches of images sharing one padded canvas,
``torch.inference_mode``. Both produce the same detections; the script checks
that before it reports the ratio.

    python benchmarks/bench_inference.py [--images 48] [--arch retinanet_cednet_next_tiny] [--min-size 320] [--device cuda]

Defaults: the bundled small CEDNet-style detector on synthetic 128-320 px
images. ``--arch`` runs a full-size paper architecture with random weights
(``--min-size`` sets its test scale, so a CPU run stays short).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradlens.data.coco import load_ground_truth
from gradlens.data.images import read_image, to_tensor
from gradlens.data.synthetic import CATEGORIES, make_synthetic_coco
from gradlens.inference import InferenceSettings, detect_images
from gradlens.models.bundled import bundled_detector_path
from gradlens.models.formats.checkpoints import load_detector
from gradlens.models.registry import build_detector, with_preprocess


def naive(detector, gt, device):
    results = {}
    with torch.no_grad():
        for image_id in gt.image_ids:
            image = to_tensor(read_image(gt.image_path(image_id))).to(device)
            results[int(image_id)] = detector.detect([image])[0]
    return results


def _timed(run, device) -> float:
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--arch", default=None, help="a paper architecture with random weights instead of the bundled detector")
    parser.add_argument("--bundled", choices=["cednet", "convnext"], default="cednet", help="which bundled detector (without --arch)")
    parser.add_argument("--min-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved rounds of naive then batched; the medians are reported (a 2-core machine drifts by 20 %%)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_synthetic_coco(Path(tmp), num_images=args.images, seed=7, progress=False)
        gt = load_ground_truth(paths)
        if args.arch:
            torch.manual_seed(0)
            detector = build_detector(args.arch, len(CATEGORIES))
            detector.categories = [dict(c) for c in CATEGORIES]
        else:
            detector = load_detector(bundled_detector_path(args.bundled))
        if args.min_size:
            with_preprocess(detector, min_size=args.min_size, max_size=int(args.min_size * 1333 / 800))
        detector = detector.to(device).eval()
        # warm-up (allocator, kernels)
        detect_images(detector, gt, image_ids=gt.image_ids[:2], settings=InferenceSettings(batch_size=1, workers=0), progress=False)

        settings = InferenceSettings(batch_size=args.batch_size, workers=args.workers, precision=args.precision)
        naive_s, fast_s, out = [], [], {}
        for _ in range(max(1, args.repeat)):  # interleaved, so a drift of the machine hits both alike
            naive_s.append(_timed(lambda: out.update(slow=naive(detector, gt, device)), device))
            fast_s.append(_timed(lambda: out.update(fast=detect_images(detector, gt, settings=settings, progress=False)), device))
        slow, fast = out["slow"], out["fast"]
        t_naive, t_fast = float(np.median(naive_s)), float(np.median(fast_s))

        same = sum(len(slow[i]["boxes"]) == len(fast[i]) for i in slow)
        n = len(gt.image_ids)
        report = {
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}",
            "detector": detector.arch_name,
            "test_scale": [detector.preprocess.min_size, detector.preprocess.max_size],
            "images": n,
            "naive_images_per_s": round(n / t_naive, 2),
            "batched_images_per_s": round(n / t_fast, 2),
            "speedup": round(t_naive / t_fast, 2),
            "rounds": len(naive_s),
            "speedup_per_round": [round(a / b, 2) for a, b in zip(naive_s, fast_s)],
            "batch_size": args.batch_size,
            "workers": args.workers,
            "precision": args.precision,
            "images_with_same_detection_count": f"{same}/{n}",
            "mean_detections_per_image": float(np.mean([len(v) for v in fast.values()])),
        }
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
