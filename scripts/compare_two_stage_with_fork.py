"""Run the CEDNet fork's own Mask R-CNN / Cascade Mask R-CNN beside gradlens: detections, the expected loss against
the Monte-Carlo average of the fork's sampled ``forward_train``, and the cost of a gradient pass.

For each config named with ``--config`` (paths under ``ced-mmdet/configs/cednet/``) it

1. builds the model with the fork's code (``build_detector``, ``init_weights``; Cascade's SyncBN reverted to
   BatchNorm2d by mmcv's ``revert_sync_batchnorm`` so it runs on a CPU, same keys), gives it random weights that
   still detect (every parameter + N(0, 0.02); the RoI classifier's bias +3 on the images' classes so some
   scores pass 0.05), sets the test scale to ``--test-scale`` and saves it with mmcv's ``save_checkpoint``
   (``meta``: ``config`` = ``cfg.pretty_text``, COCO's ``CLASSES``);
2. loads that file in the fork (``init_detector``; ``build_detector`` + ``load_checkpoint`` for the loss) and in
   gradlens (``gradlens.load_detector``);
3. per image (scikit-image photographs with made-up boxes and polygon masks, and/or a ``gradlens synthetic``
   COCO folder with its polygons and RLEs), compares
   - detections: ``inference_detector`` against ``detector.detect`` (boxes, scores, labels; masks: IoU of each
     matched pair's pasted mask);
   - the loss: the fork's ``forward_train(img, img_metas, gt_bboxes, gt_labels, gt_masks=BitmapMasks)`` (model
     in eval mode, inputs from its test pipeline with ``LoadAnnotations(with_bbox, with_mask)``) under
     ``--draws`` seeds (``torch.manual_seed``: the fork's ``RandomSampler`` draws with ``torch.randperm``), each
     term's mean and standard error, against gradlens' expected terms; and the input gradient (with respect to
     the fork's normalised padded ``img``, gradlens' with respect to its own ``prepare`` batch): the relative L2
     of gradlens' expectation from the Monte-Carlo mean, beside the relative L2 that the Monte-Carlo mean's own
     noise gives (|g_mean - g_half| between two halves of the draws, scaled), and one draw's distance;
   - with ``--all-drawn``: the fork's samplers given ``num`` = 10^6 (every candidate drawn, no randomness): its
     loss and gradient against gradlens' with the same setting (equal up to float32 round-off);
   - the time of one fork ``forward_train`` + backward (one draw) and of gradlens' expected-loss pass + backward.

The fork runs mmcv's own C++ NMS and RoIAlign kernels (:mod:`mmcv_ext`, compiled from ``--mmcv-src``). Never part
of gradlens or its tests: it runs in the fork's virtual environment (setup: ``scripts/compare_with_fork.py``).

Run::

    cd /work/main && PYTHONPATH=/work/main:/work/main/scripts /tmp/forkcmp/venv/bin/python \\
        scripts/compare_two_stage_with_fork.py --fork /tmp/forkcmp/ced-mmdet --mmcv-src /tmp/forkcmp/mmcv-src \\
        --work /tmp/forkcmp/run2 --skimage --test-scale 384 640 --draws 200 [--config <path> ...] [--all-drawn]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from compare_with_fork import COCO_CLASSES, fork_config, make_images, match_detections, rel_l2

DEFAULT_CONFIGS = [
    "convnext/mask_rcnn_ced_next_tiny_copy_paste_lsj_adamw_3x_coco_in1k.py",
    "convnext/mask_rcnn_convnext_tiny_patch4_window7_copy_paste_lsj_adamw_3x_coco_in1k.py",
    "convnext/cascade_mask_rcnn_ced_next_tiny_copy_paste_lsj_giou_4conv1f_adamw_3x_coco_in1k.py",
]
TERMS = ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask")


def polygons_for(item) -> list:
    """COCO polygons for each object: the annotation's own (synthetic COCO), or a made-up octagon in its box."""
    if item.get("segmentations") is not None:
        return item["segmentations"]
    out = []
    for x1, y1, x2, y2 in item["boxes"].tolist():
        w, h = x2 - x1, y2 - y1
        pts = [(x1 + 0.3 * w, y1), (x1 + 0.7 * w, y1), (x2, y1 + 0.3 * h), (x2, y1 + 0.7 * h), (x1 + 0.7 * w, y2),
               (x1 + 0.3 * w, y2), (x1, y1 + 0.7 * h), (x1, y1 + 0.3 * h)]
        out.append([[float(v) for p in pts for v in p]])
    return out


def gradlens_masks(item, height: int, width: int) -> torch.Tensor:
    """The objects' masks as gradlens reads them from COCO (pycocotools: frPyObjects, merge, decode)."""
    from pycocotools import mask as mask_utils

    masks = []
    for segm in polygons_for(item):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width)) if isinstance(segm, list) else segm
        if isinstance(rle.get("counts"), list):
            rle = mask_utils.frPyObjects(rle, height, width)
        masks.append(torch.from_numpy(mask_utils.decode(rle)))
    return torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.uint8)


@torch.no_grad()
def randomise(model, seed: int, classes) -> None:
    torch.manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
    heads = model.roi_head.bbox_head if isinstance(model.roi_head.bbox_head, torch.nn.ModuleList) else [model.roi_head.bbox_head]
    for head in heads:
        head.fc_cls.bias.zero_()
        head.fc_cls.bias[list(classes)] = 3.0


def write_checkpoint(cfg, path: Path, seed: int, classes) -> dict:
    import mmdet
    from mmcv.cnn.utils import revert_sync_batchnorm
    from mmcv.runner import save_checkpoint
    from mmdet.models import build_detector

    torch.manual_seed(seed)
    model = build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    model = revert_sync_batchnorm(model)
    randomise(model, seed, classes)
    model.CLASSES = COCO_CLASSES
    meta = {"mmdet_version": mmdet.__version__, "CLASSES": COCO_CLASSES, "config": cfg.pretty_text, "seed": seed}
    save_checkpoint(model, str(path), meta=meta)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def fork_models(cfg, path: Path, all_drawn: bool):
    from mmcv.cnn.utils import revert_sync_batchnorm
    from mmcv.runner import load_checkpoint
    from mmdet.apis import init_detector
    from mmdet.models import build_detector

    det_model = revert_sync_batchnorm(init_detector(copy.deepcopy(cfg), str(path), device="cpu")).eval()
    train_cfg = copy.deepcopy(cfg.model.get("train_cfg", cfg.get("train_cfg")))
    if all_drawn:
        train_cfg.rpn.sampler.num = 10**6
        for stage in train_cfg.rcnn if isinstance(train_cfg.rcnn, list) else [train_cfg.rcnn]:
            stage.sampler.num = 10**6
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.train_cfg = train_cfg
    loss_model = revert_sync_batchnorm(build_detector(model_cfg))
    load_checkpoint(loss_model, str(path), map_location="cpu", strict=True, logger=None)
    loss_model.eval()
    for p in loss_model.parameters():
        p.requires_grad_(False)
    return det_model, loss_model


def fork_detections(model, path: str):
    from mmdet.apis import inference_detector

    boxes_by_class, masks_by_class = inference_detector(model, path)
    boxes = np.concatenate([r[:, :4] for r in boxes_by_class]).astype(np.float64)
    scores = np.concatenate([r[:, 4] for r in boxes_by_class]).astype(np.float64)
    labels = np.concatenate([np.full(len(r), i) for i, r in enumerate(boxes_by_class)]).astype(np.int64)
    masks = [m for per_class in masks_by_class for m in per_class]
    return (boxes, scores, labels), masks


def fork_train_inputs(cfg, item):
    """The fork's test pipeline with LoadAnnotations(with_bbox, with_mask) after the loader (poly2mask at the
    original size, nearest rescale, padding), boxes and masks collected."""
    from mmcv.parallel import collate
    from mmdet.datasets import replace_ImageToTensor
    from mmdet.datasets.pipelines import Compose

    steps = copy.deepcopy(replace_ImageToTensor(copy.deepcopy(cfg.data.test.pipeline)))
    steps.insert(1, {"type": "LoadAnnotations", "with_bbox": True, "with_mask": True})
    for step in steps:
        if step["type"] == "MultiScaleFlipAug":
            for t in step["transforms"]:
                if t["type"] == "Collect":
                    t["keys"] = ["img", "gt_bboxes", "gt_labels", "gt_masks"]
    pipeline = Compose(steps)
    import cv2

    height, width = cv2.imread(item["path"]).shape[:2]
    data = pipeline({"img_info": {"filename": item["path"], "height": height, "width": width}, "img_prefix": None,
                     "ann_info": {"bboxes": item["boxes"].copy(), "labels": item["labels"].copy(),
                                  "masks": polygons_for(item)},
                     "bbox_fields": [], "mask_fields": [], "seg_fields": []})
    data = collate([data], samples_per_gpu=1)
    return (data["img"][0].data[0], data["img_metas"][0].data[0], data["gt_bboxes"][0].data[0],
            data["gt_labels"][0].data[0], data["gt_masks"][0].data[0])


def fork_draw(model, inputs, seed: int):
    img, metas, boxes, labels, masks = inputs
    torch.manual_seed(seed)
    x = img.clone().requires_grad_(True)
    start = time.perf_counter()
    losses = model.forward_train(x, copy.deepcopy(metas), boxes, labels, gt_masks=masks)
    terms = {name: 0.0 for name in TERMS}
    total = 0
    for key, value in losses.items():
        if "loss" not in key:
            continue
        name = key.split(".")[-1]
        v = sum(value) if isinstance(value, (list, tuple)) else value
        terms[name] += float(v)
        total = total + v
    (grad,) = torch.autograd.grad(total, x)
    return terms, grad, time.perf_counter() - start


def gradlens_expected(detector, image, target):
    batch, (size,) = detector.prepare([image])
    x = batch.detach().clone().requires_grad_(True)
    start = time.perf_counter()
    parts = detector._expected_parts(image, target, detector.features(x), size, tuple(batch.shape[-2:]))
    terms = {name: values.sum() for name, (values, _) in parts.items()}
    (grad,) = torch.autograd.grad(sum(terms.values()), x)
    return {k: float(v) for k, v in terms.items()}, grad, time.perf_counter() - start


def compare_config(rel: str, args, items, gradlens) -> dict:
    from gradlens.data.images import read_image, to_tensor

    name = Path(rel).stem
    cfg = fork_config(args.fork, rel, args.test_scale)
    ckpt = args.work / "checkpoints" / f"{name}.pth"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    classes = sorted({int(v) for item in items for v in item["labels"]})
    info = write_checkpoint(cfg, ckpt, args.seed, classes)
    det_model, loss_model = fork_models(cfg, ckpt, args.all_drawn)
    detector = gradlens.load_detector(ckpt)
    for p in detector.parameters():  # as the pipeline runs it (and as the fork's loss model is frozen here)
        p.requires_grad_(False)
    if args.all_drawn:
        import dataclasses

        detector.config = dataclasses.replace(detector.config, rpn_num=10**6, rcnn_num=10**6)
    out = {"config": rel, "arch": detector.arch_name, **info, "images": []}
    print(f"== {rel} -> {detector.arch_name}", flush=True)
    for item in items:
        image = to_tensor(read_image(item["path"]))
        row = {"image": item["name"]}
        (fb, fs, fl), fmasks = fork_detections(det_model, item["path"])
        with torch.no_grad():
            mine = detector.detect([image])[0]
        row["detections"] = match_detections((fb, fs, fl), (mine["boxes"].double().numpy(), mine["scores"].double().numpy(),
                                                            mine["labels"].numpy()))
        if len(fs) == len(mine["scores"]):
            order_f = np.lexsort((fl, -fs))
            order_g = np.lexsort((mine["labels"].numpy(), -mine["scores"].double().numpy()))
            fm = np.stack([fmasks[i] for i in order_f]) if len(fmasks) else np.zeros((0, *image.shape[-2:]), bool)
            gm = mine["masks"].numpy()[order_g]
            row["masks_equal"] = bool(np.array_equal(fm.astype(bool), gm))
            row["mask_pixels_differing"] = int((fm.astype(bool) != gm).sum())
        inputs = fork_train_inputs(cfg, item)
        h, w = image.shape[-2:]
        target = {"boxes": torch.from_numpy(item["boxes"]), "labels": torch.from_numpy(item["labels"]),
                  "masks": gradlens_masks(item, h, w)}
        runs = [gradlens_expected(detector, image, target) for _ in range(3)]  # the first one warms up
        ours, grad = runs[0][0], runs[0][1]
        ours_s = float(np.median([r[2] for r in runs[1:]]))
        draws = 1 if args.all_drawn else args.draws
        samples = [fork_draw(loss_model, inputs, seed) for seed in range(draws)]
        if grad.shape != samples[0][1].shape:
            row["error"] = f"input shapes differ: gradlens {tuple(grad.shape)}, fork {tuple(samples[0][1].shape)}"
            out["images"].append(row)
            continue
        row["terms"] = {}
        for term in TERMS:
            values = np.array([s[0][term] for s in samples])
            mean, se = float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
            row["terms"][term] = {"gradlens": ours.get(term), "fork_mean": mean, "fork_se": se,
                                  "z": (ours.get(term, 0.0) - mean) / se if se > 0 else None,
                                  "rel": abs(ours.get(term, 0.0) - mean) / abs(mean) if mean else None}
        grads = torch.stack([s[1] for s in samples]).double()
        mean = grads.mean(0)
        row["grad_rel_l2_from_mc_mean"] = rel_l2(grad, mean)
        if draws >= 4:
            half = grads[: draws // 2].mean(0)
            # the Monte-Carlo mean's own noise: two independent half-means differ by ~2x the full mean's error
            row["mc_mean_noise_rel_l2"] = rel_l2(half, grads[draws // 2:].mean(0)) / 2
            row["one_draw_rel_l2_from_mc_mean"] = rel_l2(grads[0], mean)
        row["seconds_fork_one_draw"] = float(np.median([s[2] for s in samples[1: min(draws, 6)]] or [samples[0][2]]))
        row["seconds_gradlens_expected"] = ours_s
        print(json.dumps(row), flush=True)
        out["images"].append(row)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fork", type=Path, required=True)
    parser.add_argument("--mmcv-src", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--config", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--coco", type=Path)
    parser.add_argument("--coco-images", type=int, default=3)
    parser.add_argument("--skimage", action="store_true")
    parser.add_argument("--test-scale", type=int, nargs=2, default=(800, 1333), metavar=("SHORT", "LONG"))
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--all-drawn", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    from mmcv_ext import register_mmcv_ext

    register_mmcv_ext(args.mmcv_src, args.work / "build-ext")
    import gradlens

    items = make_images(args)
    if args.coco:  # the annotations' own segmentations, in the order make_images kept the boxes
        ann = json.loads((args.coco / "annotations" / "instances_val2017.json").read_text())
        for item in items:
            if item["name"].startswith("shapes/"):
                file_name = item["name"].split("/", 1)[1]
                image = next(i for i in ann["images"] if i["file_name"] == file_name)
                kept = [a for a in ann["annotations"] if a["image_id"] == image["id"] and not a.get("iscrowd", 0)
                        and a["bbox"][2] >= 1 and a["bbox"][3] >= 1 and a["area"] > 0]
                item["segmentations"] = [a["segmentation"] for a in kept]
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "configs": []}
    for rel in args.config:
        results["configs"].append(compare_config(rel, args, items, gradlens))
        (args.work / ("results_all_drawn.json" if args.all_drawn else "results.json")).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
