"""What mmdetection's exact arithmetic costs: the uint8 cv2 resize and MaxIoUAssigner against a gradient pass.

The issue's bound: the exact resize (forward: OpenCV's fixed-point integer
arithmetic; backward: the fixed-point linear map as two matrix products) and
the exact assignment together cost no more than 5 % of a gradient pass.
Measured in one run, on one image:

- ``float resize``: the naive differentiable resize gradlens used before
  (``F.interpolate`` of the float image), forward + backward;
- ``exact resize``: :func:`gradlens.models.preprocessing.resize.mmcv_resize`, forward + backward;
- ``assignment``: ``mmdet_box_overlaps`` + vectorised ``MaxIoUAssigner`` on the
  detector's anchors, the upstream loop over objects on the same input, and
  torchvision's ``box_iou`` + ``Matcher`` (what gradlens used before);
- ``gradient pass``: the full input gradient of the total loss
  (:func:`gradlens.input_gradients`).

    python benchmarks/bench_fidelity.py [--arch retinanet_convnext_tiny] [--height 480 --width 640] [--objects 40]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

from gradlens.attribution.methods import input_gradients
from gradlens.data.synthetic import CATEGORIES
from gradlens.models.detectors.assign import MaxIoUAssigner, mmdet_box_overlaps
from gradlens.models.registry import build_detector
from gradlens.models.preprocessing.resize import mmcv_resize
from gradlens.models.preprocessing.transform import resized_size


def timed(fn, repeat: int) -> float:
    fn()  # warm-up (caches of the interpolation plan, allocator)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def loop_assign(overlaps: torch.Tensor, pos=0.5, neg=0.4) -> torch.Tensor:
    """mmdetection's assign_wrt_overlaps as upstream writes it: a Python loop over objects."""
    assigned = torch.full((overlaps.shape[1],), -1, dtype=torch.long)
    max_overlaps, argmax = overlaps.max(dim=0)
    gt_max, _ = overlaps.max(dim=1)
    assigned[(max_overlaps >= 0) & (max_overlaps < neg)] = 0
    positive = max_overlaps >= pos
    assigned[positive] = argmax[positive] + 1
    for i in range(overlaps.shape[0]):
        if gt_max[i] >= 0:
            assigned[overlaps[i] == gt_max[i]] = i + 1
    return assigned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="retinanet_convnext_tiny")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--objects", type=int, default=40, help="ground-truth objects (COCO: 7.3 per image, up to ~90)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    det = build_detector(args.arch, len(CATEGORIES))
    det.categories = [dict(c) for c in CATEGORIES]
    with torch.no_grad():
        det.head.classification_head.cls_logits.bias.fill_(-2.0)
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, args.height, args.width), generator=g).float() / 255
    xy = torch.rand(args.objects, 2, generator=g) * torch.tensor([args.width * 0.8, args.height * 0.8])
    wh = 8 + torch.rand(args.objects, 2, generator=g) * torch.tensor([args.width * 0.3, args.height * 0.3])
    target = {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, len(CATEGORIES), (args.objects,), generator=g)}
    size = resized_size(args.height, args.width, det.preprocess)

    def float_resize():
        x = image.clone().requires_grad_(True)
        torch.nn.functional.interpolate(x[None], size=size, mode="bilinear", align_corners=False).sum().backward()

    def exact_resize():
        x = image.clone().requires_grad_(True)
        mmcv_resize(x, size).sum().backward()

    with torch.no_grad():
        batch, _ = det.prepare([image])
        _, levels, _ = det.head_outputs(batch)
    anchors = torch.cat(levels)
    scale = torch.tensor([size[1] / args.width, size[0] / args.height] * 2)
    gt = target["boxes"] * scale

    def vectorised():
        MaxIoUAssigner().assign(mmdet_box_overlaps(gt, anchors))

    def upstream_loop():
        loop_assign(mmdet_box_overlaps(gt, anchors))

    matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)

    def torchvision_matcher():
        matcher(box_iou(gt, anchors))

    t_float = timed(float_resize, args.repeat)
    t_exact = timed(exact_resize, args.repeat)
    t_assign = timed(vectorised, args.repeat)
    t_loop = timed(upstream_loop, args.repeat)
    t_matcher = timed(torchvision_matcher, args.repeat)
    t_pass = timed(lambda: input_gradients(det, [image], [target]), max(1, args.repeat // 5))

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.arch}, {args.height} x {args.width} -> {size[0]} x {size[1]}, {args.objects} objects, {anchors.shape[0]} anchors")
    print(f"{'step':<44}{'ms':>10}{'of a gradient pass':>22}")
    for name, t in [("float resize (F.interpolate), fwd + bwd", t_float), ("exact mmcv resize, fwd + bwd", t_exact),
                    ("MaxIoUAssigner (overlaps + vectorised)", t_assign), ("MaxIoUAssigner, upstream loop over objects", t_loop),
                    ("torchvision box_iou + Matcher (before)", t_matcher),
                    ("gradient pass (input_gradients)", t_pass)]:
        print(f"{name:<44}{t * 1e3:>10.1f}{100 * t / t_pass:>21.2f}%")
    print(f"exact resize + assignment: {100 * (t_exact + t_assign) / t_pass:.2f} % of a gradient pass; "
          f"added to what gradlens did before (float resize + Matcher): {100 * (t_exact + t_assign - t_float - t_matcher) / t_pass:.2f} %; "
          f"vectorised assignment {t_loop / t_assign:.1f}x the upstream loop")


if __name__ == "__main__":
    main()
