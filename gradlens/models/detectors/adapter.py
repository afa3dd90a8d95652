"""Bring your own detector: a torch model of your own as a :class:`gradlens.Detector`.

:class:`LossDictDetector` wraps any ``nn.Module`` that follows torchvision's detection convention:

- in eval mode, ``model(images)`` takes a list of ``[3, H, W]`` float RGB images in [0, 1] at their original
  size and returns one dict per image with ``boxes`` (xyxy, original pixels), ``scores`` and ``labels``;
- in training mode, ``model(images, targets)`` (``targets[i]``: ``boxes`` xyxy in original pixels, ``labels``)
  returns a dict of named loss tensors.

torchvision's own detection models (FCOS, RetinaNet, SSD...) do both, and so do many research models. The
wrapped model does its own preprocessing (resize, normalisation, padding): gradients reach the original
pixels through it, whatever it is, as long as it is made of differentiable torch operations.

The rules that make the wrapped model's loss DESIGN's *total detection loss*:

- **One image at a time.** Each image's loss is the model's training loss of a batch of that image alone, so
  no image's loss or map depends on its batch mates (a torchvision model normalises a batch's loss by the
  batch's number of positives). Detections are made one image at a time too.
- **The loss path in training mode, every random or batch-dependent layer in inference mode.** The loss is
  computed on a *view* of the model: a shallow copy of its module tree that shares every parameter and buffer
  and differs only in the ``training`` flags. The view is in training mode except for every normalisation
  layer (batch, group, layer, instance and RMS norms, torchvision's ``FrozenBatchNorm2d``, and any class
  whose name ends in ``Norm``/``Norm2d``), every dropout, drop-path and stochastic-depth layer, and
  torchvision's ``GeneralizedRCNNTransform`` (whose training-mode resize draws a random size), with their
  submodules: the same rule as ``model.train()`` followed by ``.eval()`` on each of those. Detections use an
  all-eval view. The model's own flags are never changed, so threads may share one detector.
- **No random loss.** A training loss computed on a random sample (torchvision's Faster/Mask R-CNN sample
  proposals and RoIs) would make a map depend on a draw; such models are refused when wrapped.
- **No per-object split.** A loss dict is one total per image: ``object_losses`` (``--target object``) is
  refused in one sentence (:class:`NoObjectSplitError`).
- **Identity.** :attr:`LossDictDetector.identity_sha256` is a SHA-256 of the model's module classes, their
  plain settings (score thresholds, sizes...) and every parameter and buffer, computed when asked: it is
  what the pipeline keys cached detections and stored maps by, so the maps of other weights are never reused.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from gradlens.errors import GradlensError
from gradlens.models.preprocessing.transform import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig

# class names of layers that behave differently in training mode but are no part of the loss path
_INFERENCE_NAMES = re.compile(r"Norm(\d+d)?$|Dropout|DropPath|DropBlock|StochasticDepth")
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_compiled_call_impl"}
_PLAIN = (type(None), bool, int, float, str)


class NoObjectSplitError(GradlensError):
    """A per-object map (``--target object``) asked of a detector whose loss does not split by object."""


def torchvision_coco_categories() -> list[dict]:
    """The categories of torchvision's COCO detection models: 91 labels that *are* COCO category ids.

    Label 0 (``__background__``) and the ten ``N/A`` labels are no category (``"id": None``), so their
    detections are left out of results files, as for gradlens' torchvision RetinaNets.
    """
    from torchvision.models.detection import FCOS_ResNet50_FPN_Weights

    names = FCOS_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return [{"id": None if n in ("N/A", "__background__") else i, "name": n} for i, n in enumerate(names)]


def keeps_inference_mode(module: nn.Module) -> bool:
    """Whether the loss view keeps ``module`` (and its submodules) in inference mode: normalisation, dropout,
    drop-path and stochastic-depth layers, and torchvision's ``GeneralizedRCNNTransform``."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    from torchvision.ops import FrozenBatchNorm2d, StochasticDepth

    kinds = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
             nn.modules.dropout._DropoutNd, FrozenBatchNorm2d, StochasticDepth, GeneralizedRCNNTransform)
    if hasattr(nn, "RMSNorm"):
        kinds = kinds + (nn.RMSNorm,)
    return isinstance(module, kinds) or bool(_INFERENCE_NAMES.search(type(module).__name__))


def mode_view(model: nn.Module, training: bool, keep: Callable[[nn.Module], bool] = keeps_inference_mode) -> nn.Module:
    """A shallow copy of ``model``'s module tree with its own ``training`` flags, sharing every parameter, buffer
    and setting with ``model`` (the same dicts): ``training`` everywhere except in the modules ``keep`` names
    and below them (all in inference mode when ``training`` is False). ``model`` itself is not changed."""
    memo: dict[int, nn.Module] = {}

    def view(module: nn.Module, inference: bool) -> nn.Module:
        if id(module) in memo:  # a module registered twice (tied weights) stays one module
            return memo[id(module)]
        inference = inference or keep(module)
        copy = type(module).__new__(type(module))
        copy.__dict__.update(module.__dict__)
        copy.__dict__.pop("_compiled_call_impl", None)
        copy.__dict__["training"] = not inference
        memo[id(module)] = copy
        copy.__dict__["_modules"] = {name: None if child is None else view(child, inference)
                                     for name, child in module._modules.items()}
        return copy

    return view(model, not training)


def _plain(value, depth: int = 0):
    """A JSON-able form of a setting (numbers, text, and lists, tuples and dicts of them; the plain attributes of a
    small settings object such as a box coder), or ``...`` for anything else (tensors, modules, functions)."""
    if isinstance(value, _PLAIN):
        return value
    if depth > 3:
        return ...
    if isinstance(value, (list, tuple)):
        items = [_plain(v, depth + 1) for v in value]
        return ... if any(v is ... for v in items) else items
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return ...
        items = {k: _plain(v, depth + 1) for k, v in value.items()}
        return ... if any(v is ... for v in items.values()) else items
    if isinstance(value, (Tensor, nn.Module)) or callable(value) or not hasattr(value, "__dict__"):
        return ...
    fields = {k: _plain(v, depth + 1) for k, v in sorted(vars(value).items()) if not k.startswith("_")}
    return {"class": f"{type(value).__module__}.{type(value).__qualname__}",
            **{k: v for k, v in fields.items() if v is not ...}}


def module_sha256(module: nn.Module) -> str:
    """SHA-256 of a module as it computes: each submodule's class and public plain settings (thresholds, sizes,
    strides...), and every parameter and buffer (name, dtype, shape, bytes; memory layout and device aside)."""
    digest = hashlib.sha256()
    for name, sub in module.named_modules(remove_duplicate=False):
        settings = {k: _plain(v) for k, v in sorted(vars(sub).items())
                    if k not in _MODULE_INTERNALS and not k.startswith("_")}
        record = {"module": name, "class": f"{type(sub).__module__}.{type(sub).__qualname__}",
                  "settings": {k: v for k, v in settings.items() if v is not ...}}
        digest.update(json.dumps(record, sort_keys=True, default=repr).encode() + b"\n")
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name} {data.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def detector_sha256(detector: nn.Module) -> str:
    """The content digest a detector object is keyed by (caches, map stores, the manifest):
    its own ``identity_sha256`` where it has one, else :func:`module_sha256`."""
    own = getattr(detector, "identity_sha256", None)
    return own if isinstance(own, str) else module_sha256(detector)


def detector_label(detector) -> str:
    """A short name of a detector object for tables and legends."""
    for attr in ("name", "arch_name"):
        value = getattr(detector, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(detector).__name__


def _describe(value) -> str:
    if isinstance(value, dict):
        kinds = sorted({type(v).__name__ for v in value.values()})
        return f"a dict of {', '.join(kinds) or 'nothing'}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _random_samplers(model: nn.Module) -> list[str]:
    """Submodules whose training loss is computed on a random sample (torchvision's proposal and RoI samplers)."""
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

    return [name or type(model).__name__ for name, m in model.named_modules()
            if any(isinstance(v, BalancedPositiveNegativeSampler) for v in vars(m).values())]


def _categories(categories) -> list[dict]:
    if isinstance(categories, (str, bytes)) or not isinstance(categories, Sequence) or not categories:
        raise GradlensError("categories must be a non-empty list with one entry per label, in label order: "
                            "{'id': ..., 'name': ...} or None for a label that is no category.")
    out, seen = [], set()
    for label, c in enumerate(categories):
        if c is None:
            c = {"id": None, "name": "N/A"}
        if not isinstance(c, dict) or "id" not in c:
            raise GradlensError(f"Category {label} is {c!r}; each label needs {{'id': ..., 'name': ...}} (or None).")
        cid = c["id"]
        if cid is not None and (isinstance(cid, bool) or not isinstance(cid, int)):
            raise GradlensError(f"Category {label} has the id {cid!r}; category ids are whole numbers (or None).")
        if cid is not None and cid in seen:
            raise GradlensError(f"The category id {cid} is given to two labels; each dataset category has one label.")
        seen.add(cid)
        out.append({"id": cid, "name": str(c.get("name", cid))})
    return out


def _preprocess_of(model: nn.Module) -> PreprocessConfig:
    """What the model's own ``GeneralizedRCNNTransform`` does, as gradlens describes preprocessing; for any other
    model, torchvision's defaults (ImageNet mean and std)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transform = getattr(model, "transform", None)
    if isinstance(transform, GeneralizedRCNNTransform):
        min_size = transform.min_size if isinstance(transform.min_size, int) else transform.min_size[-1]
        return PreprocessConfig(min_size=int(min_size), max_size=int(transform.max_size),
                                mean=tuple(float(v) for v in transform.image_mean),
                                std=tuple(float(v) for v in transform.image_std),
                                size_divisor=int(transform.size_divisible), convention="torchvision")
    return PreprocessConfig(mean=IMAGENET_MEAN, std=IMAGENET_STD, convention="torchvision")


class LossDictDetector(nn.Module):
    """A torchvision-convention detection model as a :class:`gradlens.Detector` (module docstring: the rules).

    >>> model = torchvision.models.detection.fcos_resnet50_fpn(weights="DEFAULT")    # doctest: +SKIP
    >>> fcos = gradlens.LossDictDetector(model, gradlens.torchvision_coco_categories(), name="fcos")  # doctest: +SKIP

    ``categories``: one entry per label the model outputs, in label order: ``{"id": ..., "name": ...}`` with the
    dataset's category id, or ``None`` for a label that is no category (its detections are left out of results).
    ``name``: the label in tables and legends (default: the model's class name, lower case). ``preprocess``: what
    gradlens reports as the model's preprocessing (default: read from a torchvision ``GeneralizedRCNNTransform``);
    the model always preprocesses by itself, gradlens only uses the ``mean`` (the fill of deleted pixels in
    faithfulness and the ``mean`` baseline of integrated gradients, in [0, 1] units) and groups images into
    batches by it (which changes no result, since each image runs alone). ``keep_in_inference``: more module
    classes that the loss view keeps in inference mode besides the normalisation and dropout layers.
    """

    allows_random_samplers = False  # a subclass that takes the expectation over them sets True (models.detectors.rcnn)

    def __init__(self, model: nn.Module, categories, *, name: str | None = None,
                 preprocess: PreprocessConfig | None = None, keep_in_inference: Iterable[type] = ()):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise GradlensError(f"LossDictDetector wraps a torch.nn.Module, not {_describe(model)}.")
        try:
            inspect.signature(model.forward).bind([], [])
        except TypeError:
            raise GradlensError(f"{type(model).__name__}.forward does not take (images, targets); LossDictDetector wraps "
                                "models whose training-mode forward(images, targets) returns their named loss terms, "
                                "as torchvision's detection models do.") from None
        except ValueError:  # no signature to read (a builtin or compiled forward): checked at the first call
            pass
        samplers = _random_samplers(model)
        if samplers and not self.allows_random_samplers:
            raise GradlensError(f"{type(model).__name__} computes its training loss on a random sample ({samplers[0]} "
                                "samples proposals or RoIs), so its loss and every map would depend on a draw; gradlens "
                                "needs a deterministic loss (DESIGN: total detection loss): wrap torchvision's Faster or Mask R-CNN in "
                                "gradlens.ExpectedLossRCNN, whose loss is the expectation over the samplers.")
        self.model = model
        self.categories = _categories(categories)
        self.name = name or type(model).__name__.lower()
        self.preprocess = preprocess if preprocess is not None else _preprocess_of(model)
        self.keep_in_inference = tuple(keep_in_inference)
        self.channels_last = False

    # -- identity ------------------------------------------------------------------------------

    @property
    def framework(self) -> str:
        """Whose arithmetic the model follows: the top-level package of its class (``"torchvision"`` for
        torchvision's models; ``"pytorch"`` for a class defined in a script or notebook)."""
        package = type(self.model).__module__.split(".")[0]
        return "pytorch" if package in ("__main__", "builtins") else package

    @property
    def arch_name(self) -> str:
        """The wrapped model's class, fully qualified (part of every cache and store key)."""
        return f"wrapped:{type(self.model).__module__}.{type(self.model).__qualname__}"

    @property
    def identity_sha256(self) -> str:
        """:func:`module_sha256` of the wrapped model, computed now: it changes when any weight, buffer or plain
        setting does. The pipeline keys detections and maps by it, as it keys a checkpoint by the file's hash."""
        return module_sha256(self.model)

    def use_channels_last(self, enabled: bool = True) -> "LossDictDetector":
        """Kept as it is: a wrapped model keeps its own memory layout (gradlens switches its own RetinaNets to
        channels-last on the CPU, but an arbitrary model's ``view`` calls may not accept that layout)."""
        return self

    def _keep(self, module: nn.Module) -> bool:
        return keeps_inference_mode(module) or isinstance(module, self.keep_in_inference)

    # -- the Detector interface ----------------------------------------------------------------

    @torch.no_grad()
    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image (``boxes`` xyxy in original pixels, ``scores``, ``labels``), as the model gives them
        in eval mode, one image at a time."""
        view = mode_view(self.model, training=False)
        results = []
        for image in images:
            out = view([image])
            if not (isinstance(out, (list, tuple)) and len(out) == 1 and isinstance(out[0], dict)
                    and all(isinstance(out[0].get(k), Tensor) for k in ("boxes", "scores", "labels"))):
                raise GradlensError(f"{self.name}'s forward in eval mode returned {_describe(out)}, not one dict with "
                                    "boxes, scores and labels per image (torchvision's detection convention).")
            labels = out[0]["labels"]
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.categories)):
                raise GradlensError(f"{self.name} outputs label {int(labels.max())}, but its categories list has "
                                    f"{len(self.categories)} labels; give one category (or None) per label the model has.")
            results.append({k: out[0][k] for k in ("boxes", "scores", "labels")})
        return results

    def image_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Each image's training loss terms, computed on that image alone (``[len(images)]`` per term,
        differentiable with respect to the images), with the loss path in training mode and every
        normalisation and dropout layer in inference mode, whatever mode the model is in."""
        if any(t.get("object") is not None for t in targets):
            raise self._no_object_split()
        view = mode_view(self.model, training=True, keep=self._keep)
        per_image = []
        for image, target in zip(images, targets):
            boxes = torch.as_tensor(target["boxes"]).to(device=image.device, dtype=image.dtype).reshape(-1, 4)
            labels = torch.as_tensor(target["labels"]).to(device=image.device, dtype=torch.int64).reshape(-1)
            per_image.append(self._loss_terms(view([image], [{"boxes": boxes, "labels": labels}])))
        return self._stacked(per_image)

    def _stacked(self, per_image: list[dict[str, Tensor]], hint: str = "") -> dict[str, Tensor]:
        """Each term's per-image values as one ``[len(images)]`` tensor; one sentence if the images' terms differ."""
        if not per_image:
            return {}
        names = list(per_image[0])
        for terms in per_image[1:]:
            if list(terms) != names:
                raise GradlensError(f"{self.name} returned the loss terms {', '.join(terms)} for one image and "
                                    f"{', '.join(names)} for another; every image needs the same terms{hint}.")
        return {name: torch.stack([terms[name] for terms in per_image]) for name in names}

    def _loss_terms(self, out) -> dict[str, Tensor]:
        if not (isinstance(out, dict) and out and all(isinstance(k, str) for k in out)
                and all(isinstance(v, Tensor) and v.numel() == 1 and v.is_floating_point() for v in out.values())):
            raise GradlensError(f"{self.name}'s forward in training mode returned {_describe(out)}, not a dict of "
                                "named loss tensors; LossDictDetector wraps models whose training-mode "
                                "forward(images, targets) returns their loss terms, as torchvision's detection models do.")
        return {k: v.reshape(()) for k, v in out.items()}

    def object_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Refused: a loss dict is one total per image, with no part per object."""
        raise self._no_object_split()

    def _no_object_split(self) -> NoObjectSplitError:
        return NoObjectSplitError(f"{self.name} is a wrapped model whose loss is one dict of terms per image, with no "
                                  "part per object, so per-object maps (--target object) need a detector that splits "
                                  "its loss by object, such as gradlens' RetinaNets.")

    @torch.no_grad()
    def detect_with_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[list[dict], dict]:
        """:meth:`detect` and :meth:`image_losses` of the same images (two passes: a wrapped model gives its
        detections and its loss in different modes)."""
        return self.detect(images), self.image_losses(images, targets)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """With targets: :meth:`image_losses`; without: :meth:`detect`."""
        return self.detect(images) if targets is None else self.image_losses(images, targets)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, categories={len(self.categories)}"
