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


def object_ids(gt: GroundTruth, detector: RetinaNetDetector, image_ids) -> dict[int, list[int]]:
    """image id -> annotation ids of its objects that are in the loss (non-crowd, not too small), in loss order."""
    return {int(i): list(image_targets(gt, i, detector.categories).ann_ids) for i in image_ids}


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
                        label: str = "") -> MapRun:
    """Compute and store the map of every object of ``image_ids`` that ``store`` lacks (resumable per object).

    Objects are attributed in groups of ``batch_size`` that share one padded
    canvas (an object's copy of its image is one batch entry), so a map is the
    same whichever other objects were computed with it, up to round-off.
    """
    device = next(detector.parameters()).device
    config = (config or AttributionConfig(target="object")).check(device)
    ids = [int(i) for i in image_ids]
    targets = {i: image_targets(gt, i, detector.categories) for i in ids}
    todo, reused, replaced = [], 0, 0
    for i in ids:
        h, w = int(gt.image_info(i).get("height") or 0), int(gt.image_info(i).get("width") or 0)
        for j, ann in enumerate(targets[i].ann_ids):
            problem = store.problem(ann, (h, w) if h and w else None)
            if problem is None:
                reused += 1
                continue
            replaced += problem != "missing"
            todo.append((i, j, ann))
    if not todo:
        return MapRun(computed=0, reused=reused, store=store, replaced=replaced)
    wanted = {i for i, _, _ in todo}
    bar = track(None, f"object gradients {label} ({len(todo)} objects)".replace("  ", " "), progress, unit="object",
                total=len(todo))
    computed = 0
    try:
        with frozen_inference_mode(detector):
            for batch in plan_batches(detector, gt, sorted(wanted), batch_size):  # images of one canvas together
                images = {i: to_tensor(read_image(gt.image_path(i), gt.exif_orientation)).to(device) for i in batch}
                items = [item for item in todo if item[0] in images]
                for start in range(0, len(items), batch_size):
                    chunk = items[start:start + batch_size]
                    attributions = attribute_frozen(detector, [images[i] for i, _, _ in chunk],
                                                    [targets[i].for_object(j) for i, j, _ in chunk], config, batch_size)
                    for (_, _, ann), a in zip(chunk, attributions):
                        store.write(ann, reduce_channels(a, config.channel_reduce))
                        computed += 1
                    bar.update(len(chunk))
    finally:
        bar.close()
    return MapRun(computed=computed, reused=reused, store=store, replaced=replaced)


def object_losses(detector: RetinaNetDetector, image: torch.Tensor, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's background loss and per-object losses (focal + L1 each), as :meth:`object_losses` splits them."""
    parts = detector.object_losses([image], [targets.as_dict() if hasattr(targets, "as_dict") else targets])[0]
    total = parts["classification"] + parts["bbox_regression"]
    return total[0], total[1:]
