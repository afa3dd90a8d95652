"""How concentrated a gradient map is, whatever its overall size: mass-area, Gini index, effective area.

The paper's area at a shared threshold moves with the gradient's scale: if B's
map is c times A's, B's area at t is A's at t/c. The measures here depend only
on the *shape* of the distribution of magnitudes, so multiplying a map by any
c > 0 leaves them unchanged:

- ``mass_area(m, p)``: the smallest fraction of the pixels whose magnitudes,
  taken largest first, sum to at least p of the map's total;
- ``gini(m)``: the Gini index of the magnitudes, with Quantus' ``Sparseness``
  formula (Chalasani et al. 2020) without its 1e-7 offset: 0 for a uniform map,
  1 - 1/n for a single pixel. The area under ``mass_area`` over p in [0, 1] is
  exactly (1 - gini) / 2 + 1 / (2n);
- ``effective_area(m)``: exp(entropy of m / m.sum()) as a fraction of the
  pixels (Quantus' ``Complexity`` is that entropy): 1 for a uniform map, 1/n
  for a single pixel.

Each works on a *distribution*: distinct magnitudes in ascending order with
their pixel counts. A float map gives it by sorting; a float16 map store gives
it from a count of its 16-bit codes (:func:`code_distribution`, no sort, no
decoding), and codes of ``map / max`` have the map's own shape. An all-zero map
has no shape: every measure is NaN (:data:`ZERO_MAP`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

ZERO_MAP = "the map is zero everywhere: it has no mass to be concentrated"
FLOAT16_CODES = 1 << 16


@dataclass(frozen=True)
class Distribution:
    """Distinct non-negative magnitudes (ascending, float64) and how many pixels hold each."""

    values: np.ndarray
    counts: np.ndarray

    # Every measure of one map reads the same few sums; each is computed once (the arrays are not changed).

    @cached_property
    def pixels(self) -> int:
        return int(self.counts.sum())

    @cached_property
    def mass(self) -> float:
        return float(np.dot(self.values, self.counts))

    @cached_property
    def pixels_below(self) -> np.ndarray:
        """How many pixels hold a smaller value than each value."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    @cached_property
    def log_values(self) -> np.ndarray:
        """log of each value (-inf for zero)."""
        with np.errstate(divide="ignore"):
            return np.log(self.values)


def distribution(magnitudes) -> Distribution:
    """The distribution of a map's magnitudes (any shape; NaN, infinite or negative values are refused)."""
    flat = np.asarray(magnitudes, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        raise ValueError("The map has no pixels.")
    if not np.isfinite(flat).all() or (flat < 0).any():
        raise ValueError("A magnitude map must be finite and non-negative.")
    values, counts = np.unique(flat, return_counts=True)
    return Distribution(values, counts.astype(np.int64))


def code_distribution(codes: np.ndarray) -> Distribution:
    """The distribution of a float16 map from its raw 16-bit codes (non-negative finite values only).

    Non-negative float16 values sort as their codes do, so one ``bincount`` over
    the 65,536 codes replaces a sort of the pixels. The values are the codes'
    own (``map / max`` as stored); the measures do not depend on the scale.
    """
    flat = np.asarray(codes).reshape(-1).view(np.uint16)
    if flat.size == 0:
        raise ValueError("The map has no pixels.")
    counts = np.bincount(flat, minlength=FLOAT16_CODES)
    if counts[0x7C00:].any():  # sign bit set (negative), or infinity / NaN
        raise ValueError("A float16 magnitude map must hold finite non-negative codes.")
    present = np.flatnonzero(counts)
    return Distribution(present.astype(np.uint16).view(np.float16).astype(np.float64), counts[present].astype(np.int64))


def _as_distribution(m) -> Distribution:
    return m if isinstance(m, Distribution) else distribution(m)


def gini(m) -> float:
    """Gini index of the magnitudes: sum_i (2i - n - 1) a_(i) / (n sum a), a ascending (NaN for a zero map)."""
    d = _as_distribution(m)
    n, mass = d.pixels, d.mass
    if mass == 0:
        return float("nan")
    before = d.pixels_below
    # ranks before+1 .. before+c share the value: sum over them of (2i - n - 1) = c (2 before + c - n)
    weights = d.counts * (2 * before + d.counts - n)
    return float(np.dot(d.values, weights.astype(np.float64)) / (n * mass))


def effective_area(m) -> float:
    """exp(entropy of the normalised magnitudes) / pixels: the share of a uniform map with the same entropy."""
    d = _as_distribution(m)
    mass = d.mass
    if mass == 0:
        return float("nan")
    keep = d.values > 0
    q = d.values[keep] / mass
    entropy = -float(np.dot(d.counts[keep], q * (d.log_values[keep] - np.log(mass))))
    return float(np.exp(entropy) / d.pixels)


def mass_area(m, fractions) -> np.ndarray:
    """For each p in ``fractions`` (within [0, 1]): the smallest share of the pixels, largest first, holding p
    of the map's total (0 for p = 0; NaN for every p of a zero map)."""
    d = _as_distribution(m)
    p = np.asarray(fractions, dtype=np.float64)
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("Mass fractions must lie in [0, 1].")
    values, counts = d.values[::-1], d.counts[::-1]  # largest first
    mass_through = np.cumsum(values * counts)  # mass of the pixels down to each value
    mass = mass_through[-1]
    if mass == 0:
        return np.full(p.shape, np.nan)
    pixels_through = np.cumsum(counts)
    target = p * mass
    # the value group that completes the target; within it, as few of its equal pixels as needed
    group = np.minimum(np.searchsorted(mass_through, target, side="left"), len(values) - 1)
    mass_before = np.where(group > 0, mass_through[np.maximum(group - 1, 0)], 0.0)
    pixels_before = np.where(group > 0, pixels_through[np.maximum(group - 1, 0)], 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        needed = np.ceil((target - mass_before) / values[group])
    needed = np.clip(np.nan_to_num(needed, nan=0.0, posinf=0.0), 0, counts[group])
    result = (pixels_before + needed) / d.pixels
    # p = 1 is every pixel that holds mass, exactly (float sums of very unequal values can stop short)
    result = np.where(p == 1, float(d.counts[d.values > 0].sum()) / d.pixels, result)
    return np.where(p == 0, 0.0, result)


def mass_area_auc(m) -> float:
    """Area under ``mass_area`` over p in [0, 1], exactly: sum_k (k / n) a_(k) / sum a, a descending."""
    d = _as_distribution(m)
    mass = d.mass
    if mass == 0:
        return float("nan")
    values, counts = d.values[::-1], d.counts[::-1]
    before = (d.pixels - d.pixels_below - d.counts)[::-1]  # pixels holding a larger value
    rank_sums = counts * before + counts * (counts + 1) / 2  # sum of ranks before+1 .. before+c
    return float(np.dot(values, rank_sums) / (d.pixels * mass))
