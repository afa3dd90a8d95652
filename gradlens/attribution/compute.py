"""Gradient maps of many images into a :class:`~gradlens.attribution.store.MapStore`, streamed and resumable.

Images are decoded by DataLoader workers while the network runs; each batch
holds images of one padded canvas (so batching never changes a map); each
map is reduced over channels and written as soon as its batch is done.

The batch plan is fixed by the full list of images, and a rerun skips the
batches whose maps all exist: a run killed halfway and started again
computes the missing images in the same batches as an uninterrupted run
would, so the two give bit-identical maps.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import DataLoader

from gradlens.attribution.methods import (
    AttributionConfig,
    attribute_with_losses,
    frozen_inference_mode,
    reduce_channels,
)
from gradlens import distributed
from gradlens.attribution.store import MapStore
from gradlens.errors import GradlensError
from gradlens.attribution.targets import image_targets, needs_masks
from gradlens.data.coco import GroundTruth
from gradlens.fileio import sha256_file
from gradlens.batching import ImageFiles, batch_costs, loaded_images, plan_batches
from gradlens.models.interface import Detector, arithmetic_revisions
from gradlens.device import Inline, batch_threads, single_threaded_ops
from gradlens.progress import track

MAP_FORMAT = 1


OBJECT_MAP_FORMAT = 2  # 2: object groups run as image batches do (a thread per core on the CPU): other last bits


def detector_identity(detector: Detector, checkpoint_sha256: str, gt: GroundTruth) -> dict:
    """Which detector, run how, on which dataset: the part every store key of its results shares."""
    identity = {
        "checkpoint_sha256": checkpoint_sha256,
        "arch": getattr(detector, "arch_name", type(detector).__name__),
        "annotations_sha256": gt.sha256,
        "images": str(gt.images_dir.resolve()) if gt.images_dir else None,
        "exif_orientation": gt.exif_orientation,
        "preprocess": detector.preprocess.to_dict(),
        "categories": [c.get("id") for c in getattr(detector, "categories", [])],
    }
    # a module whose arithmetic changed (its results differ in their last bits) says so; stores made before
    # are then not reused. Absent everywhere else, so no other store's key changes.
    revisions = arithmetic_revisions(detector)
    if revisions:
        identity["arithmetic_revisions"] = revisions
    return identity


def map_store_key(detector: Detector, checkpoint_sha256: str, gt: GroundTruth, config: AttributionConfig,
                  batch_size: int | None = None) -> dict:
    """Everything that changes a map: the store's identity.

    The batch size is part of it: batch mates change a map only in the last
    bits of float arithmetic, but a store promises bit-identical maps on resume.
    """
    key = {"batch_size": batch_size, "map_format": MAP_FORMAT, **detector_identity(detector, checkpoint_sha256, gt),
           "attribution": config.to_dict()}
    if config.target == "object":  # an older object store's maps differ in their last bits: not mixed in
        key["object_map_format"] = OBJECT_MAP_FORMAT
    randomisation = getattr(detector, "randomisation", None)
    if randomisation is not None:  # a re-initialised copy (gradlens.faithfulness.randomise): other weights
        key["randomised"] = dict(randomisation)
    return key


@dataclass
class MapRun:
    computed: int  # maps written by this run (a wanted image's batch mates included)
    reused: int  # wanted images whose map was already stored
    store: MapStore
    replaced: int = 0  # stored maps found damaged, foreign or of the wrong shape, computed again


def _write_missing(store: MapStore, maps) -> int:
    written = 0
    for image_id, magnitude, loss in maps:
        if not store.has(image_id):
            store.write(image_id, magnitude, loss=loss)
            written += 1
    return written


def compute_maps(
    detector: Detector,
    gt: GroundTruth,
    image_ids,
    store: MapStore,
    config: AttributionConfig | None = None,
    batch_size: int = 4,
    workers: int = 2,
    progress: bool | None = None,
    label: str = "",
    plan_ids=None,
) -> MapRun:
    """Compute and store the map of every image in ``image_ids`` that ``store`` lacks.

    Batches are planned over ``plan_ids`` (default: ``image_ids``), and each
    batch holding a wanted image is computed whole, so a subset gets the very
    maps a run over all of ``plan_ids`` gives.
    """
    device = next(detector.parameters()).device
    config = (config or AttributionConfig()).check(device)
    wanted = {int(i) for i in image_ids}
    full_plan = plan_batches(detector, gt, sorted(wanted | {int(i) for i in (plan_ids or [])}), batch_size)
    # how batches are run (threads or not) changes the last bits of a map: decided by the whole plan,
    # so a subset ('figure --image-id') computes each batch exactly as the whole run does
    threads = batch_threads(device, len(full_plan))
    plan = [batch for batch in full_plan if wanted.intersection(batch)]
    replaced = _drop_unusable_maps(store, gt, [i for batch in plan for i in batch])
    todo = [batch for batch in plan if any(not store.has(i) for i in batch)]
    already = sum(1 for i in wanted if store.has(i))
    if not todo:
        return MapRun(computed=0, reused=already, store=store, replaced=replaced)
    name = f"gradients {label} ".replace("  ", " ")
    world = distributed.active()
    if world is None:
        desc = f"{name}({sum(map(len, todo))} images{f', {threads} threads' if threads > 1 else ''})"
    else:
        desc = f"{name}({sum(map(len, todo))} images on {world.size} ranks)"
    bar = track(None, desc, progress, unit="batch", total=len(todo))
    try:
        if world is None:
            computed = compute_batches(detector, gt, todo, store, config, batch_size, workers, threads, threads > 1,
                                       on_batch=lambda written: bar.update())
        else:
            job = rank_job(detector, gt, store, config, batch_size, workers, threads > 1)
            computed = distributed.run_job(
                "maps", job, todo, batch_costs(detector, gt, todo), sum(map(len, full_plan)), bar=bar,
                own=lambda batches, status: rank_share(detector, gt, batches, store, config, batch_size, workers,
                                                       threads > 1, status))
    finally:
        bar.close()
    return MapRun(computed=computed, reused=already, store=store, replaced=replaced)


def compute_batches(detector: Detector, gt: GroundTruth, batches: list[list[int]], store: MapStore,
                    config: AttributionConfig, batch_size: int, workers: int, threads: int, single_threaded: bool,
                    on_batch=None, stop=None, entries: dict[int, tuple[int, dict]] | None = None) -> int:
    """Compute and store the maps of ``batches`` (each whole, in order); returns the maps written.

    A batch lists map names. ``entries`` says what each name is: ``name ->
    (image id, targets of the loss)``; by default a name is an image id and its
    map is of the image's whole loss (per-object maps name one entry per
    object, :mod:`gradlens.attribution.objects`). ``threads`` batches run at
    once (CPU), each on one core when ``single_threaded`` (it changes the last
    bits of a map, so the caller decides it by the whole plan).
    ``on_batch(written)`` runs after each batch and ``stop()`` between batches
    (it may raise to end early); every map already computed is written however
    the run ends.
    """
    device = next(detector.parameters()).device
    if device.type == "cpu":
        # On the CPU the network already uses every core; decoding workers would only contend with it
        # (measured on 2 cores: 2 workers cost 20 % of the throughput). JPEG decoding is ~2 % of the work.
        workers = min(workers, max(0, (os.cpu_count() or 1) - torch.get_num_threads()))
    if entries is None:
        entries = {i: (i, image_targets(gt, i, detector.categories, masks=needs_masks(detector)).as_dict()) for batch in batches for i in batch}
    # each image decoded once per batch, however many of the batch's maps are of it (per-object maps)
    decoded = [list(dict.fromkeys(entries[name][0] for name in batch)) for batch in batches]
    paths = {i: gt.image_path(i) for batch in decoded for i in batch}
    loader = DataLoader(ImageFiles(paths, gt.exif_orientation), batch_sampler=decoded, num_workers=workers, collate_fn=list,
                        pin_memory=device.type == "cuda")

    def work(names: list[int], images: list[torch.Tensor]) -> list[tuple[int, torch.Tensor, float]]:
        # regrouped by the decoded size, so a file whose size disagrees with the annotation stays exact
        attributions, losses = attribute_with_losses(detector, images, [entries[n][1] for n in names], config, batch_size)
        return [(n, reduce_channels(a, config.channel_reduce).cpu(), loss) for n, a, loss in zip(names, attributions, losses)]

    computed = 0

    def collect(future: Future) -> None:
        nonlocal computed
        written = future.result()
        computed += written
        if on_batch is not None:
            on_batch(written)

    with frozen_inference_mode(detector), single_threaded_ops(single_threaded):
        if threads > 1:
            # CPU: one batch per thread, each thread's operators on one core. A single image's operators
            # parallelise poorly (measured on 2 cores: 1.2-1.4x more images per second this way). Each
            # batch is still computed whole by one thread, so its maps do not depend on the threads.
            executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gradlens-gradients")
        else:
            # one batch at a time; on a GPU the maps are compressed and written by a background thread
            # (zlib releases the GIL) while the next batch runs
            executor = Inline() if device.type == "cpu" else ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradlens-map-writer")
        pending: deque[Future] = deque()
        with executor as pool:
            try:
                for names, batch in zip(batches, loader):
                    ids, pixels = loaded_images(batch, device)
                    of_image = dict(zip(ids, pixels))
                    images = [of_image[entries[name][0]] for name in names]
                    del of_image, pixels
                    if threads > 1:
                        pending.append(pool.submit(lambda i=names, x=images: _write_missing(store, work(i, x))))
                    else:
                        pending.append(pool.submit(_write_missing, store, work(names, images)))
                    del images
                    while len(pending) > max(2, 2 * threads):  # bounded: memory does not grow with the run
                        collect(pending.popleft())
                        if stop is not None:
                            stop()
            except BaseException:  # a failure, Ctrl-C or another rank's failure: batches not started are dropped...
                for future in pending:
                    future.cancel()
                raise
            finally:  # ...and every map already computed is still written
                while pending:
                    future = pending.popleft()
                    if not future.cancelled():
                        collect(future)
    return computed


def rank_job(detector, gt, store, config, batch_size, workers, single_threaded) -> dict:
    """What another torchrun rank needs to compute its share of a map step: the inputs to load and check."""
    return {"detector": distributed.detector_spec(detector), "gt": distributed.ground_truth_spec(gt),
            "store": str(store.folder), "key": store.key, "config": asdict(config), "batch_size": batch_size,
            "workers": workers, "single_threaded": single_threaded, "shared": {"map store": str(store.folder)}}


def rank_inputs(job: dict, what: str = "gradient maps"):
    """On a rank > 0: load :func:`rank_job`'s detector, dataset, config and store, checked to be rank 0's."""
    detector = distributed.detector_from_spec(job["detector"])
    gt = distributed.ground_truth_from_spec(job["gt"])
    config = AttributionConfig(**job["config"]).check(next(detector.parameters()).device)
    store = MapStore(job["store"])
    mine = json.loads(json.dumps(map_store_key(detector, sha256_file(job["detector"]["checkpoint"]), gt, config,
                                               batch_size=job["batch_size"])))
    distributed.check_same_inputs(mine, job["key"], what)
    distributed.check_same_inputs(store.key, job["key"], f"the map store {store.folder}")
    return detector, gt, config, store


def rank_share(detector, gt, batches, store, config, batch_size, workers, single_threaded, status, entries=None) -> int:
    """One rank's share of a map step. Progress counts batches, or maps written when ``entries`` are given
    (per-object maps, whose bar counts objects)."""
    if not distributed.active().main:  # rank 0 is the reference: the others must decode the bytes it decodes
        images = dict.fromkeys(entries[name][0] if entries is not None else name for batch in batches for name in batch)
        distributed.check_same_images(status, [gt.image_path(i) for i in images])
    device = next(detector.parameters()).device
    threads = batch_threads(device, len(batches)) if single_threaded else 1
    return compute_batches(detector, gt, batches, store, config, batch_size, workers, threads, single_threaded,
                           on_batch=lambda written: status.batch_done(1 if entries is None else written),
                           stop=status.stop_if_failed, entries=entries)


@distributed.handler("maps")
def _maps_job(job: dict, batches: list[list[int]], status) -> int:
    """A rank > 0's share of rank 0's gradient step: load the same inputs, check them, write maps to the shared store."""
    detector, gt, config, store = rank_inputs(job)
    return rank_share(detector, gt, batches, store, config, job["batch_size"], job["workers"], job["single_threaded"], status)


def stored_problems(store: MapStore, gt: GroundTruth, image_of: dict[int, int]) -> dict[int, str | None]:
    """Why the stored map of each name cannot be used (None: it can): missing, damaged, another store's file,
    or of another shape than its image as decoded. ``image_of`` maps each name to its image id (itself for
    image maps, the object's image for per-object maps); each image's header is read once."""
    from gradlens.data.images import image_size

    shapes: dict[int, tuple[int, int] | None] = {}
    problems: dict[int, str | None] = {}
    for name, image_id in image_of.items():
        if not store.has(name):
            problems[name] = "missing"
            continue
        if image_id not in shapes:
            try:
                shapes[image_id] = image_size(gt.image_path(image_id), gt.exif_orientation)
            except GradlensError:
                shapes[image_id] = None  # an unreadable image is reported when it is decoded
        problems[name] = store.problem(name, shapes[image_id])
    return problems


def _drop_unusable_maps(store: MapStore, gt: GroundTruth, image_ids: list[int]) -> int:
    """Delete stored maps that cannot be this store's map of their image (damaged, another store's file,
    another shape than the image) so they are computed again; returns how many."""
    dropped = 0
    for image_id, problem in stored_problems(store, gt, {i: i for i in image_ids}).items():
        if problem not in (None, "missing"):
            store.path(image_id).unlink(missing_ok=True)
            dropped += 1
    return dropped
