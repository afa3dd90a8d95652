"""Important-region areas against the gradient threshold (DESIGN: important region, area curve).

For a map ``m`` and threshold ``t`` the important region is ``{m > t}``; its
area is the fraction of the image's pixels in it, so images of any size
count alike. The area curve of a detector is the mean area over the
selected images at every threshold of one grid shared by all detectors.

One pass per map, no loop over thresholds or pixels: ``searchsorted`` gives
every pixel the number of grid thresholds strictly below it, a ``bincount``
of those numbers and a reversed cumulative sum give the count of pixels
above every threshold at once — O(pixels · log thresholds) on the CPU or
the GPU. Maps arrive as an iterable and are consumed one at a time, so
memory does not grow with the number of images.
"""

from __future__ import annotations

from typing import Iterable, Literal

import numpy as np
import torch
from torch import Tensor

from gradlens.device import resolve_device
from gradlens.errors import GradlensError
from gradlens.regions.histogram import counts_above

Scale = Literal["linear", "log"]
DEFAULT_THRESHOLDS = 200
# Gradient magnitudes are heavy-tailed (a few pixels 100x the typical one): on a linear grid every
# curve collapses right after t = 0, on a log grid the whole distribution is visible.
DEFAULT_SCALE: Scale = "log"
DEFAULT_LOG_DECADES = 4.0


def threshold_grid(max_value: float, num: int = DEFAULT_THRESHOLDS, scale: Scale = "linear",
                   log_decades: float = DEFAULT_LOG_DECADES) -> np.ndarray:
    """``num`` increasing thresholds ending at ``max_value``.

    ``linear``: ``0, max/(num-1), ..., max`` (the first is 0: the area of all
    pixels with any gradient). ``log``: geometric from ``max * 10**-log_decades``
    to ``max``.
    """
    if num < 2:
        raise GradlensError("A threshold grid needs at least 2 thresholds.")
    if not (np.isfinite(max_value) and max_value > 0):
        raise GradlensError(f"The largest gradient magnitude is {max_value}; every map is zero, so there is no threshold grid.")
    if scale == "linear":
        return np.linspace(0.0, float(max_value), num)
    if scale == "log":
        if not log_decades > 0:
            raise GradlensError("--log-decades must be positive.")
        return float(max_value) * np.logspace(-float(log_decades), 0.0, num)
    raise GradlensError(f"Unknown threshold scale {scale!r}; use linear or log.")


def _as_tensor(m, device: torch.device) -> Tensor:
    t = m if isinstance(m, Tensor) else torch.from_numpy(np.asarray(m))
    return t.to(device=device, dtype=torch.float32)


def region_areas(map_: Tensor | np.ndarray, thresholds: np.ndarray | Tensor, device: str | torch.device = "cpu") -> np.ndarray:
    """Area fraction of ``{map > t}`` for every threshold ``t`` (thresholds sorted ascending)."""
    device = resolve_device(device)
    grid = torch.as_tensor(np.asarray(thresholds, dtype=np.float32), device=device)
    return _areas(_as_tensor(map_, device), grid).cpu().numpy()


def _areas(values: Tensor, grid: Tensor) -> Tensor:
    flat = values.reshape(-1)
    if flat.numel() == 0:
        raise GradlensError("A gradient map has no pixels.")
    below = torch.searchsorted(grid, flat, right=False)  # thresholds strictly below each value
    hist = torch.bincount(below, minlength=grid.numel() + 1)
    above = hist.flip(0).cumsum(0).flip(0)[1:]  # pixels with more than k thresholds below: value > t_k
    return above.to(torch.float64) / flat.numel()


def _check_grid(thresholds) -> np.ndarray:
    grid = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if grid.size == 0:
        raise GradlensError("The threshold grid is empty.")
    if not np.all(np.isfinite(grid)):
        raise GradlensError("Thresholds must be finite numbers.")
    if np.any(np.diff(grid) < 0):
        raise GradlensError("Thresholds must be sorted in increasing order.")
    return grid


def area_curve(maps: Iterable, thresholds, per_image_normalize: bool = False,
               device: str | torch.device = "cpu") -> np.ndarray:
    """Mean important-region area (fraction of pixels) over ``maps`` at each threshold.

    ``maps`` is any iterable of 2-D magnitude maps (tensors or arrays, any
    sizes), consumed one at a time. With ``per_image_normalize`` each map is
    divided by its own maximum first (then thresholds live in [0, 1]); an
    all-zero map then has area 0 everywhere. Raw thresholds are compared in
    float32, the precision maps are stored in.
    """
    grid64 = _check_grid(thresholds)
    device = resolve_device(device)
    grid = torch.as_tensor(grid64.astype(np.float32), device=device)
    total = torch.zeros(grid.numel(), dtype=torch.float64, device=device)
    count = 0
    for m in maps:
        values = _as_tensor(m, device)
        if values.ndim != 2:
            raise GradlensError(f"Gradient maps must be 2-D (H, W); got shape {tuple(values.shape)}.")
        if per_image_normalize:
            peak = values.max()
            values = values / peak if peak > 0 else torch.zeros_like(values)
        total += _areas(values, grid)
        count += 1
    if count == 0:
        raise GradlensError("No gradient maps were given, so there is no area curve.")
    return (total / count).cpu().numpy()


def area_curve_from_summaries(summaries: Iterable[dict], thresholds, per_image_normalize: bool = False) -> np.ndarray:
    """The area curve from per-map summaries alone (no map is read): approximate within one 0.8 % bin.

    Each summary holds ``hist_bins``, ``hist_counts``, ``height``, ``width`` and
    ``max`` as written by the map store.
    """
    grid = _check_grid(thresholds)
    total = np.zeros(len(grid))
    count = 0
    for s in summaries:
        pixels = int(s["height"]) * int(s["width"])
        t = grid * float(s["max"]) if per_image_normalize else grid
        if per_image_normalize and not float(s["max"]) > 0:
            above = np.zeros(len(grid))
        else:
            above = counts_above(s["hist_bins"], s["hist_counts"], t)
        total += above / pixels
        count += 1
    if count == 0:
        raise GradlensError("No gradient maps were given, so there is no area curve.")
    return total / count


def normalise_curves(thresholds: np.ndarray, curves: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """DESIGN's display normalisation: t by the grid's largest threshold, areas by the largest mean area of all curves."""
    t = np.asarray(thresholds, dtype=np.float64)
    t_norm = t / t[-1] if t[-1] > 0 else t
    peak = max((float(np.max(c)) for c in curves.values()), default=0.0)
    return t_norm, {k: (np.asarray(c) / peak if peak > 0 else np.asarray(c, dtype=np.float64)) for k, c in curves.items()}
