"""Per-object attribution (``--target object``): one map per ground-truth object, its part of the total loss.

DESIGN's total loss of an image is a sum over anchors. Every anchor that is in
the loss belongs to exactly one owner: the object the assigner matched it to,
or the background (anchors matched to no object; ignored anchors are in no
loss). Object ``j``'s loss is the focal loss of its anchors (all classes)
plus their L1 box loss, divided by the image's number of positive anchors as
the total is; the background's is the focal loss of the background anchors.
The objects' losses and the background's add up to the total loss, and an
object's map is the attribution of its own loss, reduced over channels like
the image's map (README, "Per-object maps").

Maps are stored one file per object, named by its COCO annotation id, in a
store whose key records ``target: object`` (so it never mixes with the
image maps, which sit beside it under ``maps/<role>/``).
"""

from __future__ import annotations

import torch

from gradlens.attribution.compute import MapRun
from gradlens.attribution.methods import AttributionConfig, attribute_frozen, frozen_inference_mode, reduce_channels
from gradlens.attribution.store import MapStore
from gradlens.attribution.targets import image_targets
from gradlens.data.coco import GroundTruth
from gradlens.data.images import read_image, to_tensor
from gradlens.errors import GradlensError
from gradlens.inference import plan_batches
from gradlens.models.retinanet import RetinaNetDetector
from gradlens.progress import track


def object_image(gt: GroundTruth, ann_id: int) -> int:
    """The image an annotation belongs to, or one sentence if there is no such annotation."""
    ann = gt.coco.anns.get(int(ann_id))
    if ann is None:
        raise GradlensError(f"There is no annotation {ann_id} in the annotation file.")
    if ann.get("iscrowd", 0):
        raise GradlensError(f"Annotation {ann_id} is a crowd region; crowd regions are not in the loss and have no map.")
    return int(ann["image_id"])


def compute_object_maps(detector: RetinaNetDetector, gt: GroundTruth, image_ids, store: MapStore,
                        config: AttributionConfig | None = None, batch_size: int = 4, progress: bool | None = None,
                        label: str = "", plan_ids=None) -> MapRun:
    """Compute and store the map of every object of ``image_ids`` that ``store`` lacks (resumable per object).

    Objects are attributed in groups of ``batch_size`` that share one padded
    canvas (an object's copy of its image is one batch entry). The groups
    follow a plan fixed by ``plan_ids`` (default ``image_ids``): the images in
    batches of one canvas, each batch's objects in order, cut every
    ``batch_size``; a group with a missing object is computed whole. So a
    resumed run, or one image's objects asked for alone, gets bit-identical maps.
    """
    device = next(detector.parameters()).device
    config = (config or AttributionConfig(target="object")).check(device)
    if config.target != "object":
        raise GradlensError("compute_object_maps needs an attribution config with target='object'.")
    ids = [int(i) for i in image_ids]
    wanted = set(ids)
    plan = [b for b in plan_batches(detector, gt, sorted(wanted | {int(i) for i in (plan_ids or [])}), batch_size)
            if wanted.intersection(b)]
    targets = {i: image_targets(gt, i, detector.categories) for batch in plan for i in batch}
    todo, reused, replaced = set(), 0, 0
    for i in sorted(targets):
        h, w = int(gt.image_info(i).get("height") or 0), int(gt.image_info(i).get("width") or 0)
        for ann in targets[i].ann_ids:
            problem = store.problem(ann, (h, w) if h and w else None)
            if problem is None:
                reused += i in wanted
                continue
            replaced += problem != "missing"
            todo.add(ann)
    groups = []  # the fixed plan: each batch's objects in order, cut every batch_size
    for batch in plan:
        items = [(i, j, ann) for i in batch for j, ann in enumerate(targets[i].ann_ids)]
        groups += [(batch, items[k:k + batch_size]) for k in range(0, len(items), batch_size)]
    groups = [(batch, g) for batch, g in groups if any(ann in todo and i in wanted for i, _, ann in g)]
    if not groups:
        return MapRun(computed=0, reused=reused, store=store, replaced=replaced)
    missing = sum(ann in todo for _, g in groups for _, _, ann in g)
    bar = track(None, f"object gradients {label} ({missing} objects)".replace("  ", " "), progress, unit="object", total=missing)
    computed, images, loaded = 0, {}, None
    try:
        with frozen_inference_mode(detector):
            for batch, group in groups:
                if loaded is not batch:  # decode each batch's images once
                    images = {i: to_tensor(read_image(gt.image_path(i), gt.exif_orientation)).to(device) for i in batch}
                    loaded = batch
                attributions = attribute_frozen(detector, [images[i] for i, _, _ in group],
                                                [targets[i].for_object(j) for i, j, _ in group], config, batch_size)
                written = 0
                for (_, _, ann), a in zip(group, attributions):
                    if ann in todo:
                        store.write(ann, reduce_channels(a, config.channel_reduce))
                        written += 1
                computed += written
                bar.update(written)
    finally:
        bar.close()
    return MapRun(computed=computed, reused=reused, store=store, replaced=replaced)


def object_losses(detector: RetinaNetDetector, image: torch.Tensor, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's background loss and per-object losses (focal + L1 each), as :meth:`object_losses` splits them."""
    parts = detector.object_losses([image], [targets.as_dict() if hasattr(targets, "as_dict") else targets])[0]
    total = parts["classification"] + parts["bbox_regression"]
    return total[0], total[1:]
