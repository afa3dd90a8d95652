"""Batches of images, shared by every step that runs a detector over a selection (inference, gradient maps,
faithfulness): which images go together, and how they are decoded.

A batch only ever holds images that one alone would be padded to the same canvas
(:func:`~gradlens.models.preprocessing.transform.padded_size`), so batching never changes what an image gets; the plan is
fixed by the annotation file's sizes and the whole list of images, so a resumed or partial run computes each
batch exactly as a whole run does. Images are decoded in DataLoader workers while the network runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from gradlens.data.coco import GroundTruth
from gradlens.data.images import read_image
from gradlens.errors import GradlensError
from gradlens.models.interface import Detector
from gradlens.models.preprocessing.transform import canvas_groups, padded_size


class ImageFiles(Dataset):
    """Decodes one image per item in a worker: (image id, uint8 CHW tensor)."""

    def __init__(self, paths: dict[int, Path], exif_orientation: str = "ignore"):
        self.paths = paths
        self.exif_orientation = exif_orientation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, image_id: int):
        try:
            pixels = read_image(self.paths[image_id], self.exif_orientation)
        except GradlensError as exc:  # returned, not raised: a worker's exception would arrive as a traceback text
            return image_id, exc
        return image_id, torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def loaded_images(batch, device: torch.device) -> tuple[list[int], list[torch.Tensor]]:
    """Ids and [0, 1] float images on ``device`` of a batch of :class:`ImageFiles` items.

    An image that a loader worker could not decode is re-raised here, in the
    main process and as one sentence (a worker's own exception would arrive as
    a traceback text).
    """
    for _, pixels in batch:
        if isinstance(pixels, BaseException):
            raise pixels
    return [i for i, _ in batch], [pixels.to(device, non_blocking=True).float().div_(255.0) for _, pixels in batch]


def annotated_sizes(gt: GroundTruth, image_ids) -> dict[int, tuple[int, int]]:
    """(height, width) of each image as the annotation file gives them (0 where it does not)."""
    sizes = {}
    for i in image_ids:
        info = gt.image_info(i)
        sizes[int(i)] = (int(info.get("height") or 0), int(info.get("width") or 0))
    return sizes


class ShapeGroupedBatches(Sampler):
    """Batches of image ids that share one padded canvas, in a deterministic order."""

    def __init__(self, sizes: dict[int, tuple[int, int]], detector: Detector, batch_size: int):
        ids = sorted(sizes)
        groups = canvas_groups([sizes[i] for i in ids], detector.preprocess, batch_size)
        self.batches = [[ids[k] for k in group] for group in groups]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def plan_batches(detector: Detector, gt: GroundTruth, image_ids, batch_size: int) -> list[list[int]]:
    """Image ids in batches of one padded canvas, decided by the annotation file's sizes and the whole list
    (the order given does not matter)."""
    return ShapeGroupedBatches(annotated_sizes(gt, [int(i) for i in image_ids]), detector, batch_size).batches


def batch_costs(detector: Detector, gt: GroundTruth, batches: list[list[int]]) -> list[float]:
    """Padded pixels of each batch (its canvas times its images): what torchrun ranks are balanced by."""
    sizes = annotated_sizes(gt, [batch[0] for batch in batches])
    return [float(np.prod(padded_size(*sizes[batch[0]], detector.preprocess))) * len(batch) for batch in batches]
