"""Where the gradient falls: localisation metrics of a map against the image's ground-truth boxes.

The area curve says how much of the image a detector relies on; these say
whether that part is the objects. Definitions (README, "Localisation
metrics"):

- a pixel ``(row r, column c)`` covers ``[c, c+1) x [r, r+1)``; it is **inside**
  a box ``(x1, y1, x2, y2)`` (xyxy, in the map's pixels) when its centre is:
  ``x1 <= c + 0.5 <= x2`` and ``y1 <= r + 0.5 <= y2``. The box region of an
  image is the union over its non-crowd boxes, so overlapping boxes count
  once; boxes reaching past the border are cut by it;
- **box energy**: the share of the map's total magnitude inside the box
  region, in [0, 1] (NaN for an all-zero map, which has no magnitude to share,
  and for an empty box region); its chance level is the **box fraction**, the
  share of pixels inside;
- **pointing game**: whether the map's maximum lies inside the box region; on
  ties, a hit if any maximum does (None for an all-zero map, where every pixel
  ties, and for an empty box region);
- **inside / outside areas**: at every threshold, the fractions of the image's
  pixels with magnitude > t inside and outside the box region (they add up to
  the important-region area).
"""

from __future__ import annotations

import numpy as np
import torch

from gradlens.errors import GradlensError


def _as_array(map_) -> np.ndarray:
    values = map_.detach().cpu().numpy() if isinstance(map_, torch.Tensor) else np.asarray(map_)
    if values.ndim != 2:
        raise GradlensError(f"A gradient map must be 2-D (H, W); got shape {tuple(values.shape)}.")
    return np.abs(values.astype(np.float64, copy=False))


def _as_boxes(boxes) -> np.ndarray:
    b = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4) if np.size(b) else np.zeros((0, 4))
    if not np.all(np.isfinite(b)):
        raise GradlensError("Boxes must be finite numbers (xyxy in the map's pixels).")
    return b


def box_mask(shape: tuple[int, int], boxes) -> np.ndarray:
    """``[H, W]`` booleans: pixels whose centre lies in at least one box (xyxy, the map's pixels)."""
    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros((h, w), dtype=bool)
    for x1, y1, x2, y2 in _as_boxes(boxes):
        # columns c with x1 <= c + 0.5 <= x2, rows likewise; empty when the box misses every centre
        c0, c1 = max(0, int(np.ceil(x1 - 0.5))), min(w, int(np.floor(x2 - 0.5)) + 1)
        r0, r1 = max(0, int(np.ceil(y1 - 0.5))), min(h, int(np.floor(y2 - 0.5)) + 1)
        if c0 < c1 and r0 < r1:
            mask[r0:r1, c0:c1] = True
    return mask


def box_energy(map_, boxes) -> float:
    """Share of the map's total magnitude inside the union of ``boxes``: a float in [0, 1]; NaN for an all-zero
    map or when the boxes cover no pixel centre (nothing to compare)."""
    values = _as_array(map_)
    return masked_energy(values, box_mask(values.shape, boxes))


def masked_energy(values: np.ndarray, mask: np.ndarray) -> float:
    """:func:`box_energy` of magnitudes ``values`` against an already rasterised box region ``mask``."""
    total = float(values.sum())
    if not total > 0 or not mask.any():
        return float("nan")
    return float(values[mask].sum() / total)


def pointing_game(map_, boxes) -> bool | None:
    """Whether the map's maximum lies inside a box (ties: any maximum); None for an all-zero map or an empty box region."""
    values = _as_array(map_)
    return masked_pointing(values, box_mask(values.shape, boxes))


def masked_pointing(values: np.ndarray, mask: np.ndarray) -> bool | None:
    """:func:`pointing_game` of magnitudes ``values`` against an already rasterised box region ``mask``."""
    if values.size == 0 or not float(values.max()) > 0 or not mask.any():
        return None
    return bool(np.any((values == values.max()) & mask))


def box_fraction(shape: tuple[int, int], boxes) -> float:
    """Share of the image's pixels inside the box region: box energy's value for a uniform map."""
    mask = box_mask(shape, boxes)
    return float(mask.mean()) if mask.size else float("nan")


def inside_outside_areas(map_, boxes, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Fractions of the image's pixels with magnitude > t inside and outside the box region, for every t.

    Compared in float32, the precision maps are stored in (as the area curve).
    """
    values = _as_array(map_).astype(np.float32)
    return masked_areas(values, box_mask(values.shape, boxes), thresholds)


def masked_areas(values: np.ndarray, mask: np.ndarray, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """:func:`inside_outside_areas` of float32 magnitudes ``values`` against an already rasterised box region."""
    grid = np.asarray(thresholds, dtype=np.float64).astype(np.float32).reshape(-1)
    n = values.size
    if n == 0:
        raise GradlensError("A gradient map has no pixels.")

    def above(subset: np.ndarray) -> np.ndarray:
        below = np.searchsorted(grid, subset.reshape(-1), side="left")  # thresholds strictly below each value
        counts = np.bincount(below, minlength=len(grid) + 1)
        return counts[::-1].cumsum()[::-1][1:] / n

    return above(values[mask]), above(values[~mask])


def image_boxes(gt, image_id: int) -> np.ndarray:
    """xyxy boxes (original pixels) of the image's non-crowd ground-truth objects, as annotated."""
    return gt.boxes[np.flatnonzero(gt.obj_image_id == int(image_id))].astype(np.float64).reshape(-1, 4)
