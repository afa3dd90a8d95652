"""Object and image quality, vectorised over a whole dataset.

Definitions (DESIGN.md): each non-crowd ground-truth object is matched to the
detection of its image (and, by default, its category) with the largest IoU,
ties going to the higher confidence; with no detection of IoU > 0 it gets a
virtual match (IoU 0, confidence 0). Object quality = IoU × confidence; image
quality = mean object quality; images without objects have no quality.

How: detections are sorted by a (image, category) key, so the candidates of an
object form one contiguous run. All (object, candidate) pairs of the dataset
are laid out flat, their IoUs computed in one call, and the best candidate per
object found with segment reductions (``scatter_reduce``) — on the CPU or the
GPU, in chunks that bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from gradlens.data.coco import GroundTruth, as_ground_truth
from gradlens.data.detections import Detections, as_detections
from gradlens.device import resolve_device
from gradlens.progress import track
from gradlens.scoring.iou import paired_iou

OBJECT_COLUMNS = [
    "image_id", "ann_id", "category_id", "gt_x", "gt_y", "gt_w", "gt_h",
    "matched", "det_index", "det_category_id", "det_x", "det_y", "det_w", "det_h",
    "iou", "confidence", "quality",
]  # fmt: skip
IMAGE_COLUMNS = ["image_id", "file_name", "width", "height", "num_objects", "num_matched", "num_detections", "quality"]

DEFAULT_CHUNK_PAIRS = 1 << 23  # ~8M candidate pairs per chunk: a few hundred MB of temporaries at most


@dataclass
class QualityScores:
    """Per-object and per-image quality tables plus counts of everything not scored.

    Unpacks as ``objects, images = quality_scores(...)``.
    """

    objects: pd.DataFrame
    images: pd.DataFrame
    summary: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.objects, self.images))


def _rank_in(known: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each value in the sorted unique array ``known``, and whether it is there at all.

    COCO ids span a small range, so a lookup table is used where it fits
    (O(1) per value); otherwise a binary search.
    """
    if not len(known):
        return np.zeros(len(values), dtype=np.int64), np.zeros(len(values), dtype=bool)
    lo, span = int(known[0]), int(known[-1]) - int(known[0]) + 1
    if span <= max(1 << 22, 8 * len(known)):
        table = np.full(span, -1, dtype=np.int64)
        table[known - lo] = np.arange(len(known))
        inside = (values >= lo) & (values < lo + span)
        pos = np.where(inside, table[np.clip(values - lo, 0, span - 1)], -1)
        return pos, pos >= 0
    pos = np.searchsorted(known, values)
    return pos, (pos < len(known)) & (known[np.minimum(pos, len(known) - 1)] == values)


def _group_keys(gt: GroundTruth, detections: Detections, class_agnostic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Dense integer keys for (image) or (image, category) groups, equal exactly when the groups are.

    Ids are mapped to their rank among the ground truth's ids, so any id values
    (huge, negative, sparse) give keys without overflow; a detection whose image
    or category has no object gets key -1 and is never a candidate.
    """
    obj_img, _ = _rank_in(gt.image_ids, gt.obj_image_id)
    det_img, known = _rank_in(gt.image_ids, detections.image_id)
    return _candidate_keys(gt, obj_img, gt.obj_category_id, det_img, detections.category_id, known, class_agnostic)


def _candidate_keys(gt: GroundTruth, obj_group: np.ndarray, obj_category: np.ndarray, det_group: np.ndarray,
                    det_category: np.ndarray, known: np.ndarray, class_agnostic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Keys of (group) or (group, category) from dense group numbers (an image's rank, a variant's index); a
    detection not ``known`` to its group, or of a category without objects, gets -1 and is never a candidate."""
    if class_agnostic:
        obj_keys, det_keys = obj_group, det_group
    else:
        cats = np.unique(gt.obj_category_id)
        obj_cat, _ = _rank_in(cats, obj_category)
        det_cat, known_cat = _rank_in(cats, det_category)
        known = known & known_cat
        obj_keys, det_keys = obj_group * len(cats) + obj_cat, det_group * len(cats) + det_cat
    return obj_keys.astype(np.int64), np.where(known, det_keys, -1).astype(np.int64)


def _match(
    obj_boxes: np.ndarray,
    obj_keys: np.ndarray,
    det_boxes: np.ndarray,
    det_keys: np.ndarray,
    det_scores: np.ndarray,
    device: torch.device,
    chunk_pairs: int,
    progress: bool | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each object's match as (index into the detection arrays or -1 for a virtual match, IoU)."""
    order = np.argsort(det_keys, kind="stable")  # stable: equal keys keep file order
    sorted_keys = det_keys[order]
    start = np.searchsorted(sorted_keys, obj_keys, side="left")
    count = np.searchsorted(sorted_keys, obj_keys, side="right") - start

    det_boxes_t = torch.as_tensor(det_boxes[order], dtype=torch.float64, device=device)
    det_scores_t = torch.as_tensor(det_scores[order], dtype=torch.float64, device=device)
    obj_boxes_t = torch.as_tensor(obj_boxes, dtype=torch.float64, device=device)
    match = np.full(len(obj_keys), -1, dtype=np.int64)
    match_iou = np.zeros(len(obj_keys), dtype=np.float64)

    # Chunk boundaries over objects so that no chunk holds more than chunk_pairs pairs.
    cum = np.cumsum(count)
    bounds = [0]
    while bounds[-1] < len(count):
        base = cum[bounds[-1] - 1] if bounds[-1] else 0
        nxt = int(np.searchsorted(cum, base + chunk_pairs, side="right"))
        bounds.append(max(nxt, bounds[-1] + 1))
    chunks = list(zip(bounds[:-1], bounds[1:]))
    for lo, hi in track(chunks, "matching", progress if len(chunks) > 1 else False, unit="chunk"):
        cnt = torch.as_tensor(count[lo:hi], device=device)
        total = int(cnt.sum())
        if total == 0:
            continue
        n = hi - lo
        pair_obj = torch.repeat_interleave(torch.arange(n, device=device), cnt)
        offset = torch.cumsum(cnt, 0) - cnt
        pair_det = torch.as_tensor(start[lo:hi], device=device)[pair_obj] + (
            torch.arange(total, device=device) - offset[pair_obj]
        )
        iou = paired_iou(obj_boxes_t[lo:hi][pair_obj], det_boxes_t[pair_det])
        # Best IoU per object, then the best confidence among the IoU ties, then the
        # earliest detection in file order among exact (IoU, confidence) ties.
        best_iou = torch.zeros(n, dtype=iou.dtype, device=device).scatter_reduce_(0, pair_obj, iou, "amax")
        is_best = (iou == best_iou[pair_obj]) & (iou > 0)
        conf = torch.where(is_best, det_scores_t[pair_det], torch.full_like(iou, -1.0))
        best_conf = torch.full((n,), -1.0, dtype=iou.dtype, device=device).scatter_reduce_(0, pair_obj, conf, "amax")
        winner = is_best & (conf == best_conf[pair_obj])
        big = torch.iinfo(torch.int64).max
        cand = torch.where(winner, pair_det, torch.full_like(pair_det, big))
        chosen = torch.full((n,), big, dtype=torch.int64, device=device).scatter_reduce_(0, pair_obj, cand, "amin")
        chosen = chosen.cpu().numpy()
        found = chosen != big
        match[lo:hi][found] = order[chosen[found]]
        match_iou[lo:hi][found] = best_iou.cpu().numpy()[found]
    return match, match_iou


def _take(values: np.ndarray, match: np.ndarray, fill) -> np.ndarray:
    """``values[match]`` where an object has a match, ``fill`` for virtual matches."""
    out = np.full((len(match),) + values.shape[1:], fill, dtype=np.result_type(values, np.asarray(fill)))
    found = match >= 0
    out[found] = values[match[found]]
    return out


def quality_scores(
    detections: Detections | str | list | pd.DataFrame,
    gt: GroundTruth | str | dict,
    class_agnostic: bool = False,
    device: str | torch.device = "cpu",
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
    progress: bool | None = False,
) -> QualityScores:
    """Score every non-crowd object and every image with objects (DESIGN.md definitions).

    Returns a :class:`QualityScores` whose ``objects`` table has one row per
    non-crowd object (virtual matches included, with ``matched`` False and IoU,
    confidence and quality 0) and whose ``images`` table has one row per image
    with at least one object.

    ``gt`` may also be an annotation file path, an annotation dict or a
    pycocotools ``COCO``; ``detections`` a results file path, a results list or
    a DataFrame — each is checked as ``gradlens score`` would (categories only
    when matching is class-aware).
    """
    gt = as_ground_truth(gt)
    # Class-agnostic matching ignores labels, so labels unknown to the ground truth are fine.
    detections = as_detections(detections, gt, check_categories=not class_agnostic)
    device = resolve_device(device)
    obj_keys, det_keys = _group_keys(gt, detections, class_agnostic)

    match, iou = _match(
        gt.obj_xywh, obj_keys, detections.xywh, det_keys, detections.score, device, chunk_pairs, progress
    )
    matched = match >= 0
    confidence = _take(detections.score, match, 0.0)
    det_xywh = _take(detections.xywh, match, np.nan)

    objects = pd.DataFrame(
        {
            "image_id": gt.obj_image_id,
            "ann_id": gt.obj_ann_id,
            "category_id": gt.obj_category_id,
            "gt_x": gt.obj_xywh[:, 0],
            "gt_y": gt.obj_xywh[:, 1],
            "gt_w": gt.obj_xywh[:, 2],
            "gt_h": gt.obj_xywh[:, 3],
            "matched": matched,
            "det_index": _take(detections.index, match, -1),
            "det_category_id": _take(detections.category_id, match, -1),
            "det_x": det_xywh[:, 0],
            "det_y": det_xywh[:, 1],
            "det_w": det_xywh[:, 2],
            "det_h": det_xywh[:, 3],
            "iou": iou,
            "confidence": confidence,
            "quality": iou * confidence,
        },
        columns=OBJECT_COLUMNS,
    )
    images = _image_table(objects, detections, gt)
    summary = {
        "class_agnostic": bool(class_agnostic),
        "device": str(device),
        "num_images": int(len(gt.image_ids)),
        "num_images_scored": int(len(images)),
        "num_images_without_objects": int(len(gt.image_ids) - len(images)),
        "num_images_with_objects_but_no_detections": int((images["num_detections"] == 0).sum()),
        "num_objects": int(len(objects)),
        "num_virtual_matches": int((~matched).sum()),
        "num_crowd_ignored": int(gt.num_crowd),
        "num_degenerate_objects": int(gt.num_degenerate),
        "num_detections": int(len(detections)),
        "num_detections_dropped": dict(detections.dropped),
        "mean_image_quality": float(images["quality"].mean()) if len(images) else None,
    }
    return QualityScores(objects=objects, images=images, summary=summary)


def _image_table(objects: pd.DataFrame, detections: Detections, gt: GroundTruth) -> pd.DataFrame:
    """Mean object quality per image; images without objects have no quality and no row.

    Objects arrive sorted by image, so each image is one contiguous segment.
    """
    obj_image = objects["image_id"].to_numpy(np.int64)
    ids, start, count = np.unique(obj_image, return_index=True, return_counts=True)
    if len(ids):
        total = np.add.reduceat(objects["quality"].to_numpy(np.float64), start)
        matched = np.add.reduceat(objects["matched"].to_numpy(np.int64), start)
    else:
        total, matched = np.zeros(0), np.zeros(0, np.int64)
    pos, found = _rank_in(ids, detections.image_id)
    num_det = np.bincount(pos[found], minlength=len(ids))
    infos = [gt.coco.imgs[int(i)] for i in ids]
    return pd.DataFrame(
        {
            "image_id": ids,
            "file_name": [info.get("file_name", "") for info in infos],
            "width": np.array([info.get("width", 0) for info in infos], dtype=np.int64),
            "height": np.array([info.get("height", 0) for info in infos], dtype=np.int64),
            "num_objects": count.astype(np.int64),
            "num_matched": matched.astype(np.int64),
            "num_detections": num_det.astype(np.int64),
            "quality": total / np.maximum(count, 1),
        },
        columns=IMAGE_COLUMNS,
    )


def variant_qualities(
    gt: GroundTruth,
    base_ids,
    detections: list,
    class_agnostic: bool = False,
) -> np.ndarray:
    """Image quality of many detection sets at once, each scored against the objects of its own base image.

    ``detections[v]`` is a list of COCO result records (or :class:`Detections`) found on a variant of image
    ``base_ids[v]`` (a perturbed copy, say): its objects are matched exactly as :func:`quality_scores`
    matches them (same candidates, IoU arithmetic and tie rules, records in list order), with each variant
    its own group, so the result equals :func:`quality_scores` run on each variant alone. NaN for a base
    image without objects. One vectorised matching for all variants instead of one call per variant.
    """
    from gradlens.data.detections import detections_from_records

    base = np.asarray([int(i) for i in base_ids], dtype=np.int64)
    if len(base) != len(detections):
        raise ValueError("variant_qualities needs one base image id per detection set.")
    starts = np.searchsorted(gt.obj_image_id, base, side="left")
    ends = np.searchsorted(gt.obj_image_id, base, side="right")
    counts = ends - starts
    obj_rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(base) else np.zeros(0, np.int64)
    obj_variant = np.repeat(np.arange(len(base)), counts)
    sets = [d if isinstance(d, Detections) else detections_from_records(list(d), gt, check_categories=not class_agnostic)
            for d in detections]
    det_variant = np.concatenate([np.full(len(d), v, dtype=np.int64) for v, d in enumerate(sets)]) if sets else np.zeros(0, np.int64)
    det_xywh = np.concatenate([d.xywh for d in sets]).reshape(-1, 4) if sets else np.zeros((0, 4))
    det_score = np.concatenate([d.score for d in sets]) if sets else np.zeros(0)
    det_image = np.concatenate([d.image_id for d in sets]) if sets else np.zeros(0, np.int64)
    det_category = np.concatenate([d.category_id for d in sets]) if sets else np.zeros(0, np.int64)
    det_known = det_image == base[det_variant]  # a record of another image is never a candidate
    obj_keys, det_keys = _candidate_keys(gt, obj_variant, gt.obj_category_id[obj_rows], det_variant, det_category,
                                         det_known, class_agnostic)
    match, iou = _match(gt.obj_xywh[obj_rows], obj_keys, det_xywh, det_keys, det_score,
                        torch.device("cpu"), DEFAULT_CHUNK_PAIRS, False)
    quality = iou * _take(det_score, match, 0.0)
    out = np.full(len(base), np.nan)
    scored = np.flatnonzero(counts > 0)
    if len(scored):  # summed as _image_table sums an image's objects, so the result is bit for bit the same
        offsets = (np.cumsum(counts) - counts)[scored]
        out[scored] = np.add.reduceat(quality, offsets) / counts[scored]
    return out
