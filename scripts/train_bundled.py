"""Train the two small bundled detectors on synthetic shapes, on CPU, in minutes.

The demo and the tests need two real detectors of different backbone
families that really detect: a small CEDNet-style RetinaNet and a small
ConvNeXt-style RetinaNet, trained here with the paper's loss (focal + L1,
IoU thresholds 0.5/0.4) on a synthetic COCO training split, then measured
with COCOeval on held-out synthetic images and saved in gradlens' format:

    python scripts/train_bundled.py --out gradlens/assets/detectors

Both models see the same images in the same order (same seed); they differ
only in their backbone. Training is deterministic for a seed up to
floating-point reduction order.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from gradlens.data.coco import load_ground_truth
from gradlens.data.images import read_image
from gradlens.data.synthetic import CATEGORIES, make_synthetic_coco
from gradlens.evaluation import coco_map
from gradlens.inference import InferenceSettings, detect_images
from gradlens.data.detections import detections_from_records
from gradlens.models.formats.checkpoints import load_detector, save_detector
from gradlens.models.registry import build_detector

TRAIN_SEED, HELD_OUT_SEED = 1001, 2002


def load_split(root: Path, split: str, num_images: int, seed: int):
    paths = make_synthetic_coco(root, num_images=num_images, seed=seed, split=split, progress=False)
    gt = load_ground_truth(paths.ann, images_dir=paths.images)
    label_of = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    samples = []
    for image_id in gt.image_ids:
        pixels = torch.from_numpy(read_image(gt.image_path(image_id))).permute(2, 0, 1).contiguous()
        anns = [a for a in gt.coco.imgToAnns[int(image_id)] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
                             dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        samples.append((pixels, boxes[keep], labels[keep]))
    return gt, samples


def variance_preserving_head(detector) -> None:
    """He-initialise the head's hidden convs.

    RetinaNet's N(0, 0.01) init suits 256-channel heads; in a 48-channel head
    each conv shrinks the signal about 7-fold, so after four of them almost no
    gradient reaches the backbone and training from scratch crawls. The output
    layers keep their small init and the focal-loss prior bias.
    """
    for branch in (detector.head.classification_head, detector.head.regression_head):
        for module in branch.conv.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                torch.nn.init.zeros_(module.bias)


def flip(pixels, boxes):
    w = pixels.shape[-1]
    return pixels.flip(-1), torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)


def train(arch: str, samples, minutes: float, batch_size: int, lr: float, seed: int, log_every: int = 20, init=None):
    """Train for a time budget (cosine schedule over it); ``init`` continues from a saved detector."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if init is not None:
        detector = load_detector(init)
    else:
        detector = build_detector(arch, len(CATEGORIES))
        detector.categories = [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]
        variance_preserving_head(detector)
    detector.train().use_channels_last()  # depthwise-conv backward is far faster in NHWC on CPU
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    budget = minutes * 60
    start = time.perf_counter()
    step, order = 0, []
    warmup = 50
    while True:
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            break
        if len(order) < batch_size:
            order += rng.sample(range(len(samples)), len(samples))
        batch, order = order[:batch_size], order[batch_size:]
        images, targets = [], []
        for i in batch:
            pixels, boxes, labels = samples[i]
            if rng.random() < 0.5:
                pixels, boxes = flip(pixels, boxes)
            images.append(pixels.float() / 255)
            targets.append({"boxes": boxes, "labels": labels})
        # cosine decay over the time budget, linear warm-up
        frac = min(elapsed / budget, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        losses = detector(images, targets)
        loss = losses["classification"] + losses["bbox_regression"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        if step % log_every == 0:
            print(f"  {arch} step {step:5d}  {elapsed:6.0f}s  cls {losses['classification'].item():.3f}  "
                  f"box {losses['bbox_regression'].item():.3f}", flush=True)
        step += 1
    detector.eval().use_channels_last(False)
    return detector, step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gradlens/assets/detectors"))
    parser.add_argument("--data", type=Path, default=Path("gradlens-runs/train-bundled-data"))
    parser.add_argument("--arch", nargs="+", default=["retinanet_cednet_mini", "retinanet_convnext_mini"])
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--held-out-images", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=8.0, help="training time budget per detector")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init", type=Path, default=None,
                        help="folder of earlier {cednet,convnext}.pth to continue training from (a warm restart)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    _, train_samples = load_split(args.data, "train2017", args.train_images, TRAIN_SEED)
    held_gt, _ = load_split(args.data, "val2017", args.held_out_images, HELD_OUT_SEED)
    report = {}
    for arch in args.arch:
        name = arch.replace("retinanet_", "").replace("_mini", "")
        init = args.init / f"{name}.pth" if args.init is not None else None
        detector, steps = train(arch, train_samples, args.minutes, args.batch_size, args.lr, args.seed, init=init)
        results = detect_images(detector, held_gt, settings=InferenceSettings(batch_size=8, workers=0), progress=False)
        records = [r for i in sorted(results) for r in results[i]]
        dets = detections_from_records(records, held_gt)
        stats = coco_map(held_gt, dets)
        from gradlens.scoring.quality import quality_scores

        _, images = quality_scores(dets, held_gt)
        nonzero = float((images["quality"] > 0).mean())
        path = save_detector(detector, args.out / f"{name}.pth")
        params = sum(p.numel() for p in detector.parameters())
        report[arch] = {"file": str(path), "params": params, "steps": steps, "mAP": stats["AP"], "AP50": stats["AP50"],
                        "images_with_nonzero_quality": nonzero, "bytes": path.stat().st_size}
        print(json.dumps({arch: report[arch]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
