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

from gradlens import distributed
from gradlens.attribution.compute import MapRun, compute_batches, rank_inputs, rank_job, rank_share, stored_problems
from gradlens.attribution.methods import AttributionConfig
from gradlens.attribution.store import MapStore
from gradlens.attribution.targets import image_targets, needs_masks
from gradlens.data.coco import GroundTruth
from gradlens.device import batch_threads
from gradlens.errors import GradlensError
from gradlens.batching import batch_costs, plan_batches
from gradlens.models.interface import Detector, total_loss
from gradlens.progress import track


def object_image(gt: GroundTruth, ann_id: int) -> int:
    """The image an annotation belongs to, or one sentence if there is no such annotation."""
    ann = gt.coco.anns.get(int(ann_id))
    if ann is None:
        raise GradlensError(f"There is no annotation {ann_id} in the annotation file.")
    if ann.get("iscrowd", 0):
        raise GradlensError(f"Annotation {ann_id} is a crowd region; crowd regions are not in the loss and have no map.")
    return int(ann["image_id"])


def object_entries(detector: Detector, gt: GroundTruth, image_ids) -> dict[int, tuple[int, dict]]:
    """Every object of ``image_ids`` as a map to compute: annotation id -> (image id, that object's targets)."""
    entries = {}
    for i in image_ids:
        targets = image_targets(gt, i, detector.categories, masks=needs_masks(detector))
        entries.update({ann: (int(i), targets.for_object(j)) for j, ann in enumerate(targets.ann_ids)})
    return entries


def object_groups(plan: list[list[int]], entries: dict[int, tuple[int, dict]], batch_size: int,
                  per_image: bool = False) -> list[list[int]]:
    """The fixed plan of object maps: each image batch's objects in order, cut every ``batch_size``; or, with
    ``per_image`` (plain gradients, which share one forward pass per image), each image's objects as one group."""
    by_image: dict[int, list[int]] = {}
    for ann, (image_id, _) in entries.items():
        by_image.setdefault(image_id, []).append(ann)
    groups = []
    for batch in plan:
        if per_image:
            groups += [by_image[i] for i in batch if by_image.get(i)]
            continue
        objects = [ann for i in batch for ann in by_image.get(i, [])]
        groups += [objects[k:k + batch_size] for k in range(0, len(objects), batch_size)]
    return groups


def compute_object_maps(detector: Detector, gt: GroundTruth, image_ids, store: MapStore,
                        config: AttributionConfig | None = None, batch_size: int = 4, progress: bool | None = None,
                        label: str = "", plan_ids=None, workers: int = 2) -> MapRun:
    """Compute and store the map of every object of ``image_ids`` that ``store`` lacks (resumable per object).

    Objects are attributed in groups of ``batch_size`` that share one padded
    canvas (an object's copy of its image is one batch entry); plain
    gradients instead in groups of one image's objects, which share one
    forward pass (:func:`~gradlens.attribution.methods.shared_forward_gradients`).
    The groups follow a plan fixed by ``plan_ids`` (default ``image_ids``): the
    images in batches of one canvas, each batch's objects in order, cut every
    ``batch_size`` (or by image); a group with a missing object is computed whole, and how
    groups run (a thread per core on the CPU) is decided by the machine, not
    by the call. So a resumed run, or one image's objects asked for alone,
    gets bit-identical maps. Under ``torchrun`` the groups are shared among the
    ranks like image batches (:mod:`gradlens.distributed`).
    """
    device = next(detector.parameters()).device
    config = (config or AttributionConfig(target="object")).check(device)
    if config.target != "object":
        raise GradlensError("compute_object_maps needs an attribution config with target='object'.")
    ids = [int(i) for i in image_ids]
    wanted = set(ids)
    plan = [b for b in plan_batches(detector, gt, sorted(wanted | {int(i) for i in (plan_ids or [])}), batch_size)
            if wanted.intersection(b)]
    entries = object_entries(detector, gt, [i for batch in plan for i in batch])
    groups = object_groups(plan, entries, batch_size, per_image=config.method == "gradient")
    # On the CPU groups run one per core with single-threaded operators whenever the machine has several cores:
    # decided by the machine, not by how many groups this call has, so any subset gets the whole run's bits.
    single_threaded = batch_threads(device, 2) > 1
    problems = stored_problems(store, gt, {ann: image_id for ann, (image_id, _) in entries.items()})
    reused = sum(1 for ann, (i, _) in entries.items() if i in wanted and problems[ann] is None)
    todo = [g for g in groups if any(problems[ann] is not None and entries[ann][0] in wanted for ann in g)]
    replaced = 0
    for ann in (ann for g in todo for ann in g):  # damaged, another store's or of another shape: computed again
        if problems[ann] not in (None, "missing"):
            store.path(ann).unlink(missing_ok=True)
            replaced += 1
    if not todo:
        return MapRun(computed=0, reused=reused, store=store, replaced=replaced)
    threads = batch_threads(device, len(todo)) if single_threaded else 1
    missing = sum(problems[ann] is not None for g in todo for ann in g)
    world = distributed.active()
    where = f" on {world.size} ranks" if world is not None else (f", {threads} threads" if threads > 1 else "")
    bar = track(None, f"object gradients {label} ({missing} objects{where})".replace("  ", " "), progress, unit="object",
                total=missing)
    try:
        if world is None:
            computed = compute_batches(detector, gt, todo, store, config, batch_size, workers, threads, single_threaded,
                                       on_batch=bar.update, entries=entries)
        else:
            job = rank_job(detector, gt, store, config, batch_size, workers, single_threaded)
            costs = batch_costs(detector, gt, [[entries[ann][0] for ann in g] for g in todo])
            computed = distributed.run_job(
                "object_maps", job, todo, costs, len(entries), bar=bar, unit="object",
                own=lambda shares, status: rank_share(detector, gt, shares, store, config, batch_size, workers,
                                                      single_threaded, status, entries=entries))
    finally:
        bar.close()
    return MapRun(computed=computed, reused=reused, store=store, replaced=replaced)


@distributed.handler("object_maps")
def _object_maps_job(job: dict, groups: list[list[int]], status) -> int:
    """A rank > 0's share of rank 0's object maps: the same inputs, checked; maps written to the shared store."""
    detector, gt, config, store = rank_inputs(job, "per-object gradient maps")
    images = sorted({object_image(gt, ann) for g in groups for ann in g})
    entries = object_entries(detector, gt, images)
    return rank_share(detector, gt, groups, store, config, job["batch_size"], job["workers"], job["single_threaded"],
                      status, entries=entries)


def object_losses(detector: Detector, image: torch.Tensor, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's background loss and per-object losses (focal + L1 each), as :meth:`object_losses` splits them."""
    parts = detector.object_losses([image], [targets.as_dict() if hasattr(targets, "as_dict") else targets])[0]
    total = total_loss(detector, parts)
    return total[0], total[1:]
