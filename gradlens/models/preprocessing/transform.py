"""The detector's own preprocessing, written as differentiable tensor operations.

Detections and input gradients both go through it: an RGB image in [0, 1]
at its original size is resized keeping its aspect ratio, normalised and
padded bottom-right to a multiple of ``size_divisor``. Because every step is a
torch operation on the original tensor, the gradient of the loss reaches the
original pixels (DESIGN: input gradient map).

A checkpoint is run with the convention of the framework that trained it,
because a one-pixel or one-grey-level difference changes detections:

- ``mmcv`` (mmdetection): the new size is rounded (``int(w * s + 0.5)``), the
  *uint8* image is resized by OpenCV's fixed-point bilinear
  (:mod:`gradlens.models.preprocessing.resize`, bit-exact), then normalised with mmcv's
  arithmetic. The gradient passes the uint8 rounding straight through, as
  the Jacobian of the same linear interpolation.
- ``mmdet3`` (mmdetection 3.x): mmcv 2.x's ``Resize`` in the test pipeline
  (the same rounding, the same uint8 OpenCV resize as ``mmcv``), then
  ``DetDataPreprocessor`` (mmengine's ``ImgDataPreprocessor``) on the batch:
  the uint8 tensor made float32, ``(x - mean) / std`` with float32 tensors
  (mmcv 1.x multiplies by ``1 / std`` widened to float64 instead), and
  ``stack_batch``'s zero padding bottom-right to a multiple of
  ``pad_size_divisor`` (:func:`mmengine_normalise`).
- ``torchvision``: the size is floored, the float image is normalised first
  and then resized by ``F.interpolate`` (``GeneralizedRCNNTransform``'s order).
- ``detectron2``: ``ResizeShortestEdge(min_size, max_size)``'s size
  (:func:`detectron2_output_shape`), the *uint8* image resized by Pillow's
  bilinear (:mod:`gradlens.models.preprocessing.pil_resize`, bit-exact, antialiased when
  shrinking), then ``DenseDetector.preprocess_image``: float32
  ``(x - mean) / std`` on the **BGR** image (:func:`detectron2_normalise`);
  zero padding bottom-right to ``size_divisor`` (the FPN's 32).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from gradlens.models.preprocessing.pil_resize import pil_resize
from gradlens.models.preprocessing.resize import mmcv_resize

Convention = Literal["mmcv", "mmdet3", "torchvision", "detectron2"]
CONVENTIONS = ("mmcv", "mmdet3", "torchvision", "detectron2")
# the conventions that resize the decoded uint8 image with mmcv's rounding and OpenCV's bilinear (mmcv 1.x and 2.x)
MMCV_RESIZE = ("mmcv", "mmdet3")

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # = mmdetection's (123.675, 116.28, 103.53) / 255
IMAGENET_STD = (0.229, 0.224, 0.225)  # = mmdetection's (58.395, 57.12, 57.375) / 255


@dataclass(frozen=True)
class PreprocessConfig:
    """Test-time resize, normalisation and padding of one detector."""

    min_size: int = 800
    max_size: int = 1333
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size_divisor: int = 32
    convention: Convention = "mmcv"

    def __post_init__(self):
        if self.convention not in CONVENTIONS:
            raise ValueError(f"unknown preprocessing convention {self.convention!r}; use one of {', '.join(CONVENTIONS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        d = dict(d)
        d["mean"] = tuple(float(v) for v in d.get("mean", IMAGENET_MEAN))
        d["std"] = tuple(float(v) for v in d.get("std", IMAGENET_STD))
        if "rounding" in d:  # files written before the conventions had names: rounding implied the framework
            rounding = d.pop("rounding")
            d.setdefault("convention", "mmcv" if rounding == "round" else "torchvision")
        return cls(**d)


def resized_size(height: int, width: int, config: PreprocessConfig) -> tuple[int, int]:
    """The (height, width) the image is resized to: the largest scale fitting ``min_size`` x ``max_size``."""
    if config.convention == "detectron2":
        return detectron2_output_shape(height, width, config.min_size, config.max_size)
    scale = min(config.max_size / max(height, width), config.min_size / min(height, width))
    if config.convention in MMCV_RESIZE:  # mmcv.rescale_size (mmcv 1.x and 2.x alike)
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
    return max(1, int(height * scale)), max(1, int(width * scale))  # torchvision floors


def detectron2_output_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``: the short side to ``short_edge``, then both sides
    scaled down if the long one exceeds ``max_size``, each rounded half up (at least 1 pixel, where upstream
    would give Pillow a zero size)."""
    size = short_edge * 1.0
    scale = size / min(height, width)
    new_h, new_w = (size, scale * width) if height < width else (scale * height, size)
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def padded_size(height: int, width: int, config: PreprocessConfig) -> tuple[int, int]:
    """The canvas one image alone is padded to; images sharing it can be batched without changing results."""
    h, w = resized_size(height, width, config)
    d = config.size_divisor
    return -(-h // d) * d, -(-w // d) * d


def canvas_groups(sizes, config: PreprocessConfig, batch_size: int) -> list[list[int]]:
    """Indices of ``sizes`` ((h, w) per image) in batches of at most ``batch_size`` sharing one padded canvas.

    Deterministic: groups in canvas order, indices ascending within each, so a
    list of images always gives the same batches.
    """
    by_canvas: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        by_canvas.setdefault(padded_size(h, w, config), []).append(i)
    return [idx[j:j + batch_size] for _, idx in sorted(by_canvas.items()) for j in range(0, len(idx), batch_size)]


def resize_normalise(image: Tensor, config: PreprocessConfig) -> Tensor:
    """Resize and normalise one CHW image in [0, 1] as the checkpoint's framework does."""
    height, width = image.shape[-2:]
    size = resized_size(height, width, config)
    if config.convention == "mmcv":
        return mmcv_normalise(mmcv_resize(image, size), config)
    if config.convention == "mmdet3":
        return mmengine_normalise(mmcv_resize(image, size), config)
    if config.convention == "detectron2":
        return detectron2_normalise(pil_resize(image, size), config)
    mean = torch.tensor(config.mean, dtype=image.dtype, device=image.device)[:, None, None]
    std = torch.tensor(config.std, dtype=image.dtype, device=image.device)[:, None, None]
    image = (image - mean) / std  # torchvision normalises before it resizes
    if size != (height, width):
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    return image


def mmcv_normalise(pixels: Tensor, config: PreprocessConfig) -> Tensor:
    """mmcv's ``imnormalize`` of an image in 0..255: float32 ``v - mean``, then times ``1 / std`` in float64.

    mmdetection's ``Normalize`` stores mean and std as float32 arrays;
    ``imnormalize`` widens them to float64 and inverts the std there. OpenCV's
    ``subtract`` works in float32, its ``multiply`` by a float64 array in
    float64, rounding the product once. In any dtype other than float32 (the
    float64 reference runs), the same formula in that dtype.
    """
    mean = torch.tensor(pixel_units(config.mean), dtype=torch.float32, device=pixels.device).double()[:, None, None]
    std = torch.tensor(pixel_units(config.std), dtype=torch.float32, device=pixels.device).double()[:, None, None]
    inv_std = 1.0 / std
    if pixels.dtype == torch.float32:
        return ((pixels - mean.float()).double() * inv_std).float()
    return (pixels - mean.to(pixels.dtype)) * inv_std.to(pixels.dtype)


def mmengine_normalise(pixels: Tensor, config: PreprocessConfig) -> Tensor:
    """mmengine's ``ImgDataPreprocessor`` (mmdetection 3.x's ``DetDataPreprocessor``) on an image in 0..255.

    Its ``mean`` and ``std`` are ``torch.tensor(values).view(-1, 1, 1)`` buffers (float32), the uint8 input is
    made float32 (``.float()``) and normalised as ``(x - mean) / std``: a float32 subtraction and a float32
    division. In any dtype other than float32 (the float64 reference runs), the same formula in that dtype
    with the float32 mean and std widened to it.
    """
    mean = torch.tensor(pixel_units(config.mean), dtype=torch.float32, device=pixels.device)[:, None, None]
    std = torch.tensor(pixel_units(config.std), dtype=torch.float32, device=pixels.device)[:, None, None]
    return (pixels - mean.to(pixels.dtype)) / std.to(pixels.dtype)


def detectron2_normalise(pixels: Tensor, config: PreprocessConfig) -> Tensor:
    """detectron2's ``DenseDetector.preprocess_image`` of an RGB image in 0..255, returned in **BGR** order.

    ``DatasetMapper`` gives the model the uint8 BGR image; ``pixel_mean``/``pixel_std`` are float32 buffers
    (``torch.tensor(cfg.MODEL.PIXEL_MEAN)``, BGR order) and ``(x - pixel_mean) / pixel_std`` is a float32
    subtraction and division. ``config.mean``/``std`` are given in RGB order, like every convention's, so
    this is :func:`mmengine_normalise` (the same float32 arithmetic, channel by channel) with the channels
    reversed afterwards.
    """
    return mmengine_normalise(pixels, config).flip(0)


def pixel_units(values) -> tuple[float, ...]:
    """Mean or std given for [0, 1] images, in the 0..255 units mmdetection configs write (123.675, ...)."""
    return tuple(round(float(v) * 255, 6) for v in values)


def batch_images(images: list[Tensor], config: PreprocessConfig) -> tuple[Tensor, list[tuple[int, int]]]:
    """Preprocess a list of images into one zero-padded batch; returns it and each resized (h, w).

    Zeros after normalisation, bottom-right, to the largest size rounded up to ``size_divisor``: mmdetection
    2.x's ``Pad`` then collate, and 3.x's ``stack_batch`` (``pad_value`` 0), alike.

    The canvas is the largest padded size in the list, so a batch of images
    with one shared :func:`padded_size` sees exactly what each image sees alone.
    """
    processed = [resize_normalise(im, config) for im in images]
    sizes = [tuple(p.shape[-2:]) for p in processed]
    d = config.size_divisor
    canvas_h = -(-max(s[0] for s in sizes) // d) * d
    canvas_w = -(-max(s[1] for s in sizes) // d) * d
    batch = torch.stack([F.pad(p, (0, canvas_w - p.shape[-1], 0, canvas_h - p.shape[-2])) for p in processed])
    return batch, sizes
