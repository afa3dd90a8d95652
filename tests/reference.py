"""A slow, direct implementation of DESIGN.md's quality definitions, independent of gradlens' code.

Loops over images and objects in plain Python and takes IoUs from
``pycocotools.mask.iou``; the tests compare gradlens' vectorised scores to it.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def reference_quality(gt: dict, results: list[dict], class_agnostic: bool = False):
    """Return ({ann_id: (iou, confidence, det_position or -1)}, {image_id: mean quality})."""
    by_image: dict[int, list[tuple[int, dict]]] = {}
    for pos, d in enumerate(results):
        by_image.setdefault(d["image_id"], []).append((pos, d))
    objects, images = {}, {}
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a.get("iscrowd", 0)]
        if not anns:
            continue
        qualities = []
        for a in anns:
            cands = [(p, d) for p, d in by_image.get(img["id"], []) if class_agnostic or d["category_id"] == a["category_id"]]
            best = (0.0, 0.0, -1)
            for p, d in cands:
                iou = float(mask_utils.iou(np.array([d["bbox"]], float), np.array([a["bbox"]], float), [0])[0, 0])
                iou = 0.0 if np.isnan(iou) else iou
                if iou <= 0:
                    continue
                if iou > best[0] or (iou == best[0] and d["score"] > best[1]):
                    best = (iou, d["score"], p)
            objects[a["id"]] = best
            qualities.append(best[0] * best[1])
        images[img["id"]] = sum(qualities) / len(qualities)
    return objects, images
