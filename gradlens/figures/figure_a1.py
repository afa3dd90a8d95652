"""Figure A1: per detector, its detections on the image above its gradient magnitude map.

Top row (DESIGN: Figure A1): the image with every non-crowd ground-truth
box in red, each object's matched detection in blue labelled
``(iou, confidence)``, and the image quality score in the top-left corner.
Bottom row: the gradient magnitude map, brighter meaning higher. Columns
follow the paper: the baselines first, the model under study (A) last.

Maps are shown on one scale shared by the columns (so a detector with
larger gradients looks brighter), clipped at a high percentile so that a
few extreme pixels do not turn the rest black; both are options.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gradlens.errors import GradlensError
from gradlens.figures import style

DEFAULT_CLIP_PERCENTILE = 99.5


@dataclass
class Panel:
    """What one column shows: a detector's matches on the image and its map."""

    label: str
    objects: pd.DataFrame  # the image's rows of a scores objects table (gt_*, det_*, iou, confidence, matched)
    quality: float
    gradient: np.ndarray  # [H, W] magnitudes
    highlight: tuple | None = None  # xywh of the object whose own map this is (--object), drawn thicker


def _display_maps(maps: list[np.ndarray], map_scale: str, clip_percentile: float) -> list[np.ndarray]:
    """Maps scaled to [0, 1] for display: one shared scale (default) or each by its own."""
    def top(values):
        v = np.concatenate([m.reshape(-1) for m in values])
        return float(np.percentile(v, clip_percentile)) if clip_percentile < 100 else float(v.max(initial=0.0))

    if map_scale == "shared":
        peak = top(maps)
        return [np.clip(m / peak, 0, 1) if peak > 0 else np.zeros_like(m) for m in maps]
    if map_scale == "per-map":
        out = []
        for m in maps:
            peak = top([m])
            out.append(np.clip(m / peak, 0, 1) if peak > 0 else np.zeros_like(m))
        return out
    raise ValueError(f"Unknown map scale {map_scale!r}; use shared or per-map.")


def draw_figure_a1(image: np.ndarray, panels: list[Panel], title: str | None = None, map_scale: str = "shared",
                   clip_percentile: float = DEFAULT_CLIP_PERCENTILE, panel_width: float = 4.0):
    """Draw the figure for one image (``[H, W, 3]`` uint8) and one :class:`Panel` per detector."""
    with style.plain_text():  # labels and file names are drawn as written, never as math text or LaTeX
        return _draw_figure_a1(image, panels, title, map_scale, clip_percentile, panel_width)


def _draw_figure_a1(image, panels, title, map_scale, clip_percentile, panel_width):
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    cols = len(panels)
    fig, axes = plt.subplots(2, cols, figsize=(panel_width * cols, 2 * panel_width * h / w + 0.8), squeeze=False)
    shown = _display_maps([p.gradient for p in panels], map_scale, clip_percentile)
    font = max(6.0, min(9.0, 900.0 / max(w, 1) * panel_width / 4.0 * 1.2))
    for col, (panel, display) in enumerate(zip(panels, shown)):
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(image, interpolation="nearest")
        for row in panel.objects.itertuples(index=False):
            top.add_patch(Rectangle((row.gt_x, row.gt_y), row.gt_w, row.gt_h, fill=False, edgecolor=style.GT_COLOUR, linewidth=1.6))
        if panel.highlight is not None:
            x, y, bw, bh = panel.highlight
            top.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor=style.GT_COLOUR, linewidth=4.0))
        for row in panel.objects.itertuples(index=False):
            if not row.matched:
                continue
            top.add_patch(Rectangle((row.det_x, row.det_y), row.det_w, row.det_h, fill=False, edgecolor=style.DET_COLOUR, linewidth=1.6))
            near_top = row.det_y < 0.06 * h  # no room above the box: the label goes just inside it
            top.text(row.det_x, row.det_y + 1 if near_top else row.det_y - 1, f"({row.iou:.2f}, {row.confidence:.2f})",
                     color="white", fontsize=font, va="top" if near_top else "bottom", ha="left", clip_on=True,
                     bbox={"facecolor": style.DET_COLOUR, "edgecolor": "none", "pad": 1.0, "alpha": 0.85})
        quality = "no objects" if panel.quality != panel.quality else f"{panel.quality:.3f}"  # NaN: no quality
        top.text(3, 3, quality, color="black", fontsize=font + 2, va="top", ha="left", fontweight="bold",
                 bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.5, "alpha": 0.9})
        top.set_title(style.literal(panel.label), fontsize=10)
        bottom.imshow(display, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        peak = float(panel.gradient.max()) if panel.gradient.size else 0.0
        bottom.set_title(f"gradient magnitude (max {peak:.2e})", fontsize=8)
        for ax in (top, bottom):
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(h - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(style.literal(title), fontsize=10)
    fig.tight_layout()
    return fig


def score_tables(workdir: str | os.PathLike, models) -> dict:
    """Each model's scores (objects and images tables) from the work directory, read once for many images."""
    from gradlens.scoring.store import read_scores
    from gradlens.selection.manifest import load_manifest

    workdir = Path(workdir)
    manifest = {m["role"]: m for m in load_manifest(workdir)["models"]}
    return {m.role: read_scores(workdir / manifest[m.role]["scores"])[0] for m in models}


def panels_for_image(workdir: str | os.PathLike, image_id: int, models, order: str = "paper", scores: dict | None = None,
                     object_id: int | None = None, highlight: tuple | None = None) -> list[Panel]:
    """Panels of one image from a work directory: scores of each model and its stored map.

    ``models`` are the :class:`~gradlens.attribution.workdir.ModelMaps` of the
    work directory (A first). ``order="paper"`` puts the baselines first and A last.
    ``scores`` (from :func:`score_tables`) saves re-reading the tables for every image.
    ``object_id`` shows that object's own map (the stores hold per-object maps), its box ``highlight`` (xywh).
    """
    scores = scores if scores is not None else score_tables(workdir, models)
    panels = []
    for m in models:
        objects, images = scores[m.role]
        rows = objects[objects["image_id"] == int(image_id)]
        quality = images.loc[images["image_id"] == int(image_id), "quality"]
        panels.append(Panel(
            label=f"{m.label} ({m.role.upper() if m.role == 'a' else m.role})",
            objects=rows,
            quality=float(quality.iloc[0]) if len(quality) else float("nan"),
            gradient=m.store.read(image_id if object_id is None else object_id),
            highlight=highlight,
        ))  # fmt: skip
    return panels[1:] + panels[:1] if order == "paper" and len(panels) > 1 else panels


def render_figures_a1(
    workdir: str | os.PathLike,
    image_ids: list[int] | None = None,
    top: int | None = None,
    out_dir: str | os.PathLike | None = None,
    config=None,
    detector_run=None,
    checkpoints: dict | None = None,
    coco=None,
    map_scale: str = "shared",
    clip_percentile: float = DEFAULT_CLIP_PERCENTILE,
    map_dtype: str = "float16",
    progress: bool | None = None,
    object_ids: list[int] | None = None,
) -> list[Path]:
    """Figure A1 for the given images, or a gallery of the ``top`` selected ones, from a work directory.

    Maps missing from the work directory's store are computed (only for these
    images). Writes ``figure_a1_<image id>.png``/``.pdf`` per image into
    ``out_dir`` (default ``<workdir>/figures``) and, for several images,
    ``figure_a1_gallery.pdf`` with one page each. Returns the PNG paths.
    ``object_ids`` (annotation ids) draw each object's own map instead (``figure_a1_object_<id>``), computing
    the per-object maps of their images if missing.
    """
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    from gradlens.attribution.workdir import selection_ids, workdir_maps
    from gradlens.data.images import read_image
    from gradlens.fileio import atomic_path
    from gradlens.progress import track

    workdir = Path(workdir)
    if top is not None and top < 1:
        raise GradlensError(f"top must be at least 1 (got {top}).")
    objects: dict[int, int] = {}
    gt_for_ids = None
    if object_ids:
        from dataclasses import replace as _replace

        from gradlens.attribution.methods import AttributionConfig
        from gradlens.attribution.objects import object_image
        from gradlens.attribution.workdir import workdir_ground_truth
        from gradlens.selection.manifest import load_manifest

        gt_for_ids = workdir_ground_truth(load_manifest(workdir), coco)
        objects = {int(a): object_image(gt_for_ids, a) for a in object_ids}
        ids = sorted(set(objects.values()))
        config = _replace(config or AttributionConfig(), target="object")
    elif config is not None and config.target != "total":
        raise GradlensError("Per-object maps are drawn with --object ANN_ID (an image's figure shows its total-loss maps).")
    elif image_ids:
        ids = [int(i) for i in image_ids]
    else:
        ids = selection_ids(workdir, top or 1)
        if not ids:
            raise GradlensError("The selection is empty; name images with --image-id.")
    if map_scale not in ("shared", "per-map"):
        raise GradlensError(f"Unknown map scale {map_scale!r}; use shared or per-map.")
    if not 0 < clip_percentile <= 100:
        raise GradlensError("--clip-percentile must be in (0, 100].")
    models, gt = workdir_maps(workdir, ids, config, detector_run, checkpoints, coco, map_dtype, progress, gt=gt_for_ids)
    out_dir = Path(out_dir) if out_dir is not None else workdir / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = score_tables(workdir, models)
    written = []
    with contextlib.ExitStack() as stack:
        gallery = None
        pages = [(objects[a], a) for a in objects] if objects else [(i, None) for i in ids]
        if len(pages) > 1:  # one multi-page PDF beside the per-image files, renamed into place when complete
            tmp = stack.enter_context(atomic_path(out_dir / "figure_a1_gallery.pdf"))
            gallery = stack.enter_context(PdfPages(tmp, metadata={"CreationDate": None}))
        for image_id, ann in track(pages, "figure A1", progress):
            image = read_image(gt.image_path(image_id), gt.exif_orientation)
            highlight = tuple(gt.coco.anns[ann]["bbox"]) if ann is not None else None
            if ann is not None and not all(m.store.has(ann) for m in models):
                raise GradlensError(f"Object {ann} is not in the loss (a box under one pixel, or zero area), so it has no map.")
            panels = panels_for_image(workdir, image_id, models, scores=scores, object_id=ann, highlight=highlight)
            name = gt.image_info(image_id).get("file_name", "")
            what = f"image {image_id} ({name})" if ann is None else f"object {ann} of image {image_id} ({name}): its own loss"
            fig = draw_figure_a1(image, panels, title=what, map_scale=map_scale, clip_percentile=clip_percentile)
            try:
                stem = f"figure_a1_{image_id}" if ann is None else f"figure_a1_object_{ann}"
                written.append(style.save(fig, out_dir / stem)[0])
                if gallery is not None:
                    with style.plain_text():
                        gallery.savefig(fig)
            finally:
                plt.close(fig)
    return written
