"""The scale/focus decomposition and its verdict, on synthetic maps whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from gradlens.regions.decomposition import Finding, image_terms, log_area_under_curve, verdict
from gradlens.regions.statistics import paired_difference

LOW, HIGH = np.log(1e-8), np.log(1e3)  # covers every magnitude drawn below (no pixel clipped)


def field(rng, concentration: float, shape=(48, 64)) -> np.ndarray:
    """A positive map whose spread of log-magnitudes grows with ``concentration`` (more mass on fewer pixels)."""
    return np.exp(concentration * rng.standard_normal(shape))


def direct_auc(m, low, high, steps=20001) -> float:  # the curve itself, integrated on a fine grid
    x = np.linspace(low, high, steps)
    area = (np.asarray(m).reshape(-1, 1) > np.exp(x)).mean(axis=0)
    return float(np.trapezoid(area, x) / (high - low))


def test_log_auc_is_the_integral_of_the_area_curve():
    m = field(np.random.default_rng(0), 1.5, (20, 20))
    m[0, :5] = 0.0  # zeros lie below every threshold
    assert log_area_under_curve(m, LOW, HIGH) == pytest.approx(direct_auc(m, LOW, HIGH), abs=2e-4)


@pytest.mark.parametrize("c", [0.25, 0.56, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_paper_difference_is_scale_plus_focus_exactly(c, seed):
    rng = np.random.default_rng(seed)
    a, b = c * field(rng, 1.2), field(rng, 0.8)
    t = image_terms(a, b, LOW, HIGH)
    assert t.d_auc == pytest.approx(t.scale_term + t.focus_term, abs=1e-12)
    assert t.log_scale_ratio == pytest.approx(np.log(a.mean() / b.mean()), abs=1e-12)


def test_a_scaled_copy_differs_only_in_scale():
    a = field(np.random.default_rng(2), 1.0)
    t = image_terms(a, 2.0 * a, LOW, HIGH)  # B = 2 A exactly
    assert t.focus_term == pytest.approx(0.0, abs=1e-12) and t.gini_a == pytest.approx(t.gini_b, abs=1e-12)
    assert t.scale_term == pytest.approx(-np.log(2.0) / (HIGH - LOW), abs=1e-12)
    assert t.d_auc == pytest.approx(t.scale_term, abs=1e-12)


def test_equal_scale_and_more_concentration_is_focus():
    rng = np.random.default_rng(3)
    a, b = field(rng, 1.6), field(rng, 0.6)
    a, b = a / a.mean(), b / b.mean()  # equal mean magnitude
    t = image_terms(a, b, LOW, HIGH)
    assert t.scale_term == pytest.approx(0.0, abs=1e-12) and t.gini_a > t.gini_b
    assert t.focus_term < 0 and t.d_auc == pytest.approx(t.focus_term, abs=1e-12)


def test_zero_maps_have_no_terms():
    t = image_terms(np.zeros((4, 4)), np.ones((4, 4)), LOW, HIGH)
    assert np.isnan(t.d_auc) and np.isnan(t.scale_term) and np.isnan(t.gini_a)


def store(kind: str, n: int = 20, seed: int = 0):
    """Per-image pairs (A, B) with a known truth: 'scale' (B = c A), 'focus', 'both', 'neither'."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        base = field(rng, 1.0)
        if kind == "scale":
            a, b = base, 1.8 * base
        elif kind == "focus":
            a, b = field(rng, 1.5), field(rng, 0.7)
            a, b = a / a.mean(), b / b.mean()
        elif kind == "both":
            a, b = field(rng, 1.5), field(rng, 0.7)
            a, b = 0.5 * a / a.mean(), b / b.mean()
        else:
            a, b = field(rng, 1.0), field(rng, 1.0)
        pairs.append((a, b))
    return pairs


def findings(pairs):
    terms = [image_terms(a, b, LOW, HIGH) for a, b in pairs]

    def finding(a_values, b_values):
        d = paired_difference(np.asarray(a_values)[:, None], np.asarray(b_values)[:, None], num=2000, seed=0)
        return Finding(float(d.band.mean[0]), float(d.band.low[0]), float(d.band.high[0]), float(d.p_value[0]))

    zeros = np.zeros(len(terms))
    paper = finding([t.d_auc for t in terms], zeros)
    scale = finding([t.log_scale_ratio for t in terms], zeros)
    focus = finding([t.gini_a for t in terms], [t.gini_b for t in terms])
    return paper, scale, focus


@pytest.mark.parametrize(
    "kind, says",
    [
        ("scale", "the difference is one of scale, not of focus"),
        ("focus", "the difference is one of focus, not of scale"),
        ("both", "both scale and focus contribute"),
        ("neither", "neither scale nor focus differs clearly"),
    ],
)
def test_the_verdict_names_what_the_synthetic_truth_is(kind, says):
    paper, scale, focus = findings(store(kind))
    sentence = verdict(paper, scale, focus)
    assert says in sentence, sentence
    if kind == "scale":
        assert "0.56× B's" in sentence  # 1 / 1.8
    if kind == "neither":
        assert "do not differ" in sentence


def test_the_verdict_sentence_reads_like_the_issue_example():
    sentence = verdict(Finding(-0.077, -0.105, -0.050, 2e-5), Finding(np.log(0.56), np.log(0.49), np.log(0.64), 1e-4),
                       Finding(0.004, -0.02, 0.03, 0.6))
    assert sentence == ("At shared thresholds A's important region is smaller (ΔAUC -0.077, p = 2e-05). A's gradients are "
                        "0.56× B's [0.49, 0.64]; without scale, A is not more concentrated (ΔGini +0.004 [-0.020, +0.030], "
                        "p = 0.6): the difference is one of scale, not of focus.")


def test_a_certain_but_negligible_difference_is_no_difference():
    speck = Finding(2e-6, 1e-6, 3e-6, 1e-4, negligible=1e-3)  # float16 storage moves a Gini index this much
    assert not speck.shown and Finding(2e-6, 1e-6, 3e-6, 1e-4).shown
    sentence = verdict(Finding(-0.05, -0.07, -0.03, 1e-4), Finding(np.log(0.5), np.log(0.45), np.log(0.55), 1e-4), speck)
    assert "one of scale, not of focus" in sentence


def test_without_intervals_the_p_value_decides():
    nan = float("nan")
    assert Finding(-0.05, nan, nan, 0.01).shown and not Finding(-0.05, nan, nan, 0.2).shown
    assert not Finding(-0.05, nan, nan, nan).shown  # one image: nothing to test


def test_one_image_gives_a_sentence_without_empty_intervals():
    nan = float("nan")
    sentence = verdict(Finding(-0.183, nan, nan, nan), Finding(np.log(0.09), nan, nan, nan), Finding(0.01, nan, nan, nan))
    assert "nan" not in sentence
    assert sentence.startswith("At shared thresholds A's and B's important regions do not differ (ΔAUC -0.183).")
    assert "A's gradients are 0.09× B's, and without scale A is not more concentrated (ΔGini +0.010)" in sentence


def test_the_table_verdict_reads_the_decomposition(tmp_path):
    import pandas as pd

    from gradlens.regions.decomposition import decompose, pair_terms, table_verdict

    rng = np.random.default_rng(5)
    rows_a, rows_b = [], []
    for k in range(12):  # B = 2 A on every image: a scale difference only
        a = field(rng, 1.0)
        for rows, m in ((rows_a, a), (rows_b, 2.0 * a)):
            rows.append({"image_id": k, "scale_mean": m.mean(), "log_auc": log_area_under_curve(m, LOW, HIGH),
                         "log_auc_scale_free": log_area_under_curve(m / m.mean(), LOW - 0.5, HIGH - 0.5),
                         "gini": image_terms(m, m, LOW, HIGH).gini_a, "effective_area": 0.5, "mass_area_50": 0.1,
                         "mass_area_90": 0.5, "mass_area_auc": 0.2})
    terms = pair_terms(pd.DataFrame(rows_a), pd.DataFrame(rows_b), HIGH - LOW)
    assert np.allclose(terms["outside_grid"], 0.0, atol=1e-12)
    table = decompose(terms, 500, 0, 0.95, {"role": "a", "label": "A", "versus": "b", "versus_label": "B"})
    shares = table.set_index("quantity")["share_of_paper"]
    assert shares["scale_term"] == pytest.approx(1.0, abs=1e-9) and shares["focus_term"] == pytest.approx(0.0, abs=1e-9)
    ratio = table.set_index("quantity").loc["scale_ratio"]
    assert ratio["estimate"] == pytest.approx(0.5, rel=1e-12) and ratio["low"] == pytest.approx(0.5, rel=1e-12)
    assert "one of scale, not of focus" in table_verdict(table, "A", "B")
