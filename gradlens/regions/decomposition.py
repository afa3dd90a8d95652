"""Scale or focus? The paper's area difference split into a gradient-scale term and a focus term.

On a log threshold axis a map c·u has u's area curve shifted by log c. Over a
grid [x0, x0 + L] of log thresholds that covers a map's non-zero magnitudes,
the area under the (normalised) curve is exactly

    AUC(m) = mean over pixels of clip(log m - x0, 0, L) / L
           = (log s + mean log(m / s) - x0) / L          (no pixel clipped)

for any per-image scale s. So A's minus B's area, image by image, is

    dAUC = (log s_A - log s_B) / L  +  (mean log u_A - mean log u_B) / L
           scale term                   focus term (u = m / s, the scale-free map)

exactly where the grid covers both maps (exact zeros lie below every grid and
add nothing to either side). The scale is the **mean magnitude**: it sums every
pixel, so one outlier moves it little, and it is the quantity "A's gradients
are c times B's" speaks of. The maximum is a poor scale: a single pixel, the
noisiest value of a gradient map, and a sharper peak (more focus) would raise
it and hide as a smaller scale-free map what is really focus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradlens.regions.concentration import Distribution, distribution, effective_area, gini, mass_area, mass_area_auc
from gradlens.regions.statistics import PairedDifference, bootstrap_mean, wilcoxon_p

MASS_FRACTIONS = np.linspace(0.0, 1.0, 101)  # the mass-area curve's grid (figure and table)
CONCENTRATION_COLUMNS = ["role", "label", "rank", "image_id", "scale_mean", "map_max", "loss", "gini", "effective_area",
                         "mass_area_50", "mass_area_90", "mass_area_auc", "log_auc", "log_auc_scale_free", "outside_grid",
                         "outside_grid_scale_free"]
# A minus a baseline, per image: the paper's difference, its two parts and what the grid leaves out, then the
# scale itself and the scale-free measures (each A's minus B's)
TERMS = ["paper_auc", "scale_term", "focus_term", "outside_grid", "log_scale_ratio", "gini", "effective_area",
         "mass_area_50", "mass_area_90", "mass_area_auc"]
DECOMPOSITION_COLUMNS = ["role", "label", "versus", "versus_label", "quantity", "estimate", "low", "high", "p_value",
                         "share_of_paper", "num_images"]


def log_area_under_curve(magnitudes, log_low: float, log_high: float) -> float:
    """Exact area under "fraction of pixels above t" against log t over [log_low, log_high], divided by the width."""
    if not log_high > log_low:
        raise ValueError("The log threshold range must have log_high > log_low.")
    m = np.asarray(magnitudes, dtype=np.float64).reshape(-1)
    width = log_high - log_low
    with np.errstate(divide="ignore"):
        logs = np.log(m)
    return float(np.clip(logs - log_low, 0.0, width).mean() / width)


@dataclass(frozen=True)
class LogGrid:
    """The decomposition's threshold range: natural-log thresholds from ``log_low`` to ``log_low + width``.

    It is the paper's default grid (log, ending at the pooled 99.9th percentile of the raw maps, 4 decades)
    whatever grid the curves were drawn on, so the decomposition reads the same on every run.
    """

    log_low: float
    width: float

    @classmethod
    def ending_at(cls, top: float, decades: float) -> "LogGrid":
        width = float(decades) * float(np.log(10.0))
        if not (np.isfinite(top) and top > 0 and np.isfinite(width) and width > 0):
            raise ValueError("A log grid needs a positive top threshold and a positive number of decades.")
        return cls(float(np.log(top)) - width, width)

    def auc(self, d: Distribution, shift: float = 0.0) -> float:
        """Exact area under the area curve of ``d``'s map multiplied by ``exp(shift)``, divided by the width."""
        steps = np.clip(d.log_values + shift - self.log_low, 0.0, self.width)  # zeros: -inf, clipped to 0
        return float(np.dot(steps, d.counts) / (d.pixels * self.width))

    def outside(self, d: Distribution, shift: float = 0.0) -> float:
        """Share of the pixels the grid does not cover (zero, below its first or above its last threshold)."""
        logs = d.log_values + shift
        out = (logs <= self.log_low) | (logs >= self.log_low + self.width)
        return float(d.counts[out].sum() / d.pixels)


def image_measures(d: Distribution, grid: LogGrid, log_reference: float) -> tuple[dict, np.ndarray]:
    """One map's scale, its scale-free measures and its log-grid areas, and its mass-area curve on
    :data:`MASS_FRACTIONS`.

    ``log_reference`` places the scale-free map ``u = m / s`` on the grid: ``u`` is moved to the image's
    reference scale (shared by every model of the image), so the scale-free areas of two models differ
    exactly by the focus term. Any shared reference gives the same difference; one near the maps' own
    scales keeps their pixels inside the grid.
    """
    pixels, mass = d.pixels, d.mass
    nan = float("nan")
    scale = mass / pixels
    row = {"scale_mean": scale, "map_max": float(d.values[-1])}
    if not mass > 0:
        row.update(gini=nan, effective_area=nan, mass_area_50=nan, mass_area_90=nan, mass_area_auc=nan,
                   log_auc=grid.auc(d), log_auc_scale_free=nan, outside_grid=grid.outside(d), outside_grid_scale_free=nan)
        return row, np.full(len(MASS_FRACTIONS), nan)
    curve = mass_area(d, MASS_FRACTIONS)
    shift = float(log_reference) - float(np.log(scale))
    row.update(gini=gini(d), effective_area=effective_area(d), mass_area_50=float(curve[50]), mass_area_90=float(curve[90]),
               mass_area_auc=mass_area_auc(d), log_auc=grid.auc(d), log_auc_scale_free=grid.auc(d, shift),
               outside_grid=grid.outside(d), outside_grid_scale_free=grid.outside(d, shift))
    return row, curve


def pair_terms(a: pd.DataFrame, b: pd.DataFrame, width: float) -> pd.DataFrame:
    """Per image, A's measures minus B's (:data:`TERMS`), from two concentration tables in the same image order.

    ``paper_auc`` = ``scale_term`` + ``focus_term`` + ``outside_grid``; the last is exactly 0 where the grid
    covers every pixel of both maps (it is what zero pixels and pixels beyond the grid's ends leave out).
    """
    if list(a["image_id"]) != list(b["image_id"]):
        raise ValueError("Paired measures need the same images in the same order.")
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log(a["scale_mean"].to_numpy(np.float64)) - np.log(b["scale_mean"].to_numpy(np.float64))
    log_ratio = np.where(np.isfinite(log_ratio), log_ratio, np.nan)  # a zero map has no scale
    paper = a["log_auc"].to_numpy(np.float64) - b["log_auc"].to_numpy(np.float64)
    focus = a["log_auc_scale_free"].to_numpy(np.float64) - b["log_auc_scale_free"].to_numpy(np.float64)
    scale = log_ratio / width
    terms = {"image_id": a["image_id"].to_numpy(), "paper_auc": np.where(np.isnan(log_ratio), np.nan, paper),
             "scale_term": scale, "focus_term": focus, "outside_grid": paper - scale - focus, "log_scale_ratio": log_ratio}
    for measure in ("gini", "effective_area", "mass_area_50", "mass_area_90", "mass_area_auc"):
        terms[measure] = a[measure].to_numpy(np.float64) - b[measure].to_numpy(np.float64)
    return pd.DataFrame(terms)


def decompose(terms: pd.DataFrame, bootstrap: int, seed: int, level: float, base: dict,
              counts: np.ndarray | None = None) -> pd.DataFrame:
    """Each column of :func:`pair_terms` over images: mean, bootstrap interval, Wilcoxon p-value, and for the
    three parts their share of the paper's difference. ``log_scale_ratio`` is also given as ``scale_ratio``
    (its exponential: the geometric mean ratio A / B and its interval). Images where a term is undefined (a
    zero map) are left out of that term. ``counts``: resamples already drawn for every image with the same
    ``bootstrap`` and ``seed`` (the same intervals, drawn once for all terms)."""
    rows = []
    paper_mean = float(np.nanmean(terms["paper_auc"])) if terms["paper_auc"].notna().any() else float("nan")
    for quantity in TERMS:
        values = terms[quantity].to_numpy(np.float64)
        keep = ~np.isnan(values)
        if not keep.any():
            rows.append({**base, "quantity": quantity, "estimate": np.nan, "low": np.nan, "high": np.nan,
                         "p_value": np.nan, "share_of_paper": np.nan, "num_images": 0})
            continue
        shared = counts if counts is not None and keep.all() else None
        d = PairedDifference(bootstrap_mean(values[keep], bootstrap, seed, level, counts=shared),
                             wilcoxon_p(values[keep]).reshape(()))
        share = float(d.band.mean) / paper_mean if quantity in ("scale_term", "focus_term", "outside_grid") \
            and paper_mean != 0 and np.isfinite(paper_mean) else np.nan
        rows.append({**base, "quantity": quantity, "estimate": float(d.band.mean), "low": float(d.band.low),
                     "high": float(d.band.high), "p_value": float(d.p_value), "share_of_paper": share,
                     "num_images": d.band.num_images})
        if quantity == "log_scale_ratio":
            rows.append({**rows[-1], "quantity": "scale_ratio", "estimate": float(np.exp(d.band.mean)),
                         "low": float(np.exp(d.band.low)), "high": float(np.exp(d.band.high))})
    return pd.DataFrame(rows, columns=DECOMPOSITION_COLUMNS)


# Differences too small to mean anything, whatever their interval: storing a map as float16 moves its Gini
# index by ~1e-6 and its mean by ~1e-4 relative, so B = c * A stored is not bit-for-bit A's shape, and a
# thousand consistent such specks would otherwise count as "focus". A thousandth of the Gini index's and
# of the area's [0, 1] range, and a 1 % ratio of scales, are far below any difference worth a sentence.
NEGLIGIBLE = {"paper_auc": 1e-3, "log_scale_ratio": float(np.log(1.01)), "gini": 1e-3}


def finding(table: pd.DataFrame, quantity: str, level: float = 0.95) -> Finding:
    """One row of :func:`decompose`'s table as a :class:`Finding` (with its :data:`NEGLIGIBLE` floor)."""
    row = table[table["quantity"] == quantity].iloc[0]
    return Finding(float(row["estimate"]), float(row["low"]), float(row["high"]), float(row["p_value"]), 1 - level,
                   NEGLIGIBLE.get(quantity, 0.0))


def table_verdict(table: pd.DataFrame, a: str = "A", b: str = "B", level: float = 0.95) -> str:
    """:func:`verdict` on one pair's rows of :func:`decompose`'s table."""
    return verdict(finding(table, "paper_auc", level), finding(table, "log_scale_ratio", level),
                   finding(table, "gini", level), a, b)


@dataclass(frozen=True)
class ImageTerms:
    """One image, A against B: the paper's area difference and its two parts, and the scale-free measures."""

    d_auc: float
    scale_term: float
    focus_term: float
    log_scale_ratio: float  # log(s_A / s_B)
    gini_a: float
    gini_b: float
    effective_area_a: float
    effective_area_b: float


def image_terms(map_a, map_b, log_low: float, log_high: float) -> ImageTerms:
    """The decomposition of one image's paired maps on the shared log grid [log_low, log_high]."""
    width = log_high - log_low
    a = np.asarray(map_a, dtype=np.float64)
    b = np.asarray(map_b, dtype=np.float64)
    s_a, s_b = float(a.mean()), float(b.mean())
    if not (s_a > 0 and s_b > 0):
        nan = float("nan")
        return ImageTerms(nan, nan, nan, nan, gini(a), gini(b), effective_area(a), effective_area(b))
    d_auc = log_area_under_curve(a, log_low, log_high) - log_area_under_curve(b, log_low, log_high)
    log_ratio = float(np.log(s_a) - np.log(s_b))
    # the scale-free maps on the shared grid moved by the pair's geometric-mean scale: the same width L
    centre = 0.5 * (np.log(s_a) + np.log(s_b))
    focus = log_area_under_curve(a / s_a, log_low - centre, log_high - centre) - log_area_under_curve(
        b / s_b, log_low - centre, log_high - centre
    )
    da, db = distribution(a), distribution(b)
    return ImageTerms(d_auc, log_ratio / width, focus, log_ratio, gini(da), gini(db), effective_area(da), effective_area(db))


@dataclass(frozen=True)
class Finding:
    """A paired difference over images: estimate, interval and Wilcoxon p-value."""

    estimate: float
    low: float
    high: float
    p_value: float
    alpha: float = 0.05  # without an interval (--bootstrap 0): shown when the Wilcoxon p-value is below it
    negligible: float = 0.0  # an estimate this small or smaller is no difference, however certain

    @property
    def shown(self) -> bool:
        """A difference: larger than ``negligible`` and significant at the interval's level (the interval
        excludes 0; without an interval, the Wilcoxon p-value is below ``alpha``)."""
        if not abs(self.estimate) > self.negligible:
            return False
        if np.isnan(self.low) or np.isnan(self.high):
            return bool(self.p_value < self.alpha)
        return bool(self.low > 0 or self.high < 0)


def verdict(paper: Finding, log_scale_ratio: Finding, focus: Finding, a: str = "A", b: str = "B") -> str:
    """The sentence that says which of scale and focus drives the paper's difference.

    Rule: each of the three findings counts when its bootstrap interval excludes
    zero (without intervals: its Wilcoxon p-value is below 1 - level) and its
    estimate is not negligible (:data:`NEGLIGIBLE`). Focus is judged on the Gini
    index (higher: more concentrated), scale on the log ratio of mean magnitudes.
    Then: scale only, focus only, both, or neither, as the sentence's ending says
    (with a paper's difference that is not shown, "the two cancel" or nothing).
    """
    ratio = np.exp([log_scale_ratio.estimate, log_scale_ratio.low, log_scale_ratio.high])

    def interval(low: float, high: float, spec: str) -> str:  # none with one image or without bootstrap
        return "" if np.isnan(low) or np.isnan(high) else f" [{low:{spec}}, {high:{spec}}]"

    def p_value(p: float) -> str:  # none with one image or constant differences
        return "" if np.isnan(p) else f", p = {p:.2g}"

    if paper.shown:
        where = "smaller" if paper.estimate < 0 else "larger"
        first = f"At shared thresholds {a}'s important region is {where} (ΔAUC {paper.estimate:+.3f}{p_value(paper.p_value)})."
    else:
        first = (f"At shared thresholds {a}'s and {b}'s important regions do not differ "
                 f"(ΔAUC {paper.estimate:+.3f}{interval(paper.low, paper.high, '+.3f')}{p_value(paper.p_value)}).")
    scale = f"{a}'s gradients are {ratio[0]:.2f}× {b}'s{interval(ratio[1], ratio[2], '.2f')}"
    more = "more" if focus.estimate > 0 else "less"
    focus_text = f"ΔGini {focus.estimate:+.3f}{interval(focus.low, focus.high, '+.3f')}{p_value(focus.p_value)}"
    if log_scale_ratio.shown and not focus.shown:
        rest = f"{scale}; without scale, {a} is not more concentrated ({focus_text})"
        tail = ": the difference is one of scale, not of focus." if paper.shown else "."
    elif focus.shown and not log_scale_ratio.shown:
        rest = f"{scale}, not a clear difference of scale; without scale, {a} is {more} concentrated ({focus_text})"
        tail = ": the difference is one of focus, not of scale." if paper.shown else "."
    elif focus.shown and log_scale_ratio.shown:
        rest = f"{scale}, and without scale {a} is {more} concentrated ({focus_text})"
        tail = ": both scale and focus contribute." if paper.shown else ", and the two cancel at shared thresholds."
    else:
        rest = f"{scale}, and without scale {a} is not more concentrated ({focus_text})"
        tail = ": neither scale nor focus differs clearly." if not paper.shown else \
            ": neither part is clear on its own."
    return f"{first} {rest}{tail}"
