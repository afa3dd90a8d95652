"""A fine histogram of a map's values that serves every threshold grid at every scale.

Bins are the top 16 bits of the float32 value (sign, exponent, 7 mantissa
bits): 128 bins per power of two, i.e. bin edges 0.8 % apart at any
magnitude, identical for every map and every detector. That makes the
histogram of a gradient map (whose values may be 1e-9 or 1e+3 depending on
the detector and its loss scale) fine everywhere without knowing its range,
and histograms of different maps can be added. Counting the pixels above a
threshold from it is exact when the threshold is a bin edge and otherwise
interpolates inside one bin.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NUM_BINS = 1 << 15  # non-negative float32 values: sign bit 0, so bins 0 .. 2^15 - 1
SHIFT = 16


def value_histogram(values: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Non-empty bins (``uint16``) and their counts (``int64``) of non-negative values."""
    flat = values.detach().reshape(-1).to(torch.float32)
    if flat.numel() and bool((flat < 0).any()):
        raise ValueError("value_histogram expects magnitudes (no negative values).")
    bins = (flat.view(torch.int32) >> SHIFT).to(torch.int64)
    counts = torch.bincount(bins, minlength=NUM_BINS).cpu().numpy()
    nonzero = np.flatnonzero(counts)
    return nonzero.astype(np.uint16), counts[nonzero].astype(np.int64)


def bin_edges(bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper value edges (float64) of the given bins."""
    b = np.asarray(bins, dtype=np.int64)
    lower = (b << SHIFT).astype(np.uint32).view(np.float32).astype(np.float64)
    upper = ((b + 1) << SHIFT).astype(np.uint32).view(np.float32).astype(np.float64)
    return lower, upper


def counts_above(bins: np.ndarray, counts: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Approximate number of values ``> t`` for each threshold, from one histogram.

    Bins entirely above ``t`` count fully; the bin holding ``t`` counts the
    fraction of its width above ``t`` (values spread evenly within 0.8 %).
    O(thresholds · log bins): a binary search per threshold and suffix sums.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    bins = np.asarray(bins)
    if len(bins) == 0:
        return np.zeros(len(thresholds))
    lower, upper = bin_edges(bins)
    counts = np.asarray(counts, dtype=np.float64)
    if bins[0] == 0:  # bin 0 holds exact zeros (and denormals below 1e-40): never above a threshold t >= 0
        lower[0] = upper[0] = 0.0
    suffix = np.concatenate([counts[::-1].cumsum()[::-1], [0.0]])  # suffix[k] = values in bins k, k+1, ...
    k = np.searchsorted(lower, thresholds, side="right") - 1  # the bin whose range starts at or below t
    inside = np.clip(k, 0, len(bins) - 1)
    width = upper[inside] - lower[inside]
    frac = np.where(width > 0, np.clip((upper[inside] - thresholds) / np.where(width > 0, width, 1.0), 0.0, 1.0),
                    (thresholds < lower[inside]).astype(np.float64))
    above = suffix[inside + 1] + counts[inside] * frac
    return np.where(k < 0, suffix[0], above)


def bin_values(summary) -> tuple[np.ndarray, np.ndarray]:
    """A map's values as its histogram knows them: each bin's midpoint (0 for the bin of zeros, at most the
    map's max), ascending, and the bin's count."""
    bins = np.asarray(summary["hist_bins"])
    lower, upper = bin_edges(bins)
    mid = np.where(bins == 0, 0.0, 0.5 * (lower + upper))
    return np.minimum(mid, float(summary["max"])), np.asarray(summary["hist_counts"], dtype=np.int64)


def approximate_mean(summary) -> float:
    """A map's mean value from its histogram (within 0.4 %): enough to place a grid, not to measure with."""
    values, counts = bin_values(summary)
    return float(np.dot(values, counts) / counts.sum()) if counts.sum() else 0.0


def pooled_percentile(summaries, q: float, per_image_normalize: bool = False) -> float:
    """The ``q``-th percentile of all pixel values of many maps, from their histograms alone.

    Each bin counts at its midpoint (0.4 % from any value in it); with
    ``per_image_normalize`` values are first divided by their map's max.
    ``q = 100`` is the exact largest value.
    """
    values, weights = [], []
    peak = 0.0
    for s in summaries:
        top = float(s["max"])
        scale = top if per_image_normalize and top > 0 else 1.0
        peak = max(peak, top / scale)
        mid, counts = bin_values(s)
        values.append(mid / scale)
        weights.append(counts.astype(np.float64))
    if not values:
        raise ValueError("no maps")
    if q >= 100:
        return peak
    v, w = np.concatenate(values), np.concatenate(weights)
    order = np.argsort(v, kind="stable")
    v, cum = v[order], np.cumsum(w[order])
    k = int(np.searchsorted(cum, q / 100.0 * cum[-1], side="left"))
    return float(v[min(k, len(v) - 1)])
