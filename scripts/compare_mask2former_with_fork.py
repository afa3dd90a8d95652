"""Run the CEDNet fork's own Mask2Former beside gradlens: detections, and gradlens' deterministic loss against the
Monte-Carlo average of the fork's randomly point-sampled ``forward_train``.

For each config named with ``--config`` (paths under ``ced-mmdet/configs/cednet/``) it

1. builds the model with the fork's code (``build_detector``, ``init_weights``; SyncBN reverted to BatchNorm2d by
   mmcv's ``revert_sync_batchnorm``, same keys), gives it random weights that still segment (every parameter +
   N(0, 0.02); the class embedding's bias +3 on the images' classes so the matching and the scores mean something),
   sets the test scale to ``--test-scale`` and saves it with mmcv's ``save_checkpoint``;
2. loads that file in the fork (``init_detector``; ``build_detector`` + ``load_checkpoint`` for the loss, eval mode:
   dropout off, batch norm on running statistics) and in gradlens (``recognise_mask2former`` + ``build_mask2former``
   + ``load_state_dict(strict=True)``);
3. per image (scikit-image photographs with made-up boxes and octagon masks), compares
   - detections: ``inference_detector`` against ``detector.detect`` (labels, scores, boxes, masks, pairs matched
     by sorting both on (score, label));
   - the loss: the fork's ``forward_train`` (inputs from its test pipeline with ``LoadAnnotations(with_bbox,
     with_mask)``) under ``--draws`` seeds (``torch.manual_seed``: its points come from ``torch.rand``), each term's
     mean and standard error, against gradlens' terms; the input gradient (w.r.t. the fork's normalised padded
     ``img`` and gradlens' ``prepare`` batch): relative L2 of gradlens' from the Monte-Carlo mean, beside the Monte-
     Carlo mean's own noise (two half-means) and one draw's distance; the same for one point per mask-grid cell and
     for the plain grid mean (importance ratio 0, the uniform-points limit), to show what the definition's
     subdivision and importance weighting buy.

Never part of gradlens or its tests: it runs in the fork's virtual environment (setup: ``scripts/compare_with_fork.py``).

Run::

    cd /work/main && PYTHONPATH=/work/main:/work/main/scripts /tmp/forkcmp/venv/bin/python \\
        scripts/compare_mask2former_with_fork.py --fork /tmp/forkcmp/ced-mmdet --mmcv-src /tmp/forkcmp/mmcv-src \\
        --work /tmp/forkcmp/m2f_final --test-scale 240 400 --draws 32 --images coffee
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from compare_detr_with_fork import fork_models, write_checkpoint
from compare_two_stage_with_fork import fork_train_inputs, gradlens_masks
from compare_with_fork import fork_config, make_images, rel_l2

DEFAULT_CONFIGS = [
    "mask2former/mask2former_ced_r50_lsj_8x2_50e_coco.py",
    "mask2former/mask2former_ced_convnext_lsj_8x2_50e_coco.py",
]
TERMS = ("loss_cls", "loss_mask", "loss_dice")
VARIANTS = {  # config changes measured beside gradlens' definition
    "one_point_per_cell": {"subdivisions": 1},
    "grid_uniform": {"subdivisions": 1, "importance_sample_ratio": 0.0},
}


@torch.no_grad()
def randomise(model, seed: int, classes) -> None:
    torch.manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
    bias = model.panoptic_head.cls_embed.bias
    bias.zero_()
    bias[list(classes)] = 3.0


def fork_detections(model, path: str):
    from mmdet.apis import inference_detector

    result = inference_detector(model, path)
    if isinstance(result, dict):  # a panoptic model: its instance results beside the panoptic ones
        result = result["ins_results"]
    boxes_by_class, masks_by_class = result
    boxes = np.concatenate([r[:, :4] for r in boxes_by_class]).astype(np.float64)
    scores = np.concatenate([r[:, 4] for r in boxes_by_class]).astype(np.float64)
    labels = np.concatenate([np.full(len(r), i) for i, r in enumerate(boxes_by_class)]).astype(np.int64)
    masks = np.stack([m for per_class in masks_by_class for m in per_class]).astype(bool)
    return boxes, scores, labels, masks


def compare_detections(fork, mine) -> dict:
    fb, fs, fl, fm = fork
    gb, gs, gl, gm = (mine[k].double().numpy() if k != "masks" else mine[k].numpy() for k in ("boxes", "scores", "labels", "masks"))
    out = {"count_fork": len(fs), "count_gradlens": len(gs)}
    if len(fs) != len(gs):
        return out
    of, og = np.lexsort((fl, -fs)), np.lexsort((gl, -gs))
    out.update(labels_equal=bool((fl[of] == gl[og]).all()), max_score_diff=float(np.abs(fs[of] - gs[og]).max()),
               max_box_diff_px=float(np.abs(fb[of] - gb[og]).max()),
               mask_pixels_differing=int((fm[of] != gm[og].astype(bool)).sum()),
               masks_equal=bool((fm[of] == gm[og].astype(bool)).all()))
    return out


def fork_draw(model, inputs, seed: int):
    img, metas, boxes, labels, masks = inputs
    torch.manual_seed(seed)
    x = img.clone().requires_grad_(True)
    start = time.perf_counter()
    losses = model.forward_train(x, copy.deepcopy(metas), boxes, labels, gt_masks=masks)
    terms = {name: 0.0 for name in TERMS}
    total = 0
    for key, value in losses.items():
        if "loss" in key:
            terms[key.split(".")[-1]] += float(value.detach())
            total = total + value
    (grad,) = torch.autograd.grad(total, x)
    return terms, grad, time.perf_counter() - start


def gradlens_loss(detector, image, target):
    batch, (size,) = detector.prepare([image])
    x = batch.detach().clone().requires_grad_(True)
    start = time.perf_counter()
    outputs = detector.forward_outputs(x)
    parts = detector._parts(image, target, outputs, size, tuple(batch.shape[-2:]))
    terms = {name: values.sum() for name, (values, _) in parts.items()}
    (grad,) = torch.autograd.grad(sum(terms.values()), x)
    return {k: float(v.detach()) for k, v in terms.items()}, grad, time.perf_counter() - start


def load_gradlens(path: Path, test_scale):
    """The checkpoint in gradlens: recognised from its state dict, built, loaded strictly, at the test scale."""
    from gradlens.models.detectors.mask2former import build_mask2former
    from gradlens.models.formats.mmdet import recognise_mask2former

    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    name, options, num_classes = recognise_mask2former(state)
    detector = build_mask2former(name, num_classes, options)
    short, long = test_scale
    detector.preprocess = dataclasses.replace(detector.preprocess, min_size=short, max_size=long)
    detector.load_state_dict(state, strict=True)
    for p in detector.parameters():
        p.requires_grad_(False)
    return detector


def compare_config(rel: str, args, items) -> dict:
    from gradlens.data.images import read_image, to_tensor

    cfg = fork_config(args.fork, rel, args.test_scale)
    cfg.model.pop("pretrained", None)  # fork_config's (for detectors that take one; Mask2Former does not)
    cfg.model.backbone.pretrained = None  # random weights: no ImageNet file
    if "init_cfg" in cfg.model.backbone:
        cfg.model.backbone.init_cfg = None
    ckpt = args.work / "checkpoints" / f"{Path(rel).stem}.pth"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    classes = sorted({int(v) for item in items for v in item["labels"]})
    info = write_checkpoint(cfg, ckpt, args.seed, lambda model: randomise(model, args.seed, classes))
    det_model, loss_model = fork_models(cfg, ckpt)
    detector = load_gradlens(ckpt, args.test_scale)
    out = {"config": rel, "arch": detector.arch_name, **info, "images": []}
    print(f"== {rel} -> {detector.arch_name}", flush=True)
    for item in items:
        image = to_tensor(read_image(item["path"]))
        row = {"image": item["name"]}
        with torch.no_grad():
            mine = detector.detect([image])[0]
        row["detections"] = compare_detections(fork_detections(det_model, item["path"]), mine)
        print(json.dumps(row), flush=True)
        if args.draws == 0:
            out["images"].append(row)
            continue
        inputs = fork_train_inputs(cfg, item)
        h, w = image.shape[-2:]
        target = {"boxes": torch.from_numpy(item["boxes"]), "labels": torch.from_numpy(item["labels"]),
                  "masks": gradlens_masks(item, h, w)}
        ours, grad, ours_s = gradlens_loss(detector, image, target)
        base_config = detector.config
        variants = {}  # other definitions, to show what the default's choices buy
        for label, change in VARIANTS.items():
            detector.config = dataclasses.replace(base_config, **change)
            variants[label] = gradlens_loss(detector, image, target)[:2]
        detector.config = base_config
        samples = [fork_draw(loss_model, inputs, seed) for seed in range(args.draws)]
        if grad.shape != samples[0][1].shape:
            row["error"] = f"input shapes differ: gradlens {tuple(grad.shape)}, fork {tuple(samples[0][1].shape)}"
            out["images"].append(row)
            continue
        row["input_equal"] = bool(torch.equal(detector.prepare([image])[0], inputs[0]))
        row["terms"] = {}
        for term in TERMS:
            values = np.array([s[0][term] for s in samples])
            mean, se = float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))
            row["terms"][term] = {"gradlens": ours[term], "fork_mean": mean, "fork_se": se,
                                  "rel": (ours[term] - mean) / abs(mean) if mean else None}
            for label, (terms, _) in variants.items():
                row["terms"][term][f"rel_{label}"] = (terms[term] - mean) / abs(mean) if mean else None
        total_f = np.array([sum(s[0].values()) for s in samples])
        row["total"] = {"gradlens": sum(ours.values()), "fork_mean": float(total_f.mean()),
                        "fork_se": float(total_f.std(ddof=1) / np.sqrt(len(total_f)))}
        grads = torch.stack([s[1] for s in samples]).double()
        mean = grads.mean(0)
        row["grad_rel_l2_from_mc_mean"] = rel_l2(grad, mean)
        for label, (terms, g) in variants.items():
            row["total"][label] = sum(terms.values())
            row[f"{label}_grad_rel_l2_from_mc_mean"] = rel_l2(g, mean)
        half = grads[: args.draws // 2].mean(0)
        row["mc_mean_noise_rel_l2"] = rel_l2(half, grads[args.draws // 2:].mean(0)) / 2
        row["one_draw_rel_l2_from_mc_mean"] = rel_l2(grads[0], mean)
        row["grad_cosine_with_mc_mean"] = float((grad.double() * mean).sum() / (grad.double().norm() * mean.norm()))
        row["seconds_fork_one_draw"] = float(np.median([s[2] for s in samples[1:6]]))
        row["seconds_gradlens"] = ours_s
        print(json.dumps(row), flush=True)
        out["images"].append(row)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fork", type=Path, required=True)
    parser.add_argument("--mmcv-src", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--build-ext", type=Path, default=Path("/tmp/forkcmp/build-ext"))
    parser.add_argument("--config", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--images", nargs="+", default=["coffee", "astronaut"])
    parser.add_argument("--test-scale", type=int, nargs=2, default=(256, 384), metavar=("SHORT", "LONG"))
    parser.add_argument("--draws", type=int, default=64, help="0: detections only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    from mmcv_ext import register_mmcv_ext

    register_mmcv_ext(args.mmcv_src, args.build_ext)
    args.skimage, args.coco = True, None
    items = [item for item in make_images(args) if Path(item["name"]).stem in args.images]
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "draws": args.draws,
               "test_scale": list(args.test_scale), "configs": []}
    for rel in args.config:
        results["configs"].append(compare_config(rel, args, items))
        (args.work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
