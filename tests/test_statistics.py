"""Bootstrap bands cover the true mean at about the nominal rate; paired tests agree with scipy; the scalar summary."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from gradlens.errors import GradlensError
from gradlens.regions.statistics import (
    area_under_curve,
    bootstrap_mean,
    paired_difference,
    resample_counts,
    wilcoxon_p,
)


def _synthetic_curves(rng, n: int, grid: np.ndarray) -> np.ndarray:
    """Per-image curves exp(-u t) with u ~ Exponential(1): the mean curve is E exp(-u t) = 1 / (1 + t), known exactly."""
    u = rng.exponential(1.0, size=(n, 1))
    return np.exp(-u * grid[None, :])


def test_bands_cover_the_true_mean_at_about_the_nominal_rate():
    grid = np.array([0.1, 0.5, 2.0, 8.0])
    truth = 1 / (1 + grid)
    rng = np.random.default_rng(12345)
    trials, covered = 300, np.zeros(len(grid))
    for k in range(trials):
        band = bootstrap_mean(_synthetic_curves(rng, 80, grid), num=400, seed=k, level=0.9)
        covered += (band.low <= truth) & (truth <= band.high)
    rate = covered / trials
    # percentile intervals of a mean of 80 skewed values: close to, slightly under, the nominal 90 %
    assert np.all(rate > 0.84) and np.all(rate < 0.95), rate


def test_bootstrap_mean_by_explicit_resampling_and_its_seed():
    x = np.random.default_rng(0).normal(size=(25, 3))
    band = bootstrap_mean(x, num=200, seed=7)
    counts = resample_counts(25, 200, 7)
    slow = np.array([np.repeat(x, c.astype(int), axis=0).mean(axis=0) for c in counts])  # each resample, drawn out
    assert np.allclose(band.mean, x.mean(axis=0))
    assert np.allclose(band.low, np.percentile(slow, 2.5, axis=0)) and np.allclose(band.high, np.percentile(slow, 97.5, axis=0))
    again = bootstrap_mean(x, num=200, seed=7)
    assert np.array_equal(again.low, band.low) and not np.array_equal(bootstrap_mean(x, num=200, seed=8).low, band.low)
    assert counts.sum(axis=1).tolist() == [25] * 200


def test_undefined_values_are_left_out_and_no_bootstrap_gives_no_interval():
    x = np.array([0.2, np.nan, 0.4, 0.6])
    band = bootstrap_mean(x, num=100, seed=0)
    assert band.num_images == 3 and band.mean == pytest.approx(0.4)
    none = bootstrap_mean(x, num=0)
    assert np.isnan(none.low) and none.mean == pytest.approx(0.4)
    empty = bootstrap_mean(np.array([np.nan]), num=10)
    assert empty.num_images == 0 and np.isnan(empty.mean)
    with pytest.raises(GradlensError):
        bootstrap_mean(x, level=1.5)


def test_paired_difference_and_wilcoxon_agree_with_scipy():
    rng = np.random.default_rng(1)
    a = rng.random((40, 5))
    b = a - 0.05 + rng.normal(0, 0.1, (40, 5))
    b[:, 4] = a[:, 4]  # no difference at all in the last column
    result = paired_difference(a, b, num=300, seed=0)
    d = a - b
    assert np.allclose(result.band.mean, d.mean(axis=0))
    for j in range(4):
        assert result.p_value[j] == pytest.approx(stats.wilcoxon(d[:, j]).pvalue, rel=1e-12)
        assert result.band.low[j] <= d[:, j].mean() <= result.band.high[j]
    assert np.isnan(result.p_value[4])
    assert wilcoxon_p(np.array([[0.0], [0.0], [0.3]]))[0] == pytest.approx(stats.wilcoxon([0.0, 0.0, 0.3]).pvalue)
    with pytest.raises(GradlensError):
        paired_difference(a, b[:10])


def test_area_under_the_curve_on_the_grid_axis():
    grid = np.geomspace(1e-4, 1.0, 9)
    areas = np.random.default_rng(2).random((3, 9))
    x = np.log10(grid)
    slow = [sum((row[k] + row[k + 1]) / 2 * (x[k + 1] - x[k]) for k in range(8)) / 4.0 for row in areas]
    assert np.allclose(area_under_curve(areas, grid, "log"), slow)
    assert area_under_curve(np.ones(9), grid, "log") == pytest.approx(1.0)
    lin = np.linspace(0, 2.0, 5)
    assert area_under_curve(1 - lin / 2, lin, "linear") == pytest.approx(0.5)
