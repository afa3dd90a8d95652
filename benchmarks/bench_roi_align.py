"""RoIAlign's backward: gradlens' sparse-matrix product against torchvision's CPU kernel (the naive way).

A two-stage detector's expected loss pools every RoI the samplers could draw (about 1,000-2,000 boxes, against 512
in one draw), and torchvision's CPU backward of ``roi_align`` -- bit-equal to mmcv's, one thread walking every
RoI, channel, bin and sample point -- was 45 % of a Mask R-CNN gradient pass. This script times both backwards on
one FPN level's worth of boxes of a 384 x 640 image (256 channels at stride 4, as mmdetection maps RoIs smaller
than 112 px there), checks they agree to float32 round-off, and prints the ratio.

    python benchmarks/bench_roi_align.py [--rois 1500] [--size 7] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torchvision.ops import roi_align as torchvision_roi_align

from gradlens.models.detectors.roi_align import roi_align


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rois", type=int, default=1500)
    parser.add_argument("--size", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 256, 96, 160, generator=g)
    xy = torch.rand(args.rois, 2, generator=g) * torch.tensor([600.0, 340.0])
    wh = torch.rand(args.rois, 2, generator=g) * 108 + 4
    rois = torch.cat([torch.zeros(args.rois, 1), xy, xy + wh], 1)
    grad_out = torch.randn(args.rois, 256, args.size, args.size, generator=g)

    def backward(fn):
        x = feat.clone().requires_grad_(True)
        out = fn(x)
        start = time.perf_counter()
        (grad,) = torch.autograd.grad(out, x, grad_out)
        return time.perf_counter() - start, grad

    naive = lambda x: torchvision_roi_align(x, rois, args.size, 0.25, 0, True)  # noqa: E731
    fast = lambda x: roi_align(x, rois, args.size, 0.25)  # noqa: E731
    backward(naive), backward(fast)  # warm up
    t_naive, ref = min((backward(naive) for _ in range(args.repeats)), key=lambda r: r[0])
    t_fast, grad = min((backward(fast) for _ in range(args.repeats)), key=lambda r: r[0])
    err = float((grad - ref).abs().max()) / float(ref.abs().max())
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.rois} RoIs, {args.size}x{args.size} bins, 256 x 96 x 160 map")
    print(f"torchvision backward  {t_naive * 1000:8.1f} ms")
    print(f"sparse backward       {t_fast * 1000:8.1f} ms   ({t_naive / t_fast:.2f}x faster; max |diff| / max |grad| {err:.1e})")


if __name__ == "__main__":
    main()
