"""Data in and out: COCO ground truth, detection results files, image decoding, synthetic datasets."""

from gradlens.data.coco import CocoPaths, GroundTruth, load_ground_truth, resolve_coco_paths
from gradlens.data.detections import Detections, read_detections, write_detections
from gradlens.data.images import read_image

__all__ = [
    "CocoPaths",
    "Detections",
    "GroundTruth",
    "load_ground_truth",
    "read_detections",
    "read_image",
    "resolve_coco_paths",
    "write_detections",
]
