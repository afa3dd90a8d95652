"""COCO box mAP through pycocotools' own ``COCOeval``.

So a user can check that a loaded checkpoint reproduces its published box AP
(and so that the bundled detectors' quality is measured, not claimed).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from gradlens.data.coco import GroundTruth
from gradlens.data.detections import Detections

STAT_NAMES = [
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large",
]


def coco_map(gt: GroundTruth, detections: Detections, image_ids=None, class_agnostic: bool = False) -> dict[str, float]:
    """The twelve ``COCOeval`` bbox statistics (AP in [0, 1]; -1 where COCO has nothing to measure)."""
    from pycocotools.cocoeval import COCOeval

    ids = [int(i) for i in (gt.image_ids if image_ids is None else image_ids)]
    if len(detections) == 0:
        stats = np.zeros(12)
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            results = gt.coco.loadRes(_as_array(detections))
            evaluator = COCOeval(gt.coco, results, "bbox")
            evaluator.params.imgIds = ids
            if class_agnostic:
                evaluator.params.useCats = 0
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = evaluator.stats
    return {name: float(v) for name, v in zip(STAT_NAMES, stats)}


def _as_array(dets: Detections) -> np.ndarray:
    """``loadRes`` accepts an (n, 7) array [image_id, x, y, w, h, score, category] without a JSON round trip."""
    return np.column_stack([dets.image_id, dets.xywh, dets.score, dets.category_id]).astype(np.float64)
