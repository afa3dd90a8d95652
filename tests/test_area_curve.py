"""Area curves against a direct per-threshold computation; grids, normalisation, histograms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradlens.errors import GradlensError
from gradlens.regions.area import (
    area_curve,
    area_curve_from_summaries,
    normalise_curves,
    region_areas,
    threshold_grid,
)
from gradlens.regions.histogram import bin_edges, counts_above, pooled_percentile, value_histogram


def direct_curve(maps, thresholds, per_image_normalize=False):
    """The slow, obvious computation: for every threshold, for every map, the fraction above it."""
    out = []
    for t in thresholds:
        areas = []
        for m in maps:
            m = np.asarray(m, dtype=np.float32)
            if per_image_normalize:
                m = m / m.max() if m.max() > 0 else np.zeros_like(m)
            areas.append(float(np.count_nonzero(m > np.float32(t))) / m.size)
        out.append(np.mean(areas))
    return np.array(out)


def random_maps(seed, n=7, integer=False):
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        h, w = rng.integers(1, 40, size=2)
        if integer:  # many exact ties, including ties with the thresholds
            maps.append(rng.integers(0, 6, size=(h, w)).astype(np.float32))
        else:
            maps.append((rng.lognormal(-6, 2, size=(h, w)) * (rng.random((h, w)) > 0.2)).astype(np.float32))
    return maps


@pytest.mark.parametrize("seed", range(6))
def test_curve_equals_direct_computation(seed):
    maps = random_maps(seed, integer=seed % 2 == 0)
    top = max(float(m.max()) for m in maps)
    for grid in (threshold_grid(top, 37, "linear"), threshold_grid(top, 23, "log", 3)):
        assert np.allclose(area_curve(maps, grid), direct_curve(maps, grid), rtol=0, atol=1e-12)
    ties = np.arange(0.0, 6.0)  # thresholds equal to map values: 'greater than', not 'at least'
    assert np.allclose(area_curve(maps, ties), direct_curve(maps, ties), atol=1e-12)


def test_curve_from_tensors_iterators_and_per_image_normalisation():
    maps = random_maps(11)
    grid = np.linspace(0, 1, 50)
    expected = direct_curve(maps, grid, per_image_normalize=True)
    got = area_curve((torch.from_numpy(m) for m in maps), grid, per_image_normalize=True)
    assert np.allclose(got, expected, atol=1e-12)
    with_zero = maps + [np.zeros((5, 5), np.float32)]
    assert np.allclose(area_curve(with_zero, grid, per_image_normalize=True), direct_curve(with_zero, grid, True), atol=1e-12)


def test_curve_is_monotone_non_increasing_and_bounded():
    rng = np.random.default_rng(3)
    maps = random_maps(4)
    grid = np.sort(rng.random(300) * 0.05)
    curve = area_curve(maps, grid)
    assert np.all(np.diff(curve) <= 0) and curve.min() >= 0 and curve.max() <= 1


def test_images_count_alike_whatever_their_size():
    big, small = np.ones((100, 100), np.float32), np.zeros((2, 2), np.float32)
    assert area_curve([big, small], [0.5])[0] == pytest.approx(0.5)


def test_region_areas_of_one_map():
    m = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.float32)
    assert region_areas(m, [0, 2, 5]).tolist() == [5 / 6, 3 / 6, 0.0]


def test_grid_and_input_errors():
    with pytest.raises(GradlensError, match="No gradient maps"):
        area_curve([], [0.1])
    with pytest.raises(GradlensError, match="sorted"):
        area_curve([np.ones((2, 2))], [0.2, 0.1])
    with pytest.raises(GradlensError, match="2-D"):
        area_curve([np.ones((2, 2, 3))], [0.1])
    with pytest.raises(GradlensError, match="every map is zero"):
        threshold_grid(0.0, 10)
    with pytest.raises(GradlensError, match="at least 2"):
        threshold_grid(1.0, 1)
    with pytest.raises(GradlensError, match="linear or log"):
        threshold_grid(1.0, 10, "cubic")


def test_threshold_grids():
    lin = threshold_grid(2.0, 5, "linear")
    assert lin.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    log = threshold_grid(2.0, 5, "log", log_decades=4)
    assert log[0] == pytest.approx(2e-4) and log[-1] == pytest.approx(2.0) and np.allclose(np.diff(np.log10(log)), 1.0)


def test_display_normalisation_follows_design():
    t = np.array([0.0, 1.0, 4.0])
    curves = {"a": np.array([0.5, 0.2, 0.0]), "b": np.array([0.8, 0.4, 0.1])}
    t_norm, normed = normalise_curves(t, curves)
    assert t_norm.tolist() == [0.0, 0.25, 1.0]
    assert normed["b"].tolist() == [1.0, 0.5, 0.125] and normed["a"].tolist() == [0.625, 0.25, 0.0]


def test_histogram_counts_and_exactness_at_bin_edges():
    rng = np.random.default_rng(0)
    values = torch.from_numpy((rng.lognormal(-8, 3, size=20000) * (rng.random(20000) > 0.1)).astype(np.float32))
    bins, counts = value_histogram(values)
    assert counts.sum() == values.numel() and np.all(np.diff(bins.astype(int)) > 0)
    lower, upper = bin_edges(bins)
    v = values.numpy().astype(np.float64)
    assert np.all(v >= lower[np.searchsorted(bins, (values.view(torch.int32) >> 16).numpy())])
    edges = upper[::7]  # at an upper bin edge the count is exact
    assert np.array_equal(counts_above(bins, counts, edges), np.array([(v > e).sum() for e in edges], dtype=float))
    assert counts_above(bins, counts, [0.0])[0] == np.count_nonzero(v)  # zeros are never above 0
    with pytest.raises(ValueError):
        value_histogram(torch.tensor([-1.0]))


def _summary(m):
    bins, counts = value_histogram(torch.from_numpy(m))
    return {"height": m.shape[0], "width": m.shape[1], "max": float(m.max()), "hist_bins": bins, "hist_counts": counts}


def test_curve_from_summaries_is_within_one_bin_of_the_exact_curve():
    maps = random_maps(8, n=10)
    top = max(float(m.max()) for m in maps)
    grid = threshold_grid(top, 60, "log", 4)
    exact = area_curve(maps, grid)
    approx = area_curve_from_summaries([_summary(m) for m in maps], grid)
    for k, t in enumerate(grid):  # the error is at most the share of pixels within 1 % of t
        near = np.mean([np.count_nonzero(np.abs(m - t) <= 0.01 * t) / m.size for m in maps])
        assert abs(approx[k] - exact[k]) <= near + 1e-12
    normalised = area_curve_from_summaries([_summary(m) for m in maps], np.linspace(0, 1, 30), per_image_normalize=True)
    assert np.allclose(normalised, area_curve(maps, np.linspace(0, 1, 30), per_image_normalize=True), atol=0.02)


def test_pooled_percentile_from_histograms():
    maps = random_maps(9, n=6)
    pooled = np.concatenate([m.ravel() for m in maps])
    summaries = [_summary(m) for m in maps]
    for q in (50, 90, 99.9):
        assert pooled_percentile(summaries, q) == pytest.approx(np.percentile(pooled, q, method="inverted_cdf"), rel=0.005)
    assert pooled_percentile(summaries, 100) == pooled.max()
    norm = np.concatenate([(m / m.max()).ravel() for m in maps])
    assert pooled_percentile(summaries, 90, per_image_normalize=True) == pytest.approx(np.percentile(norm, 90, method="inverted_cdf"), rel=0.005)


@pytest.mark.parametrize(
    "grid",
    [
        np.linspace(1.0, 1.0 + 2e-5, 300),  # steps near float32's resolution: rounding puts estimates off by one
        np.linspace(-3.0, 5.0, 17),  # negative thresholds
        np.geomspace(1e-30, 1e-20, 50),  # a log grid among denormal-sized magnitudes
        np.array([0.0, 0.0, 1.0, 1.0, 2.5]),  # repeated thresholds
    ],
)
def test_fast_grid_lookup_is_exact_on_awkward_grids(grid):
    rng = np.random.default_rng(1)
    lo, hi = float(grid[0]), float(grid[-1])
    span = hi - lo if hi > lo else 1.0
    values = np.concatenate([rng.uniform(lo - 0.1 * span, hi + 0.1 * span, 3000), grid, np.nextafter(grid, np.inf)])
    maps = [values.astype(np.float32).reshape(-1, 1), np.abs(values).astype(np.float32).reshape(1, -1) * 0]
    assert np.allclose(area_curve(maps, grid), direct_curve(maps, grid), atol=1e-12)
