"""The detector on every perturbed image of a selection: batched, a thread per core, resumable per image,
shared out under ``torchrun``.

For one image and one model, the steps of :mod:`~gradlens.faithfulness.perturb` give a fixed list of
perturbed images (:func:`image_variants`): the image itself and the filled image once each (both
orders start there), then every (mode, order, q > 0). They all share the image's padded canvas, so
they run in batches of ``batch_size`` of that one image, and each batch gives the detections and the
total detection loss of its images from one forward pass
(:meth:`~gradlens.models.detectors.retinanet.RetinaNetDetector.detect_with_losses`, in inference mode). The
detections become COCO records exactly as ``score`` writes them and are scored against the image's
objects as ``score`` scores them (:func:`~gradlens.scoring.quality.variant_qualities`).

Each image's rows are written to one small JSON file when all of them are done, under a key that names
everything that changes them (checkpoint, dataset, the map ranking the pixels, fill, fractions, seed,
batch size, precision): a killed run keeps every finished image, and a rerun computes only the others,
with the same batches, so it gets the same numbers. Under torchrun the images are the unit of work: each
is computed whole by one rank with the arithmetic one process uses, so the merged table is byte-identical.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradlens import distributed
from gradlens._version import __version__
from gradlens.attribution.compute import detector_identity
from gradlens.attribution.methods import frozen_inference_mode
from gradlens.attribution.store import MapStore, key_digest
from gradlens.attribution.targets import image_targets, needs_masks
from gradlens.data.coco import GroundTruth
from gradlens.data.images import read_image
from gradlens.device import Inline, batch_threads, single_threaded_ops
from gradlens.errors import GradlensError
from gradlens.faithfulness.perturb import (
    DEFAULT_FRACTIONS,
    MODES,
    ORDERS,
    check_fill,
    check_fractions,
    fill_image,
    map_order,
    perturbed,
    random_order,
    ranks,
)
from gradlens.fileio import atomic_path, sha256_file, write_json
from gradlens.inference import detection_records
from gradlens.precision import PrecisionScope
from gradlens.models.interface import Detector, total_loss
from gradlens.models.preprocessing.transform import padded_size
from gradlens.progress import track
from gradlens.scoring.quality import variant_qualities

RESULT_FORMAT = 1
RESULT_STORE_FILE = "store.json"
ROW_FIELDS = ("mode", "order", "q", "quality", "loss", "detections")


@dataclass(frozen=True)
class FaithfulnessConfig:
    """What to perturb and how: the fill, the q grid (from 0) and the seed of the random order and noise."""

    fill: str = "mean"
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    seed: int = 0

    def check(self) -> "FaithfulnessConfig":
        """The same settings, checked; one sentence for a bad one."""
        try:
            check_fill(self.fill)
            fractions = check_fractions(self.fractions)
        except ValueError as exc:
            raise GradlensError(str(exc)) from None
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= int(self.seed) < 2**63:
            raise GradlensError(f"The seed must be an integer from 0 to 2**63 - 1; got {self.seed!r}.")
        return FaithfulnessConfig(self.fill, fractions, int(self.seed))

    def to_dict(self) -> dict:
        return {"fill": self.fill, "fractions": list(self.fractions), "seed": self.seed}


def image_variants(config: FaithfulnessConfig) -> list[tuple[str, str | None, float]]:
    """The perturbed images one image needs, each once: (mode, order, q); order None at q = 0, where both
    orders start from the same image (the image itself for deletion, the filled image for insertion)."""
    shared = [(mode, None, 0.0) for mode in MODES]
    return shared + [(mode, order, q) for mode in MODES for order in ORDERS for q in config.fractions[1:]]


def expected_rows(config: FaithfulnessConfig) -> list[tuple[str, str, float]]:
    """The (mode, order, q) of an image's rows, in the order they are stored and tabled."""
    return [(mode, order, q) for mode in MODES for order in ORDERS for q in config.fractions]


def faithfulness_key(detector: Detector, checkpoint_sha256: str, gt: GroundTruth, maps: MapStore,
                     config: FaithfulnessConfig, batch_size: int, precision: str, class_agnostic: bool,
                     single_threaded: bool) -> dict:
    """Everything that changes an image's rows: the result store's identity. The maps that rank the pixels are
    named as their folder is (their key and dtype); how the arithmetic runs (device type, one core per image or
    not, batch size, precision) changes the last bits, so a resumed run must run it the same way."""
    return {
        "result_format": RESULT_FORMAT,
        **detector_identity(detector, checkpoint_sha256, gt),
        # a family's post-processing and loss settings, where it has them as objects (RetinaNet's do)
        **{name: getattr(detector, name).to_dict() for name in ("test_cfg", "loss_cfg")
           if hasattr(getattr(detector, name, None), "to_dict")},
        "map_store": key_digest({**maps.key, "map_dtype": maps.map_dtype}),
        "faithfulness": config.to_dict(),
        "device_type": next(detector.parameters()).device.type,
        "single_threaded": bool(single_threaded),
        "batch_size": int(batch_size),
        "precision": precision,
        "class_agnostic": bool(class_agnostic),
    }


class ResultStore:
    """One JSON file per image: its rows (:data:`ROW_FIELDS`) for every (mode, order, q), and the store key.

    A file is data anyone can edit: one whose key, rows or values are not what this store writes is not
    used (it is computed again), never trusted.
    """

    def __init__(self, folder: str | Path, key: dict | None = None, config: FaithfulnessConfig | None = None):
        self.folder = Path(folder)
        meta = self.folder / RESULT_STORE_FILE
        if key is None:  # an existing store (another torchrun rank opens rank 0's)
            try:
                stored = json.loads(meta.read_text())
                key = stored["key"]
            except (OSError, ValueError, KeyError, TypeError):
                raise GradlensError(f"{self.folder} is not a faithfulness result store (no readable {RESULT_STORE_FILE}).") from None
        self.key = key
        self.digest = key_digest(key)
        if config is None:
            try:
                settings = key["faithfulness"]
                config = FaithfulnessConfig(settings["fill"], tuple(settings["fractions"]), settings["seed"])
            except (KeyError, TypeError, AttributeError):
                raise GradlensError(f"{meta} is damaged (no faithfulness settings); delete {self.folder} to have its "
                                    "results computed again.") from None
        self.config = config.check()
        self.expected = expected_rows(self.config)
        if not meta.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(meta, {"gradlens_version": __version__, "key": key})

    def path(self, image_id: int) -> Path:
        return self.folder / f"{int(image_id)}.json"

    def rows(self, image_id: int) -> list[dict] | None:
        """The image's rows, or None when there is no usable file (missing, damaged, another store's)."""
        try:
            data = json.loads(self.path(image_id).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("key") != self.digest or data.get("image_id") != int(image_id):
            return None
        rows = data.get("rows")
        if not isinstance(rows, list) or len(rows) != len(self.expected):
            return None
        out = []
        for row, (mode, order, q) in zip(rows, self.expected):
            if not isinstance(row, list) or len(row) != len(ROW_FIELDS) or row[:3] != [mode, order, q]:
                return None
            quality, loss, count = row[3], row[4], row[5]
            quality = math.nan if quality is None else quality
            if not (isinstance(quality, float) and (math.isnan(quality) or 0.0 <= quality <= 1.0)):
                return None
            loss = math.nan if loss is None else loss
            if not (isinstance(loss, float) and (math.isnan(loss) or loss >= 0) and not math.isinf(loss)) and not (
                    isinstance(loss, int) and not isinstance(loss, bool) and loss >= 0):
                return None
            if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
                return None
            # only a map-order row of a constant map is not computed (NaN quality and loss, no detections);
            # the unperturbed/filled image and every random-order row always are
            missing = math.isnan(quality) or math.isnan(float(loss))
            if missing and not (order == "map" and q > 0 and math.isnan(quality) and math.isnan(float(loss)) and count == 0):
                return None
            out.append(dict(zip(ROW_FIELDS, (mode, order, q, quality, float(loss), count))))
        return out

    def has(self, image_id: int) -> bool:
        return self.rows(image_id) is not None

    def write(self, image_id: int, rows: list[dict]) -> None:
        if [(r["mode"], r["order"], r["q"]) for r in rows] != self.expected:
            raise GradlensError("internal: faithfulness rows out of the store's order")  # a bug, not a user mistake
        data = {"key": self.digest, "image_id": int(image_id),
                "rows": [[r["mode"], r["order"], r["q"], None if math.isnan(r["quality"]) else r["quality"],
                          None if math.isnan(r["loss"]) else r["loss"], r["detections"]] for r in rows]}
        with atomic_path(self.path(image_id)) as tmp:
            tmp.write_text(json.dumps(data) + "\n")  # floats as repr: read back bit for bit


def order_ranks(magnitude: np.ndarray, seed: int, image_id: int) -> dict[str, np.ndarray | None]:
    """Each pixel's rank in the map's order and in the seeded random order. A constant map (all zero, say)
    ranks nothing: its ``map`` entry is None and its map-order rows are NaN (row-major order is no ranking)."""
    flat = np.asarray(magnitude).reshape(-1)
    constant = flat.size == 0 or bool((flat == flat[0]).all())
    return {"map": None if constant else ranks(map_order(magnitude)),
            "random": ranks(random_order(flat.size, seed, image_id))}


def pixel_ranks(image_id: int, maps: MapStore, shape: tuple[int, int], seed: int) -> dict[str, np.ndarray | None]:
    """:func:`order_ranks` of the model's stored map of the image (its float16 codes: no decoding)."""
    codes = maps.read_codes(image_id)[0] if maps.map_dtype == "float16" else maps.read(image_id)
    if tuple(codes.shape) != tuple(shape):
        raise GradlensError(f"The stored map of image {image_id} in {maps.folder} is {codes.shape[0]}x{codes.shape[1]}, "
                            f"but the image is {shape[0]}x{shape[1]}; delete the map to have it computed again.")
    return order_ranks(codes, seed, image_id)


def image_rows(detector: Detector, gt: GroundTruth, image_id: int, image: torch.Tensor,
               rankings: dict[str, np.ndarray | None], config: FaithfulnessConfig, batch_size: int, precision: str,
               class_agnostic: bool) -> list[dict]:
    """Every row of one image (``image``: its ``[3, H, W]`` uint8 pixels) for one model; ``rankings`` as
    :func:`order_ranks` gives them (map-order rows of a constant map are NaN, and not computed)."""
    device = next(detector.parameters()).device
    filled = fill_image(image, config.fill, detector.preprocess.mean, config.seed, image_id)
    target = image_targets(gt, image_id, detector.categories, masks=needs_masks(detector)).as_dict()
    variants = [v for v in image_variants(config) if v[1] is None or rankings[v[1]] is not None]
    label_to_id = [c["id"] for c in detector.categories]
    records, losses = [], []
    for start in range(0, len(variants), batch_size):
        chunk = variants[start:start + batch_size]
        pixels = [image if q == 0 and mode == "deletion" else filled if q == 0 else
                  perturbed(image, filled, rankings[order], q, mode) for mode, order, q in chunk]
        batch = [p.to(device).float().div_(255.0) for p in pixels]
        with torch.inference_mode(), PrecisionScope(precision, device):
            outputs, loss = detector.detect_with_losses(batch, [target] * len(batch))
        records += [detection_records(image_id, out, label_to_id) for out in outputs]
        total = total_loss(detector, loss, torch.float64).cpu().tolist()
        losses += total
    qualities = variant_qualities(gt, [image_id] * len(variants), records, class_agnostic)
    found = {(mode, order, q): (float(quality), float(loss), len(recs))
             for (mode, order, q), quality, loss, recs in zip(variants, qualities, losses, records)}
    rows = []
    for mode, order, q in expected_rows(config):
        quality, loss, count = found.get((mode, None if q == 0 else order, q), (math.nan, math.nan, 0))
        rows.append({"mode": mode, "order": order, "q": q, "quality": quality, "loss": loss, "detections": count})
    return rows


def faithfulness_rows(detector, gt: GroundTruth, image_id: int, image, magnitude, config: FaithfulnessConfig | None = None,
                      batch_size: int = 4, precision: str = "fp32", class_agnostic: bool = False) -> list[dict]:
    """The rows of one image for one detector, from its pixels and a magnitude map: what ``gradlens
    faithfulness`` stores per image, for a notebook or any detector object with ``detect_with_losses``,
    ``preprocess.mean``, ``categories`` and parameters.

    ``image``: 8-bit RGB, ``[3, H, W]`` tensor or ``[H, W, 3]`` array; ``magnitude``: ``[H, W]`` (its order
    ranks the pixels, ties top-left first). Each row: mode, order, q, quality, loss, detections.
    """
    config = (config or FaithfulnessConfig()).check()
    pixels = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if pixels.dtype != torch.uint8:
        raise GradlensError(f"faithfulness_rows needs the image's 8-bit pixels (uint8), not {pixels.dtype}: the detector "
                            "reads 8-bit images, and a fill is rounded to 8 bits.")
    if pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.shape[0] != 3:
        pixels = pixels.permute(2, 0, 1)
    pixels = pixels.contiguous()
    m = magnitude.detach().cpu().numpy() if isinstance(magnitude, torch.Tensor) else np.asarray(magnitude)
    if tuple(m.shape) != tuple(pixels.shape[-2:]):
        raise GradlensError(f"The map is {m.shape} but the image is {tuple(pixels.shape[-2:])}: they must share pixels.")
    device = next(detector.parameters()).device
    # operators on one core where the command runs them so (a machine with several cores): the same last bits
    with frozen_inference_mode(detector), single_threaded_ops(batch_threads(device, 2, "GRADLENS_FAITHFULNESS_THREADS") > 1):
        return image_rows(detector, gt, int(image_id), pixels, order_ranks(m, config.seed, image_id), config, batch_size,
                          precision, class_agnostic)


def compute_images(detector: Detector, gt: GroundTruth, image_ids: list[int], maps: MapStore,
                   results: ResultStore, batch_size: int, precision: str, class_agnostic: bool, threads: int,
                   single_threaded: bool, on_image=None, stop=None) -> int:
    """Rows of ``image_ids`` into ``results``, each image whole (``threads`` images at once on the CPU, each on
    one core when ``single_threaded``); ``on_image()`` after each, ``stop()`` between them. Returns images written."""
    config = results.config

    def work(image_id: int) -> int:
        pixels = torch.from_numpy(read_image(gt.image_path(image_id), gt.exif_orientation)).permute(2, 0, 1).contiguous()
        rankings = pixel_ranks(image_id, maps, tuple(pixels.shape[-2:]), config.seed)
        results.write(image_id, image_rows(detector, gt, image_id, pixels, rankings, config, batch_size, precision,
                                           class_agnostic))
        return 1

    done = 0

    def collect(future) -> None:
        nonlocal done
        done += future.result()
        if on_image is not None:
            on_image()
        if stop is not None:
            stop()

    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gradlens-faithfulness") if threads > 1 else Inline()
    with frozen_inference_mode(detector), single_threaded_ops(single_threaded), executor as pool:
        pending = []
        try:
            for image_id in image_ids:
                pending.append(pool.submit(work, image_id))
                while len(pending) > (2 * threads if threads > 1 else 0):  # bounded: memory does not grow
                    collect(pending.pop(0))
            while pending:
                collect(pending.pop(0))
        except BaseException:  # a failure or Ctrl-C: images not started are dropped; finished ones are on disk
            for future in pending:
                future.cancel()
            raise
    return done


@dataclass
class FaithfulnessRun:
    computed: int  # images whose rows this run wrote
    reused: int  # images whose rows were already stored
    results: ResultStore


def compute_faithfulness(detector: Detector, checkpoint_sha256: str, gt: GroundTruth, image_ids,
                         maps: MapStore, folder: str | Path, config: FaithfulnessConfig | None = None,
                         batch_size: int = 4, precision: str = "fp32", class_agnostic: bool = False,
                         progress: bool | None = None, label: str = "") -> FaithfulnessRun:
    """Rows of every image in ``image_ids`` that the store under ``folder`` lacks (the store is
    ``folder/<key digest>``). The maps ranking the pixels must be in ``maps`` already."""
    config = (config or FaithfulnessConfig()).check()
    if batch_size < 1:
        raise GradlensError("--batch-size must be at least 1.")
    device = next(detector.parameters()).device
    # one image per core with single-threaded operators whenever the machine has several cores: decided by
    # the machine, not by how many images are left, so a resumed run computes each image as a whole run does
    single_threaded = batch_threads(device, 2, "GRADLENS_FAITHFULNESS_THREADS") > 1
    key = faithfulness_key(detector, checkpoint_sha256, gt, maps, config, batch_size, precision, class_agnostic,
                           single_threaded)
    results = ResultStore(Path(folder) / key_digest(key), key, config)
    ids = [int(i) for i in image_ids]
    todo = [i for i in ids if not results.has(i)]
    if not todo:
        return FaithfulnessRun(0, len(ids), results)
    threads = batch_threads(device, len(todo), "GRADLENS_FAITHFULNESS_THREADS") if single_threaded else 1
    world = distributed.active()
    where = f" on {world.size} ranks" if world is not None else (f", {threads} threads" if threads > 1 else "")
    variants = len(image_variants(config))
    bar = track(None, f"faithfulness {label} ({len(todo)} images × {variants} perturbations{where})".replace("  ", " "),
                progress, unit="image", total=len(todo))
    try:
        if world is None:
            computed = compute_images(detector, gt, todo, maps, results, batch_size, precision, class_agnostic, threads,
                                      single_threaded, on_image=bar.update)
        else:
            job = {"detector": distributed.detector_spec(detector), "gt": distributed.ground_truth_spec(gt),
                   "maps": str(maps.folder), "results": str(results.folder), "key": json.loads(json.dumps(key)),
                   "batch_size": batch_size,
                   "precision": precision, "class_agnostic": class_agnostic, "single_threaded": single_threaded,
                   "shared": {"faithfulness results": str(results.folder)}}
            sizes = {i: (gt.image_info(i)["height"], gt.image_info(i)["width"]) for i in todo}
            costs = [float(np.prod(padded_size(*sizes[i], detector.preprocess))) * variants for i in todo]
            computed = distributed.run_job(
                "faithfulness", job, [[i] for i in todo], costs, len(todo), bar=bar,
                own=lambda shares, status: _rank_share(detector, gt, shares, maps, results, batch_size, precision,
                                                       class_agnostic, single_threaded, status))
    finally:
        bar.close()
    return FaithfulnessRun(computed, len(ids) - len(todo), results)


def _rank_share(detector, gt, shares, maps, results, batch_size, precision, class_agnostic, single_threaded, status) -> int:
    ids = [i for share in shares for i in share]
    if not distributed.active().main:  # rank 0 is the reference: the others must decode the bytes it decodes
        distributed.check_same_images(status, [gt.image_path(i) for i in ids])
    device = next(detector.parameters()).device
    threads = batch_threads(device, len(ids), "GRADLENS_FAITHFULNESS_THREADS") if single_threaded else 1
    return compute_images(detector, gt, ids, maps, results, batch_size, precision, class_agnostic, threads,
                          single_threaded, on_image=lambda: status.batch_done(1), stop=status.stop_if_failed)


@distributed.handler("faithfulness")
def _faithfulness_job(job: dict, shares: list[list[int]], status) -> int:
    """A rank > 0's share: load rank 0's inputs, check that it sees the same ones, write rows to the shared store."""
    detector = distributed.detector_from_spec(job["detector"])
    gt = distributed.ground_truth_from_spec(job["gt"])
    maps = MapStore(job["maps"])
    results = ResultStore(job["results"])
    mine = faithfulness_key(detector, sha256_file(job["detector"]["checkpoint"]), gt, maps, results.config,
                            job["batch_size"], job["precision"], job["class_agnostic"], job["single_threaded"])
    distributed.check_same_inputs(json.loads(json.dumps(mine)), job["key"], "the faithfulness step")
    distributed.check_same_inputs(results.key, job["key"], f"the faithfulness results {results.folder}")
    return _rank_share(detector, gt, shares, maps, results, job["batch_size"], job["precision"], job["class_agnostic"],
                       job["single_threaded"], status)

