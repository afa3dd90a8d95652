"""Build ``tests/data/mmcv_nms_reference.pt``: mmcv's own ``batched_nms`` on boxes whose scores tie.

mmdetection 2.x/3.x end every dense head with mmcv's ``batched_nms`` (``mmcv/ops/nms.py``) over mmcv's C++ CPU
NMS (``csrc/pytorch/cpu/nms.cpp``). gradlens' :mod:`gradlens.models.detectors.nms` must keep the same boxes in
the same order, ties included (a detector whose scores saturate at 1.0 otherwise keeps other boxes). This
script runs the upstream code itself: mmcv 1.7.2's Python ``batched_nms`` (installed without compiled ops) with
its C++ NMS compiled from the mmcv source tree by ``scripts/mmcv_ext.py``, and records

* ``cases[name] = {"boxes", "scores", "labels", "iou", "keep"}``: float32 inputs (what the heads give NMS) and
  mmcv's kept indices (int64), for: scores saturated at 1.0 and quantised to two decimals (ties everywhere,
  3,000 boxes over 5 classes in clusters, threshold 0.5); the same at threshold 0.6 (not a float32 number:
  the kernel's float threshold); 10,000 boxes over 10 classes (mmcv's per-class path from ``split_thr`` 10,000 on); one class.

NMS is discrete: the tests compare the kept indices exactly. Run in the fork's virtual environment::

    PYTHONPATH=/work/main /tmp/forkcmp/venv/bin/python scripts/make_nms_reference.py \\
        --mmcv-src /tmp/forkcmp/mmcv-src --build /tmp/forkcmp/build-nms --out tests/data/mmcv_nms_reference.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))


def clustered_boxes(generator: torch.Generator, n: int, clusters: int, width: float = 640, height: float = 480):
    """Boxes around a few centres (so many overlap near the thresholds), float32, xyxy inside the image."""
    centres = torch.rand(clusters, 2, generator=generator) * torch.tensor([width, height])
    sizes = 20 + torch.rand(clusters, 2, generator=generator) * 180
    which = torch.randint(clusters, (n,), generator=generator)
    jitter = torch.randn(n, 2, generator=generator) * 0.15 * sizes[which]
    half = sizes[which] * (0.5 + 0.3 * torch.rand(n, 2, generator=generator)) / 2
    c = centres[which] + jitter
    boxes = torch.cat([c - half, c + half], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes.float()


def tied_scores(generator: torch.Generator, n: int) -> torch.Tensor:
    """A third exactly 1.0 (saturated sigmoids), the rest quantised to two decimals: ties everywhere."""
    scores = (torch.rand(n, generator=generator) * 0.95 + 0.05).mul(100).round().div(100)
    scores[torch.rand(n, generator=generator) < 1 / 3] = 1.0
    return scores.float()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mmcv-src", type=Path, required=True, help="an mmcv v1.7.2 source tree")
    parser.add_argument("--build", type=Path, required=True, help="folder for the compiled NMS kernel")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from mmcv_ext import register_mmcv_ext

    register_mmcv_ext(args.mmcv_src, args.build)
    from mmcv.ops import batched_nms

    generator = torch.Generator().manual_seed(0)
    specs = {"saturated_0.5": (3000, 5, 0.5), "saturated_0.6": (3000, 5, 0.6), "split_path": (10000, 10, 0.5),
             "one_class": (2000, 1, 0.5)}
    cases = {}
    for name, (n, classes, iou) in specs.items():
        boxes = clustered_boxes(generator, n, clusters=60)
        scores = tied_scores(generator, n)
        labels = torch.randint(classes, (n,), generator=generator)
        _, keep = batched_nms(boxes, scores, labels, {"type": "nms", "iou_threshold": iou})
        cases[name] = {"boxes": boxes, "scores": scores, "labels": labels, "iou": iou, "keep": keep.long()}
        print(f"{name}: {n} boxes, {int((scores == 1).sum())} at 1.0, {len(keep)} kept")
    import mmcv

    torch.save({"mmcv_version": str(mmcv.__version__), "torch_version": str(torch.__version__), "cases": cases}, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
