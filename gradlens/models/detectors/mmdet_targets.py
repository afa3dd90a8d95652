"""mmdetection 2.x's pipeline applied to one image's ground truth, as its training losses receive it.

The fork's detectors train on boxes and masks that went through the same ``Resize`` (and ``Pad``) as the image:
float32 boxes times the scale factor, clipped to the resized image; masks rescaled by OpenCV's nearest neighbour
and zero-padded to the batch. Every mmdetection-family loss in gradlens (Mask R-CNN, Deformable DETR,
Mask2Former) reads its ground truth through these functions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gradlens.errors import GradlensError


def scale_factor(image: Tensor, size: tuple[int, int]) -> Tensor:
    """mmdetection's ``Resize`` scale factor ``(w, h, w, h)`` of an image resized to ``size``, float32."""
    return torch.tensor([size[1] / image.shape[-1], size[0] / image.shape[-2]] * 2, dtype=torch.float32,
                        device=image.device)


def resized_boxes(image: Tensor, target: dict, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The objects' boxes in the resized image (float32 boxes times the scale factor, clipped) and their labels."""
    device = image.device
    boxes = torch.as_tensor(target["boxes"]).to(device=device).reshape(-1, 4).float()
    labels = torch.as_tensor(target["labels"]).to(device=device, dtype=torch.int64).reshape(-1)
    scaled = boxes * scale_factor(image, size)
    h, w = size
    clipped = torch.stack([scaled[:, 0].clamp(0, w), scaled[:, 1].clamp(0, h), scaled[:, 2].clamp(0, w),
                           scaled[:, 3].clamp(0, h)], dim=1)
    return clipped, labels


def nearest_rescale(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """OpenCV's ``INTER_NEAREST`` resize of ``(K, H, W)`` masks to ``size`` (mmcv's ``imrescale`` of
    ``BitmapMasks.rescale``): source index ``min(floor(x * (src / dst)), src - 1)`` in double precision."""
    h, w = masks.shape[-2:]
    th, tw = size
    ys = np.minimum(np.floor(np.arange(th) * (1.0 / (th / h))).astype(np.int64), h - 1)
    xs = np.minimum(np.floor(np.arange(tw) * (1.0 / (tw / w))).astype(np.int64), w - 1)
    return masks[:, torch.as_tensor(ys, device=masks.device)][:, :, torch.as_tensor(xs, device=masks.device)]


def resized_masks(target: dict, size: tuple[int, int], padded: tuple[int, int]) -> Tensor:
    """The objects' instance masks (uint8 ``(K, h, w)``) nearest-rescaled to the resized image
    (``BitmapMasks.rescale``) and zero-padded to the batch (``Pad``)."""
    if target.get("masks") is None:
        raise GradlensError("this detector's loss needs the objects' instance masks; give masks for every image "
                            "(the pipeline reads them from the COCO annotations)")
    masks = torch.as_tensor(target["masks"]).to(dtype=torch.uint8)
    if masks.ndim != 3:
        raise GradlensError("instance masks must be one H x W mask per object")
    resized = nearest_rescale(masks, size) if masks.shape[0] else masks.new_zeros((0, *size))
    h, w = padded
    return F.pad(resized, (0, w - resized.shape[-1], 0, h - resized.shape[-2]))
