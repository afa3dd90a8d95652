"""gradlens.regions.concentration against direct computations (sorting, loops) and scipy's entropy."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import entropy

from gradlens.regions.concentration import (
    code_distribution,
    distribution,
    effective_area,
    gini,
    mass_area,
    mass_area_auc,
)


def maps():
    rng = np.random.default_rng(0)
    yield "gamma", rng.gamma(0.3, size=(37, 53))
    yield "ties", rng.integers(0, 4, size=(20, 30)).astype(float)  # many equal magnitudes
    yield "sparse", np.where(rng.random((40, 40)) < 0.02, rng.random((40, 40)), 0.0)
    yield "uniform", np.full((8, 9), 3.5)
    yield "one pixel", np.eye(1, 100, 42).reshape(10, 10)
    yield "float16", rng.lognormal(-6, 2, size=(31, 29)).astype(np.float16).astype(np.float64)


MAPS = dict(maps())


def direct_gini(m) -> float:  # Quantus' Sparseness formula, written as the paper states it (no offset)
    a = np.sort(np.asarray(m, dtype=np.float64).ravel())
    n = a.size
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * a).sum() / (n * a.sum()))


def direct_mass_area(m, p: float) -> float:  # a loop over pixels, largest first, in exact rational arithmetic
    a = np.sort(np.asarray(m, dtype=np.float64).ravel())[::-1]
    total = sum(Fraction(v) for v in a)
    target, running = Fraction(p) * total, Fraction(0)
    if p == 0:
        return 0.0
    for k, v in enumerate(a, start=1):
        running += Fraction(v)
        if running >= target:
            return k / a.size
    return 1.0


@pytest.mark.parametrize("name", MAPS)
def test_gini_matches_the_direct_formula(name):
    assert gini(MAPS[name]) == pytest.approx(direct_gini(MAPS[name]), abs=1e-12)


def test_gini_extremes():
    assert gini(MAPS["uniform"]) == pytest.approx(0.0, abs=1e-15)
    assert gini(MAPS["one pixel"]) == pytest.approx(1 - 1 / 100, abs=1e-15)


@pytest.mark.parametrize("name", MAPS)
def test_effective_area_is_exp_entropy_over_pixels(name):
    m = MAPS[name]
    assert effective_area(m) == pytest.approx(math.exp(entropy(m.ravel())) / m.size, rel=1e-12)


def test_effective_area_extremes():
    assert effective_area(MAPS["uniform"]) == pytest.approx(1.0, rel=1e-14)
    assert effective_area(MAPS["one pixel"]) == pytest.approx(1 / 100, rel=1e-14)


@pytest.mark.parametrize("name", MAPS)
def test_mass_area_matches_a_loop_over_pixels(name):
    m = MAPS[name]
    fractions = np.array([0, 1e-3, 0.1, 0.25, 0.5, 0.9, 0.99, 1.0])
    got = mass_area(m, fractions)
    assert got.tolist() == pytest.approx([direct_mass_area(m, p) for p in fractions], abs=1e-12)
    assert np.all(np.diff(got) >= 0)


@pytest.mark.parametrize("name", MAPS)
def test_area_under_mass_area_is_one_minus_gini_over_two(name):
    m = MAPS[name]
    n = m.size
    exact = (1 - gini(m)) / 2 + 1 / (2 * n)
    assert mass_area_auc(m) == pytest.approx(exact, abs=1e-12)
    # and the curve itself, integrated on a fine grid (a step function: within the grid's step)
    p = np.linspace(0, 1, 200_001)
    assert np.trapezoid(mass_area(m, p), p) == pytest.approx(exact, abs=2e-5)


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("c", [1e-9, 0.37, 1.0, 8.0, 3e7])
def test_scale_invariance(name, c):
    m = MAPS[name]
    p = np.array([0.1, 0.5, 0.9])
    # powers of two scale exactly; other factors round each product, so equal up to float64 round-off
    assert gini(c * m) == pytest.approx(gini(m), abs=1e-12)
    assert effective_area(c * m) == pytest.approx(effective_area(m), rel=1e-12)
    assert mass_area_auc(c * m) == pytest.approx(mass_area_auc(m), abs=1e-12)
    if c in (1.0, 8.0):
        assert mass_area(c * m, p).tolist() == mass_area(m, p).tolist()


def test_zero_map_is_nan_with_a_reason():
    zero = np.zeros((5, 5))
    assert math.isnan(gini(zero)) and math.isnan(effective_area(zero)) and math.isnan(mass_area_auc(zero))
    assert np.isnan(mass_area(zero, [0.5, 1.0])).all()


@pytest.mark.parametrize("bad", [np.array([[1.0, np.nan]]), np.array([[1.0, np.inf]]), np.array([[1.0, -0.5]]), np.zeros((0, 3))])
def test_bad_maps_are_refused(bad):
    with pytest.raises(ValueError):
        distribution(bad)


def test_codes_give_the_map_distribution_without_decoding():
    m = MAPS["float16"]
    codes = (m / m.max()).astype(np.float16).view(np.uint16)
    from_codes = code_distribution(codes)
    decoded = codes.view(np.float16).astype(np.float64)
    assert gini(from_codes) == pytest.approx(direct_gini(decoded), abs=1e-12)
    assert effective_area(from_codes) == pytest.approx(effective_area(decoded), rel=1e-12)
    assert mass_area(from_codes, [0.5]).tolist() == mass_area(decoded, [0.5]).tolist()
    with pytest.raises(ValueError):
        code_distribution(np.array([0x3C00, 0x7C00], dtype=np.uint16))  # +inf
    with pytest.raises(ValueError):
        code_distribution(np.array([0x3C00, 0xBC00], dtype=np.uint16))  # -1
