"""Important-region areas against the gradient threshold (DESIGN: important region, area curve).

For a map ``m`` and threshold ``t`` the important region is ``{m > t}``; its
area is the fraction of the image's pixels in it, so images of any size
count alike. The area curve of a detector is the mean area over the
selected images at every threshold of one grid shared by all detectors.

One pass per map, no loop over thresholds or pixels: every pixel gets the
number of grid thresholds strictly below it (one arithmetic step on linear
and log grids, verified exactly; a binary search on any other grid), and a
``bincount`` of those numbers with a reversed cumulative sum gives the count
of pixels above every threshold at once, on the CPU or the GPU. Maps arrive as an iterable and are consumed one at a time, so
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


MAX_THRESHOLDS = 1_000_000  # a grid is held per model and image batch: more points than pixels tell nothing


def threshold_grid(max_value: float, num: int = DEFAULT_THRESHOLDS, scale: Scale = "linear",
                   log_decades: float = DEFAULT_LOG_DECADES) -> np.ndarray:
    """``num`` increasing thresholds ending at ``max_value``.

    ``linear``: ``0, max/(num-1), ..., max`` (the first is 0: the area of all
    pixels with any gradient). ``log``: geometric from ``max * 10**-log_decades``
    to ``max``.
    """
    if num < 2:
        raise GradlensError("A threshold grid needs at least 2 thresholds.")
    if num > MAX_THRESHOLDS:
        raise GradlensError(f"--thresholds {num} is more than the {MAX_THRESHOLDS:,} a grid may have.")
    if not (np.isfinite(max_value) and max_value > 0):
        raise GradlensError(f"The largest gradient magnitude is {max_value}; every map is zero, so there is no threshold grid.")
    if scale == "linear":
        return np.linspace(0.0, float(max_value), num)
    if scale == "log":
        if not (np.isfinite(log_decades) and log_decades > 0):
            raise GradlensError("--log-decades must be a positive number.")
        grid = float(max_value) * np.logspace(-float(log_decades), 0.0, num)
        # maps are float32 (or float16 codes): a threshold below the smallest float32 cannot separate anything
        if not (grid[0] >= np.finfo(np.float32).tiny and np.all(np.diff(grid) > 0)):
            usable = np.log10(float(max_value) / np.finfo(np.float32).tiny)
            raise GradlensError(f"--log-decades {log_decades:g} reaches below the smallest float32 value from the "
                                f"largest magnitude {float(max_value):.3g}; use at most {usable:.0f}.")
        return grid
    raise GradlensError(f"Unknown threshold scale {scale!r}; use linear or log.")


def _as_tensor(m, device: torch.device) -> Tensor:
    t = m if isinstance(m, Tensor) else torch.from_numpy(np.asarray(m))
    return t.to(device=device, dtype=torch.float32)


def region_areas(map_: Tensor | np.ndarray, thresholds: np.ndarray | Tensor, device: str | torch.device = "cpu") -> np.ndarray:
    """Area fraction of ``{map > t}`` for every threshold ``t`` (thresholds sorted ascending)."""
    device = resolve_device(device)
    return _areas(_as_tensor(map_, device), _Bucketer(_check_grid(thresholds), device)).cpu().numpy()


class _Bucketer:
    """For each value, the number of grid thresholds strictly below it — exactly, and fast on the grids gradlens makes.

    ``searchsorted`` costs a ~10-step binary search per pixel. On a linear or
    geometric grid the answer is one arithmetic step (``ceil((v - t0) / dt)``,
    or the same in log space); floating-point rounding can put it one off, so
    every estimate is verified against the grid itself (two gathers) and the
    rare wrong ones are redone with ``searchsorted``. Any other sorted grid
    takes ``searchsorted`` throughout.
    """

    def __init__(self, grid64: np.ndarray, device: torch.device):
        self.size = len(grid64)
        self.grid = torch.as_tensor(grid64.astype(np.float32), device=device)
        inf = torch.tensor([np.inf], dtype=torch.float32, device=device)
        self.extended = torch.cat([-inf, self.grid, inf])  # extended[k] = t_{k-1}, extended[k + 1] = t_k
        self.kind, self.origin, self.step = None, 0.0, 1.0
        g32 = self.grid.cpu().numpy().astype(np.float64)
        if self.size >= 2:
            diffs = np.diff(g32)
            if diffs.min() > 0 and np.allclose(diffs, (g32[-1] - g32[0]) / (self.size - 1), rtol=1e-4, atol=0):
                self.kind, self.origin, self.step = "linear", g32[0], (g32[-1] - g32[0]) / (self.size - 1)
            elif g32[0] > 0 and diffs.min() > 0:
                logs = np.diff(np.log(g32))
                if np.allclose(logs, (np.log(g32[-1]) - np.log(g32[0])) / (self.size - 1), rtol=1e-4, atol=0):
                    self.kind = "log"
                    self.origin, self.step = np.log(g32[0]), (np.log(g32[-1]) - np.log(g32[0])) / (self.size - 1)

    def below(self, flat: Tensor) -> Tensor:
        if self.kind is None:
            return torch.searchsorted(self.grid, flat, right=False)
        if self.kind == "linear":
            position = (flat - self.origin) / self.step
        else:
            position = (torch.log(flat.clamp_min(torch.finfo(torch.float32).tiny)) - self.origin) / self.step
            position = torch.where(flat > 0, position, torch.full_like(position, -1.0))
        estimate = position.ceil_().clamp_(0, self.size).to(torch.int64)
        wrong = (self.extended[estimate] >= flat) | (self.extended[estimate + 1] < flat)
        if bool(wrong.any()):
            where = wrong.nonzero().squeeze(1)
            estimate[where] = torch.searchsorted(self.grid, flat[where], right=False)
        return estimate


def _areas(values: Tensor, bucketer: _Bucketer) -> Tensor:
    flat = values.reshape(-1)
    if flat.numel() == 0:
        raise GradlensError("A gradient map has no pixels.")
    if not bool(torch.isfinite(flat).all()):
        raise GradlensError("A gradient map has NaN or infinite values.")
    below = bucketer.below(flat)  # thresholds strictly below each value
    if below.device.type == "cpu":  # NumPy's bincount is ~15x faster than torch's on the CPU
        hist = torch.from_numpy(np.bincount(below.numpy(), minlength=bucketer.size + 1))
    else:
        hist = torch.bincount(below, minlength=bucketer.size + 1)
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
    bucketer = _Bucketer(grid64, device)
    total = torch.zeros(len(grid64), dtype=torch.float64, device=device)
    count = 0
    for m in maps:
        values = _as_tensor(m, device)
        if values.ndim != 2:
            raise GradlensError(f"Gradient maps must be 2-D (H, W); got shape {tuple(values.shape)}.")
        if per_image_normalize:
            peak = values.max()
            values = values / peak if peak > 0 else torch.zeros_like(values)
        total += _areas(values, bucketer).to(device)
        count += 1
    if count == 0:
        raise GradlensError("No gradient maps were given, so there is no area curve.")
    return (total / count).cpu().numpy()


_FLOAT16_VALUES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def area_curve_from_store(store, image_ids, thresholds, per_image_normalize: bool = False) -> np.ndarray:
    """The exact area curve of a float16 map store's maps, from a histogram of their 16-bit codes.

    A stored map takes at most 65,536 distinct values (``code * scale``), so
    each map costs one ``bincount`` of its codes plus work on 65,536 values —
    and gives exactly what :func:`area_curve` gives on ``store.maps(image_ids)``
    (same float32 values, same comparisons).
    """
    curves = CodeCurves(thresholds)
    return mean_of_rows(curves.image(*store.read_codes(i), per_image_normalize)["area"] for i in image_ids)


def mean_of_rows(rows: Iterable[np.ndarray]) -> np.ndarray:
    """Rows added one after another, then divided by their number: one summation order for every caller."""
    total, count = None, 0
    for row in rows:
        total = np.array(row, dtype=np.float64) if total is None else total + row
        count += 1
    if count == 0:
        raise GradlensError("No gradient maps were given, so there is no area curve.")
    return total / count


class CodeCurves:
    """Per-image curves and box statistics of float16 maps, from histograms of their 16-bit codes.

    ``image(codes, scale, per_image_normalize, mask)`` gives the image's area
    curve and, with a box ``mask`` (``[H, W]`` booleans), its inside and
    outside areas, box energy and pointing-game hit: exactly what the
    functions of :mod:`gradlens.regions.localisation` give on the same map
    (same float32 values, same comparisons), at the cost of three ``bincount``.
    """

    def __init__(self, thresholds):
        self.grid = _check_grid(thresholds).astype(np.float32)

    def _above(self, below: np.ndarray, hist: np.ndarray, pixels: int) -> np.ndarray:
        per_threshold = np.bincount(below, weights=hist, minlength=len(self.grid) + 1)
        return per_threshold[::-1].cumsum()[::-1][1:] / pixels

    def image(self, codes: np.ndarray, scale, per_image_normalize: bool = False, mask: np.ndarray | None = None) -> dict:
        flat = codes.reshape(-1)
        if flat.size == 0:
            raise GradlensError("A gradient map has no pixels.")
        hist = np.bincount(flat, minlength=1 << 16)
        used = np.flatnonzero(hist)
        raw = _FLOAT16_VALUES[used] * np.float32(scale)  # exactly the float32 values MapStore.read returns
        values = raw
        if per_image_normalize:
            peak = values.max()
            values = values / peak if peak > 0 else np.zeros_like(values)
        below = np.searchsorted(self.grid, values, side="left")  # thresholds strictly below each value
        # the map's distinct values (ascending: non-negative float16 codes sort as their values) and their
        # pixel counts, for measures that need the whole distribution (gradlens.regions.concentration)
        out = {"area": self._above(below, hist[used], flat.size), "max": float(raw.max()), "values": raw,
               "counts": hist[used]}
        if mask is not None:
            inside = np.bincount(flat[mask.reshape(-1)], minlength=1 << 16)[used]
            out["inside"] = self._above(below, inside, flat.size)
            out["outside"] = self._above(below, hist[used] - inside, flat.size)
            magnitude = raw.astype(np.float64)
            total = float((hist[used] * magnitude).sum())
            defined = raw.max() > 0 and mask.any()  # an all-zero map or an empty box region: nothing to compare
            out["box_energy"] = float((inside * magnitude).sum() / total) if defined else float("nan")
            # distinct codes are distinct float32 values: the largest used code is the maximum
            out["pointing_game"] = bool(inside[np.argmax(raw)] > 0) if defined else None
        return out


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
