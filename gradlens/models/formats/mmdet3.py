"""Reading mmdetection 3.x RetinaNet checkpoints (mmengine's layout) and running them as 3.x runs them.

A checkpoint saved by mmengine's ``Runner.save_checkpoint`` is ``{"meta": {"cfg": text, "dataset_meta":
{"classes": names, "palette": ...}, "mmengine_version", "seed", "experiment_name", "time", "epoch", "iter"},
"state_dict": {...}, ...}`` (``publish_model.py`` keeps only ``meta`` and ``state_dict``). The RetinaNet's
keys are 2.x's (``backbone.*``, ``neck.lateral_convs.N.conv.*``, ``bbox_head.retina_cls.*``...), so the
architecture is recognised and renamed as in :mod:`gradlens.models.formats.mmdet`; the meta and the test-time
arithmetic are 3.x's:

- **preprocessing** (convention ``"mmdet3"``, :mod:`gradlens.models.preprocessing.transform`): mmcv 2.x's ``Resize``
  (``mmcv.imrescale``: the same rounded size and uint8 OpenCV bilinear as mmcv 1.x), then
  ``DetDataPreprocessor``: ``(x - mean) / std`` in float32 tensors and zero padding to a multiple of
  ``pad_size_divisor``, read from ``model.data_preprocessor`` and the test pipeline's ``Resize`` in
  ``meta['cfg']``;
- **post-processing** (:class:`MMDet3RetinaNet`): ``BaseDenseHead._bbox_post_process`` rescales the boxes by
  *multiplying* with the float32 inverses of the ``Resize``'s scale factors (2.x divides by the float32
  factors), drops boxes whose width or height is not above ``test_cfg.min_bbox_size`` (0 in the RetinaNet
  configs: boxes clipped to zero width go; 2.x keeps them), then NMS and ``max_per_img``; ``test_cfg`` is read
  from the config;
- anchors, box coding, ``MaxIoUAssigner`` (0.5/0.4, ``min_pos_iou=0``, ``gt_max_assign_all``), the
  ``PseudoSampler``'s ``avg_factor`` (positives per image, at least 1) and the focal and L1 losses are 2.x's.

The config text is read as data (:mod:`gradlens.models.formats.config_text`), never run; a setting gradlens needs
that is no literal, or a step of the test pipeline it does not reproduce, is refused in one sentence naming it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.errors import CheckpointError
from gradlens.models.formats.config_text import ConfigDict, Opaque, read_config
from gradlens.models.formats.mmdet import MAX_SIZE_DIVISOR, MAX_TEST_SIDE, shorten, whole_number
from gradlens.models.detectors.retinanet import RetinaNetDetector, TestConfig

CONVENTION = "mmdet3"  # PreprocessConfig.convention
FORMAT = "mmdetection3"  # detector.checkpoint_format
MMENGINE_META = ("cfg", "dataset_meta", "mmengine_version")  # what mmengine's Runner writes into meta
MMDET2_META = ("config", "CLASSES")  # what mmcv 1.x's runner and mmdetection 2.x write
# the transforms of mmdetection 3.x's RetinaNet test pipeline (configs/_base_/datasets/coco_detection.py)
TEST_TRANSFORMS = ("LoadImageFromFile", "Resize", "LoadAnnotations", "PackDetInputs")
DATA_PREPROCESSORS = ("DetDataPreprocessor", "ImgDataPreprocessor")


@dataclass(frozen=True)
class MMDet3TestConfig(TestConfig):
    """mmdetection 3.x's RetinaNet ``test_cfg``: 2.x's settings and ``min_bbox_size`` (boxes whose width or height
    is not above it are dropped before NMS; a negative value, upstream's default when the config has none,
    keeps every box)."""

    min_bbox_size: float = 0.0


def is_mmdet3_checkpoint(obj) -> bool:
    """Whether an mmdetection checkpoint's ``meta`` is mmengine's (``cfg``, ``dataset_meta``) rather than 2.x's
    (``config``, ``CLASSES``). A meta with both kinds is refused: which test arithmetic applies is unclear."""
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return False
    mmengine = [k for k in MMENGINE_META if k in meta]
    mmdet2 = [k for k in MMDET2_META if k in meta]
    if mmengine and mmdet2:
        raise CheckpointError(f"The checkpoint's meta has both mmdetection 2.x's {', '.join(mmdet2)} and mmengine's "
                              f"{', '.join(mmengine)} (mmdetection 3.x), so which framework's test arithmetic applies "
                              "is unclear.")
    return bool(mmengine)


# ---------------------------------------------------------------------------------------------
# the meta


@dataclass(frozen=True)
class MMDet3Settings:
    """How a 3.x checkpoint's config text (``meta['cfg']``) says to test it."""

    config_text: str
    preprocess: dict  # PreprocessConfig fields (convention "mmdet3")
    test_cfg: MMDet3TestConfig


def read_meta(meta: Mapping) -> MMDet3Settings:
    """The test settings of a 3.x meta's config text (one sentence for what is wrong); the class names are
    read by :func:`classes_of` once the head's number of classes is known."""
    text = meta.get("cfg")
    if text is None:
        raise CheckpointError("The checkpoint's meta (mmengine's, mmdetection 3.x) has no config text under cfg, which "
                              "says how 3.x tests the model (test scale, normalisation, padding, test_cfg); gradlens "
                              "does not guess them.")
    if not isinstance(text, str):
        raise CheckpointError(f"The checkpoint's meta cfg is {type(text).__name__}, not config text.")
    return MMDet3Settings(text, preprocess_settings(text), test_settings(text))


def classes_of(meta: Mapping, num_classes: int) -> list[str] | None:
    """``meta['dataset_meta']['classes']``: one name per class of the head, or None when the meta has none
    (mmdetection's ``init_detector`` then falls back to COCO's names). Its keys are read lowercased, as
    ``init_detector`` reads them (3.0's release candidates wrote ``CLASSES``)."""
    dataset_meta = meta.get("dataset_meta")
    if dataset_meta is None:
        return None
    if not isinstance(dataset_meta, Mapping):
        raise CheckpointError(f"The checkpoint's meta dataset_meta is {type(dataset_meta).__name__}, not a mapping "
                              "with the class names under classes.")
    classes = {str(k).lower(): v for k, v in dataset_meta.items()}.get("classes")
    if classes is None:
        return None
    if isinstance(classes, str) or not isinstance(classes, (list, tuple)) \
            or not all(isinstance(c, str) for c in classes):
        raise CheckpointError("The checkpoint's meta dataset_meta classes is not a list of class names.")
    if len(classes) != num_classes:
        raise CheckpointError(f"The checkpoint's meta dataset_meta classes lists {len(classes)} names, but its head "
                              f"(bbox_head.retina_cls) has {num_classes} classes.")
    return list(classes)


# ---------------------------------------------------------------------------------------------
# the config text


def _refuse_opaque(value, label: str, written: str | None = None):
    if isinstance(value, Opaque):
        raise CheckpointError(f"The checkpoint's config sets {label}={shorten(written or value.source)}, which is not a "
                              "literal value; gradlens reads config text as data and never evaluates it.")
    return value


def _get(owner: dict, key: str, label: str, default=None):
    """``owner[key]`` (or ``default``), refused in one sentence when it is no literal."""
    if key not in owner:
        return default
    return _refuse_opaque(owner[key], label, getattr(owner, "sources", {}).get(key))


def _written(owner: dict, key: str, default=None) -> str:
    """How ``key`` is written in the text (its default's repr where the text leaves it out)."""
    return shorten(getattr(owner, "sources", {}).get(key) or repr(owner.get(key, default)))


def _kind(transform: dict, label: str) -> str | None:
    """A transform's or module's ``type`` without its registry scope (``mmdet.Resize`` -> ``Resize``)."""
    kind = _get(transform, "type", f"{label} type")
    return kind.rsplit(".", 1)[-1] if isinstance(kind, str) else None


def _model(config: ConfigDict) -> dict:
    model = _refuse_opaque(config.get("model"), "model", config.sources.get("model"))
    if not isinstance(model, dict):
        raise CheckpointError("The checkpoint's config has no model dict, which mmdetection 3.x's config text has.")
    return model


def test_pipeline(config: ConfigDict) -> tuple[list, str]:
    """The transforms 3.x's test loop runs (``test_dataloader.dataset.pipeline``, else ``test_pipeline``) and
    how to name them."""
    loader = _refuse_opaque(config.get("test_dataloader"), "test_dataloader", config.sources.get("test_dataloader"))
    dataset = _get(loader, "dataset", "test_dataloader dataset") if isinstance(loader, dict) else None
    pipeline, label = None, "test_dataloader dataset pipeline"
    if isinstance(dataset, dict):
        pipeline = _get(dataset, "pipeline", label)
    if pipeline is None:
        label = "test_pipeline"
        pipeline = _refuse_opaque(config.get(label), label, config.sources.get(label))
    if pipeline is None:
        raise CheckpointError("The checkpoint's config has no test pipeline (test_dataloader dataset pipeline or "
                              "test_pipeline), which says how mmdetection 3.x resizes images for testing.")
    if not isinstance(pipeline, (list, tuple)) or not all(isinstance(t, dict) for t in pipeline):
        raise CheckpointError(f"The checkpoint's config sets {label} to {shorten(repr(pipeline))}, not a list of "
                              "transforms.")
    return list(pipeline), label


def _check_loading(transform: dict, label: str) -> None:
    for key, wanted in (("to_float32", False), ("color_type", "color"), ("imdecode_backend", "cv2")):
        value = _get(transform, key, f"{label} LoadImageFromFile {key}", wanted)
        if value != wanted:
            raise CheckpointError(f"The checkpoint's config sets {label} LoadImageFromFile "
                                  f"{key}={_written(transform, key)}; gradlens runs the default {key}={wanted!r} (a "
                                  "uint8 BGR image decoded by OpenCV).")


def _resize_sides(transform: dict, label: str) -> tuple[int, int]:
    """``Resize(scale=..., keep_ratio=True)``'s limits as (short side, long side): mmcv 2.x's ``rescale_size``
    fits the image within ``max(scale)`` x ``min(scale)``, whichever order the scale is written in."""
    name = f"{label} Resize"
    keep_ratio = _get(transform, "keep_ratio", f"{name} keep_ratio", False)
    if keep_ratio is not True:
        written = _written(transform, "keep_ratio", False)
        raise CheckpointError(f"The checkpoint's config sets {name} keep_ratio={written}; gradlens resizes keeping "
                              "the aspect ratio (keep_ratio=True, mmcv.imrescale) only.")
    for key, wanted in (("backend", "cv2"), ("interpolation", "bilinear")):
        value = _get(transform, key, f"{name} {key}", wanted)
        if value != wanted:
            raise CheckpointError(f"The checkpoint's config sets {name} {key}={_written(transform, key)}; gradlens "
                                  f"reproduces {key}={wanted!r} (OpenCV's uint8 bilinear) only.")
    scale = _get(transform, "scale", f"{name} scale")
    if scale is None:
        raise CheckpointError(f"The checkpoint's config's {name} has no scale (a scale_factor alone resizes by a "
                              "fixed factor); gradlens runs a test scale written as (long side, short side).")
    # Resize makes an int scale (s, s); a float one would be a scale factor for rescale_size
    sides = [scale] * 2 if isinstance(scale, int) and not isinstance(scale, bool) else \
        [whole_number(v) for v in scale] if isinstance(scale, (list, tuple)) else []
    if len(sides) != 2 or any(v is None or not 1 <= v <= MAX_TEST_SIDE for v in sides):
        raise CheckpointError(f"The checkpoint's config sets the test scale {name} scale={_written(transform, 'scale')}"
                              f"; it must be two whole numbers of pixels from 1 to {MAX_TEST_SIDE}.")
    return min(sides), max(sides)


def _numbers(owner: dict, key: str, label: str) -> list[float] | None:
    value = _get(owner, key, label)
    if value is None:
        return None
    numbers = list(value) if isinstance(value, (list, tuple)) else []
    if (len(numbers) not in (1, 3) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers)
            or not all(math.isfinite(v) for v in numbers) or (key == "std" and min(numbers) <= 0)):
        rule = "positive" if key == "std" else "finite"
        raise CheckpointError(f"The checkpoint's config sets {label}={_written(owner, key)}; it must be one or three "
                              f"{rule} numbers (in 0..255 units).")
    return [float(v) for v in numbers] * (3 if len(numbers) == 1 else 1)  # one value: every channel's


def preprocess_settings(config_text: str) -> dict:
    """The :class:`~gradlens.models.preprocessing.transform.PreprocessConfig` fields a 3.x config sets: the test pipeline's
    ``Resize`` scale and ``model.data_preprocessor``'s mean, std and ``pad_size_divisor``, convention ``"mmdet3"``.

    As upstream: a data preprocessor without ``mean``/``std`` does not normalise (mean 0, std 1), one value
    is every channel's, ``pad_size_divisor`` defaults to 1. Refused in one sentence: a value that is no
    literal, a BGR model (``bgr_to_rgb`` not True), a padding value other than 0, a resize that does not keep
    the ratio or is not OpenCV's bilinear, and any test transform but those of 3.x's RetinaNet test pipeline.
    """
    config = read_config(config_text)
    pipeline, label = test_pipeline(config)
    sides = None
    for transform in pipeline:
        kind = _kind(transform, f"{label} transform")
        if kind not in TEST_TRANSFORMS:
            raise CheckpointError(f"The checkpoint's config's {label} has a {shorten(str(transform.get('type')))} "
                                  f"transform; gradlens runs mmdetection 3.x's RetinaNet test pipeline "
                                  f"({', '.join(TEST_TRANSFORMS)}) and no other step.")
        if kind == "LoadImageFromFile":
            _check_loading(transform, label)
        elif kind == "Resize":
            if sides is not None:
                raise CheckpointError(f"The checkpoint's config's {label} resizes twice; gradlens runs one Resize.")
            sides = _resize_sides(transform, label)
    if sides is None:
        raise CheckpointError(f"The checkpoint's config's {label} has no Resize, so mmdetection 3.x tests images at "
                              "their own size; gradlens runs a test scale (Resize with scale and keep_ratio=True).")
    model = _model(config)
    pre = _get(model, "data_preprocessor", "model data_preprocessor")
    if not isinstance(pre, dict):
        raise CheckpointError("The checkpoint's config has no model data_preprocessor, where mmdetection 3.x "
                              "normalises and pads images, so gradlens cannot tell how.")
    name = "model data_preprocessor"
    kind = _kind(pre, name)
    if kind not in DATA_PREPROCESSORS:
        raise CheckpointError(f"The checkpoint's config's {name} is {shorten(str(pre.get('type')))}; gradlens runs "
                              f"{' and '.join(DATA_PREPROCESSORS)} only.")
    if _get(pre, "bgr_to_rgb", f"{name} bgr_to_rgb", False) is not True \
            or _get(pre, "rgb_to_bgr", f"{name} rgb_to_bgr", False) is not False:
        # caffe-style models see BGR images; gradlens feeds RGB, so their detections would be silently wrong
        raise CheckpointError(f"The checkpoint's config normalises BGR images ({name} bgr_to_rgb is not True); "
                              "gradlens runs RGB models only.")
    mean, std = _numbers(pre, "mean", f"{name} mean"), _numbers(pre, "std", f"{name} std")
    if (mean is None) != (std is None):
        raise CheckpointError(f"The checkpoint's config's {name} sets one of mean and std without the other, which "
                              "mmengine refuses.")
    divisor = _get(pre, "pad_size_divisor", f"{name} pad_size_divisor", 1)
    if whole_number(divisor) is None or not 1 <= divisor <= MAX_SIZE_DIVISOR:
        raise CheckpointError(f"The checkpoint's config sets {name} pad_size_divisor="
                              f"{_written(pre, 'pad_size_divisor')}; it must be a whole number from 1 to "
                              f"{MAX_SIZE_DIVISOR}.")
    pad_value = _get(pre, "pad_value", f"{name} pad_value", 0)
    if isinstance(pad_value, bool) or pad_value != 0:
        raise CheckpointError(f"The checkpoint's config sets {name} pad_value={_written(pre, 'pad_value')}; gradlens "
                              "pads with zeros (the default).")
    mean, std = mean or [0.0] * 3, std or [1.0] * 3  # no normalisation: (x - 0) / 1 is x, exactly
    return {"min_size": sides[0], "max_size": sides[1], "size_divisor": int(divisor),
            "mean": tuple(v / 255 for v in mean), "std": tuple(v / 255 for v in std), "convention": CONVENTION}


def test_settings(config_text: str) -> MMDet3TestConfig:
    """``model.test_cfg`` as 3.x's ``BaseDenseHead`` reads it: ``nms_pre``, ``score_thr`` (default 0), ``nms``
    (``type='nms'``), ``max_per_img`` and ``min_bbox_size`` (default -1, no filter)."""
    model = _model(read_config(config_text))
    cfg = _get(model, "test_cfg", "model test_cfg")
    if not isinstance(cfg, dict):
        raise CheckpointError("The checkpoint's config has no model test_cfg, which sets mmdetection 3.x's score "
                              "threshold, NMS and detections per image.")
    name = "model test_cfg"

    def whole(key: str) -> int:
        value = _get(cfg, key, f"{name} {key}")
        if whole_number(value) is None or value < 1:
            raise CheckpointError(f"The checkpoint's config sets {name} {key}={_written(cfg, key)}; gradlens needs a "
                                  "whole number from 1.")
        return int(value)

    def number(owner: dict, key: str, label: str, default, low: float, high: float) -> float:
        value = _get(owner, key, label, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            raise CheckpointError(f"The checkpoint's config sets {label}={_written(owner, key)}; it must be a number "
                                  f"from {low:g} to {high:g}.")
        return float(value)

    nms = _get(cfg, "nms", f"{name} nms")
    if not isinstance(nms, dict) or _kind(nms, f"{name} nms") != "nms":
        raise CheckpointError(f"The checkpoint's config sets {name} nms={_written(cfg, 'nms')}; gradlens runs "
                              "dict(type='nms', iou_threshold=...) only.")
    if _get(nms, "class_agnostic", f"{name} nms class_agnostic", False) is not False:
        raise CheckpointError(f"The checkpoint's config sets {name} nms class_agnostic="
                              f"{_written(nms, 'class_agnostic')}; gradlens runs class-wise NMS.")
    return MMDet3TestConfig(score_thr=number(cfg, "score_thr", f"{name} score_thr", 0, 0, 1),
                            nms_pre=whole("nms_pre"),
                            nms_iou=number(nms, "iou_threshold", f"{name} nms iou_threshold", None, 0, 1),
                            max_per_img=whole("max_per_img"),
                            min_bbox_size=number(cfg, "min_bbox_size", f"{name} min_bbox_size", -1, -math.inf,
                                                 math.inf))


# ---------------------------------------------------------------------------------------------
# the detector


class MMDet3RetinaNet(RetinaNetDetector):
    """A RetinaNet run as mmdetection 3.x runs it: 2.x's network, anchors, assignment and loss, 3.x's
    post-processing (``BaseDenseHead._predict_by_feat_single`` and ``_bbox_post_process``)."""

    @property
    def framework(self) -> str:
        return "torchvision" if self.preprocess.convention == "torchvision" else "mmdetection"

    def _detections(self, outputs, levels, counts, images, sizes) -> list[dict[str, Tensor]]:
        if self.framework == "torchvision":
            return super()._detections(outputs, levels, counts, images, sizes)
        cls = outputs["cls_logits"].float().split(counts, dim=1)
        reg = outputs["bbox_regression"].float().split(counts, dim=1)
        results = []
        for i, (image, size) in enumerate(zip(images, sizes)):
            height, width = image.shape[-2:]
            # mmcv's Resize: scale_factor = (new_w / w, new_h / h) as Python floats; scale_boxes multiplies by
            # boxes.new_tensor([1 / s for s in scale_factor]) (float32)
            inverse = torch.tensor([1 / (size[1] / width), 1 / (size[0] / height)] * 2, dtype=torch.float32,
                                   device=levels[0].device)
            results.append(self._postprocess_3x([c[i] for c in cls], [r[i] for r in reg], levels, size, inverse))
        return results

    def _postprocess_3x(self, cls_levels, reg_levels, anchor_levels, size, inverse) -> dict[str, Tensor]:
        cfg = self.test_cfg
        boxes, scores, labels = self._level_candidates(cls_levels, reg_levels, anchor_levels, size)
        boxes = boxes * inverse  # (decoding all levels at once, as 3.x does, is the same elementwise)
        min_size = getattr(cfg, "min_bbox_size", -1)
        if min_size >= 0:
            valid = (boxes[:, 2] - boxes[:, 0] > min_size) & (boxes[:, 3] - boxes[:, 1] > min_size)
            if not bool(valid.all()):
                boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
        return self._nms(boxes, scores, labels)


def as_mmdet3(detector: RetinaNetDetector) -> MMDet3RetinaNet:
    """The same detector (same modules and weights) run with mmdetection 3.x's post-processing."""
    if type(detector) not in (RetinaNetDetector, MMDet3RetinaNet):
        raise TypeError(f"cannot run a {type(detector).__name__} as an mmdetection 3.x RetinaNet")
    detector.__class__ = MMDet3RetinaNet
    return detector
