"""Is the difference real? Bootstrap bands over images and paired A-versus-B tests.

The selected images are a sample; a mean curve without its uncertainty
invites reading noise. Everything here resamples *images* (with
replacement, seeded) and, for A against a baseline, works on the per-image
paired differences, so that an image that is hard for both detectors does
not count as evidence either way:

- **bands**: the percentile bootstrap interval of the mean, per threshold
  (or per metric). One set of resamples is drawn per call from ``seed``, so
  every model's band uses the same resampled image sets;
- **paired difference**: mean of ``a_i - b_i`` with its bootstrap interval,
  and the two-sided Wilcoxon signed-rank p-value (scipy, zero differences
  dropped, as scipy's default ``zero_method="wilcox"``); NaN where every
  difference is zero or there is one image (nothing to test). A metric
  undefined on some images is resampled over the others;
- **scalar summary**: the area under the area curve on the grid's own axis
  (``log10 t`` on a log grid, ``t / t_max`` on a linear one), divided by that
  axis' span: the mean area over the grid, in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from gradlens.errors import GradlensError

DEFAULT_BOOTSTRAP = 1000
DEFAULT_LEVEL = 0.95
MAX_SEED = 2**63 - 1  # what every table and record holds as an integer (int64)
# Memory a bootstrap may take: the resample counts [num, images] (drawn as int64, kept as float64) and the
# resample means [num, columns] with np.percentile's working copy. A bootstrap asking for more is refused
# with the largest count that fits, rather than left to exhaust the machine.
BOOTSTRAP_MEMORY = 2 * 1024**3


def check_level(level) -> float:
    """The confidence level: a number strictly between 0 and 1."""
    if isinstance(level, bool) or not isinstance(level, Real) or not (0 < float(level) < 1):
        raise GradlensError(f"The confidence level (--level) must be a number in (0, 1); got {_shown(level)}.")
    return float(level)


def min_resamples(level: float) -> int:
    """The fewest resamples that give a ``level`` percentile interval: each tail, ``(1 - level) / 2`` of the
    resamples, must hold at least one of them, or the interval's ends are the extreme resamples (with 1
    resample both ends are that resample's mean, and the interval need not contain the estimate)."""
    return max(2, math.ceil(2 / (1 - check_level(level)) - 1e-9))


def bootstrap_bytes(num: int, images: int, columns: int = 1) -> int:
    """Peak memory of a bootstrap of ``num`` resamples of ``images`` rows of ``columns`` values each."""
    return 8 * int(num) * (2 * int(images) + 2 * int(columns))


def check_bootstrap(num, seed=0, level: float | None = None, images: int | None = None, columns: int = 1) -> int:
    """The bootstrap options, each bounded by what it can mean, or one sentence: ``num`` is 0 (no interval) or,
    with ``level`` given, at least :func:`min_resamples`; with ``images`` given, it fits :data:`BOOTSTRAP_MEMORY`;
    ``seed`` is an integer in [0, 2**63). Returns ``num``."""
    if isinstance(num, bool) or not isinstance(num, Integral) or num < 0:
        raise GradlensError(f"--bootstrap must be 0 (no intervals) or a number of resamples; got {_shown(num)}.")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed <= MAX_SEED:
        raise GradlensError(f"--bootstrap-seed must be an integer from 0 to 2**63 - 1; got {_shown(seed)}.")
    least = min_resamples(level) if level is not None else 1
    if 0 < num < least:
        raise GradlensError(f"--bootstrap {num} is too few resamples for a {float(level):g} interval: each tail needs at "
                            f"least one resample, so use 0 (no intervals) or at least {least}.")
    if num and images is not None:
        need = bootstrap_bytes(num, images, columns)
        if need > BOOTSTRAP_MEMORY:
            most = BOOTSTRAP_MEMORY // bootstrap_bytes(1, images, columns)
            raise GradlensError(f"--bootstrap {num} would need {need / 1024**3:.1f} GiB for {images} images and {columns} "
                                f"values each (at most {BOOTSTRAP_MEMORY // 1024**3} GiB); use at most {most:,} resamples.")
    return int(num)


def _shown(value) -> str:
    from gradlens.fileio import short_repr

    return short_repr(value)


def resample_counts(n: int, num: int, seed: int) -> np.ndarray:
    """``[num, n]`` multiplicities of a bootstrap: row k says how often each image is drawn in resample k."""
    if n < 1:
        raise GradlensError("A bootstrap needs at least one image.")
    check_bootstrap(num, seed, images=n)  # the floor set by a level is the caller's (bootstrap_mean)
    rng = np.random.default_rng(int(seed))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=num).astype(np.float64)


@dataclass
class Band:
    """Mean and percentile bootstrap interval over the first axis of some per-image values."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    num_images: int


def bootstrap_mean(values, num: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = DEFAULT_LEVEL,
                   counts: np.ndarray | None = None) -> Band:
    """Mean of ``values`` (``[n, ...]``, one row per image) and its ``level`` percentile interval.

    Rows that are NaN anywhere are left out (an undefined metric, such as the box
    energy of an all-zero map); ``counts`` reuses resamples drawn for ``n`` rows.
    """
    check_level(level)
    check_bootstrap(num, seed)  # types and ranges here; the floor on the count where an interval is drawn
    x = np.asarray(values, dtype=np.float64)
    shape = x.shape[1:]
    flat = x.reshape(x.shape[0], -1)
    keep = ~np.isnan(flat).any(axis=1)
    if counts is not None and not keep.all():
        counts = None  # the shared resamples were drawn for all rows
    flat = flat[keep]
    n = flat.shape[0]
    if n == 0:
        nan = np.full(shape, np.nan)
        return Band(nan, nan.copy(), nan.copy(), 0)
    mean = flat.mean(axis=0)
    if num <= 0 or n < 2:  # one image: resampling it says nothing about uncertainty
        return Band(mean.reshape(shape), np.full(shape, np.nan), np.full(shape, np.nan), n)
    # an interval is drawn: enough resamples for the level, and (drawn here) few enough for memory
    check_bootstrap(num, seed, level, images=n if counts is None else None, columns=flat.shape[1])
    weights = resample_counts(n, num, seed) if counts is None else counts
    means = weights @ flat / n  # [num, ...]: each resample's mean
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return Band(mean.reshape(shape), low.reshape(shape), high.reshape(shape), n)


def wilcoxon_p(differences) -> np.ndarray:
    """Two-sided Wilcoxon signed-rank p-value of each column of ``differences`` (``[n, k]``); NaN where all are zero."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=np.float64)
    d = d.reshape(d.shape[0], -1)
    out = np.full(d.shape[1], np.nan)
    for j in range(d.shape[1]):
        column = d[:, j][~np.isnan(d[:, j])]
        if len(column) >= 2 and np.any(column != 0):
            out[j] = float(wilcoxon(column).pvalue)
    return out


@dataclass
class PairedDifference:
    """A minus B per image: mean, bootstrap interval, Wilcoxon p-value (per column)."""

    band: Band
    p_value: np.ndarray


def paired_difference(a, b, num: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = DEFAULT_LEVEL) -> PairedDifference:
    """The paired comparison of two models' per-image values on the same images (rows aligned)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise GradlensError(f"Paired values need the same images; got shapes {a.shape} and {b.shape}.")
    d = a - b
    return PairedDifference(bootstrap_mean(d, num, seed, level), wilcoxon_p(d).reshape(d.shape[1:]))


def curve_axis(thresholds, scale: str) -> np.ndarray:
    """The grid's own x axis: ``log10 t`` on a log grid, ``t / t_max`` on a linear one."""
    t = np.asarray(thresholds, dtype=np.float64)
    if scale == "log":
        return np.log10(t)
    return t / t[-1] if t[-1] > 0 else t


def area_under_curve(areas, thresholds, scale: str) -> np.ndarray:
    """Trapezoidal area under each curve (last axis) on the grid's axis, divided by the axis' span."""
    x = curve_axis(thresholds, scale)
    span = x[-1] - x[0]
    if not span > 0:
        raise GradlensError("The threshold grid spans no range, so a curve has no area under it.")
    y = np.asarray(areas, dtype=np.float64)
    return ((y[..., 1:] + y[..., :-1]) / 2 * np.diff(x)).sum(axis=-1) / span
