"""A small, real COCO dataset that gradlens writes itself, for the demo and the tests.

Real JPEG files of rendered shapes (several categories, sizes from a few pixels
to most of the image, occlusion, crowds, empty and grayscale images) and a valid
``annotations/instances_<split>.json`` with visible-pixel boxes, areas and RLE
masks, laid out like COCO so every command can point ``--coco-root`` at it.
Everything is drawn from one seed: the same seed gives the same bytes.

Also here: :func:`simulate_detections`, which perturbs the ground truth into
a COCO results file of chosen quality (stand-in detectors for demos and
benchmarks), and :func:`random_annotations`, COCO ground truth of any size
without images, for benchmarks and randomised tests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from gradlens.data.coco import CocoPaths, GroundTruth
from gradlens.data.detections import Detections
from gradlens.errors import GradlensError
from gradlens.fileio import atomic_path
from gradlens.progress import track

# Non-contiguous ids, like COCO's, so that id mapping is always exercised.
CATEGORIES = [
    {"id": 1, "name": "disc", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 4, "name": "triangle", "supercategory": "shape"},
    {"id": 7, "name": "ring", "supercategory": "shape"},
    {"id": 9, "name": "cross", "supercategory": "shape"},
]
MIN_VISIBLE_FRACTION = 0.2  # an object hidden more than this is not annotated (nobody could see it)
# The first images are made to show one edge case each, so even a 3-image dataset has them all;
# the rest are left to chance.
FORCED_CASES = ("crowd", "empty", "grayscale")
DESCRIPTION = "gradlens synthetic shapes"  # marks an annotation file as one this module wrote


@dataclass(frozen=True)
class SyntheticConfig:
    """What the generated dataset looks like; the defaults make a 2-second dataset for tests."""

    num_images: int = 40
    seed: int = 0
    split: str = "val2017"
    min_side: int = 128
    max_side: int = 320
    max_objects: int = 7
    empty_fraction: float = 0.1
    grayscale_fraction: float = 0.15
    crowd_fraction: float = 0.15
    jpeg_quality: int = 90


def _shape_mask(kind: str, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Boolean mask of one shape filling ``box`` (x0, y0, x1, y1) on an image of ``size`` (w, h)."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if kind == "disc":
        draw.ellipse(box, fill=255)
    elif kind == "square":
        draw.rectangle(box, fill=255)
    elif kind == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1, y1), (x0, y1)], fill=255)
    elif kind == "ring":
        draw.ellipse(box, fill=255)
        t = max(w, h) * 0.22
        draw.ellipse((x0 + t, y0 + t, x1 - t, y1 - t), fill=0)
    elif kind == "cross":
        tw, th = w * 0.34, h * 0.34
        draw.rectangle((x0, y0 + (h - th) / 2, x1, y0 + (h + th) / 2), fill=255)
        draw.rectangle((x0 + (w - tw) / 2, y0, x0 + (w + tw) / 2, y1), fill=255)
    else:  # pragma: no cover - CATEGORIES and this function change together
        raise ValueError(kind)
    return np.asarray(canvas) > 127


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour gradient plus grain: texture, so that detectors cannot key on flat colour."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    img += rng.normal(0, 9, size=(h, w, 1)) + rng.normal(0, 4, size=(h, w, 3))
    return img


def _encode_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _render_image(rng: np.random.Generator, cfg: SyntheticConfig, force: str | None = None):
    """One image and its annotations (without ids). Returns (uint8 HxWx3, grayscale?, annotations).

    ``force`` (one of :data:`FORCED_CASES`) overrides the random draw for that
    case; the draws are still made, so the random stream stays the same.
    """
    w = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    h = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    img = _background(rng, h, w)
    owner = np.full((h, w), -1, dtype=np.int32)  # which shape a pixel shows (the last one drawn)
    shapes: list[tuple[int, bool, np.ndarray]] = []  # (category id, crowd?, full mask)

    empty = (rng.random() < cfg.empty_fraction or force == "empty") and force != "crowd"
    n_objects = 0 if empty else int(rng.integers(1, cfg.max_objects + 1))
    for _ in range(n_objects):
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        side = float(np.exp(rng.uniform(np.log(10), np.log(0.7 * min(w, h)))))
        aspect = float(np.exp(rng.uniform(-0.4, 0.4)))
        bw, bh = side * aspect, side / aspect
        x0, y0 = rng.uniform(-0.1 * bw, w - 0.9 * bw), rng.uniform(-0.1 * bh, h - 0.9 * bh)
        mask = _shape_mask(cat["name"], (w, h), (x0, y0, x0 + bw, y0 + bh))
        if not mask.any():
            continue
        colour = rng.uniform(0, 255, size=3)
        img[mask] = colour * 0.85 + img[mask] * 0.15
        owner[mask] = len(shapes)
        shapes.append((cat["id"], False, mask))

    crowded = rng.random() < cfg.crowd_fraction if n_objects else False
    if crowded or force == "crowd":
        # A crowd: many tiny shapes of one category in one region, annotated as a single iscrowd box.
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        rw, rh = rng.uniform(0.25, 0.45) * w, rng.uniform(0.25, 0.45) * h
        rx, ry = rng.uniform(0, w - rw), rng.uniform(0, h - rh)
        crowd = np.zeros((h, w), dtype=bool)
        colour = rng.uniform(0, 255, size=3)
        for _ in range(int(rng.integers(8, 16))):
            s = rng.uniform(4, 9)
            cx, cy = rng.uniform(rx, rx + rw - s), rng.uniform(ry, ry + rh - s)
            crowd |= _shape_mask(cat["name"], (w, h), (cx, cy, cx + s, cy + s))
        img[crowd] = colour
        owner[crowd] = len(shapes)
        shapes.append((cat["id"], True, crowd))

    annotations = []
    for index, (category_id, is_crowd, full) in enumerate(shapes):
        visible = owner == index
        if visible.sum() < max(MIN_VISIBLE_FRACTION * full.sum(), 4):
            continue
        ys, xs = np.nonzero(visible)
        x_min, y_min = int(xs.min()), int(ys.min())
        annotations.append(
            {
                "category_id": category_id,
                "bbox": [float(x_min), float(y_min), float(xs.max() + 1 - x_min), float(ys.max() + 1 - y_min)],
                "area": float(visible.sum()),
                "iscrowd": int(is_crowd),
                "segmentation": _encode_rle(visible),
            }
        )

    pixels = np.clip(img, 0, 255).astype(np.uint8)
    grayscale = bool(rng.random() < cfg.grayscale_fraction) or force == "grayscale"
    return pixels, grayscale, annotations


def make_synthetic_coco(
    root: str | os.PathLike, config: SyntheticConfig | None = None, progress: bool | None = None,
    on_remove=None, **overrides
) -> CocoPaths:
    """Write a COCO-layout dataset under ``root`` and return its paths.

    ``root/annotations/instances_<split>.json`` and ``root/<split>/<id>.jpg``,
    so that ``--coco-root root`` finds it. Writing over an earlier synthetic
    dataset replaces it: JPEGs that the earlier annotation file listed and the
    new one does not are removed (each passed to ``on_remove``); any other file
    in the folder — a JPEG the user added — is left alone. A split that holds
    anything else (an annotation file gradlens did not write, or JPEGs without
    one) is refused, not overwritten.
    """
    cfg = config or SyntheticConfig()
    if overrides:
        cfg = SyntheticConfig(**{**cfg.__dict__, **overrides})
    root = Path(root)
    image_dir = root / cfg.split
    ann_path = root / "annotations" / f"instances_{cfg.split}.json"
    _refuse_foreign_dataset(ann_path, image_dir)
    written_before = _listed_file_names(ann_path)
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    # Sparse, sorted ids (COCO's are not 1..N either).
    image_ids = np.sort(rng.choice(np.arange(1, 20 * cfg.num_images + 1), size=cfg.num_images, replace=False))

    images, annotations = [], []
    for k, image_id in enumerate(track(image_ids, "synthetic images", progress)):
        pixels, grayscale, anns = _render_image(rng, cfg, FORCED_CASES[k] if k < len(FORCED_CASES) else None)
        file_name = f"{int(image_id):012d}.jpg"
        picture = Image.fromarray(pixels).convert("L") if grayscale else Image.fromarray(pixels)
        with atomic_path(image_dir / file_name) as tmp:
            picture.save(tmp, format="JPEG", quality=cfg.jpeg_quality)
        images.append({"id": int(image_id), "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1]})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_id), **ann})

    dataset = {
        "info": {"description": f"{DESCRIPTION} (seed {cfg.seed})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    with atomic_path(ann_path) as tmp:
        tmp.write_text(json.dumps(dataset))
    listed = {img["file_name"] for img in images}
    for name in sorted(written_before - listed):  # written by an earlier, larger run
        stale = image_dir / name
        if stale.is_file():
            stale.unlink()
            if on_remove is not None:
                on_remove(stale)
    return CocoPaths(ann=ann_path, images=image_dir)


def _listed_file_names(ann_path: Path) -> set[str]:
    """The plain file names an earlier synthetic annotation file listed (what gradlens wrote there)."""
    if not ann_path.exists():
        return set()
    try:
        data = json.loads(ann_path.read_text())
        names = {img["file_name"] for img in data["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str) and n == Path(n).name}


def _is_synthetic_annotation_file(path: Path) -> bool:
    """Whether ``path`` was written by :func:`make_synthetic_coco` (its ``info`` comes first)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(200)
    except OSError:
        return False
    return head.startswith(f'{{"info": {{"description": "{DESCRIPTION}'.encode())


def _refuse_foreign_dataset(ann_path: Path, image_dir: Path) -> None:
    """Refuse to write over a dataset that gradlens did not make (real COCO, say): its annotation
    file would be replaced and its images deleted as stale."""
    if ann_path.exists():
        if not _is_synthetic_annotation_file(ann_path):
            raise GradlensError(
                f"{ann_path} exists and is not a gradlens synthetic dataset; choose an empty folder so nothing is overwritten."
            )
    elif image_dir.is_dir() and any(image_dir.glob("*.jpg")):
        raise GradlensError(
            f"{image_dir} already holds JPEG images without a synthetic annotation file; choose an empty folder so nothing is overwritten."
        )


def simulate_detections(
    gt: GroundTruth,
    skill: float = 0.8,
    seed: int = 0,
    max_per_image: int = 100,
    false_positives: float = 3.0,
) -> Detections:
    """COCO results that a detector of a given ``skill`` (0..1) might produce on ``gt``.

    Each object is found with probability rising with skill, its box jittered by
    noise that shrinks with skill, with a confidence that rises with skill and
    an occasional wrong label; Poisson(``false_positives``) spurious boxes per
    image with low scores; then at most ``max_per_image`` per image by score.
    A stand-in for a real detector where only the results format matters.
    """
    rng = np.random.default_rng(seed)
    skill = float(np.clip(skill, 0.0, 1.0))
    cats = np.array(sorted(gt.category_names), dtype=np.int64)
    sizes = {int(i): (gt.coco.imgs[int(i)].get("width", 640), gt.coco.imgs[int(i)].get("height", 480)) for i in gt.image_ids}

    n = gt.num_objects
    found = rng.random(n) < 0.55 + 0.4 * skill
    wh = np.maximum(gt.obj_xywh[:, 2:], 1.0)
    noise = rng.normal(0, 0.25 * (1.2 - skill), size=(n, 4)) * np.concatenate([wh, wh], axis=1)
    xy = gt.obj_xywh[:, :2] + noise[:, :2]
    box_wh = np.maximum(gt.obj_xywh[:, 2:] + noise[:, 2:], 1.0)
    score = np.clip(rng.beta(2 + 6 * skill, 2 + 2 * (1 - skill), size=n), 0.05, 1.0)
    label = np.where(rng.random(n) < 0.05 + 0.15 * (1 - skill), rng.choice(cats, size=n), gt.obj_category_id)

    fp_counts = rng.poisson(false_positives, size=len(gt.image_ids))
    fp_image = np.repeat(gt.image_ids, fp_counts)
    m = len(fp_image)
    dims = np.array([sizes[int(i)] for i in fp_image], dtype=np.float64).reshape(-1, 2)
    fp_wh = np.maximum(dims * rng.uniform(0.05, 0.5, size=(m, 2)), 1.0)
    fp_xy = rng.uniform(0, 1, size=(m, 2)) * np.maximum(dims - fp_wh, 0)
    fp_score = rng.uniform(0.05, 0.35, size=m)

    image_id = np.concatenate([gt.obj_image_id[found], fp_image])
    category_id = np.concatenate([label[found], rng.choice(cats, size=m) if m else np.zeros(0, np.int64)])
    xywh = np.concatenate([np.concatenate([xy, box_wh], axis=1)[found], np.concatenate([fp_xy, fp_wh], axis=1)])
    scores = np.concatenate([score[found], fp_score])

    # Keep the best max_per_image per image, ordered by image then score, as detectors write them.
    order = np.lexsort((-scores, image_id))
    image_id, category_id, xywh, scores = image_id[order], category_id[order], xywh[order], scores[order]
    first = np.searchsorted(image_id, image_id, side="left")
    keep = (np.arange(len(image_id)) - first) < max_per_image
    return Detections.from_arrays(image_id[keep], category_id[keep], np.round(xywh[keep], 2), np.round(scores[keep], 4))


def random_annotations(
    num_images: int,
    objects_per_image: float = 7.0,
    num_categories: int = 80,
    seed: int = 0,
    crowd_fraction: float = 0.01,
    width: int = 640,
    height: int = 480,
) -> dict:
    """A COCO annotation dict of any size without images (for benchmarks and randomised tests)."""
    rng = np.random.default_rng(seed)
    categories = [{"id": int(c), "name": f"class{c}"} for c in range(1, num_categories + 1)]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": width, "height": height} for i in range(1, num_images + 1)]
    counts = rng.poisson(objects_per_image, size=num_images)
    total = int(counts.sum())
    image_id = np.repeat(np.arange(1, num_images + 1), counts)
    wh = np.exp(rng.uniform(np.log(4), np.log(0.6 * min(width, height)), size=(total, 2)))
    xy = rng.uniform(0, 1, size=(total, 2)) * (np.array([width, height]) - wh)
    cats = rng.integers(1, num_categories + 1, size=total)
    crowd = rng.random(total) < crowd_fraction
    annotations = [
        {
            "id": k + 1,
            "image_id": int(image_id[k]),
            "category_id": int(cats[k]),
            "bbox": [round(float(v), 2) for v in (*xy[k], *wh[k])],
            "area": float(wh[k, 0] * wh[k, 1]),
            "iscrowd": int(crowd[k]),
        }
        for k in range(total)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}
