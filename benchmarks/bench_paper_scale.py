"""The paper's analysis at its real size, end to end, against the naive way, in one run.

What the CEDNet paper's Appendix B needs: three full-size RetinaNets
(CEDNet-NeXt-T as A, ConvNeXt-T and Swin-T as baselines) run on all of COCO
val2017 (5,000 images), the 1,000 images A improves most on, and each
detector's input gradients of them. This script builds that workload and
runs it through the code the commands run:

- **dataset**: a COCO-val2017-shaped synthetic dataset — real JPEGs (decoded
  like any others), 640 px on the long side for 98 % of the images, short
  sides of 480/427/360 px and portraits as in val2017, a few smaller images,
  Poisson(7.3) objects over COCO's 80 categories (their real ids), 1 % crowd;
- **detectors**: the three architectures with random weights (fixed seed),
  calibrated so that they emit detections: the classification layer is
  rescaled so its logits spread by 1 and its bias set so that 2 % of the
  anchors of one image score above the test threshold (0.05), measured on
  that image. Saved as gradlens checkpoints carrying the dataset's categories;
- **select** (``gradlens select --a cednet.pth --b convnext.pth --b swin.pth``):
  each checkpoint's detections through ``detections_for_checkpoint`` (what
  select runs for a checkpoint), timed per detector, then ``run_selection``
  itself, which finds them in the cache and scores and ranks;
- **area-curve**: each model's gradient maps of the selected images through
  ``compute_maps`` into the very stores ``workdir_maps`` names (timed per
  detector), then ``run_area_curve`` itself, which reuses every map (checked)
  and computes the grid, the curves, the table and Figure A2.

Per stage it prints wall time, images/s, FLOPs per image and the achieved
TFLOP/s with its fraction of the device's dense peak for the precision used
(``--precision auto``, the commands' default, is tf32 on CUDA and fp32 on the
CPU). FLOPs are counted by torch's ``FlopCounterMode`` on one batch of the most
common padded canvas, through the stage's own function (``detect_images``, or
``attribute_frozen`` with the parameters frozen), and scaled to every other
image by its canvas area; a multiply-add counts as 2 FLOPs, the convention of
peak figures. gradlens rows are cold, as the commands run (loading the
checkpoint included). The ``area-curve`` row is the whole command; the
``  curves`` row below it times its curve computation alone, for a like-for-like
ratio, and is not added to the total.

The naive way runs on a subset in the same process, in fp32, warmed up on one
image: one image at a time, the JPEG decoded in the main process; for
inference ``detector.detect([image])`` under ``no_grad``; for gradients captum
``Saliency`` on the total loss with every parameter requiring grad, default
memory layout; for the curves a Python loop over the thresholds. The ratio is
gradlens' images/s over the naive images/s; both outputs are compared and the
agreement printed.

``--scale S`` shrinks everything for a small machine: 5000*S images whose
sides are scaled by S (at least 64 px on the long side), test scale 800x1333
scaled alike (so images are resized by the same factor as at full scale;
the architecture's size divisor is kept), top 1000*S images.

    python benchmarks/bench_paper_scale.py [--batch-size 8 --workers 4] [--precision fp32] [--json out.json]   # the paper's size (GPU)
    python benchmarks/bench_paper_scale.py --scale 0.05 --device cpu                                           # minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

from gradlens.attribution.compute import compute_maps
from gradlens.attribution.methods import AttributionConfig, TotalLoss, attribute_frozen, frozen_inference_mode, reduce_channels
from gradlens.attribution.targets import image_targets
from gradlens.attribution.workdir import selection_ids, workdir_maps
from gradlens.data.coco import CocoPaths, load_ground_truth, resolve_coco_paths
from gradlens.data.images import read_image, to_tensor
from gradlens.device import resolve_device
from gradlens.errors import GradlensError
from gradlens.inference import (
    PRECISIONS,
    InferenceSettings,
    ShapeGroupedBatches,
    annotated_sizes,
    detect_images,
    resolve_precision,
)
from gradlens.models.formats.checkpoints import load_detector, save_detector
from gradlens.models.formats.mmdet import coco80_categories
from gradlens.models.registry import build_detector, with_preprocess
from gradlens.models.preprocessing.transform import padded_size
from gradlens.regions.area import area_curve_from_store
from gradlens.regions.run import run_area_curve
from gradlens.runner import DetectorRun, detections_for_checkpoint
from gradlens.selection.run import run_selection

# the paper's detectors: role, label (file stem), architecture
MODELS = (
    ("a", "cednet_next_t", "retinanet_cednet_next_tiny"),
    ("b1", "convnext_t", "retinanet_convnext_tiny"),
    ("b2", "swin_t", "retinanet_swin_tiny"),
)
FULL_IMAGES, FULL_TOP, FULL_LONG_SIDE, FULL_TEST_SCALE = 5000, 1000, 640, (800, 1333)
MIN_LONG_SIDE, MIN_IMAGES, MIN_TOP = 64, 8, 2

# COCO val2017's image sizes: the long side is 640 px for 98 % of the images; the short side is mostly
# 480 (4:3) or 427 (3:2), some 360 (16:9), a few square or in between; a quarter are portraits.
SHORT_SIDES = ((480, 0.45), (427, 0.35), (360, 0.08), (640, 0.04), (None, 0.08))  # None: anything from 300 to 512
PORTRAIT_FRACTION, FULL_SIDE_FRACTION = 0.25, 0.98
OBJECTS_PER_IMAGE, EMPTY_FRACTION, CROWD_FRACTION = 7.3, 0.01, 0.01
JPEG_QUALITY = 90
ANCHOR_FRACTION = 0.02  # calibration: this fraction of one image's anchors scores above the test threshold
MARKER = ".bench_paper_scale"  # in a --keep folder: this script may replace what is there

# Dense (no sparsity) peak TFLOP/s per precision, from the vendors' data sheets; first matching name wins.
# fp32 is the CUDA-core figure: gradlens' fp32 turns TF32 off.
PEAK_TFLOPS = (
    ("H200", {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "fp16": 989.0}),
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100", {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "fp16": 989.0}),  # SXM
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0}),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
)


# ---------------------------------------------------------------------------------------------
# the workload


def workload(scale: float) -> dict:
    """Image count, image size factor, test scale and top-K for ``--scale``."""
    if not 0 < scale <= 1:
        raise SystemExit(f"--scale must be in (0, 1]; got {scale}.")
    factor = max(scale, MIN_LONG_SIDE / FULL_LONG_SIDE)  # images and test scale shrink together
    return {
        "images": max(MIN_IMAGES, round(FULL_IMAGES * scale)),
        "image_factor": factor,
        "test_scale": (round(FULL_TEST_SCALE[0] * factor), round(FULL_TEST_SCALE[1] * factor)),
        "top": max(MIN_TOP, round(FULL_TOP * scale)),
    }


def _image_size(rng: np.random.Generator, factor: float) -> tuple[int, int]:
    """(height, width) of one image drawn from val2017's size distribution, scaled by ``factor``."""
    long = FULL_LONG_SIDE if rng.random() < FULL_SIDE_FRACTION else int(rng.integers(200, FULL_LONG_SIDE))
    sides, weights = zip(*SHORT_SIDES)
    short = sides[rng.choice(len(sides), p=weights)]
    short = int(rng.integers(300, 513)) if short is None else short
    short = min(short * long // FULL_LONG_SIDE, long)
    long, short = max(16, round(long * factor)), max(16, round(short * factor))
    return (long, short) if rng.random() < PORTRAIT_FRACTION else (short, long)


def _objects(rng: np.random.Generator, height: int, width: int, factor: float, categories: list[int]) -> list[dict]:
    """Poisson(7.3) boxes, sizes log-uniform from 6 px (scaled) to most of the short side, COCO's small/medium/large mix."""
    if rng.random() < EMPTY_FRACTION:
        return []
    objects = []
    low, high = math.log(max(2.0, 6 * factor)), math.log(0.9 * min(height, width))
    for _ in range(int(rng.poisson(OBJECTS_PER_IMAGE))):
        side, aspect = math.exp(rng.uniform(low, max(low, high))), math.exp(rng.uniform(-0.7, 0.7))
        w, h = min(side * aspect, width - 1.0), min(side / aspect, height - 1.0)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        shape = int(rng.integers(3))  # rectangle, ellipse, triangle
        objects.append({
            "category_id": int(categories[rng.integers(len(categories))]),
            "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
            "area": round(w * h * (1.0, math.pi / 4, 0.5)[shape], 2),
            "iscrowd": int(rng.random() < CROWD_FRACTION),
            "shape": shape,
        })
    return objects


def _render(rng: np.random.Generator, height: int, width: int, objects: list[dict], noise: np.ndarray) -> Image.Image:
    """A colour field with grain (so the JPEG is photo-sized) and every object drawn as a filled shape."""
    field = Image.fromarray(rng.integers(30, 226, size=(3, 4, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    tile = noise[rng.integers(len(noise))]
    y0, x0 = int(rng.integers(tile.shape[0] - height + 1)), int(rng.integers(tile.shape[1] - width + 1))
    pixels = np.asarray(field, dtype=np.int16) + tile[y0:y0 + height, x0:x0 + width]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x, y, w, h = obj["bbox"]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if obj["shape"] == 0:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        elif obj["shape"] == 1:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        else:
            draw.polygon([(x + w / 2, y), (x + w, y + h), (x, y + h)], fill=colour)
    return image


def make_dataset(root: Path, num_images: int, factor: float, seed: int) -> tuple[CocoPaths, float]:
    """Write (or reuse, when made with the same settings) ``root/annotations/instances_val2017.json`` and
    ``root/val2017/*.jpg``; returns the paths and the seconds spent writing (0 when reused)."""
    settings = {"images": num_images, "image_factor": factor, "seed": seed, "format": 1}
    stamp = root / "bench_dataset.json"
    paths = resolve_coco_paths(root)
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and paths.ann.is_file():
        return paths, 0.0
    start = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    paths.images.mkdir(parents=True)
    paths.ann.parent.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    categories = coco80_categories()
    ids = [c["id"] for c in categories]
    side = max(16, round(FULL_LONG_SIDE * factor))
    noise = rng.integers(-32, 33, size=(6, side, side, 3), dtype=np.int16)  # grain: ~150 KB per 640x480 JPEG, as COCO's
    image_ids = np.sort(rng.choice(np.arange(1, 600_000), size=num_images, replace=False))
    images, annotations = [], []
    for image_id in image_ids:
        height, width = _image_size(rng, factor)
        objects = _objects(rng, height, width, factor, ids)
        name = f"{int(image_id):012d}.jpg"
        _render(rng, height, width, objects, noise).save(paths.images / name, quality=JPEG_QUALITY)
        images.append({"id": int(image_id), "file_name": name, "height": height, "width": width})
        for obj in objects:
            obj.pop("shape")
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_id), **obj})
    dataset = {"info": {"description": f"bench_paper_scale: COCO val2017-shaped synthetic data ({settings})"},
               "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    paths.ann.write_text(json.dumps(dataset))
    stamp.write_text(json.dumps(settings))
    return paths, time.perf_counter() - start


def calibrate(detector, image: torch.Tensor, fraction: float = ANCHOR_FRACTION) -> dict:
    """Make a randomly initialised RetinaNet emit detections, measured on ``image``.

    The classification layer is rescaled so that its logits (bias aside) have
    standard deviation 1 over all anchors and classes, and its bias is set so
    that ``fraction`` of the anchors have a class scoring above the test
    threshold. Returns what the detector then does on ``image``.
    """
    layer = detector.head.classification_head.cls_logits
    threshold = detector.test_cfg.score_thr
    with torch.no_grad():
        batch, _ = detector.prepare([image])
        logits = detector.head_outputs(batch)[0]["cls_logits"][0] - layer.bias.view(-1, detector.num_classes)[0]
        spread = float(logits.std())
        layer.weight.mul_(1.0 / spread)
        best = (logits / spread).amax(dim=1)  # each anchor's best class, as the rescaled layer computes it
        layer.bias.fill_(math.log(threshold / (1 - threshold)) - float(torch.quantile(best, 1 - fraction)))
        above = float((torch.sigmoid(best + layer.bias[0]) > threshold).float().mean())
        detections = detector.detect([image])[0]
    return {"anchors_above_threshold": above, "detections": int(len(detections["scores"]))}


def make_checkpoints(folder: Path, gt, work: dict, seed: int) -> tuple[dict[str, Path], dict]:
    """The three detectors, random (seeded) and calibrated, saved with the dataset's categories."""
    folder.mkdir(parents=True, exist_ok=True)
    categories = [{"id": int(c["id"]), "name": c["name"]} for c in gt.coco.loadCats(sorted(gt.coco.getCatIds()))]
    image = to_tensor(read_image(gt.image_path(gt.image_ids[0])))
    paths, report = {}, {}
    for k, (role, label, arch) in enumerate(MODELS):
        torch.manual_seed(seed + k)
        detector = build_detector(arch, len(categories))
        detector.categories = categories
        with_preprocess(detector, min_size=work["test_scale"][0], max_size=work["test_scale"][1])
        report[label] = calibrate(detector, image)
        paths[role] = save_detector(detector, folder / f"{label}.pth")
        del detector
    return paths, report


# ---------------------------------------------------------------------------------------------
# FLOPs and peaks


def count_flops(run) -> int:
    """FLOPs (a multiply-add counts 2) that ``run()`` dispatches in this thread, as torch's FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    flops = int(counter.get_total_flops())
    assert flops > 0, "FlopCounterMode saw no work: did the stage run in another thread?"
    return flops


def counted_batch(detector, gt, image_ids, batch_size: int) -> list[int]:
    """The first full batch of the most common padded canvas: the batch FLOPs are counted on."""
    sizes = annotated_sizes(gt, image_ids)
    canvases = Counter(padded_size(*sizes[i], detector.preprocess) for i in image_ids)
    common = canvases.most_common(1)[0][0]
    batches = [b for b in ShapeGroupedBatches(sizes, detector, batch_size).batches
               if padded_size(*sizes[b[0]], detector.preprocess) == common]
    return max(batches, key=len)


def canvas_factor(detector, gt, image_ids, batch: list[int]) -> float:
    """Mean padded-canvas area of ``image_ids`` over that of the counted batch (FLOPs grow with the area)."""
    sizes = annotated_sizes(gt, image_ids)
    area = lambda hw: hw[0] * hw[1]  # noqa: E731
    counted = area(padded_size(*sizes[batch[0]], detector.preprocess))
    return float(np.mean([area(padded_size(*sizes[i], detector.preprocess)) for i in image_ids]) / counted)


def inference_flops(detector, gt, batch: list[int], precision: str) -> int:
    """FLOPs per image of ``detect_images`` (inference's own function) on one batch (one batch runs in this thread)."""
    settings = InferenceSettings(batch_size=len(batch), workers=0, precision=precision)
    return count_flops(lambda: detect_images(detector, gt, image_ids=batch, settings=settings, progress=False)) // len(batch)


def gradient_flops(detector, gt, batch: list[int], config: AttributionConfig) -> int:
    """FLOPs per image of one batch's gradient maps as ``compute_maps`` computes them (parameters frozen)."""
    device = next(detector.parameters()).device
    images = [to_tensor(read_image(gt.image_path(i))).to(device) for i in batch]
    targets = [image_targets(gt, i, detector.categories) for i in batch]
    with frozen_inference_mode(detector):
        return count_flops(lambda: attribute_frozen(detector, images, targets, config, len(batch))) // len(batch)


def peak_tflops(device: torch.device, precision: str) -> tuple[str, float | None]:
    """The device's name and its dense peak TFLOP/s at ``precision`` (None: unknown, or a CPU)."""
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return name, peaks.get(precision)
    return name, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# the naive way


def naive_detect(detector, gt, image_ids, device) -> tuple[float, dict[int, int]]:
    """One image at a time, decoded in the main process; seconds and detections per image."""
    counts = {}
    start = time.perf_counter()
    with torch.no_grad():
        for image_id in image_ids:
            image = to_tensor(read_image(gt.image_path(image_id))).to(device)
            counts[int(image_id)] = len(detector.detect([image])[0]["scores"])
    _sync(device)
    return time.perf_counter() - start, counts


def naive_gradients(detector, gt, image_ids, device) -> tuple[float, dict[int, np.ndarray]]:
    """captum Saliency on one image's total loss at a time, every parameter requiring grad, fp32."""
    from captum.attr import Saliency

    detector.eval()
    for p in detector.parameters():
        p.requires_grad_(True)
    maps = {}
    start = time.perf_counter()
    for image_id in image_ids:
        image = to_tensor(read_image(gt.image_path(image_id))).to(device)
        target = image_targets(gt, image_id, detector.categories).as_dict()
        grad = Saliency(TotalLoss(detector, [target])).attribute(image[None].requires_grad_(True), abs=False)[0]
        maps[int(image_id)] = reduce_channels(grad.detach(), "max").cpu().numpy()
        detector.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start, maps


def naive_curve(stores, image_ids, thresholds) -> tuple[float, dict[str, np.ndarray]]:
    """For every model and map: read it, then a Python loop over the thresholds, ``(m > t).mean()``."""
    curves = {}
    start = time.perf_counter()
    for role, store in stores.items():
        total = np.zeros(len(thresholds))
        for image_id in image_ids:
            m = store.read(image_id)
            for k, t in enumerate(thresholds):
                total[k] += float((m > np.float32(t)).mean())
        curves[role] = total / len(image_ids)
    return time.perf_counter() - start, curves


# ---------------------------------------------------------------------------------------------
# the run


def _row(stage, model, images, seconds, flops_per_image=None, peak=None, naive_images=None, naive_seconds=None,
         in_total=True, **extra) -> dict:
    rate = images / seconds
    tflops = flops_per_image * rate / 1e12 if flops_per_image else None
    naive_rate = naive_images / naive_seconds if naive_images else None
    return {
        "stage": stage, "model": model, "images": int(images), "seconds": seconds, "images_per_s": rate,
        "gflop_per_image": flops_per_image / 1e9 if flops_per_image else None, "tflops": tflops,
        "peak_fraction": tflops / peak if tflops is not None and peak else None,
        "naive_images": naive_images, "naive_seconds": naive_seconds, "naive_images_per_s": naive_rate,
        "ratio": rate / naive_rate if naive_rate else None, "in_total": in_total, **extra,
    }


def _fmt(value, spec: str, width: int) -> str:
    return f"{'n/a':>{width}s}" if value is None else f"{value:{width}{spec}}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'stage':11s} {'model':14s} {'images':>6s} {'seconds':>8s} {'img/s':>8s} {'GFLOP/img':>9s} "
            f"{'TFLOP/s':>8s} {'% peak':>6s} {'naive img/s':>11s} {'ratio':>7s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        fraction = None if r["peak_fraction"] is None else 100 * r["peak_fraction"]
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['stage']:11s} {r['model']:14s} {r['images']:6d} {r['seconds']:8.2f} {r['images_per_s']:8.2f} "
              f"{_fmt(r['gflop_per_image'], '.1f', 9)} {_fmt(r['tflops'], '.3f', 8)} {_fmt(fraction, '.1f', 6)} "
              f"{_fmt(r['naive_images_per_s'], '.2f', 11)} {ratio:>7s}")


def warm_up(device: torch.device) -> None:
    """Start CUDA and its libraries before anything is timed (the first stage would pay for it otherwise)."""
    if device.type == "cuda":
        x = torch.ones(1, 8, 32, 32, device=device)
        torch.nn.functional.conv2d(x, torch.ones(8, 8, 3, 3, device=device)).sum().item()
        (x.view(8, -1) @ x.view(-1, 8)).sum().item()


class Bench:
    """One run: the dataset, the device and settings, and the rows measured so far.

    gradlens rows are cold, as the commands run them (loading the checkpoint
    included); the naive loops are warmed up on one image first, so the
    ratios err in the naive way's favour.
    """

    def __init__(self, args, root: Path):
        self.args = args
        self.device = resolve_device(args.device)
        args.precision = resolve_precision(args.precision, self.device)  # as the commands resolve --precision auto
        InferenceSettings(batch_size=args.batch_size, workers=args.workers, precision=args.precision).check(self.device)
        self.work = workload(args.scale)
        self.top = args.top or self.work["top"]
        self.naive_n = args.naive_images or max(2, round(16 * args.scale))
        self.device_name, self.peak = peak_tflops(self.device, args.precision)
        self.root = root
        self.workdir, self.cache = root / "run", root / "cache"
        self.rows: list[dict] = []
        self.flops: dict[str, dict] = {}
        self.agreement: dict[str, str] = {}
        self.labels = {role: label for role, label, _ in MODELS}
        self.config = AttributionConfig(precision=args.precision)

    def _time(self, fn):
        _sync(self.device)
        start = time.perf_counter()
        out = fn()
        _sync(self.device)
        return out, time.perf_counter() - start

    def prepare(self) -> None:
        """Dataset and checkpoints (not part of the analysis' time); an empty work directory and cache."""
        args, work = self.args, self.work
        self.coco, t_data = make_dataset(self.root / "coco", work["images"], work["image_factor"], args.seed)
        self.gt = gt = load_ground_truth(self.coco)
        self.all_ids = [int(i) for i in gt.image_ids]
        self.sizes = annotated_sizes(gt, self.all_ids)
        side = round(FULL_LONG_SIDE * work["image_factor"])
        full = np.mean([max(hw) == side for hw in self.sizes.values()])
        megabytes = sum(p.stat().st_size for p in self.coco.images.glob("*.jpg")) / 1e6
        self.dataset = {"images": len(self.all_ids), "objects": int(gt.num_objects), "megabytes": megabytes,
                        "seconds": t_data, "root": str(self.coco.ann.parent.parent)}
        print(f"dataset: {len(self.all_ids)} JPEGs ({megabytes:.1f} MB), {gt.num_objects} objects "
              f"({gt.num_objects / len(self.all_ids):.1f} per image), {len(gt.category_names)} categories, "
              f"{100 * full:.0f} % with the long side {side} px; "
              + (f"written in {t_data:.1f} s" if t_data else "reused from an earlier run"))
        start = time.perf_counter()
        self.checkpoints, self.calibration = make_checkpoints(self.root / "checkpoints", gt, work, args.seed)
        print(f"detectors: {', '.join(a for _, _, a in MODELS)} at test scale {work['test_scale'][0]}x{work['test_scale'][1]}, "
              f"random weights (seed {args.seed}), built, calibrated and saved in {time.perf_counter() - start:.1f} s; "
              + "; ".join(f"{k}: {100 * v['anchors_above_threshold']:.1f} % of anchors above 0.05, {v['detections']} detections"
                          for k, v in self.calibration.items()) + " on the first image")
        for folder in (self.workdir, self.cache):  # every stage is measured from scratch, also with --keep
            shutil.rmtree(folder, ignore_errors=True)
        self.detector_run = DetectorRun(batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                                        cache_dir=self.cache, device=str(self.device))
        warm_up(self.device)

    def inference(self, role: str) -> None:
        """select's step for one checkpoint (``detections_for_checkpoint``: load, hash, detect every image, cache)."""
        label, path, gt, ids = self.labels[role], self.checkpoints[role], self.gt, self.all_ids
        result, seconds = self._time(lambda: detections_for_checkpoint(path, gt, self.detector_run, progress=self.args.progress))
        assert not result.reused, "the detection cache was not empty"
        counts = Counter(int(i) for i in result.detections.image_id)
        detector = load_detector(path, device=self.device)
        batch = counted_batch(detector, gt, ids, self.args.batch_size)
        counted = inference_flops(detector, gt, batch, self.args.precision)
        self.flops[label] = {"canvas": list(padded_size(*self.sizes[batch[0]], detector.preprocess)), "batch": len(batch),
                             "inference_per_image": counted}
        naive_ids = ids[: self.naive_n]
        naive_detect(detector, gt, naive_ids[:1], self.device)  # warm-up
        t_naive, naive_counts = naive_detect(detector, gt, naive_ids, self.device)
        same = sum(naive_counts[i] == counts.get(i, 0) for i in naive_ids)
        self.agreement[f"inference {label}: images with as many detections as the naive loop"] = f"{same}/{len(naive_ids)}"
        self.rows.append(_row("inference", label, len(ids), seconds, counted * canvas_factor(detector, gt, ids, batch),
                              self.peak, len(naive_ids), t_naive, detections_per_image=len(result.detections.image_id) / len(ids)))

    def select(self) -> None:
        """``gradlens select`` itself: every detection comes from the cache; it scores, ranks and writes the work directory."""
        a, b = self.checkpoints["a"], [self.checkpoints["b1"], self.checkpoints["b2"]]
        self.selection, seconds = self._time(lambda: run_selection(
            a, b, coco=self.coco, workdir=self.workdir, top=self.top, device=str(self.device),
            progress=self.args.progress, detector_run=self.detector_run))
        self.ids = selection_ids(self.workdir)
        self.rows.append(_row("select", "score + rank", len(self.all_ids), seconds))
        # area-curve's detector settings: those select recorded, with this command line's (as the CLI makes them)
        self.recorded = DetectorRun.recorded(self.workdir, workers=self.args.workers, precision=self.args.precision,
                                             device=str(self.device))
        self.models, _ = workdir_maps(self.workdir, config=self.config, detector_run=self.recorded, compute=False)

    def gradients(self, model) -> None:
        """area-curve's step for one model (``workdir_maps``: load, channels-last on the CPU, ``compute_maps`` into its store)."""
        run, gt, ids = self.recorded, self.gt, self.ids

        def compute():
            detector = load_detector(model.checkpoint, arch=run.arch, trust=run.trust, device=self.device)
            if self.device.type == "cpu":
                detector.use_channels_last()  # as workdir_maps does
            maps = compute_maps(detector, gt, ids, model.store, self.config, batch_size=run.batch_size, workers=run.workers,
                                progress=self.args.progress, label=f"{model.role} ({model.label})", plan_ids=ids)
            return detector, maps

        (detector, maps), seconds = self._time(compute)
        assert maps.computed >= len(ids), maps
        batch = counted_batch(detector, gt, ids, run.batch_size)
        counted = gradient_flops(detector, gt, batch, self.config)
        self.flops[model.label].update(gradient_canvas=list(padded_size(*self.sizes[batch[0]], detector.preprocess)),
                                       gradient_batch=len(batch), gradient_per_image=counted)
        per_image = counted * canvas_factor(detector, gt, ids, batch)
        naive = detector.use_channels_last(False)  # default memory layout, as a first script has it
        naive_ids = ids[: self.naive_n]
        naive_gradients(naive, gt, naive_ids[:1], self.device)  # warm-up
        t_naive, reference = naive_gradients(naive, gt, naive_ids, self.device)
        stored = {i: model.store.read(i) for i in naive_ids}
        worst = max(float(np.abs(stored[i] - reference[i]).max() / reference[i].max()) for i in naive_ids)
        l2 = max(float(np.linalg.norm(stored[i] - reference[i]) / np.linalg.norm(reference[i])) for i in naive_ids)
        self.agreement[f"gradients {model.label}: max |stored - naive| / max(naive map), relative L2"] = f"{worst:.1e}, {l2:.1e}"
        self.rows.append(_row("gradients", model.label, len(ids), seconds, per_image, self.peak, len(naive_ids), t_naive))

    def area_curve(self) -> None:
        """``gradlens area-curve`` itself (every map reused: checked), then its curve computation alone against the naive loop."""
        self.curves, seconds = self._time(lambda: run_area_curve(
            self.workdir, config=self.config, detector_run=self.recorded, progress=self.args.progress))
        computed = {m.role: m.run.computed for m in self.curves.models if m.run and m.run.computed}
        assert not computed, f"area-curve computed maps again ({computed}): the benchmark's stores are not the command's"
        self.rows.append(_row("area-curve", "command", len(self.ids), seconds))
        stores, grid = {m.label: m.store for m in self.curves.models}, self.curves.thresholds
        _, t_fast = self._time(lambda: [area_curve_from_store(s, self.ids, grid) for s in stores.values()])
        naive_ids = self.ids[: self.naive_n]
        t_naive, slow = naive_curve(stores, naive_ids, grid)
        fast = {label: area_curve_from_store(s, naive_ids, grid) for label, s in stores.items()}
        difference = max(float(np.abs(fast[k] - slow[k]).max()) for k in stores)
        self.agreement["area curves of the naive subset: max |gradlens - naive| (area fraction)"] = f"{difference:.1e}"
        self.rows.append(_row("  curves", "3 models", len(self.ids), t_fast, naive_images=len(naive_ids),
                              naive_seconds=t_naive, in_total=False))

    def report(self) -> dict:
        args, device = self.args, self.device
        timed = [r for r in self.rows if r["in_total"]]
        total = sum(r["seconds"] for r in timed)
        naive_total = sum(r["images"] / r["naive_images_per_s"] if r["naive_images_per_s"] else r["seconds"] for r in timed)
        print(f"\nselect: {len(self.all_ids)} images, {len(self.ids)} selected (top {self.top}); area-curve: {len(self.ids)} "
              f"images x {len(self.models)} models; batch size {args.batch_size}, {args.workers} workers, precision "
              f"{args.precision}; naive loops on the first {self.naive_n} images\n")
        print_table(self.rows)
        print(f"\nwhole analysis (the rows above but '  curves', which is part of area-curve): {total:.1f} s; "
              f"with the naive loops about {naive_total:.1f} s (their rates, select's scoring as gradlens'): "
              f"{naive_total / total:.2f}x")
        print("FLOPs: torch FlopCounterMode (a multiply-add = 2) on one batch of the most common padded canvas ("
              + ", ".join(f"{k} {v['canvas'][1]}x{v['canvas'][0]}" for k, v in self.flops.items())
              + "), scaled by canvas area; gradients: the input's only (parameters frozen)")
        for what, value in self.agreement.items():
            print(f"agreement, {what}: {value}")
        print(f"outputs: {self.workdir / 'selection.csv'}, {self.curves.outputs['table']}, {self.curves.outputs['png']}")
        return {
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "device": str(device), "device_name": self.device_name,
                        "peak_tflops": self.peak},
            "settings": {"scale": args.scale, **self.work, "top": self.top, "batch_size": args.batch_size,
                         "workers": args.workers, "precision": args.precision, "naive_images": self.naive_n, "seed": args.seed},
            "dataset": self.dataset,
            "calibration": self.calibration,
            "flops": self.flops,
            "stages": self.rows,
            "total_seconds": total,
            "naive_total_seconds": naive_total,
            "agreement": self.agreement,
            "workdir": str(self.workdir),
            "selected": len(self.ids),
            "outputs": {k: str(v) for k, v in self.curves.outputs.items()},
        }


def run(args, root: Path) -> dict:
    """The whole benchmark in ``root``; returns what it printed, as a dict."""
    bench = Bench(args, root)
    print(f"machine: {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {bench.device} ({bench.device_name}); precision {args.precision}, "
          f"dense peak {'n/a' if bench.peak is None else f'{bench.peak:g} TFLOP/s'}")
    bench.prepare()
    for role, _, _ in MODELS:
        bench.inference(role)
    bench.select()
    for model in bench.models:
        bench.gradients(model)
    bench.area_curve()
    return bench.report()


def keep_folder(folder: Path) -> Path:
    """``--keep``: an empty folder or one this script used before (it deletes and rewrites its subfolders)."""
    marker = folder / MARKER
    if folder.is_dir() and any(folder.iterdir()) and not marker.is_file():
        raise SystemExit(f"bench_paper_scale: error: --keep {folder} holds files this script did not write; "
                         "give an empty folder or one an earlier run kept.")
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by benchmarks/bench_paper_scale.py\n")
    return folder


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="shrink the workload: 5000*S images, sides and test scale times S, top 1000*S (default 1: the paper's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch, as --batch-size of select (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="JPEG decoding workers, as --workers of select (default 2)")
    parser.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS),
                        help="as --precision of select and area-curve (default auto: tf32 on CUDA, fp32 on the CPU)")
    parser.add_argument("--top", type=int, default=None, help="images to select (default 1000*S)")
    parser.add_argument("--naive-images", type=int, default=None, help="images for each naive loop (default 16*S, at least 2)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="folder for the dataset, checkpoints and work directory, kept afterwards (default: a temporary one); "
                             "a dataset made there with the same settings is reused")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset and the detectors' weights")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args(argv)
    try:
        if args.keep is not None:
            report = run(args, keep_folder(args.keep))
        else:
            with tempfile.TemporaryDirectory(prefix="bench_paper_scale_") as tmp:
                report = run(args, Path(tmp))
    except GradlensError as exc:
        raise SystemExit(f"bench_paper_scale: error: {exc}") from None
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
