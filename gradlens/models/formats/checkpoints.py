"""Loading and saving detectors: gradlens' own files, torchvision state dicts, mmdetection 2.x and 3.x and
detectron2 checkpoints.

Loading is safe by default: ``torch.load(weights_only=True)`` unpickles only
tensors and plain containers. A file that needs arbitrary code to unpickle is
refused unless the caller says it is trusted. Weights are loaded strictly; a
checkpoint that does not fit its architecture is refused with the keys that
differ, never silently half-loaded.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from gradlens._version import __version__
from gradlens.errors import CheckpointError, GradlensError
from gradlens.fileio import atomic_path, require_file
from gradlens.models.formats import detectron2, mmdet, mmdet3
from gradlens.models.detectors.rcnn import TORCHVISION_TWO_STAGE, rcnn_from_state_dict
from gradlens.models.detectors.mask2former import MASK2FORMER_ARCHITECTURES, build_mask2former
from gradlens.models.registry import (ARCHITECTURES, DETR_ARCHITECTURES, TWO_STAGE_ARCHITECTURES, TooFewBackboneMaps,
                                      architecture, build_deformable_detr, build_detector, build_two_stage)
from gradlens.models.detectors.retinanet import RetinaNetDetector, TestConfig
from gradlens.models.preprocessing.transform import PreprocessConfig

FORMAT = "gradlens-detector"
FORMAT_VERSION = 1


def default_categories(num_classes: int) -> list[dict]:
    return [{"id": i + 1, "name": f"class_{i + 1}"} for i in range(num_classes)]


def save_detector(detector: RetinaNetDetector, path: str | os.PathLike, categories: list[dict] | None = None) -> Path:
    """Write a detector in gradlens' format: architecture, options, categories, settings and weights in one file.

    Everything in it is a tensor or a plain container, so it loads with
    ``weights_only=True``.
    """
    cats = categories or getattr(detector, "categories", None) or default_categories(detector.num_classes)
    if len(cats) != detector.num_classes:
        raise GradlensError(f"{len(cats)} categories were given for a detector with {detector.num_classes} classes.")
    settings = detector.test_cfg if hasattr(detector, "test_cfg") else getattr(detector, "config", None)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gradlens_version": __version__,
        "arch": detector.arch_name,
        "options": _plain(detector.arch_options),
        "num_classes": detector.num_classes,
        "categories": [{"id": None if c["id"] is None else int(c["id"]), "name": str(c["name"])} for c in cats],
        "preprocess": _plain(detector.preprocess.to_dict()),
        "test_cfg": settings.to_dict() if settings is not None else {},
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in detector.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _plain(obj):
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def read_checkpoint(path: str | os.PathLike, trust: bool = False):
    """Unpickle a checkpoint file safely, turning every failure into one sentence."""
    path = require_file(path, "checkpoint")
    if path.suffix.lower() == ".pkl":  # detectron2's model-zoo pickles of numpy arrays (its own rule: by the name's suffix)
        return detectron2.read_pkl(path, trust=trust)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        # torch names a refused global as "Unsupported global: ..." or "unsupported GLOBAL posix.system whose
        # module posix is blocked": both mean the file holds more than tensors ("Unsupported operand" is garbage)
        if "Weights only load failed" in text and "unsupported global" in text.lower():
            if not trust:
                raise CheckpointError(
                    f"{path} needs arbitrary code to unpickle (it is not plain tensors and containers); "
                    "pass --trust-checkpoint (trust=True) only if you trust its source."
                ) from None
            return _load_trusted(path)
        raise CheckpointError(f"{path} is damaged or truncated and cannot be read as a PyTorch checkpoint.") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError, IndexError, KeyError, TypeError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, EOFError) and "zip" not in str(exc).lower():
            raise CheckpointError(f"{path} cannot be read: {exc.strerror or exc}.") from None
        raise CheckpointError(f"{path} is damaged or truncated and cannot be read as a PyTorch checkpoint.") from None


def _load_trusted(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # arbitrary unpickling can fail in arbitrary ways
        raise CheckpointError(f"{path} could not be unpickled even as a trusted file ({type(exc).__name__}: {exc}).") from None


def _state_dict_of(obj) -> Mapping[str, Tensor] | None:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
    return None


def load_detector(path: str | os.PathLike, arch: str | None = None, trust: bool = False, device: str | torch.device = "cpu",
                  categories: list[dict] | None = None) -> RetinaNetDetector:
    """A ready detector (eval mode, on ``device``) from any supported checkpoint file.

    - gradlens' format (written by :func:`save_detector`): everything is in the file;
    - an mmdetection 2.x RetinaNet checkpoint: the architecture is recognised from its keys; likewise the CEDNet
      fork's Mask R-CNN and Cascade Mask R-CNN (:mod:`gradlens.models.detectors.mmdet_rcnn`);
    - an mmdetection 3.x one (mmengine's ``meta``: ``cfg``, ``dataset_meta``): the same keys, run with 3.x's
      test arithmetic (:mod:`gradlens.models.formats.mmdet3`);
    - a detectron2 RetinaNet (a model-zoo ``.pkl`` or a ``DetectionCheckpointer`` ``.pth``): recognised from its
      keys, run with detectron2's arithmetic (:mod:`gradlens.models.formats.detectron2`);
    - a torchvision state dict: ``arch`` must name the architecture.

    ``categories`` (``[{"id", "name"}]`` in label order) overrides the label mapping.
    """
    from gradlens.device import resolve_device

    path = Path(path)
    device = resolve_device(device)
    detector = detector_from_object(read_checkpoint(path, trust=trust), path, arch=arch)
    if categories is not None:
        if len(categories) != detector.num_classes:
            raise GradlensError(f"{len(categories)} categories were given for a detector with {detector.num_classes} classes.")
        detector.categories = [dict(c) for c in categories]
    detector.load_options = {"arch": arch, "trust": bool(trust)}  # how to load it again (another torchrun rank)
    return detector.to(device).eval()


def detector_from_object(obj, path: str | os.PathLike, arch: str | None = None) -> RetinaNetDetector:
    """Build the detector an unpickled checkpoint describes (``path`` names it in messages)."""
    path = Path(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        detector = _from_native(obj, path)
        source = "gradlens"
    elif mmdet.is_mmdet_checkpoint(obj):
        with _naming(path):
            three = mmdet3.is_mmdet3_checkpoint(obj)
        detector = _from_mmdet(obj, path, arch, three)
        source = mmdet3.FORMAT if three else "mmdetection"
    elif detectron2.is_detectron2_checkpoint(obj):
        detector = _from_detectron2(obj, path, arch)
        source = detectron2.FORMAT
    else:
        state = _state_dict_of(obj)
        if state is None:
            raise CheckpointError(f"{path} holds no state dict gradlens recognises (not a gradlens, torchvision or mmdetection checkpoint).")
        if arch is None:
            raise CheckpointError(f"{path} is a plain state dict; name its architecture with --arch (one of "
                                  f"{', '.join([*ARCHITECTURES, *TORCHVISION_TWO_STAGE])}).")
        detector = _from_torchvision(state, path, arch)
        source = "torchvision"
    detector.checkpoint_path = path
    detector.checkpoint_format = source
    return detector.eval()


# The only entries of a checkpoint that hold integers (batch norm's counter, Swin's index table); every
# parameter and every other buffer holds real numbers.
INTEGER_BUFFERS = ("num_batches_tracked", "relative_position_index")


def _a(name: str) -> str:
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def check_tensors(state, path) -> Mapping[str, Tensor]:
    """A checkpoint's state dict, checked before any of its keys or shapes is read: parameter names (text) to
    dense tensors of real numbers (integers only in :data:`INTEGER_BUFFERS`), all finite.

    ``load_state_dict`` would cast integer, boolean or complex tensors silently and fail with a page of text on
    a number or a list; each of these is refused here in one sentence naming the key as the file spells it.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: its state dict is {_a(type(state).__name__)}, not a mapping of parameter "
                              "names to tensors.")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: its state dict has the key {key!r}, which is not a parameter name (text).")
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: {key} holds {_a(type(value).__name__)} where a tensor belongs.")
        if value.layout != torch.strided or value.is_quantized:
            kind = "quantized" if value.is_quantized else str(value.layout).removeprefix("torch.")
            raise CheckpointError(f"{path}: {key} is {_a(kind)} tensor, not a dense tensor of numbers.")
        if key.endswith(INTEGER_BUFFERS):
            continue
        if not value.is_floating_point():
            raise CheckpointError(f"{path}: {key} holds {str(value.dtype).removeprefix('torch.')} values where a "
                                  "floating-point tensor belongs.")
        if value.device.type == "meta":  # shapes only (no values to check): refused by load_strict, which needs values
            continue
        # a sum is one fast pass and is NaN or infinite when any value is; only then is each value looked at
        if not math.isfinite(float(value.sum(dtype=torch.float64))) and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: {key} holds NaN or infinite values.")
    return state


def _from_native(obj: Mapping, path: Path) -> RetinaNetDetector:
    try:
        name, num_classes, state = obj["arch"], int(obj["num_classes"]), obj["state_dict"]
        preprocess = PreprocessConfig.from_dict(obj["preprocess"])
        three = preprocess.convention == mmdet3.CONVENTION  # an mmdetection 3.x checkpoint, converted
        # a two-stage architecture fixes its test and training settings (RCNNConfig) by its name
        test_cfg = None if name in (*TWO_STAGE_ARCHITECTURES, *DETR_ARCHITECTURES, *MASK2FORMER_ARCHITECTURES) else \
            (mmdet3.MMDet3TestConfig if three else TestConfig)(**obj.get("test_cfg", {}))
        cats = list(obj["categories"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is a gradlens checkpoint with a damaged header ({exc}).") from None
    p = preprocess
    if problem := mmdet.check_preprocess(p.min_size, p.max_size, p.size_divisor, p.mean, p.std):
        raise CheckpointError(f"{path} is a gradlens checkpoint whose preprocessing setting {problem}.")
    check_tensors(state, path)
    if name in TWO_STAGE_ARCHITECTURES or name in DETR_ARCHITECTURES or name in MASK2FORMER_ARCHITECTURES:
        # the architecture fixes its test and training settings
        build = (build_two_stage if name in TWO_STAGE_ARCHITECTURES else
                 build_deformable_detr if name in DETR_ARCHITECTURES else build_mask2former)
        detector = build(name, num_classes, obj.get("options") or {}, preprocess=preprocess)
        load_strict(detector, state, path)
        detector.categories = checked_categories(cats, num_classes, path)
        return detector
    detector = build_detector(name, num_classes, obj.get("options") or {}, preprocess=preprocess, test_cfg=test_cfg)
    if three:
        detector = mmdet3.as_mmdet3(detector)
    load_strict(detector, state, path)
    detector.categories = checked_categories(cats, num_classes, path)
    return detector


def checked_categories(cats, num_classes: int, path) -> list[dict]:
    """A checkpoint's label -> category list, one entry per class, each an integer id (or none) and a name."""
    if len(cats) != num_classes:
        raise CheckpointError(f"{path} lists {len(cats)} categories for a detector with {num_classes} classes.")
    checked = []
    for label, c in enumerate(cats):
        cid = c.get("id") if isinstance(c, Mapping) else "?"
        if not (cid is None or (isinstance(cid, int) and not isinstance(cid, bool))):
            raise CheckpointError(f"{path} gives label {label} the category id {cid!r}; ids must be integers.")
        checked.append({"id": cid, "name": str(c.get("name", f"class_{label}"))})
    return checked


def _from_torchvision(state: Mapping[str, Tensor], path: Path, arch_name: str) -> RetinaNetDetector:
    if arch_name in TORCHVISION_TWO_STAGE:  # Faster/Mask R-CNN: torchvision's modules, the expected loss
        check_tensors(state, path)
        return rcnn_from_state_dict(state, arch_name, str(path))
    arch = architecture(arch_name)
    check_tensors(state, path)
    key = "head.classification_head.cls_logits.weight"
    if key not in state:
        raise CheckpointError(f"{path} is not a RetinaNet state dict (it has no {key}).")
    anchors = 9
    if state[key].ndim != 4 or state[key].shape[0] < anchors or state[key].shape[0] % anchors:
        raise CheckpointError(f"{path}: {key} has shape {tuple(state[key].shape)}, not a convolution's with {anchors} "
                              "anchors per class (classes x 9, channels, 3, 3).")
    num_classes = int(state[key].shape[0]) // anchors
    options = {}
    if arch.family in mmdet.TABLE_A1_FAMILIES:  # the same keys as their mmdetection layout: read the options there
        try:
            as_mmdet = mmdet.to_mmdet(state)
        except KeyError as exc:
            raise CheckpointError(f"{path} does not fit {arch_name} ({exc.args[0]}).") from None
        with _naming(path):
            options = mmdet.family_options(arch.family, as_mmdet, path, arch_name)
    elif arch.family in ("convnext", "swin"):
        options["out_indices"] = [i for i in range(4) if f"backbone.body.norm{i}.weight" in state]
        if not options["out_indices"]:
            raise CheckpointError(f"{path} does not fit {arch_name}: its weights have no {arch.family} stage outputs "
                                  "(backbone.body.norm<i>); is it a state dict of another architecture?")
    try:
        detector = build_detector(arch_name, num_classes, options)
    except TooFewBackboneMaps:
        raise _too_few_maps(path, arch_name, options) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path} does not fit {arch_name} ({exc}).") from None
    load_strict(detector, state, path)
    if arch_name.startswith("torchvision_") and num_classes == 91:
        from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

        names = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
        # label == COCO id; the placeholders ('N/A', background) have no category and their detections are dropped
        detector.categories = [{"id": None if n in ("N/A", "__background__") else i, "name": n} for i, n in enumerate(names)]
    else:
        detector.categories = default_categories(num_classes)
    return detector


def _too_few_maps(path, name: str, options: Mapping) -> CheckpointError:
    stages = list(options.get("out_indices", []))
    return CheckpointError(f"{path}: its {name} backbone has {len(stages)} output stage(s) {stages}, but gradlens runs "
                           "these RetinaNets with mmdetection's FPN on the last three backbone maps, so it needs three.")


@contextlib.contextmanager
def _naming(path):
    """Say which file a sentence about "the checkpoint" is about (``select`` reads two or more)."""
    try:
        yield
    except CheckpointError as exc:
        text = str(exc)
        if text.startswith(str(path)):
            raise
        text = "its " + text[len("The checkpoint's "):] if text.startswith("The checkpoint's ") else text[:1].lower() + text[1:]
        raise CheckpointError(f"{path}: {text}") from None


def _from_mmdet(obj: Mapping, path: Path, arch_hint: str | None, three: bool = False) -> RetinaNetDetector:
    """An mmdetection RetinaNet: 2.x's (``meta['config']``, ``meta['CLASSES']``) or, with ``three``, 3.x's
    (``meta['cfg']``, ``meta['dataset_meta']['classes']``, its test arithmetic; :mod:`gradlens.models.formats.mmdet3`)."""
    from dataclasses import replace

    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    state = obj.get("state_dict", obj)
    for is_family, recognise, build, kind, runs in _FORK_FAMILIES:
        if isinstance(state, Mapping) and is_family(state):
            if three:
                raise CheckpointError(f"{path} is an mmdetection 3.x {kind}; gradlens runs the {runs} of mmdetection "
                                      "2.x (the CEDNet fork's).")
            return _from_mmdet_recognised(check_tensors(state, path), meta, path, arch_hint, recognise, build)
    if three:  # the config text first: it is cheaper to read than the weights
        with _naming(path):
            settings = mmdet3.read_meta(meta)
    state = check_tensors(obj.get("state_dict", obj), path)
    with _naming(path):
        name, options = mmdet.recognise(state)
    if arch_hint is not None and arch_hint != name:
        raise CheckpointError(f"{path} holds a {name} (recognised from its weights), not the {arch_hint} named by --arch.")
    num_classes = mmdet.num_classes_of(state)
    preprocess, test_cfg = architecture(name).preprocess, None
    if three:
        with _naming(path):
            classes = mmdet3.classes_of(meta, num_classes)
        config, test_cfg = settings.config_text, settings.test_cfg
        preprocess = replace(preprocess, **settings.preprocess)
    else:
        config = meta.get("config") if isinstance(meta.get("config"), str) else None
        classes = meta.get("CLASSES")
        with _naming(path):
            hints = mmdet.preprocess_hints(config)
        if hints:
            preprocess = replace(preprocess, **hints)
    try:
        detector = build_detector(name, num_classes, options, preprocess=preprocess, test_cfg=test_cfg)
    except TooFewBackboneMaps:
        raise _too_few_maps(path, name, options) from None
    if three:
        detector = mmdet3.as_mmdet3(detector)
    mmdet.check_fpn_inputs(state, detector, path, name)
    load_strict(detector, mmdet.to_gradlens(state), path)
    detector.categories = _mmdet_categories(num_classes, classes)
    detector.config_backbone_type = mmdet.backbone_type_hint(config)
    return detector


def _mmdet_categories(num_classes: int, classes) -> list[dict]:
    """An mmdetection checkpoint's categories: COCO's 80 (with its class names when it has them), else numbered
    from 1 with its names where they fit."""
    if num_classes == 80:
        return mmdet.coco80_categories(list(classes) if classes is not None else None)
    names = list(classes) if classes is not None and len(classes) == num_classes else None
    return [{"id": i + 1, "name": str(names[i]) if names else f"class_{i + 1}"} for i in range(num_classes)]


# The fork's mmdetection 2.x detectors other than RetinaNets: how each is told from its keys, recognised and built,
# and what an mmdetection 3.x checkpoint of it is called in the refusal.
_FORK_FAMILIES = (
    (mmdet.is_two_stage, mmdet.recognise_two_stage, build_two_stage, "two-stage detector", "two-stage detectors"),
    (mmdet.is_mask2former, mmdet.recognise_mask2former, build_mask2former, "Mask2Former", "Mask2Former"),
    (mmdet.is_deformable_detr, mmdet.recognise_deformable_detr, build_deformable_detr, "Deformable DETR",
     "Deformable DETR"),
)


def _from_mmdet_recognised(state: Mapping[str, Tensor], meta: Mapping, path: Path, arch_hint: str | None,
                           recognise, build):
    """An mmdetection 2.x detector of the CEDNet fork other than a RetinaNet (Mask R-CNN and Cascade Mask R-CNN,
    :mod:`~gradlens.models.detectors.mmdet_rcnn`; Deformable DETR, :mod:`~gradlens.models.detectors.deformable_detr`;
    Mask2Former, :mod:`~gradlens.models.detectors.mask2former`): ``recognise(state)`` names the architecture from
    its keys, ``build`` makes it; test-time hints come from the config text and every weight loads under its own
    name."""
    from dataclasses import replace

    with _naming(path):
        name, options, num_classes = recognise(state)
    if arch_hint is not None and arch_hint != name:
        raise CheckpointError(f"{path} holds a {name} (recognised from its weights), not the {arch_hint} named by --arch.")
    config = meta.get("config") if isinstance(meta.get("config"), str) else None
    with _naming(path):
        hints = mmdet.preprocess_hints(config)
    try:
        detector = build(name, num_classes, options)
    except TooFewBackboneMaps as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    detector.preprocess = replace(detector.preprocess, **hints)
    load_strict(detector, state, path)
    detector.categories = _things_and_stuff(detector, meta.get("CLASSES"))
    detector.config_backbone_type = mmdet.backbone_type_hint(config)
    return detector


def _things_and_stuff(detector, classes) -> list[dict]:
    """An mmdetection checkpoint's categories (:func:`_mmdet_categories`) for its detectable (thing) classes; a
    panoptic checkpoint's stuff classes have no category id (gradlens never detects or scores them)."""
    things = getattr(detector, "num_things", detector.num_classes)
    names = list(classes) if classes is not None and len(classes) == detector.num_classes else None
    if things == detector.num_classes:
        return _mmdet_categories(things, classes)
    cats = _mmdet_categories(things, names[:things] if names else None)
    return cats + [{"id": None, "name": str(names[i]) if names else f"stuff_{i - things + 1}"}
                   for i in range(things, detector.num_classes)]


def _from_detectron2(obj, path: Path, arch_hint: str | None) -> RetinaNetDetector:
    """A detectron2 RetinaNet: weights under ``model`` (numpy arrays from a ``.pkl``, tensors from a ``.pth``)."""
    with _naming(path):
        state = check_tensors(detectron2.state_of(obj), path)
        name, options, num_classes = detectron2.recognise(state)
    if arch_hint is not None and arch_hint != name:
        raise CheckpointError(f"{path} holds a {name} (recognised from its weights), not the {arch_hint} named by --arch.")
    detector = build_detector(name, num_classes, options)
    load_strict(detector, detectron2.to_gradlens(state), path)
    # detectron2's COCO labels are the 80 categories in the order of their ids, as mmdetection's
    detector.categories = mmdet.coco80_categories() if num_classes == 80 else default_categories(num_classes)
    return detector


def load_strict(detector: torch.nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """Load every weight or none: missing, unexpected and mis-shaped keys are named in the error."""
    own = detector.state_dict()
    # buffers some layouts keep and gradlens recomputes or does not track (frozen BN, Swin's index table)
    state = {k: v for k, v in state.items() if k in own or not k.endswith(("num_batches_tracked", "relative_position_index"))}
    # and the counters a live batch norm keeps but that inference never reads (torch's own loader accepts their absence)
    state.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state})
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and isinstance(state[k], Tensor) and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape (e.g. {'; '.join(mismatched[:3])})")
    if problems:
        raise CheckpointError(f"{path} does not fit {detector.arch_name}: {'; '.join(problems)}.")
    if shapes_only := next((k for k, v in state.items() if isinstance(v, Tensor) and v.device.type == "meta"), None):
        raise CheckpointError(f"{path}: {shapes_only} is a tensor of the meta device (a shape without values).")
    detector.load_state_dict(state, strict=True)
