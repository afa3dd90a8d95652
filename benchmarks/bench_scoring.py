"""Benchmark: quality scoring of a COCO-val2017-sized input against the naive ways, in one run.

Input (synthetic, seeded): 5,000 images, Poisson(7) objects per image over 80
categories, about 100 detections per image (simulated, COCO results format).

Compared, on the same input and the same machine:
  * gradlens.quality_scores (vectorised pair matching, class-aware)
  * a straightforward per-image Python implementation (loop over objects and detections)
  * pycocotools' COCOeval.evaluate() (per-image, per-category IoU matrices and matching)

Run: python benchmarks/bench_scoring.py [--images 5000] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gradlens.data.coco import load_ground_truth
from gradlens.data.detections import read_detections, write_detections
from gradlens.data.synthetic import random_annotations, simulate_detections
from gradlens.scoring.quality import quality_scores


def naive_quality(gt: dict, results: list[dict], class_agnostic: bool = False) -> dict[int, float]:
    """Per image, per object, per detection: the definition written as loops."""
    by_image: dict[int, list[dict]] = {}
    for d in results:
        by_image.setdefault(d["image_id"], []).append(d)
    anns_by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            anns_by_image.setdefault(a["image_id"], []).append(a)
    out = {}
    for img in gt["images"]:
        anns = anns_by_image.get(img["id"])
        if not anns:
            continue
        total = 0.0
        for a in anns:
            gx, gy, gw, gh = a["bbox"]
            best_iou, best_conf = 0.0, 0.0
            for d in by_image.get(img["id"], ()):
                if not class_agnostic and d["category_id"] != a["category_id"]:
                    continue
                dx, dy, dw, dh = d["bbox"]
                iw = min(dx + dw, gx + gw) - max(dx, gx)
                ih = min(dy + dh, gy + gh) - max(dy, gy)
                if iw <= 0 or ih <= 0:
                    continue
                inter = iw * ih
                iou = inter / (dw * dh + gw * gh - inter)
                if iou > best_iou or (iou == best_iou and d["score"] > best_conf):
                    best_iou, best_conf = iou, d["score"]
            total += best_iou * best_conf
        out[img["id"]] = total / len(anns)
    return out


def timed(fn, repeat=1):
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-cocoeval", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gt_dict = random_annotations(args.images, objects_per_image=7, num_categories=80, seed=0)
        (tmp / "gt.json").write_text(json.dumps(gt_dict))
        gt = load_ground_truth(tmp / "gt.json")
        dets = simulate_detections(gt, skill=0.7, seed=1, false_positives=95, max_per_image=100)
        write_detections(dets, tmp / "res.json")
        results = json.loads((tmp / "res.json").read_text())
        print(f"input: {len(gt_dict['images'])} images, {gt.num_objects} objects ({gt.num_crowd} crowd), "
              f"{len(dets)} detections ({len(dets) / args.images:.1f} per image)")
        print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs, device {args.device}")

        t_read, loaded = timed(lambda: read_detections(tmp / "res.json", gt))
        t_fast, scores = timed(lambda: quality_scores(loaded, gt, device=args.device), repeat=3)
        t_agn, _ = timed(lambda: quality_scores(loaded, gt, device=args.device, class_agnostic=True), repeat=3)
        t_naive, naive = timed(lambda: naive_quality(gt_dict, results))
        t_naive_agn, naive_agn = timed(lambda: naive_quality(gt_dict, results, class_agnostic=True))
        agn = quality_scores(loaded, gt, device=args.device, class_agnostic=True).images
        worst_agn = max(abs(q - naive_agn[i]) for i, q in zip(agn["image_id"], agn["quality"]))
        assert worst_agn < 1e-12, worst_agn

        ours = dict(zip(scores.images["image_id"].tolist(), scores.images["quality"].tolist()))
        assert ours.keys() == naive.keys()
        worst = max(abs(ours[k] - naive[k]) for k in ours)
        assert worst < 1e-12, worst

        rows = [
            ("gradlens quality_scores (class-aware)", t_fast),
            ("gradlens quality_scores (class-agnostic)", t_agn),
            ("gradlens read_detections (JSON parse + checks)", t_read),
            ("gradlens end to end (read + score)", t_read + t_fast),
            ("naive per-image Python loops (class-aware)", t_naive),
            ("naive per-image Python loops (class-agnostic)", t_naive_agn),
        ]
        if not args.skip_cocoeval:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_gt = COCO(str(tmp / "gt.json"))
                coco_dt = coco_gt.loadRes(str(tmp / "res.json"))
                evaluator = COCOeval(coco_gt, coco_dt, "bbox")
                t_coco, _ = timed(evaluator.evaluate)
            rows.append(("pycocotools COCOeval.evaluate()", t_coco))

        print(f"\n{'method':50s} {'seconds':>9s} {'gradlens is':>12s}")
        for name, t in rows:
            reference = t_agn if "agnostic" in name else t_fast  # compare like with like
            line = f"{name:50s} {t:9.3f}"
            print(line if name.startswith("gradlens") else f"{line} {t / reference:10.1f}x")
        print(f"\nagreement with the naive implementation: max |diff| of image quality = {max(worst, worst_agn):.1e}")


if __name__ == "__main__":
    main()
