"""Fast batched inference of a detector over a COCO image set, cached by content.

Speed comes from decoding JPEGs in DataLoader workers while the network runs,
from batching, and from ``torch.inference_mode``. Batches only ever hold
images that one alone would be padded to the same canvas (same
:func:`~gradlens.models.preprocessing.transform.padded_size`), so a batch gives each image
exactly the detections it gets alone: batching changes speed, not results
(up to the last bits of floating-point summation order).

Results are cached as COCO results JSON under a key made of the checkpoint's
content hash, the annotation file's hash, the image folder and every setting
that can change a detection; a second ``select`` reuses them. An interrupted
run keeps what it finished in chunk files and resumes from them; under
torchrun the batches are shared out over the ranks (:mod:`gradlens.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from gradlens import distributed
from gradlens._version import __version__
from gradlens.data.coco import GroundTruth
from gradlens.data.detections import Detections, read_detections, write_detections
from gradlens.device import Inline, batch_threads, single_threaded_ops
from gradlens.errors import GradlensError
from gradlens.fileio import atomic_path, sha256_file, write_json
# batching and precision live in their own modules (shared with the gradient and faithfulness steps); their
# names stay importable from here, where they have always been
from gradlens.batching import (  # noqa: F401
    ImageFiles,
    ShapeGroupedBatches,
    annotated_sizes,
    batch_costs,
    loaded_images,
    plan_batches,
)
from gradlens.models.interface import Detector, arithmetic_revisions
from gradlens.precision import (  # noqa: F401
    AUTO_CURVE_TOLERANCE,
    GPU_DEFAULT_PRECISION,
    PRECISIONS,
    Precision,
    PrecisionScope,
    resolve_precision,
)
from gradlens.models.preprocessing.transform import padded_size
from gradlens.progress import track

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$GRADLENS_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradlens``, else ``~/.cache/gradlens``."""
    if env := os.environ.get("GRADLENS_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradlens"


@dataclass
class InferenceSettings:
    batch_size: int = 4
    workers: int = 2
    precision: Precision = "fp32"

    def check(self, device: torch.device) -> None:
        if self.precision not in PRECISIONS:
            raise GradlensError(f"Unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}.")
        if self.precision in ("tf32", "fp16") and device.type != "cuda":
            raise GradlensError(f"--precision {self.precision} needs a CUDA device; on {device.type} use fp32 (or bf16).")
        if self.batch_size < 1:
            raise GradlensError("--batch-size must be at least 1.")
        if self.workers < 0:
            raise GradlensError("--workers cannot be negative.")


def detect_images(
    detector: Detector,
    gt: GroundTruth,
    image_ids=None,
    settings: InferenceSettings | None = None,
    progress: bool | None = None,
    done: dict[int, list[dict]] | None = None,
    on_batch=None,
) -> dict[int, list[dict]]:
    """COCO result records per image id for ``image_ids`` (default: every image of ``gt``).

    ``done`` holds results already computed (from a partial run): batches
    whose images are all done are skipped, and the dict is filled in place, so
    a caller keeps every finished image even if a later batch fails.
    ``on_batch(results)`` is called after every batch. The batch plan is fixed
    by the whole list, so a resumed run computes each batch exactly as an
    uninterrupted one (bit-identical detections).
    """
    settings = settings or InferenceSettings()
    device = next(detector.parameters()).device
    settings.check(device)
    ids = [int(i) for i in (gt.image_ids if image_ids is None else image_ids)]
    results: dict[int, list[dict]] = done if done is not None else {}
    plan = plan_batches(detector, gt, ids, settings.batch_size)
    todo = [batch for batch in plan if any(i not in results for i in batch)]
    if not todo:
        return results
    threads = batch_threads(device, len(plan), "GRADLENS_INFERENCE_THREADS")
    bar = track(None, f"detecting {sum(map(len, todo))} images{f' ({threads} threads)' if threads > 1 else ''}", progress,
                unit="batch", total=len(todo))

    def finish(pairs: list[tuple[int, list[dict]]]) -> None:
        results.update(pairs)
        bar.update()
        if on_batch is not None:
            on_batch(results)

    try:
        run_detection_batches(detector, gt, todo, settings, threads, threads > 1, finish)
    finally:
        bar.close()
    return results


def run_detection_batches(detector: Detector, gt: GroundTruth, batches: list[list[int]], settings: InferenceSettings,
                          threads: int, single_threaded: bool, on_batch, stop=None) -> None:
    """Detect on ``batches`` (each run whole, in order); ``on_batch([(image_id, records), ...])`` after each, in
    this thread. ``threads`` batches run at once (CPU); ``single_threaded`` keeps each batch's operators on one
    core (it changes the last bits, so the caller decides it by the whole plan). ``stop()`` is called after
    every batch and may raise to end the run early (another rank failed)."""
    device = next(detector.parameters()).device
    paths = {i: gt.image_path(i) for batch in batches for i in batch}
    workers = settings.workers
    if threads > 1:  # decoding workers would take the cores the batch threads use (JPEG decoding is ~5 % of the work)
        workers = min(workers, max(0, (os.cpu_count() or 1) - threads))
    loader = DataLoader(ImageFiles(paths, gt.exif_orientation), batch_sampler=batches, num_workers=workers,
                        collate_fn=list, pin_memory=device.type == "cuda", persistent_workers=False)
    label_to_id = [c["id"] for c in detector.categories]
    detector.eval()

    def work(ids: list[int], images: list[torch.Tensor]) -> list[tuple[int, list[dict]]]:
        with torch.inference_mode(), PrecisionScope(settings.precision, device):
            # Annotation sizes decide grouping; if a file disagrees, run its batch image by image so batching stays exact.
            canvases = [padded_size(*im.shape[-2:], detector.preprocess) for im in images]
            if len(set(canvases)) == 1:
                outputs = detector.detect(images)
            else:
                outputs = [detector.detect([im])[0] for im in images]
            return [(image_id, detection_records(image_id, out, label_to_id)) for image_id, out in zip(ids, outputs)]

    def finish(future: Future) -> None:
        on_batch(future.result())
        if stop is not None:
            stop()

    pending: deque[Future] = deque()
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gradlens-detect") if threads > 1 else Inline()
    with single_threaded_ops(single_threaded), executor as pool:
        try:
            for batch in loader:
                ids, images = loaded_images(batch, device)
                pending.append(pool.submit(work, ids, images))
                del images
                while len(pending) > (2 * threads if threads > 1 else 0):  # bounded: memory does not grow with the run
                    finish(pending.popleft())
            while pending:
                finish(pending.popleft())
        except BaseException:  # a failure or Ctrl-C: batches not started are dropped, those running are kept
            for future in pending:
                future.cancel()
            for future in pending:
                if not future.cancelled():
                    try:
                        on_batch(future.result())
                    except BaseException:  # noqa: BLE001 - the first failure is the one raised
                        pass
            raise


def detection_records(image_id: int, out: dict, label_to_id: list) -> list[dict]:
    """COCO result records of one image from :meth:`~gradlens.models.detectors.retinanet.RetinaNetDetector.detect`'s output
    (labels mapped to category ids; a label that is no COCO category is left out), as score writes them."""
    boxes = out["boxes"].float().cpu().numpy()
    scores = out["scores"].float().cpu().numpy()
    labels = out["labels"].cpu().numpy()
    masks = out.get("masks")
    records = []
    for k, ((x1, y1, x2, y2), score, label) in enumerate(zip(boxes.tolist(), scores.tolist(), labels.tolist())):
        category = label_to_id[label]
        if category is None:
            # torchvision's placeholder labels ('N/A', background) are no COCO category. Boxes clipped to zero
            # area at the border are kept, as mmdetection and torchvision keep them: they match nothing
            continue
        record = {"image_id": image_id, "category_id": int(category), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
        if masks is not None:
            record["segmentation"] = mask_rle(masks[k])
        records.append(record)
    return records


def mask_rle(mask: torch.Tensor) -> dict:
    """One instance mask as COCO's compressed RLE (``{"size": [h, w], "counts": str}``), as mmdetection's
    ``results2json`` writes it: boolean masks as they are, torchvision's ``[1, H, W]`` probabilities at 0.5."""
    from pycocotools import mask as mask_utils

    if mask.ndim == 3:
        mask = mask[0]
    binary = mask if mask.dtype == torch.bool else mask >= 0.5
    rle = mask_utils.encode(np.asfortranarray(binary.cpu().numpy().astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------------------------------------
# the cache


def cache_key(checkpoint_sha256: str, gt: GroundTruth, detector: Detector, settings: InferenceSettings,
              arch: str | None = None) -> dict:
    """Everything that can change a detection, as a JSON-able dict (its hash names the cache file)."""
    key = {
        "cache_format": CACHE_FORMAT,
        "checkpoint_sha256": checkpoint_sha256,
        "arch": arch or detector.arch_name,
        "annotations_sha256": gt.sha256,
        "images": str(Path(gt.images_dir).resolve()) if gt.images_dir else None,
        "exif_orientation": gt.exif_orientation,
        "preprocess": detector.preprocess.to_dict(),
        # a family's post-processing settings where it has them as an object (RetinaNet's); a wrapped model's are
        # in its checkpoint_sha256 (LossDictDetector.identity_sha256 hashes the model's settings with its weights)
        "test_cfg": detector.test_cfg.to_dict() if hasattr(getattr(detector, "test_cfg", None), "to_dict") else None,
        "categories": [c["id"] for c in detector.categories],
        "precision": settings.precision,
    }
    # arithmetic that changed in its last bits, and post-processing that changed the order of tied scores:
    # caches made before are not reused (absent where nothing changed, so those keys stay as they were)
    revisions = arithmetic_revisions(detector)
    if revisions:
        key["arithmetic_revisions"] = revisions
    if getattr(detector, "postprocess_revision", None) is not None:
        key["postprocess_revision"] = detector.postprocess_revision
    return json.loads(json.dumps(key))  # as it reads back from the meta file (tuples become lists)


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class InferenceResult:
    detections: Detections
    path: Path
    reused: bool
    seconds: float
    images: int


def cached_detections(
    detector: Detector,
    checkpoint_sha256: str,
    gt: GroundTruth,
    settings: InferenceSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    save_every_s: float = 60.0,
) -> InferenceResult:
    """Detections of every image of ``gt``, from the cache when this exact run was done before.

    The result is also a COCO results JSON at ``result.path``. While running,
    finished images are saved as chunks in a ``.partial/`` folder every ``save_every_s``
    seconds and on any failure, so a killed or failed run resumes.
    """
    settings = settings or InferenceSettings()
    key = cache_key(checkpoint_sha256, gt, detector, settings)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / "detections"
    name = _digest(key)
    final, meta_path = folder / f"{name}.json", folder / f"{name}.meta.json"
    legacy_partial = folder / f"{name}.partial.json"  # the single partial file of gradlens < 0.5
    start = time.perf_counter()
    if final.exists() and meta_path.exists():
        try:
            if json.loads(meta_path.read_text()).get("key") == key:
                dets = read_detections(final, gt)
                return InferenceResult(dets, final, True, time.perf_counter() - start, len(gt.image_ids))
        except (GradlensError, OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    folder.mkdir(parents=True, exist_ok=True)
    chunks = PartialResults(folder / f"{name}.partial", key, every=_save_every(save_every_s))
    results: dict[int, list[dict]] = {**_read_partial(legacy_partial, key), **chunks.load()}
    resumed = len(results)
    try:
        if distributed.active() is None:
            detect_images(detector, gt, settings=settings, progress=progress, done=results, on_batch=chunks.save_if_due)
        else:
            _detect_across_ranks(detector, gt, settings, key, chunks, results, progress)
    except BaseException:
        chunks.save(results)  # keep every finished image for the next run
        raise
    records = [r for i in sorted(results) for r in results[i]]
    write_detections(records, final)
    write_json(meta_path, {"key": key, "gradlens_version": __version__, "images": len(results), "detections": len(records)})
    chunks.clear()
    legacy_partial.unlink(missing_ok=True)
    dets = read_detections(final, gt)
    return InferenceResult(dets, final, False, time.perf_counter() - start, len(results) - resumed)


def _save_every(default: float) -> float:
    raw = os.environ.get("GRADLENS_PARTIAL_SAVE_S")
    if raw is None:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds >= 0):
        raise GradlensError(f"GRADLENS_PARTIAL_SAVE_S is {raw!r}; set it to a number of seconds, 0 or more.")
    return seconds


class PartialResults:
    """The images an interrupted run finished, as chunk files in one folder (``<cache name>.partial/``).

    Each save writes only the images finished since the last one, atomically,
    so saving costs the same at image 10 and at image 5,000, and several
    torchrun ranks save side by side; loading reads every chunk of this key.
    """

    def __init__(self, folder: Path, key: dict, tag: str = "0", every: float = 60.0):
        self.folder, self.key, self.tag, self.every = Path(folder), key, tag, every
        self.saved: set[int] = set()
        self._count = 0
        self._last_save = time.perf_counter()

    def load(self) -> dict[int, list[dict]]:
        results: dict[int, list[dict]] = {}
        for path in sorted(self.folder.glob("chunk-*.json")):
            results.update(_read_partial(path, self.key))
        self.saved.update(results)
        return results

    def save_if_due(self, results: dict[int, list[dict]]) -> None:
        """:meth:`save` when ``every`` seconds have passed since the last save (or since the start)."""
        if time.perf_counter() - self._last_save >= self.every:
            self.save(results)

    def save(self, results: dict[int, list[dict]]) -> int:
        self._last_save = time.perf_counter()
        new = [i for i in results if i not in self.saved]
        if not new:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        self._count += 1
        path = self.folder / f"chunk-{self.tag}-{os.getpid()}-{time.time_ns()}-{self._count}.json"
        _write_partial(path, self.key, {i: results[i] for i in new})
        self.saved.update(new)
        return len(new)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _detect_across_ranks(detector, gt, settings, key, chunks, results, progress) -> None:
    """Rank 0 under torchrun: the batches a single process would run, split over the ranks (see gradlens.distributed)."""
    ids = [int(i) for i in gt.image_ids]
    plan = plan_batches(detector, gt, ids, settings.batch_size)
    todo = [batch for batch in plan if any(i not in results for i in batch)]
    if not todo:
        return
    device = next(detector.parameters()).device
    single_threaded = batch_threads(device, len(plan), "GRADLENS_INFERENCE_THREADS") > 1
    job = {"detector": distributed.detector_spec(detector), "gt": distributed.ground_truth_spec(gt), "key": key,
           "settings": asdict(settings), "single_threaded": single_threaded, "partial": str(chunks.folder),
           "save_every_s": chunks.every, "shared": {"cache directory": str(chunks.folder.parent)}}
    world = distributed.active()
    bar = track(None, f"detecting {sum(map(len, todo))} images on {world.size} ranks", progress, unit="batch", total=len(todo))
    try:
        distributed.run_job("detect", job, todo, batch_costs(detector, gt, todo), len(ids), bar=bar,
                            own=lambda batches, status: _detect_share(detector, gt, batches, settings, single_threaded,
                                                                      chunks, results, status))
    finally:
        bar.close()
    results.update(chunks.load())  # every rank's chunks
    missing = [i for batch in todo for i in batch if i not in results]
    if missing:  # the marker check makes this unlikely; a merge with holes would be a silent wrong result
        raise GradlensError(f"the detections of {len(missing)} image(s) computed by the other ranks (e.g. image "
                            f"{missing[0]}) are not in {chunks.folder}: torchrun's ranks need the cache directory on one "
                            f"shared file system; run the same command again to compute them.")


def _detect_share(detector, gt, batches, settings, single_threaded, chunks, results, status) -> int:
    """One rank's batches: results saved as chunks when due and when the share ends, however it ends."""
    device = next(detector.parameters()).device
    threads = batch_threads(device, len(batches), "GRADLENS_INFERENCE_THREADS") if single_threaded else 1

    def on_batch(pairs):
        results.update(pairs)
        chunks.save_if_due(results)
        status.batch_done()

    try:
        run_detection_batches(detector, gt, batches, settings, threads, single_threaded, on_batch, stop=status.stop_if_failed)
    finally:
        chunks.save(results)
    return sum(map(len, batches))


@distributed.handler("detect")
def _detect_job(job: dict, batches: list[list[int]], status) -> int:
    """A rank > 0's share of rank 0's inference step: load the same inputs, check them, compute, save chunks."""
    detector = distributed.detector_from_spec(job["detector"])
    gt = distributed.ground_truth_from_spec(job["gt"])
    settings = InferenceSettings(**job["settings"])
    mine = cache_key(sha256_file(job["detector"]["checkpoint"]), gt, detector, settings)
    distributed.check_same_inputs(mine, job["key"], "detections")
    distributed.check_same_images(status, [gt.image_path(i) for batch in batches for i in batch])
    chunks = PartialResults(Path(job["partial"]), job["key"], tag=str(distributed.active().rank), every=job["save_every_s"])
    return _detect_share(detector, gt, batches, settings, job["single_threaded"], chunks, {}, status)


def _read_partial(path: Path, key: dict) -> dict[int, list[dict]]:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return {}
        return {int(k): v for k, v in data["results"].items()}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return {}


def _write_partial(path: Path, key: dict, results: dict[int, list[dict]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"key": key, "results": {str(k): v for k, v in results.items()}}))
