"""Run the CEDNet fork's own Deformable DETR beside gradlens: detections, every loss term, the matching and the input
gradient, and the cost of a gradient pass.

For each config named with ``--config`` (paths under ``ced-mmdet/configs/cednet/``) it

1. builds the model with the fork's code (``build_detector``, ``init_weights``; SyncBN reverted to BatchNorm2d by
   mmcv's ``revert_sync_batchnorm`` so it runs on a CPU, same keys), gives it random weights that still detect
   (every parameter + N(0, 0.02)), sets the test scale to ``--test-scale`` and saves it with mmcv's
   ``save_checkpoint`` (``meta``: ``config`` = ``cfg.pretty_text``, COCO's ``CLASSES``);
2. loads that file in the fork (``init_detector``; ``build_detector`` + ``load_checkpoint`` for the loss) and in
   gradlens (``gradlens.load_detector``);
3. per image (scikit-image photographs with made-up boxes, and/or a ``gradlens synthetic`` COCO folder), compares
   - detections: ``inference_detector`` against ``detector.detect`` (boxes, scores, labels);
   - the loss: the fork's ``forward_train(img, img_metas, gt_bboxes, gt_labels)`` (model in eval mode: dropout off,
     batch norm on its statistics; inputs from its test pipeline with ``LoadAnnotations``) against gradlens'
     ``loss_parts``, term by term (18 terms), and each layer's Hungarian matching (the fork's ``HungarianAssigner``
     called on the fork's own head outputs against gradlens' ``matches``);
   - the input gradient of the total (with respect to the fork's normalised padded ``img`` and gradlens' own
     ``prepare`` batch): relative L2;
   - the time of one fork ``forward_train`` + backward and of gradlens' loss pass + backward.

Never part of gradlens or its tests: it runs in the fork's virtual environment (setup: ``scripts/compare_with_fork.py``;
mmcv's C++ kernels are not needed by Deformable DETR on a CPU, but ``mmcv.ops`` must import: :mod:`mmcv_ext`).

Run::

    cd /work/main && PYTHONPATH=/work/main:/work/main/scripts /tmp/forkcmp/venv/bin/python \\
        scripts/compare_detr_with_fork.py --fork /tmp/forkcmp/ced-mmdet --mmcv-src /tmp/forkcmp/mmcv-src \\
        --work /tmp/forkcmp/detr --skimage --test-scale 384 640 [--config <path> ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from compare_with_fork import COCO_CLASSES, fork_config, fork_detections, fork_train_inputs, make_images, \
    match_detections, rel_l2

DEFAULT_CONFIGS = [
    "deformable_detr/deformable_detr_ced_convnext_tiny_16x2_50e_coco.py",
    "deformable_detr/deformable_detr_r50_16x2_50e_coco.py",
    "deformable_detr/deformable_detr_convnext_tiny_16x2_50e_coco.py",
]


@torch.no_grad()
def add_noise(model) -> None:
    """Random weights that still detect: every parameter + N(0, 0.02), drawn after the fork's init."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)


def write_checkpoint(cfg, path: Path, seed: int, randomise=add_noise) -> dict:
    """The fork's model of ``cfg`` (its ``init_weights``, SyncBN reverted), ``randomise(model)``d, saved with mmcv's
    ``save_checkpoint`` and the config text and COCO's classes in ``meta``."""
    import mmdet
    from mmcv.cnn.utils import revert_sync_batchnorm
    from mmcv.runner import save_checkpoint
    from mmdet.models import build_detector
    from mmdet.models.backbones.resnet import ResNet

    # the fork's ResNet.init_weights always loads an ImageNet checkpoint (torchvision://resnet50, not reachable
    # here): its random weights stay PyTorch's default initialisation instead
    ResNet.init_weights = lambda self: None
    torch.manual_seed(seed)
    model = build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    model = revert_sync_batchnorm(model)
    randomise(model)
    model.CLASSES = COCO_CLASSES
    meta = {"mmdet_version": mmdet.__version__, "CLASSES": COCO_CLASSES, "config": cfg.pretty_text, "seed": seed}
    save_checkpoint(model, str(path), meta=meta)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def fork_models(cfg, path: Path):
    """The saved model in the fork twice: for ``inference_detector``, and frozen in eval mode for the loss."""
    from mmcv.cnn.utils import revert_sync_batchnorm
    from mmcv.runner import load_checkpoint
    from mmdet.apis import init_detector
    from mmdet.models import build_detector

    det_model = revert_sync_batchnorm(init_detector(copy.deepcopy(cfg), str(path), device="cpu")).eval()
    loss_model = revert_sync_batchnorm(build_detector(copy.deepcopy(cfg.model)))
    load_checkpoint(loss_model, str(path), map_location="cpu", strict=True, logger=None)
    loss_model.eval()
    for p in loss_model.parameters():
        p.requires_grad_(False)
    return det_model, loss_model


def fork_loss(model, inputs):
    img, metas, boxes, labels = inputs
    x = img.clone().requires_grad_(True)
    start = time.perf_counter()
    losses = model.forward_train(x, copy.deepcopy(metas), boxes, labels)
    terms = {k: v for k, v in losses.items() if "loss" in k}
    (grad,) = torch.autograd.grad(sum(terms.values()), x)
    seconds = time.perf_counter() - start
    with torch.no_grad():  # the fork's own matching of each layer, on its own head outputs
        feats = model.extract_feat(img)
        metas2 = copy.deepcopy(metas)
        for m in metas2:
            m["batch_input_shape"] = tuple(img.shape[-2:])
        classes, coords, _, _ = model.bbox_head(feats, metas2)
        head = model.bbox_head
        matches = []
        for layer in range(classes.shape[0]):
            result = head.assigner.assign(coords[layer, 0], classes[layer, 0], boxes[0], labels[0], metas2[0])
            matches.append((result.gt_inds - 1).numpy())
    return {k: float(v) for k, v in terms.items()}, grad, seconds, np.stack(matches)


def gradlens_loss(detector, image, target):
    batch, (size,) = detector.prepare([image])
    x = batch.detach().clone().requires_grad_(True)
    start = time.perf_counter()
    classes, boxes = detector.bbox_head(detector.features(x), tuple(x.shape[-2:]), [size])
    parts = detector._loss_parts(image, target, classes[:, 0], boxes[:, 0], size)
    terms = {name: values.sum() for name, (values, _) in parts.items()}
    (grad,) = torch.autograd.grad(sum(terms.values()), x)
    return {k: float(v) for k, v in terms.items()}, grad, time.perf_counter() - start


def compare_config(rel: str, args, items, gradlens) -> dict:
    from gradlens.data.images import read_image, to_tensor

    name = Path(rel).stem
    cfg = fork_config(args.fork, rel, args.test_scale)
    ckpt = args.work / "checkpoints" / f"{name}.pth"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    info = write_checkpoint(cfg, ckpt, args.seed)
    det_model, loss_model = fork_models(cfg, ckpt)
    detector = gradlens.load_detector(ckpt)
    for p in detector.parameters():
        p.requires_grad_(False)
    out = {"config": rel, "arch": detector.arch_name, **info, "images": []}
    print(f"== {rel} -> {detector.arch_name}", flush=True)
    for item in items:
        image = to_tensor(read_image(item["path"]))
        row = {"image": item["name"]}
        fb, fs, fl = fork_detections(det_model, item["path"])
        with torch.no_grad():
            mine = detector.detect([image])[0]
        ours = (mine["boxes"].double().numpy(), mine["scores"].double().numpy(), mine["labels"].numpy())
        row["detections"] = match_detections((fb, fs, fl), ours)
        order_f, order_g = np.lexsort((fl, -fs)), np.lexsort((ours[2], -ours[1]))
        if len(fs) == len(ours[1]):
            row["detections"]["max_abs_box_sorted"] = float(np.abs(fb[order_f] - ours[0][order_g]).max())
            row["detections"]["max_abs_score_sorted"] = float(np.abs(fs[order_f] - ours[1][order_g]).max())
            row["detections"]["labels_equal_sorted"] = bool((fl[order_f] == ours[2][order_g]).all())
        inputs = fork_train_inputs(cfg, item)
        target = {"boxes": torch.from_numpy(item["boxes"]), "labels": torch.from_numpy(item["labels"])}
        runs = [gradlens_loss(detector, image, target) for _ in range(2)]
        mine_terms, grad = runs[0][0], runs[0][1]
        fork_runs = [fork_loss(loss_model, inputs) for _ in range(2)]
        fork_terms, fork_grad, _, fork_matches = fork_runs[0]
        if grad.shape != fork_grad.shape:
            row["error"] = f"input shapes differ: gradlens {tuple(grad.shape)}, fork {tuple(fork_grad.shape)}"
            out["images"].append(row)
            continue
        row["terms_max_rel_diff"] = max(abs(mine_terms[k] - v) / max(abs(v), 1e-12) for k, v in fork_terms.items())
        row["terms_missing"] = sorted(set(fork_terms) ^ set(mine_terms))
        row["total_fork"] = sum(fork_terms.values())
        row["total_gradlens"] = sum(mine_terms.values())
        ours_matches = detector.matches(image, target).numpy()
        row["matching_equal_layers"] = int((ours_matches == fork_matches).all(axis=1).sum())
        row["grad_rel_l2"] = rel_l2(grad, fork_grad)
        row["seconds_fork"] = fork_runs[1][2]
        row["seconds_gradlens"] = runs[1][2]
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    from mmcv_ext import register_mmcv_ext

    register_mmcv_ext(args.mmcv_src, args.work / "build-ext")
    import gradlens

    torch.set_num_threads(max(1, torch.get_num_threads()))
    items = make_images(args)
    results = [compare_config(rel, args, items, gradlens) for rel in args.config]
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
