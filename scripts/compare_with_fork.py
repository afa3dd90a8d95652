"""Run the CEDNet authors' own mmdetection (their fork's ``ced-mmdet``) beside gradlens and measure the distance.

For each of the fork's RetinaNet configs named with ``--config`` (paths under ``ced-mmdet/configs/cednet/``) it

1. builds the model with the fork's own code (``build_detector`` of the config, ``init_weights``; the fork's
   ResNet.init_weights can only load a pretrained file, so there the backbone keeps PyTorch's defaults), gives it
   random weights that still detect (as ``scripts/make_mmdet_checkpoints.py`` does for gradlens: every parameter
   plus N(0, 0.02), classifier bias -1, backbone batch-norm running statistics calibrated so activations stay
   O(1) -- here on the fork's preprocessed tensor of a natural image, see :func:`randomise_like_gradlens`),
   and saves it with mmcv's own ``save_checkpoint`` (``meta``: ``config`` =
   ``cfg.pretty_text``, COCO's ``CLASSES``, ``mmdet_version``, epoch/iter, as mmdetection's training saves it),
   after setting the test pipeline's ``img_scale`` to ``--test-scale`` (both ``test_pipeline`` and
   ``data.test/val.pipeline``);
2. loads that file twice: in the fork (``mmdet.apis.init_detector`` for detections; ``build_detector`` with the
   config's ``train_cfg`` + ``load_checkpoint`` for losses) and in gradlens (``gradlens.load_detector``);
3. per image (JPEGs with ground truth: a ``gradlens synthetic`` COCO folder and/or scikit-image's sample photos
   with made-up boxes), compares
   - detections: the fork's ``inference_detector(model, path)`` against gradlens' ``detector.detect`` on
     ``to_tensor(read_image(path))`` (what ``gradlens score`` runs): count, boxes matched by label and IoU
     (max abs px difference), scores (max abs difference);
   - the preprocessed tensors: the fork's test pipeline (with ``LoadAnnotations`` added, ``Collect`` of the
     boxes) against ``detector.prepare([image])``: bit equality (and whether the two JPEG decoders agree);
   - the losses: the fork's ``model.forward_train(img, img_metas, gt_bboxes, gt_labels)`` (model in eval mode)
     against gradlens' ``image_losses`` terms (absolute and relative differences);
   - the input gradient of the total loss (loss_cls + loss_bbox) with respect to the fork's normalised padded
     ``img`` against gradlens' gradient with respect to its own ``prepare`` batch, as relative L2
     ``|g_gradlens - g_fork| / |g_fork|``, for gradlens in its default NCHW layout and in the channels-last
     mode its CLI uses on the CPU (``use_channels_last``); and the gradient with respect to the [0, 1] image
     at original resolution: gradlens' ``input_gradients`` (NCHW) against the fork's padded-input gradient carried
     back through gradlens' differentiable preprocessing (the linear Jacobian of the resize, which is the
     Jacobian gradlens defines for the uint8 OpenCV resize; the forward values are the fork's own);
   - on every gradient pass, the pyramid features entering the head and the head outputs, level by level
     (relative L2), so a disagreement can be located.

The fork's RetinaNet needs only mmcv's NMS kernel at test time; mmcv is installed without compiled ops, so this
script compiles mmcv's own C++ kernels from ``--mmcv-src`` (an mmcv v1.7.2 source tree) and registers them as
``mmcv._ext`` with ``scripts/mmcv_ext.py`` (every other op name resolves to a stub that raises), so the
reference NMS is upstream's arithmetic.

Never part of gradlens or its tests: it runs in a separate virtual environment that holds the fork.
Setup (Python 3.11; the fork mirror is a bare git repository of github:zhanggang001/CEDNet)::

    python3.11 -m venv /tmp/forkcmp/venv && V=/tmp/forkcmp/venv/bin
    $V/pip install torch==2.14.1 torchvision==0.29.1 wheel
    $V/pip install "setuptools<70" "opencv-python-headless<5" yapf==0.40.1 "numpy<2"
    $V/pip download --no-deps --no-binary :all: --no-build-isolation -d /tmp/forkcmp/dl "mmcv-full==1.7.2"
    MMCV_WITH_OPS=0 $V/pip install --no-build-isolation /tmp/forkcmp/dl/mmcv-full-1.7.2.tar.gz  # (by file: pip
    # 23 refuses the index's sdist, which names itself "mmcv" without ops)
    git -C <CEDNet mirror> archive HEAD -- ced-mmdet | tar -x -C /tmp/forkcmp     # (its two demo notebooks may be absent)
    $V/pip install timm einops scikit-image matplotlib pycocotools scipy six terminaltables
    $V/pip install --no-build-isolation --use-pep517 --no-deps -e /tmp/forkcmp/ced-mmdet
    $V/pip install "pandas>=2,<3" "pyarrow>=14,<18" captum msgspec typer tqdm   # gradlens' own imports
    git -C <mmcv mirror> archive v1.7.2 | tar -x -C /tmp/forkcmp/mmcv-src          # C++ source of the NMS kernel
    gradlens synthetic /tmp/forkcmp/data/shapes --num-images 6 --seed 0              # (gradlens' venv)

Run (the five configs of the fork's other RetinaNets and the ConvNeXt-T control, :data:`DEFAULT_CONFIGS`)::

    cd /work/main && PYTHONPATH=/work/main /tmp/forkcmp/venv/bin/python scripts/compare_with_fork.py \\
        --fork /tmp/forkcmp/ced-mmdet --mmcv-src /tmp/forkcmp/mmcv-src --work /tmp/forkcmp/run \\
        --coco /tmp/forkcmp/data/shapes --coco-images 3 --skimage --test-scale 384 640 [--config <path> ...]
        [--diagnose-frozen-bn]

It prints a line per image and one markdown table per config, and writes ``<work>/results.json`` (every number,
per image; ``--summary <work>/results.json`` prints the tables again). The ConvNeXt-T control runs with
``out_indices=[0, 1, 2, 3]`` (:data:`CONFIG_FIXES`: as committed, the fork's config cannot run).
``--diagnose-frozen-bn`` adds, for detectors with torchvision's ``FrozenBatchNorm2d`` (gradlens' ResNet-50),
gradlens' gradient with that layer computing ``F.batch_norm`` as mmdetection's batch norm in eval mode does.
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

COCO_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant',
    'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli',
    'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed', 'dining table', 'toilet',
    'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')

DEFAULT_CONFIGS = [
    "resnet/retinanet_resnet_50_copy_paste_lsj_adamw_3x_coco_in1k.py",
    "resnet/retinanet_ced_resnet_50_copy_paste_lsj_adamw_3x_coco_in1k.py",
    "swin/retinanet_ced_swin_tiny_copy_paste_lsj_adamw_3x_coco_in1k.py",
    "cswin/retinanet_ced_cswin_tiny_copy_paste_lsj_adamw_3x_coco_in1k.py",
    "cswin/retinanet_cswin_tiny_patch4_window7_copy_paste_lsj_adamw_3x_coco.py",
    "convnext/retinanet_convnext_tiny_patch4_window7_copy_paste_lsj_adamw_3x_coco_in1k.py",
]

# ---------------------------------------------------------------------------------------------------------
# images and ground truth


def make_images(args) -> list[dict]:
    """``[{name, path, boxes (xyxy float32, original px), labels (0..79)}]`` for every image to compare."""
    items = []
    if args.coco:
        ann = json.loads((args.coco / "annotations" / "instances_val2017.json").read_text())
        cat_index = {c["id"]: i for i, c in enumerate(sorted(ann["categories"], key=lambda c: c["id"]))}
        by_image: dict[int, list] = {}
        for a in ann["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for im in sorted(ann["images"], key=lambda i: i["id"])[: args.coco_images]:
            boxes, labels = [], []
            for a in by_image.get(im["id"], []):  # mmdetection's CocoDataset._parse_ann_info rules
                x, y, w, h = a["bbox"]
                if a.get("ignore", False) or a.get("iscrowd", 0) or w < 1 or h < 1 or a["area"] <= 0:
                    continue
                boxes.append([x, y, x + w, y + h])
                labels.append(cat_index[a["category_id"]])
            items.append({"name": f"shapes/{im['file_name']}", "path": str(args.coco / "val2017" / im["file_name"]),
                          "boxes": np.array(boxes, np.float32).reshape(-1, 4), "labels": np.array(labels, np.int64)})
    if args.skimage:
        import cv2
        import skimage.data

        out = args.work / "images"
        out.mkdir(parents=True, exist_ok=True)
        photos = {  # made-up boxes (xyxy) and COCO labels
            "astronaut": ([[140, 20, 460, 512], [360, 150, 470, 270]], [0, 24]),
            "coffee": ([[140, 40, 460, 330], [30, 200, 150, 330]], [41, 44]),
            "chelsea": ([[60, 20, 400, 300]], [15]),
        }
        for name, (boxes, labels) in photos.items():
            path = out / f"{name}.jpg"
            rgb = getattr(skimage.data, name)()
            cv2.imwrite(str(path), rgb[:, :, ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 90])
            items.append({"name": f"skimage/{name}.jpg", "path": str(path), "boxes": np.array(boxes, np.float32),
                          "labels": np.array(labels, np.int64)})
    return items


# ---------------------------------------------------------------------------------------------------------
# the fork's model


# The fork's ConvNeXt-T RetinaNet config asks its backbone for three outputs (out_indices=[1, 2, 3]) while its FPN
# expects four (in_channels of four stages): as committed it fails in FPN.forward (``assert len(inputs) ==
# len(self.in_channels)``). The ConvNeXt-S/B RetinaNet configs have out_indices=[0, 1, 2, 3]; the control run
# uses that (gradlens reads whether ``norm0`` exists from the weights).
CONFIG_FIXES = {
    "convnext/retinanet_convnext_tiny_patch4_window7_copy_paste_lsj_adamw_3x_coco_in1k.py":
        {"model.backbone.out_indices": [0, 1, 2, 3]},
}


def fork_config(fork: Path, rel: str, test_scale):
    from mmcv import Config

    path = fork / "configs" / "cednet" / rel
    text = path.read_text()
    if "'../_base_/" in text and not (path.parent.parent / "_base_").is_dir():
        # the fork's CSWin-T RetinaNet config names '../_base_/...' from configs/cednet/cswin/, a folder that
        # does not exist (as committed it fails in Config.fromfile); its siblings use '../../_base_/'. The control
        # run reads a copy beside it with the base paths made absolute (configs/_base_/).
        fixed = path.with_name(path.stem + "_basefix.py")
        fixed.write_text(text.replace("'../_base_/", f"'{fork / 'configs' / '_base_'}/"))
        print(f"   (config fixed to load: _base_ paths '../_base_/' -> {fork / 'configs' / '_base_'}/)", flush=True)
        path = fixed
    cfg = Config.fromfile(str(path))
    cfg.model.pretrained = None
    if rel in CONFIG_FIXES:
        cfg.merge_from_dict(CONFIG_FIXES[rel])
        print(f"   (config fixed to run: {CONFIG_FIXES[rel]})", flush=True)
    scale = tuple(test_scale)
    for pipeline in (cfg.get("test_pipeline"), cfg.data.test.pipeline, cfg.data.val.pipeline):
        if pipeline is None:
            continue
        for step in pipeline:
            if step["type"] == "MultiScaleFlipAug":
                step["img_scale"] = scale
    return cfg


@torch.no_grad()
def randomise_like_gradlens(model, seed: int, calibration: torch.Tensor | None = None) -> int:
    """make_mmdet_checkpoints.py's recipe on the fork's modules: N(0, 0.02) on every parameter, classifier bias -1,
    the backbone's batch norms' running statistics set to their input's (eval mode, in forward order).

    ``calibration`` is the image batch the statistics are taken on (default: white noise, 2x3x256x256, as
    make_mmdet_checkpoints.py). Statistics taken on white noise do not keep a random ResNet-50's activations
    O(1) on a photograph: spatially smooth inputs add up coherently in every 3x3 convolution, C5 reached a
    standard deviation of ~50, the head's logits ~40, every score was exactly 1.0 and every box was clipped
    to the image's corners, so no two detection lists could be compared. The comparison therefore calibrates
    on a preprocessed natural image (the fork's own test-pipeline tensor)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    torch.manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
    model.bbox_head.retina_cls.bias.fill_(-1.0)
    norms = [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]

    def calibrate(module, inputs):
        x = inputs[0].double()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6))

    hooks = [m.register_forward_pre_hook(calibrate) for m in norms]
    model.eval()
    try:
        if calibration is None:
            calibration = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(seed))
        model.backbone(calibration)
    finally:
        for h in hooks:
            h.remove()
    return len(norms)


def write_checkpoint(cfg, path: Path, seed: int, calibration: torch.Tensor | None = None) -> dict:
    import mmdet
    from mmcv.runner import save_checkpoint
    from mmdet.models import build_detector

    torch.manual_seed(seed)
    model = build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    init = "init_weights"
    try:
        model.init_weights()
    except (TypeError, KeyError, AssertionError):
        # the fork's ResNet.init_weights only loads a pretrained file (init_cfg['checkpoint']); there the backbone
        # keeps PyTorch's default initialisation and the neck and head get their own init_weights
        init = "init_weights of neck and head; backbone: PyTorch's defaults (the fork's ResNet.init_weights only loads a file)"
        torch.manual_seed(seed)
        model = build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
        for part in (model.neck, model.bbox_head):
            if part is not None:
                part.init_weights()
    calibrated = randomise_like_gradlens(model, seed, calibration)
    model.CLASSES = COCO_CLASSES
    meta = {"mmdet_version": mmdet.__version__, "CLASSES": COCO_CLASSES, "config": cfg.pretty_text,
            "seed": seed, "exp_name": Path(cfg.filename).name, "epoch": 36, "iter": 263736}
    save_checkpoint(model, str(path), meta=meta)
    return {"parameters": sum(p.numel() for p in model.parameters()), "batch_norms_calibrated": calibrated, "init": init}


def fork_models(cfg, path: Path):
    from mmcv.runner import load_checkpoint
    from mmdet.apis import init_detector
    from mmdet.models import build_detector

    # the fork's own inference entry (it sets the config's train_cfg to None: give it a copy)
    det_model = init_detector(copy.deepcopy(cfg), str(path), device="cpu")
    det_model.eval()
    loss_model = build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    load_checkpoint(loss_model, str(path), map_location="cpu", strict=True, logger=None)
    loss_model.cfg = cfg
    loss_model.eval()
    for p in loss_model.parameters():
        p.requires_grad_(False)
    return det_model, loss_model


def fork_detections(model, path: str):
    from mmdet.apis import inference_detector

    result = inference_detector(model, path)
    boxes = np.concatenate([r[:, :4] for r in result]) if result else np.zeros((0, 4))
    scores = np.concatenate([r[:, 4] for r in result])
    labels = np.concatenate([np.full(len(r), i) for i, r in enumerate(result)])
    return boxes.astype(np.float64), scores.astype(np.float64), labels.astype(np.int64)


def fork_train_inputs(cfg, item):
    """The fork's test pipeline with LoadAnnotations after the loader and the boxes collected."""
    from mmcv.parallel import collate
    from mmdet.datasets import replace_ImageToTensor
    from mmdet.datasets.pipelines import Compose

    steps = copy.deepcopy(replace_ImageToTensor(copy.deepcopy(cfg.data.test.pipeline)))
    steps.insert(1, {"type": "LoadAnnotations", "with_bbox": True})
    for step in steps:
        if step["type"] == "MultiScaleFlipAug":
            for t in step["transforms"]:
                if t["type"] == "Collect":
                    t["keys"] = ["img", "gt_bboxes", "gt_labels"]
    pipeline = Compose(steps)
    data = pipeline({"img_info": {"filename": item["path"]}, "img_prefix": None,
                     "ann_info": {"bboxes": item["boxes"].copy(), "labels": item["labels"].copy()},
                     "bbox_fields": [], "mask_fields": [], "seg_fields": []})
    data = collate([data], samples_per_gpu=1)
    img = data["img"][0].data[0]
    metas = data["img_metas"][0].data[0]
    return img, metas, data["gt_bboxes"][0].data[0], data["gt_labels"][0].data[0]


def fork_decoded(path: str) -> np.ndarray:
    import mmcv

    return mmcv.imread(path, "color", channel_order="rgb")


def fork_loss_and_grad(model, img, metas, gt_bboxes, gt_labels):
    captured = {}

    def hook(module, inputs, outputs):
        captured["features"] = [f.detach() for f in inputs[0]]
        cls, reg = outputs
        captured["cls"] = torch.cat([c.detach().permute(0, 2, 3, 1).reshape(c.shape[0], -1, model.bbox_head.cls_out_channels)
                                     for c in cls], 1)
        captured["reg"] = torch.cat([r.detach().permute(0, 2, 3, 1).reshape(r.shape[0], -1, 4) for r in reg], 1)

    handle = model.bbox_head.register_forward_hook(hook)
    x = img.clone().requires_grad_(True)
    try:
        losses = model.forward_train(x, copy.deepcopy(metas), gt_bboxes, gt_labels)
    finally:
        handle.remove()
    cls = sum(losses["loss_cls"])
    box = sum(losses["loss_bbox"])
    (grad,) = torch.autograd.grad(cls + box, x)
    return float(cls), float(box), grad, captured


# ---------------------------------------------------------------------------------------------------------
# gradlens


def gradlens_loss_and_grad(detector, image, target, channels_last: bool):
    detector.use_channels_last(channels_last)
    captured = {}

    def hook(module, inputs, outputs):
        captured["features"] = [f.detach().contiguous() for f in inputs[0]]
        captured["cls"] = outputs["cls_logits"].detach()
        captured["reg"] = outputs["bbox_regression"].detach()

    handle = detector.head.register_forward_hook(hook)
    try:
        batch, sizes = detector.prepare([image])
        x = batch.detach().clone().requires_grad_(True)
        outputs, levels, _ = detector.head_outputs(x)
        losses = detector._losses(outputs, levels, [image], sizes, [target])
    finally:
        handle.remove()
    cls, box = losses["classification"][0], losses["bbox_regression"][0]
    (grad,) = torch.autograd.grad(cls + box, x)
    detector.use_channels_last(False)
    return batch.detach(), float(cls), float(box), grad.contiguous(), captured


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in float64."""
    a, b = a.double(), b.double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def match_detections(fork, ours):
    """Greedy match by label and IoU: count equality, max |box diff| (px) and max |score diff| over matches."""
    from torchvision.ops import box_iou

    fb, fs, fl = fork
    gb, gs, gl = ours
    out = {"count_fork": int(len(fs)), "count_gradlens": int(len(gs))}
    unmatched, box_diff, score_diff = 0, 0.0, 0.0
    used = np.zeros(len(gs), bool)
    order = np.argsort(-fs, kind="stable")
    iou = box_iou(torch.from_numpy(fb), torch.from_numpy(gb)).numpy() if len(fs) and len(gs) else np.zeros((len(fs), len(gs)))
    for i in order:
        cand = np.where((gl == fl[i]) & ~used)[0]
        if not len(cand):
            unmatched += 1
            continue
        j = cand[np.argmax(iou[i, cand] - 1e-3 * np.abs(gs[cand] - fs[i]))]
        if iou[i, j] < 0.5:
            unmatched += 1
            continue
        used[j] = True
        box_diff = max(box_diff, float(np.abs(fb[i] - gb[j]).max()))
        score_diff = max(score_diff, float(abs(fs[i] - gs[j])))
    out.update(unmatched_fork=int(unmatched), unmatched_gradlens=int((~used).sum()), max_box_diff_px=box_diff,
               max_score_diff=score_diff)
    # the same in the order each framework returns them (sorted by score; equal lists have equal order)
    if len(fs) == len(gs):
        out["same_order_labels_equal"] = bool((np.sort(fl) == np.sort(gl)).all())
    return out


# ---------------------------------------------------------------------------------------------------------


def compare_config(rel: str, args, items, gradlens) -> dict:
    from gradlens.data.images import read_image, to_tensor

    name = Path(rel).stem
    t0 = time.time()
    cfg = fork_config(args.fork, rel, args.test_scale)
    ckpt = args.work / "checkpoints" / f"{name}.pth"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    calibration = None
    if args.calibrate_on is not None:  # the fork's own preprocessed tensor of that image
        calibration = fork_train_inputs(cfg, items[args.calibrate_on])[0]
    info = write_checkpoint(cfg, ckpt, args.seed, calibration)
    info["batch_norm_calibration"] = "white noise" if calibration is None else items[args.calibrate_on]["name"]
    t1 = time.time()
    det_model, loss_model = fork_models(cfg, ckpt)
    t2 = time.time()
    detector = gradlens.load_detector(ckpt)
    print(f"   checkpoint written in {t1 - t0:.0f} s, loaded by the fork in {t2 - t1:.0f} s, by gradlens in "
          f"{time.time() - t2:.0f} s", flush=True)
    detector.eval()
    for p in detector.parameters():
        p.requires_grad_(False)
    res = {"config": rel, "checkpoint": str(ckpt), "gradlens_arch": detector.arch_name,
           "gradlens_preprocess": detector.preprocess.to_dict(), **info, "images": []}
    print(f"\n== {rel}: gradlens recognised {detector.arch_name}, preprocess {detector.preprocess.to_dict()}", flush=True)
    for item in items:
        row = {"image": item["name"], "objects": int(len(item["labels"]))}
        t_image = time.time()
        pixels = read_image(item["path"])
        image = to_tensor(pixels)
        row["decoders_equal"] = bool(np.array_equal(pixels, fork_decoded(item["path"])))
        # 1. detections from the JPEG
        with torch.inference_mode():
            ours = detector.detect([image])[0]
        ours = (ours["boxes"].double().numpy(), ours["scores"].double().numpy(), ours["labels"].numpy())
        row["detections"] = match_detections(fork_detections(det_model, item["path"]), ours)
        # 2./3. preprocessed tensors, losses, gradients
        img, metas, gt_bboxes, gt_labels = fork_train_inputs(cfg, item)
        target = {"boxes": torch.from_numpy(item["boxes"]), "labels": torch.from_numpy(item["labels"])}
        f_cls, f_box, f_grad, f_cap = fork_loss_and_grad(loss_model, img, metas, gt_bboxes, gt_labels)
        for mode, cl in (("nchw", False), ("channels_last", True)):
            batch, g_cls, g_box, g_grad, g_cap = gradlens_loss_and_grad(detector, image, target, cl)
            if mode == "nchw":
                row["tensor_shapes"] = [list(img.shape), list(batch.shape)]
                row["tensors_equal"] = bool(img.shape == batch.shape and torch.equal(img, batch))
                row["tensor_max_abs_diff"] = float((img - batch).abs().max()) if img.shape == batch.shape else None
                row["loss_fork"] = {"cls": f_cls, "bbox": f_box}
                row["loss_gradlens"] = {"cls": g_cls, "bbox": g_box}
                row["loss_abs_diff"] = {"cls": abs(g_cls - f_cls), "bbox": abs(g_box - f_box),
                                        "total": abs(g_cls + g_box - f_cls - f_box)}
                row["loss_rel_diff_total"] = abs(g_cls + g_box - f_cls - f_box) / max(abs(f_cls + f_box), 1e-30)
                row["feature_rel_l2"] = [rel_l2(a, b) for a, b in zip(g_cap["features"], f_cap["features"])]
                row["head_rel_l2"] = {"cls": rel_l2(g_cap["cls"], f_cap["cls"]), "reg": rel_l2(g_cap["reg"], f_cap["reg"])}
                row["grad_fork_norm"] = float(f_grad.double().norm())
            same = g_grad.shape == f_grad.shape
            row[f"grad_rel_l2_{mode}"] = rel_l2(g_grad, f_grad) if same else None
            if mode == "channels_last":
                row["feature_rel_l2_channels_last"] = [rel_l2(a, b) for a, b in zip(g_cap["features"], f_cap["features"])]
        if args.diagnose_frozen_bn and any(type(m).__name__ == "FrozenBatchNorm2d" for m in detector.modules()):
            # diagnosis: the same gradient with torchvision's FrozenBatchNorm2d computing mmdetection's arithmetic
            # (F.batch_norm on the running statistics, as nn.BatchNorm2d/SyncBatchNorm in eval mode) instead of
            # x * scale + shift with a precomputed scale
            from torchvision.ops.misc import FrozenBatchNorm2d

            original = FrozenBatchNorm2d.forward
            FrozenBatchNorm2d.forward = lambda self, x: torch.nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
            try:
                _, p_cls, p_box, p_grad, _ = gradlens_loss_and_grad(detector, image, target, False)
            finally:
                FrozenBatchNorm2d.forward = original
            row["frozen_bn_as_batch_norm"] = {"grad_rel_l2_nchw": rel_l2(p_grad, f_grad), "tensors_equal": True,
                                              "loss_abs_diff_total": abs(p_cls + p_box - f_cls - f_box)}
            print(f"    FrozenBatchNorm2d as F.batch_norm: grad rel L2 {rel_l2(p_grad, f_grad):.2e}, total loss diff "
                  f"{abs(p_cls + p_box - f_cls - f_box):.2e}", flush=True)
        # gradient at the original [0, 1] image: gradlens' own vs the fork's carried back through the same Jacobian
        if args.original_grad:
            x = image.clone().requires_grad_(True)
            batch, _ = detector.prepare([x])
            (fork_orig,) = torch.autograd.grad(batch, x, grad_outputs=f_grad.to(batch.dtype))
            (ours_orig,) = gradlens.input_gradients(detector, [image], [target], batch_size=1)
            row["orig_grad_rel_l2_nchw"] = rel_l2(ours_orig, fork_orig)
        d = row["detections"]
        print(f"  {item['name']:<26} det {d['count_fork']:>3}/{d['count_gradlens']:<3} unmatched {d['unmatched_fork']}/"
              f"{d['unmatched_gradlens']} box {d['max_box_diff_px']:.2e} score {d['max_score_diff']:.2e} | tensors equal "
              f"{row['tensors_equal']} (decoders {row['decoders_equal']}) | loss cls {f_cls:.6f}/{g_cls:.6f} box "
              f"{f_box:.6f}/{g_box:.6f} | grad rel L2 nchw {row['grad_rel_l2_nchw']:.2e} cl "
              f"{row['grad_rel_l2_channels_last']:.2e}"
              + (f" | orig {row['orig_grad_rel_l2_nchw']:.2e}"
                 if args.original_grad else "") + f" | {time.time() - t_image:.0f} s", flush=True)
        res["images"].append(row)
    res["seconds"] = time.time() - t0
    return res


def summarise(results: dict) -> str:
    """One markdown table per config from ``results.json``."""
    lines = [f"torch {results['torch']}, mmcv {results['mmcv']}, mmdet {results['mmdet']} ({results['mmdet_path']}), "
             f"test scale {tuple(results['test_scale'])}, {results['threads']} threads"]
    for c in results["configs"]:
        lines += ["", f"### {c['config']} (gradlens: {c['gradlens_arch']}; BN statistics: "
                      f"{c.get('batch_norm_calibration', 'white noise')}; {c['seconds']:.0f} s)", "",
                  "| image | objects | dets fork/gradlens (unmatched) | max box diff px | max score diff | tensors equal "
                  "(decoders) | loss cls fork / diff | loss bbox fork / diff | rel. diff total | grad rel L2 NCHW | "
                  "grad rel L2 channels-last | grad rel L2 original image | features rel L2 max | head rel L2 cls/reg |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in c["images"]:
            d = r["detections"]
            orig = r.get("orig_grad_rel_l2_nchw")
            lines.append(
                f"| {r['image']} | {r['objects']} | {d['count_fork']}/{d['count_gradlens']} ({d['unmatched_fork']}/"
                f"{d['unmatched_gradlens']}) | {d['max_box_diff_px']:.2g} | {d['max_score_diff']:.2g} | "
                f"{r['tensors_equal']} ({r['decoders_equal']}) | {r['loss_fork']['cls']:.6g} / {r['loss_abs_diff']['cls']:.2g} | "
                f"{r['loss_fork']['bbox']:.6g} / {r['loss_abs_diff']['bbox']:.2g} | {r['loss_rel_diff_total']:.2g} | "
                f"{r['grad_rel_l2_nchw']:.2g} | {r['grad_rel_l2_channels_last']:.2g} | "
                f"{'' if orig is None else f'{orig:.2g}'} | {max(r['feature_rel_l2']):.2g} | "
                f"{r['head_rel_l2']['cls']:.2g}/{r['head_rel_l2']['reg']:.2g} |")
        g = [r["grad_rel_l2_nchw"] for r in c["images"]]
        gc = [r["grad_rel_l2_channels_last"] for r in c["images"]]
        lines.append(f"| **max** | | | {max(r['detections']['max_box_diff_px'] for r in c['images']):.2g} | "
                     f"{max(r['detections']['max_score_diff'] for r in c['images']):.2g} | "
                     f"{all(r['tensors_equal'] for r in c['images'])} | | | "
                     f"{max(r['loss_rel_diff_total'] for r in c['images']):.2g} | {max(g):.2g} | {max(gc):.2g} | | | |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fork", type=Path, help="the fork's ced-mmdet directory")
    parser.add_argument("--mmcv-src", type=Path, help="an mmcv v1.7.2 source tree (C++ NMS)")
    parser.add_argument("--work", type=Path, help="checkpoints, images, build folder, results.json")
    parser.add_argument("--config", nargs="+", default=DEFAULT_CONFIGS, help="paths under configs/cednet/")
    parser.add_argument("--coco", type=Path, help="a COCO-layout folder (gradlens synthetic)")
    parser.add_argument("--coco-images", type=int, default=6)
    parser.add_argument("--skimage", action="store_true", help="add scikit-image's astronaut, coffee and chelsea")
    parser.add_argument("--test-scale", type=int, nargs=2, default=(800, 1333), metavar=("SHORT", "LONG"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrate-on", type=int, default=None, metavar="INDEX",
                        help="take batch-norm statistics on this image of the list (default: the first scikit-image "
                             "photograph with --skimage, else white noise); -1: white noise")
    parser.add_argument("--no-original-grad", dest="original_grad", action="store_false")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--diagnose-frozen-bn", action="store_true",
                        help="also compute gradlens' gradient with torchvision's FrozenBatchNorm2d patched to F.batch_norm")
    parser.add_argument("--summary", type=Path, help="only print the tables of an earlier results.json")
    args = parser.parse_args(argv)
    if args.summary:
        print(summarise(json.loads(args.summary.read_text())))
        return
    if not (args.fork and args.mmcv_src and args.work):
        parser.error("--fork, --mmcv-src and --work are required (or --summary)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    from mmcv_ext import register_mmcv_ext

    register_mmcv_ext(args.mmcv_src, args.work / "build-ext")
    import mmcv
    import mmdet

    import gradlens

    if not (args.coco or args.skimage):
        sys.exit("give --coco and/or --skimage")
    items = make_images(args)
    if args.calibrate_on is None and args.skimage:
        args.calibrate_on = next(i for i, item in enumerate(items) if item["name"].startswith("skimage/"))
    elif args.calibrate_on is not None and args.calibrate_on < 0:
        args.calibrate_on = None
    results = {"torch": torch.__version__, "mmcv": mmcv.__version__, "mmdet": mmdet.__version__,
               "mmdet_path": str(Path(mmdet.__file__).parent), "gradlens_path": str(Path(gradlens.__file__).parent),
               "test_scale": list(args.test_scale), "threads": torch.get_num_threads(), "configs": []}
    out = args.work / "results.json"
    for rel in args.config:
        results["configs"].append(compare_config(rel, args, items, gradlens))
        out.write_text(json.dumps(results, indent=1))
    print("\n" + summarise(results))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
