"""What the pipeline needs of a detector: one interface, whatever the family.

Inference, scoring from checkpoints, gradients, per-object maps, area curves, faithfulness and torchrun
talk to a detector through these members only; :class:`~gradlens.models.detectors.retinanet.RetinaNetDetector` is one
implementation (every RetinaNet gradlens loads). A detector is a ``torch.nn.Module`` (the pipeline moves it
between devices, freezes its parameters and sets inference mode on every submodule) that also has:

- ``preprocess`` (:class:`~gradlens.models.preprocessing.transform.PreprocessConfig`): the framework's test-time resize,
  normalisation and padding of a [0, 1] RGB image at its original size, applied by the detector itself and
  differentiable (the uint8 rounding of a framework that resizes 8-bit images passes the gradient straight
  through); its ``mean`` is also what faithfulness fills deleted pixels with;
- ``categories``: the dataset categories of its labels, ``[{"id": ..., "name": ...}]`` in label order
  (``None`` entries for labels that are no category);
- ``framework`` and ``arch_name``: whose arithmetic it follows and what it is, for cache and store keys;
- ``detect(images)``: detections per image in original pixel coordinates (``boxes`` xyxy, ``scores``,
  ``labels``), as the framework's test pipeline gives them;
- ``image_losses(images, targets)``: DESIGN's total detection loss per image as named terms (shape
  ``[len(images)]`` each, differentiable with respect to the images), in whatever mode the modules are; the
  total is the sum of the terms named by the optional ``loss_terms`` (every entry where a detector has none:
  RetinaNet reports its number of positive anchors beside its two terms), see :func:`total_loss`;
- ``object_losses(images, targets)``: each image's loss split by owner (entry 0 the background, then one per
  object), adding up to ``image_losses``;
- ``detect_with_losses(images, targets)``: both from one forward pass, without gradient.

``targets[i]`` holds ``boxes`` (xyxy, original pixels) and contiguous ``labels``
(:func:`gradlens.attribution.targets.image_targets`).

A model of your own that follows torchvision's detection convention becomes one with
:class:`gradlens.models.detectors.adapter.LossDictDetector`. A detector given to the pipeline as an object (not as a
checkpoint file) is keyed by its ``identity_sha256`` where it has one, else by a hash of its modules
(:func:`gradlens.models.detectors.adapter.detector_sha256`), in place of the file's SHA-256.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from gradlens.models.preprocessing.transform import PreprocessConfig


@runtime_checkable
class Detector(Protocol):
    """The members every detector has (see the module's docstring); a ``torch.nn.Module`` besides."""

    preprocess: PreprocessConfig
    categories: list

    @property
    def framework(self) -> str: ...

    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]: ...

    def image_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]: ...

    def object_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]: ...

    def detect_with_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[list[dict], dict]: ...


def total_loss(detector, terms: dict[str, Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """The total detection loss from ``image_losses`` (or one entry of ``object_losses``): the sum of the terms
    the detector's ``loss_terms`` names, in that order (every entry, in the dict's order, where it names none),
    each cast to ``dtype`` first if given."""
    names = getattr(detector, "loss_terms", None) or list(terms)
    total = terms[names[0]] if dtype is None else terms[names[0]].to(dtype)
    for name in names[1:]:
        total = total + (terms[name] if dtype is None else terms[name].to(dtype))
    return total


def arithmetic_revisions(detector) -> dict[str, int]:
    """``{module class: revision}`` of the modules whose arithmetic changed in their last bits (an
    ``arithmetic_revision`` attribute), so that results stored before are not reused; empty for the others,
    whose store keys then stay as they were."""
    modules = detector.modules() if hasattr(detector, "modules") else []
    return {type(m).__name__: m.arithmetic_revision for m in modules if hasattr(m, "arithmetic_revision")}
