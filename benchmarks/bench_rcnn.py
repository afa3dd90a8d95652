"""The cost of the expected loss of a two-stage detector, against one official sampled draw.

gradlens' total loss for torchvision's Faster/Mask R-CNN is the expectation over the RPN's and the RoI head's
samplers (``gradlens.ExpectedLossRCNN``): the RoI head runs on every proposal the sampler could draw (the
2,000 training proposals plus the objects) instead of the 512 of one draw, and the RPN's terms weight every
anchor instead of 256. This script times, on the same image and targets, each way's input-gradient pass:

- *one draw*: torchvision's own training-mode ``forward(images, targets)`` (norms in inference mode, as gradlens
  runs it) and ``backward`` to the image, which is what a user of the official code would differentiate;
- *expected*: ``ExpectedLossRCNN.image_losses`` and ``backward``;

and prints the ratio (issue 26 asks for at most 1.3x), and how far one draw's gradient is from the expected one
(relative L2), which is what the expectation buys. Random weights with the classifier bias set so that boxes
come out; the image is a scikit-image-like smooth random field at COCO's typical 480 x 640.

    python benchmarks/bench_rcnn.py                                   # Faster R-CNN v1 at 800 (torchvision's scale)
    python benchmarks/bench_rcnn.py --arch torchvision_maskrcnn_resnet50_fpn --min-size 480 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from gradlens.models.detectors.adapter import mode_view
from gradlens.models.detectors.rcnn import TORCHVISION_TWO_STAGE, ExpectedLossRCNN


def scene(height: int, width: int, masks: bool):
    g = torch.Generator().manual_seed(0)
    image = F.interpolate(torch.rand(1, 3, height // 16, width // 16, generator=g), size=(height, width),
                          mode="bilinear", align_corners=False)[0]
    boxes = torch.tensor([[40, 60, 260, 400], [300, 80, 600, 300], [100, 250, 380, 470], [420, 300, 630, 470]],
                         dtype=torch.float32)
    target = {"boxes": boxes, "labels": torch.tensor([1, 18, 3, 62])}
    if masks:
        m = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            m[k, y1:y2, x1:x2] = 1
        target["masks"] = m
    return image, target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="torchvision_fasterrcnn_resnet50_fpn", choices=sorted(TORCHVISION_TWO_STAGE))
    parser.add_argument("--min-size", type=int, default=800, help="the transform's test scale (torchvision: 800)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torchvision.models.detection as detection

    torch.manual_seed(0)
    model = getattr(detection, TORCHVISION_TWO_STAGE[args.arch])(weights=None, weights_backbone=None, num_classes=91,
                                                                min_size=args.min_size, max_size=1333).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    det = ExpectedLossRCNN(model, [None] * 91, name=args.arch)
    image, target = scene(480, 640, det.needs_masks)
    view = mode_view(model, training=True)

    def one_draw(seed: int):
        torch.manual_seed(seed)
        x = image.clone().requires_grad_(True)
        sum(view([x], [target]).values()).backward()
        return x.grad

    def expected():
        x = image.clone().requires_grad_(True)
        sum(t.sum() for t in det.image_losses([x], [target]).values()).backward()
        return x.grad

    one_draw(0), expected()  # warm-up
    times = {"one draw": [], "expected": []}
    draws = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        draws.append(one_draw(r + 1))
        times["one draw"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reference = expected()
        times["expected"].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    away = [float((d - reference).norm() / reference.norm()) for d in draws]
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.arch} at {args.min_size}, 480x640 image, 4 objects; best of {args.repeats}")
    print(f"  one official draw (forward + backward to the image): {best['one draw']:.2f} s")
    print(f"  expected loss (forward + backward to the image):     {best['expected']:.2f} s")
    print(f"  ratio: {best['expected'] / best['one draw']:.2f}x")
    print(f"  one draw's gradient from the expected one: {min(away):.0%} to {max(away):.0%} (relative L2)")


if __name__ == "__main__":
    main()
