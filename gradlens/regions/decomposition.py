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

from gradlens.regions.concentration import distribution, effective_area, gini


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

    @property
    def shown(self) -> bool:
        """Significant at the interval's level: the interval excludes 0 (the p-value is reported beside it)."""
        return bool(self.low > 0 or self.high < 0)


def verdict(paper: Finding, log_scale_ratio: Finding, focus: Finding, a: str = "A", b: str = "B") -> str:
    """The sentence that says which of scale and focus drives the paper's difference.

    Rule: each of the three findings counts when its bootstrap interval excludes
    zero. Focus is judged on the Gini index (higher: more concentrated), scale on
    the log ratio of mean magnitudes.
    """
    ratio = np.exp([log_scale_ratio.estimate, log_scale_ratio.low, log_scale_ratio.high])
    if paper.shown:
        where = "smaller" if paper.estimate < 0 else "larger"
        first = f"At shared thresholds {a}'s important region is {where} (ΔAUC {paper.estimate:+.3f}, p = {paper.p_value:.2g})."
    else:
        first = (f"At shared thresholds {a}'s and {b}'s important regions do not differ "
                 f"(ΔAUC {paper.estimate:+.3f} [{paper.low:+.3f}, {paper.high:+.3f}], p = {paper.p_value:.2g}).")
    scale = f"{a}'s gradients are {ratio[0]:.2f}× {b}'s [{ratio[1]:.2f}, {ratio[2]:.2f}]"
    more = "more" if focus.estimate > 0 else "less"
    focus_text = f"ΔGini {focus.estimate:+.3f} [{focus.low:+.3f}, {focus.high:+.3f}], p = {focus.p_value:.2g}"
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
