"""mmdetection 3.x RetinaNet checkpoints (mmengine's meta) load and detect as mmdetection 3.x does.

The references are written here from the upstream code: mmcv 2.x's ``Resize`` (``mmcv.imrescale``:
``rescale_size``, ``cv2.resize``), ``PackDetInputs``, mmengine's ``ImgDataPreprocessor`` and ``stack_batch``
for the batch; mmdetection 3.x's ``filter_scores_and_topk``, ``delta2bbox``, ``scale_boxes`` and
``BaseDenseHead._bbox_post_process`` for the detections. The checkpoint is the full-size ResNet-50 RetinaNet
written by ``scripts/make_mmdet_checkpoints.py`` (``make_mmdet3``) beside its 2.x twin (same weights).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from gradlens.models.detectors.nms import mmcv_batched_nms
from gradlens.data.images import read_image, to_tensor
from gradlens.errors import CheckpointError
from gradlens.models.formats import mmdet3
from gradlens.models.formats.checkpoints import detector_from_object, load_detector, read_checkpoint, save_detector
from gradlens.models.formats.mmdet import coco80_categories
from gradlens.models.preprocessing.transform import PreprocessConfig, batch_images, mmcv_normalise, mmengine_normalise
from tests.scripts import make_mmdet_checkpoints
from tests.test_detector_cli import run

TEST_SCALE = (96, 64)  # (long, short) as 3.x writes Resize's scale; small, so the full-size model runs fast


def config_text(scale=(1333, 800), divisor=32) -> str:
    return make_mmdet_checkpoints().MMDET3_CONFIG.format(scale=tuple(scale), divisor=divisor)


# ---------------------------------------------------------------------------------------------
# the batch, from the JPEG


def _upstream_batch(paths, scale, mean, std, pad_size_divisor) -> tuple[torch.Tensor, list]:
    """LoadImageFromFile -> Resize(scale, keep_ratio=True) -> PackDetInputs -> DetDataPreprocessor, as upstream."""
    inputs, shapes = [], []
    for path in paths:
        img = cv2.imdecode(np.frombuffer(Path(path).read_bytes(), np.uint8), cv2.IMREAD_COLOR)  # mmcv.imfrombytes
        h, w = img.shape[:2]
        # mmcv.rescale_size((w, h), scale): the largest factor fitting max(scale) x min(scale), then _scale_size
        factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
        new_w, new_h = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)  # mmcv.imresize, backend cv2
        shapes.append((new_h, new_w))
        inputs.append(torch.from_numpy(img).permute(2, 0, 1).contiguous())  # PackDetInputs (contiguous image)
    # ImgDataPreprocessor.forward, pseudo_collate's list of uint8 (3, H, W) tensors
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    normalised = [(x[[2, 1, 0], ...].float() - mean_t) / std_t for x in inputs]
    # mmengine.model.utils.stack_batch(tensor_list, pad_size_divisor, pad_value=0)
    all_sizes = torch.Tensor([t.shape for t in normalised])
    max_sizes = torch.ceil(torch.max(all_sizes, dim=0)[0] / pad_size_divisor) * pad_size_divisor
    padded_sizes = max_sizes - all_sizes
    padded_sizes[:, 0] = 0
    pad = torch.zeros(len(normalised), 6, dtype=torch.int)
    pad[:, 1::2] = padded_sizes[:, range(2, -1, -1)]
    batch = torch.stack([torch.nn.functional.pad(t, tuple(pad[i].tolist()), value=0) for i, t in enumerate(normalised)])
    return batch, shapes


def _jpeg(folder: Path, h: int, w: int, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.clip(np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 256], -1) + rng.normal(0, 25, (h, w, 3)), 0, 255)
    path = folder / f"photo_{h}x{w}.jpg"
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=85)
    return path


@pytest.mark.parametrize("scale, divisor, sizes", [
    ((1333, 800), 32, [(375, 500), (61, 97)]),
    (TEST_SCALE, 32, [(427, 640), (97, 61), (33, 47)]),
    ((416, 256), 128, [(101, 253), (255, 99)]),
])  # fmt: skip
def test_the_batch_equals_mmdetection3s_from_the_jpeg(tmp_path, scale, divisor, sizes):
    """Odd-sized images, one batch: the normalised, padded float32 tensor equals upstream's bit for bit."""
    paths = [_jpeg(tmp_path, h, w, seed) for seed, (h, w) in enumerate(sizes)]
    settings = mmdet3.preprocess_settings(config_text(scale, divisor))
    config = PreprocessConfig(**settings)
    assert config.convention == "mmdet3" and (config.min_size, config.max_size) == (min(scale), max(scale))
    expected, shapes = _upstream_batch(paths, scale, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375], divisor)
    batch, got_shapes = batch_images([to_tensor(read_image(p)) for p in paths], config)
    assert got_shapes == shapes and batch.dtype == torch.float32
    assert torch.equal(batch, expected)


def test_normalisation_is_mmengines_float32_formula_for_every_value():
    """(x - mean) / std in float32 tensors, for every uint8 value and means/stds of several kinds."""
    values = torch.arange(256, dtype=torch.float32).view(1, 16, 16).expand(3, 16, 16).contiguous()
    rng = np.random.default_rng(0)
    cases = [([123.675, 116.28, 103.53], [58.395, 57.12, 57.375]), ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
             ([127.5] * 3, [127.5] * 3)]
    cases += [(np.round(rng.uniform(0, 255, 3), 3).tolist(), np.round(rng.uniform(0.5, 90, 3), 3).tolist())
              for _ in range(20)]
    for mean, std in cases:
        config = PreprocessConfig(mean=tuple(v / 255 for v in mean), std=tuple(v / 255 for v in std),
                                  convention="mmdet3")
        expected = (values - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
        assert torch.equal(mmengine_normalise(values, config), expected)
    # 2.x's imnormalize multiplies by 1 / std in float64; 3.x divides in float32 (equal here, by another formula)
    imagenet = PreprocessConfig(convention="mmdet3")
    assert torch.equal(mmcv_normalise(values, imagenet), mmengine_normalise(values, imagenet))
    # a float64 run keeps the formula, with the float32 mean and std widened
    wide = mmengine_normalise(values.double(), imagenet)
    assert wide.dtype == torch.float64 and torch.allclose(wide.float(), mmengine_normalise(values, imagenet))


# ---------------------------------------------------------------------------------------------
# the checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The 3.x checkpoint and its 2.x twin (same weights, same test scale and padding), loaded.

    Written once per session: pytest-xdist's workers share their session's folder, under a file lock."""
    from filelock import FileLock

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    folder = tmp_path_factory.getbasetemp().parent / "mmdet3-pair" if shared else tmp_path_factory.mktemp("mmdet3")
    folder.mkdir(exist_ok=True)
    with FileLock(str(folder / "write.lock")):
        path3, path2 = folder / "resnet50.mmdet3.pth", folder / "resnet50.pth"
        if not (folder / "done").exists():
            assert make_mmdet_checkpoints().make_mmdet3(folder, test_scale=TEST_SCALE) == (path3, path2)
            (folder / "done").touch()
    raw = read_checkpoint(path3)
    return SimpleNamespace(path3=path3, path2=path2, raw=raw, det3=detector_from_object(raw, path3),
                           det2=load_detector(path2))


def _images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 90, 120, generator=g), torch.rand(3, 130, 101, generator=g)]


def test_3x_checkpoint_is_recognised_and_read(pair):
    meta = pair.raw["meta"]
    assert "CLASSES" not in meta and "config" not in meta and set(meta["dataset_meta"]) == {"classes", "palette"}
    assert {k.split(".")[0] for k in pair.raw["state_dict"]} == {"backbone", "neck", "bbox_head"}
    det3, det2 = pair.det3, pair.det2
    assert det3.checkpoint_format == "mmdetection3" and det2.checkpoint_format == "mmdetection"
    assert det3.arch_name == det2.arch_name == "retinanet_resnet50"
    assert isinstance(det3, mmdet3.MMDet3RetinaNet) and det3.framework == "mmdetection"
    assert det3.preprocess == PreprocessConfig(min_size=64, max_size=96, size_divisor=32, convention="mmdet3",
                                               mean=det2.preprocess.mean, std=det2.preprocess.std)
    assert det2.preprocess.convention == "mmcv" and det2.preprocess.size_divisor == 32
    assert det3.test_cfg == mmdet3.MMDet3TestConfig(score_thr=0.05, nms_pre=1000, nms_iou=0.5, max_per_img=100,
                                                    min_bbox_size=0)
    assert det3.categories == coco80_categories(list(meta["dataset_meta"]["classes"]))
    assert det3.categories[0] == {"id": 1, "name": "person"} and det3.categories[-1]["id"] == 90
    assert det3.config_backbone_type == "ResNet"
    state3, state2 = det3.state_dict(), det2.state_dict()
    assert state3.keys() == state2.keys() and all(torch.equal(state3[k], state2[k]) for k in state3)


def _upstream_detections(outputs, levels, counts, images, sizes) -> list[dict]:
    """mmdetection 3.x's RetinaHead.predict_by_feat on the network's outputs, transcribed from upstream."""
    cfg = dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100)
    results = []
    for i, (image, (new_h, new_w)) in enumerate(zip(images, sizes)):
        h, w = image.shape[-2:]
        scale_factor = (new_w / w, new_h / h)  # mmcv Resize._resize_img, keep_ratio
        mlvl_bbox_preds, mlvl_priors, mlvl_scores, mlvl_labels = [], [], [], []
        cls = outputs["cls_logits"][i].split(counts)
        reg = outputs["bbox_regression"][i].split(counts)
        for cls_score, bbox_pred, priors in zip(cls, reg, levels):
            scores = cls_score.sigmoid()
            # filter_scores_and_topk
            valid_mask = scores > cfg["score_thr"]
            scores = scores[valid_mask]
            valid_idxs = torch.nonzero(valid_mask)
            num_topk = min(cfg["nms_pre"], valid_idxs.size(0))
            scores, idxs = scores.sort(descending=True)
            scores = scores[:num_topk]
            keep_idxs, labels = valid_idxs[idxs[:num_topk]].unbind(dim=1)
            mlvl_bbox_preds.append(bbox_pred[keep_idxs])
            mlvl_priors.append(priors[keep_idxs])
            mlvl_scores.append(scores)
            mlvl_labels.append(labels)
        bboxes = _delta2bbox(torch.cat(mlvl_priors), torch.cat(mlvl_bbox_preds), max_shape=(new_h, new_w))
        scores, labels = torch.cat(mlvl_scores), torch.cat(mlvl_labels)
        # _bbox_post_process: rescale (scale_boxes), min_bbox_size, batched NMS, max_per_img
        bboxes = bboxes * bboxes.new_tensor([1 / s for s in scale_factor]).repeat((1, 2))
        if cfg["min_bbox_size"] >= 0:
            bw, bh = bboxes[:, 2] - bboxes[:, 0], bboxes[:, 3] - bboxes[:, 1]
            valid = (bw > cfg["min_bbox_size"]) & (bh > cfg["min_bbox_size"])
            if not valid.all():
                bboxes, scores, labels = bboxes[valid], scores[valid], labels[valid]
        if bboxes.numel() > 0:
            # mmcv's batched_nms: gradlens' transcription, held to mmcv's compiled kernel in tests/test_nms.py
            keep = mmcv_batched_nms(bboxes, scores, labels, cfg["nms"]["iou_threshold"])
            bboxes, scores, labels = bboxes[keep][: cfg["max_per_img"]], scores[keep][: cfg["max_per_img"]], \
                labels[keep][: cfg["max_per_img"]]
        results.append({"boxes": bboxes, "scores": scores, "labels": labels})
    return results


def _delta2bbox(rois, deltas, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0), max_shape=None,
                wh_ratio_clip=16 / 1000):
    """mmdet/models/task_modules/coders/delta_xywh_bbox_coder.py::delta2bbox (no centre clamp, clip_border)."""
    means = deltas.new_tensor(means).view(1, -1)
    stds = deltas.new_tensor(stds).view(1, -1)
    denorm_deltas = deltas * stds + means
    dxy, dwh = denorm_deltas[:, :2], denorm_deltas[:, 2:]
    pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
    pwh = rois[:, 2:] - rois[:, :2]
    dxy_wh = pwh * dxy
    max_ratio = np.abs(np.log(wh_ratio_clip))
    dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    bboxes = torch.cat([gxy - (gwh * 0.5), gxy + (gwh * 0.5)], dim=-1)
    bboxes[..., 0::2].clamp_(min=0, max=max_shape[1])
    bboxes[..., 1::2].clamp_(min=0, max=max_shape[0])
    return bboxes


def test_detections_follow_mmdetection3(pair):
    """The same network as the 2.x twin on the same batch; 3.x's post-processing, not 2.x's."""
    images = _images()
    batch3, sizes3 = pair.det3.prepare(images)
    batch2, sizes2 = pair.det2.prepare(images)
    assert sizes3 == sizes2 and torch.equal(batch3, batch2)  # the preprocessing differs only in its formula
    with torch.no_grad():
        outputs, levels, counts = pair.det2.head_outputs(batch2)
        expected = _upstream_detections(outputs, levels, counts, images, sizes3)
        old = pair.det2._detections(outputs, levels, counts, images, sizes2)  # 2.x's post-processing
    got = pair.det3.detect(images)
    for g, e, o in zip(got, expected, old):
        assert len(g["boxes"]) > 0
        assert torch.equal(g["boxes"], e["boxes"]) and torch.equal(g["scores"], e["scores"])
        assert torch.equal(g["labels"], e["labels"])
        # 3.x drops the boxes clipped to zero width or height, which 2.x keeps (random weights make many)
        zero = (o["boxes"][:, 2] <= o["boxes"][:, 0]) | (o["boxes"][:, 3] <= o["boxes"][:, 1])
        assert zero.any()
        assert ((g["boxes"][:, 2] > g["boxes"][:, 0]) & (g["boxes"][:, 3] > g["boxes"][:, 1])).all()
    # anchors, assignment and loss are 2.x's in 3.x (MaxIoUAssigner 0.5/0.4, PseudoSampler, focal + L1)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0], [5.0, 5.0, 30.0, 20.0]]), "labels": torch.tensor([0, 7])},
               {"boxes": torch.tensor([[20.0, 30.0, 90.0, 120.0]]), "labels": torch.tensor([3])}]
    with torch.no_grad():
        losses3, losses2 = pair.det3.image_losses(images, targets), pair.det2.image_losses(images, targets)
    assert all(torch.equal(losses3[k], losses2[k]) for k in losses2) and (losses3["num_foreground"] > 0).all()


def test_rescaling_multiplies_by_the_inverse_scale():
    """3.x's scale_boxes multiplies by float32(1 / s); 2.x divides by float32(s): other last bits."""
    boxes = torch.rand(2000, 4, generator=torch.Generator().manual_seed(0)) * 192
    h, w, new_h, new_w = 130, 101, 192, 149
    s = (new_w / w, new_h / h)
    three = boxes * boxes.new_tensor([1 / v for v in s]).repeat((1, 2))
    two = boxes / torch.tensor([s[0], s[1]] * 2, dtype=torch.float32)
    assert not torch.equal(three, two) and torch.allclose(three, two, rtol=1e-6)


def test_native_round_trip_and_distinct_identity(pair, tmp_path):
    """gradlens' own file keeps the 3.x arithmetic (class, preprocessing, test_cfg, weights); the cache key of a
    3.x detector is never a 2.x one's."""
    from gradlens.inference import InferenceSettings, cache_key

    back = load_detector(save_detector(pair.det3, tmp_path / "native.pth"))
    assert type(back) is mmdet3.MMDet3RetinaNet and back.checkpoint_format == "gradlens"
    assert back.preprocess == pair.det3.preprocess and back.test_cfg == pair.det3.test_cfg
    assert back.categories == pair.det3.categories
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), pair.det3.state_dict().values()))
    gt = SimpleNamespace(sha256="0" * 64, images_dir=None, exif_orientation="ignore")
    key3, key2 = (cache_key("same", gt, d, InferenceSettings()) for d in (pair.det3, pair.det2))
    assert key3 != key2 and key3["preprocess"]["convention"] == "mmdet3" and key3["test_cfg"]["min_bbox_size"] == 0


# ---------------------------------------------------------------------------------------------
# reading the meta: data, never code; one sentence for what gradlens does not reproduce


def _with_meta(pair, **changes) -> dict:
    meta = dict(pair.raw["meta"])
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return {"meta": meta, "state_dict": pair.raw["state_dict"]}


def _one_sentence(exc: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and text.endswith(".") and all(p in text for p in parts), text


def test_code_in_the_config_text_is_read_as_data_or_refused(pair, tmp_path):
    marker = tmp_path / "ran"
    code = f"__import__('os').system('touch {marker}')"
    # statements around the settings are ignored: the text reads as data, nothing runs
    text = f"import os\nos.system('touch {marker}')\ndef f():\n    open('{marker}', 'w')\n" + config_text(TEST_SCALE)
    settings = mmdet3.read_meta(_with_meta(pair, cfg=text)["meta"])
    assert PreprocessConfig(**settings.preprocess) == pair.det3.preprocess and settings.test_cfg == pair.det3.test_cfg
    assert not marker.exists()
    # a setting gradlens needs written as code is refused, naming it
    for old, new, setting in [
        ("mean=[123.675, 116.28, 103.53]", f"mean={code}", "model data_preprocessor mean="),
        (f"scale={TEST_SCALE}", f"scale=({code}, 64)", "test_dataloader dataset pipeline Resize scale="),
        ("pad_size_divisor=32", "pad_size_divisor=32 * 1", "model data_preprocessor pad_size_divisor=32 * 1"),
        ("score_thr=0.05", f"score_thr={code}", "model test_cfg score_thr="),
    ]:
        changed = config_text(TEST_SCALE).replace(old, new, 1)
        assert changed != config_text(TEST_SCALE)
        with pytest.raises(CheckpointError) as exc:
            detector_from_object(_with_meta(pair, cfg=changed), "code.pth")
        _one_sentence(exc, "code.pth: its config sets", setting, "not a literal value")
    assert not marker.exists()
    with pytest.raises(CheckpointError) as exc:
        detector_from_object(_with_meta(pair, cfg="model = dict(\n"), "code.pth")
    _one_sentence(exc, "config text is not Python")


@pytest.mark.parametrize("old, new, message", [
    ("keep_ratio=True, scale=(96, 64)", "keep_ratio=False, scale=(96, 64)", "keep_ratio=False"),
    ("dict(type='LoadAnnotations', with_bbox=True),\n", "dict(type='LoadAnnotations', with_bbox=True), "
     "dict(type='RandomFlip', prob=1.0),\n", "has a RandomFlip transform"),
    ("bgr_to_rgb=True", "bgr_to_rgb=False", "gradlens runs RGB models only"),
    ("pad_size_divisor=32,", "pad_size_divisor=32, pad_value=114,", "pad_value=114"),
    ("pad_size_divisor=32,", "pad_size_divisor=0,", "pad_size_divisor=0; it must be a whole number"),
    ("mean=[123.675, 116.28, 103.53]", "mean=[123.675, 116.28]", "mean=[123.675, 116.28]; it must be one or three"),
    ("type='nms'), nms_pre", "type='soft_nms'), nms_pre", "runs dict(type='nms'"),
    ("dict(keep_ratio=True, scale=(96, 64), type='Resize'),\n            dict(type='LoadAnn",
     "dict(type='LoadAnn", "has no Resize"),
])  # fmt: skip
def test_settings_gradlens_does_not_reproduce_are_refused(pair, old, new, message):
    changed = config_text(TEST_SCALE).replace(old, new, 1)
    assert changed != config_text(TEST_SCALE), old
    with pytest.raises(CheckpointError) as exc:
        detector_from_object(_with_meta(pair, cfg=changed), "odd.pth")
    _one_sentence(exc, "odd.pth:", message)


def test_the_config_without_test_dataloader_uses_test_pipeline_and_refuses_mixed_metas(pair):
    text = config_text(TEST_SCALE)
    start = text.index("test_dataloader = ")
    without = text[:start] + text[text.index("test_pipeline = "):]
    assert mmdet3.preprocess_settings(without) == mmdet3.preprocess_settings(text)
    with pytest.raises(CheckpointError) as exc:
        detector_from_object(_with_meta(pair, CLASSES=("a",) * 80), "mixed.pth")
    _one_sentence(exc, "mixed.pth: its meta has both", "CLASSES", "cfg")
    settings = mmdet3.preprocess_settings(text.replace("mean=[123.675, 116.28, 103.53], ", "")
                                          .replace("std=[58.395, 57.12, 57.375], ", ""))
    assert settings["mean"] == (0.0,) * 3 and settings["std"] == (1 / 255,) * 3  # no normalisation: x itself
    assert math.isclose(mmdet3.test_settings(text.replace("min_bbox_size=0, ", "")).min_bbox_size, -1)
    # dataset_meta's keys are read lowercased, as init_detector reads them (3.0's release candidates: CLASSES)
    names = [f"c{i}" for i in range(80)]
    assert mmdet3.classes_of({"dataset_meta": {"CLASSES": tuple(names)}}, 80) == names
    assert mmdet3.classes_of({"dataset_meta": {"palette": []}}, 80) is None and mmdet3.classes_of({}, 80) is None


def test_bad_3x_metas_are_one_sentence_in_the_cli(pair, synthetic_coco, tmp_path, capsys):
    root = synthetic_coco.ann.parent.parent
    classes = list(pair.raw["meta"]["dataset_meta"]["classes"])
    with pytest.raises(CheckpointError) as exc:
        detector_from_object(_with_meta(pair, dataset_meta={"classes": "person"}), "str.pth")
    _one_sentence(exc, "str.pth: its meta dataset_meta classes is not a list of class names")
    cases = [
        (_with_meta(pair, dataset_meta={"classes": classes[:79]}), "dataset_meta classes lists 79 names, but its head"),
        # refused before the weights are read: a file with the head's weights alone is enough
        ({"meta": _with_meta(pair, cfg=None)["meta"], "state_dict": {k: v for k, v in pair.raw["state_dict"].items()
                                                                      if k.startswith("bbox_head.retina_cls")}},
         "has no config text under cfg"),
    ]
    for i, (payload, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.pth"
        torch.save(payload, path)
        score = ["score", "--model", path, "--coco-root", root, "--out", tmp_path / "x", "--workers", 0]
        select = ["select", "--a", path, "--b", path, "--coco-root", root, "--workdir", tmp_path / "w", "--workers", 0,
                  "--no-progress"]
        code, out, err = run(select if i == 1 else score, capsys)
        assert code == 1, err
        assert err.startswith("gradlens: error: ") and message in err and str(path) in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
