"""Localisation metrics against slow, direct computations pixel by pixel; the store's code path against the maps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradlens.attribution.store import MapStore
from gradlens.regions.area import CodeCurves
from gradlens.regions.localisation import box_energy, box_fraction, box_mask, inside_outside_areas, pointing_game


def _inside_slow(r: int, c: int, boxes) -> bool:
    """DESIGN of the metrics: a pixel is inside when its centre lies in some box (closed box)."""
    return any(x1 <= c + 0.5 <= x2 and y1 <= r + 0.5 <= y2 for x1, y1, x2, y2 in boxes)


def _slow_metrics(m: np.ndarray, boxes, thresholds):
    h, w = m.shape
    inside_sum = total = 0.0
    hits = []
    peak = max(float(v) for v in m.reshape(-1))
    inside_counts = [0] * len(thresholds)
    outside_counts = [0] * len(thresholds)
    pixels_inside = sum(_inside_slow(r, c, boxes) for r in range(h) for c in range(w))
    for r in range(h):
        for c in range(w):
            v = float(m[r, c])
            inside = _inside_slow(r, c, boxes)
            total += v
            if inside:
                inside_sum += v
            if v == peak:
                hits.append(inside)
            for k, t in enumerate(thresholds):
                if np.float32(v) > np.float32(t):
                    (inside_counts if inside else outside_counts)[k] += 1
    energy = inside_sum / total if total > 0 and pixels_inside else math.nan
    pointing = any(hits) if peak > 0 and pixels_inside else None
    n = h * w
    return energy, pointing, pixels_inside / n, np.array(inside_counts) / n, np.array(outside_counts) / n


BOXES = [
    [(0, 0, 5, 4)],  # touching the top-left border
    [(20.3, 10.7, 31.0, 25.0), (25.0, 18.0, 40.0, 30.0)],  # overlapping: the overlap counts once
    [(30.0, -5.0, 60.0, 12.5)],  # past the right and top borders
    [(10.5, 10.5, 10.5, 20.0), (3.2, 3.2, 3.7, 3.7)],  # degenerate: zero width (one column of centres); a tiny box on one centre
    [(3.6, 3.6, 3.9, 3.9)],  # a sliver covering no pixel centre: an empty box region
    [(0.49, 0.51, 1.5, 1.49)],  # centres exactly on or just off the box edges
    [],  # no ground truth
]


@pytest.mark.parametrize("boxes", BOXES)
def test_metrics_equal_the_direct_computation(boxes):
    rng = np.random.default_rng(len(boxes))
    m = (rng.gamma(0.5, 1.0, (33, 47)) ** 2).astype(np.float32)
    m[rng.integers(0, 33), rng.integers(0, 47)] = m.max()  # a tie for the maximum
    grid = np.r_[0.0, np.geomspace(1e-3, float(m.max()), 25)]
    energy, pointing, fraction, inside, outside = _slow_metrics(m, boxes, grid)
    got_energy = box_energy(m, boxes)
    assert got_energy == pytest.approx(energy, rel=1e-12, abs=1e-15) if not math.isnan(energy) else math.isnan(got_energy)
    assert pointing_game(m, boxes) is pointing
    assert box_fraction(m.shape, boxes) == pytest.approx(fraction, abs=0)
    got_in, got_out = inside_outside_areas(m, boxes, grid)
    assert np.array_equal(got_in, inside) and np.array_equal(got_out, outside)


def test_ties_count_any_maximum_and_zero_maps_have_no_answer():
    m = np.zeros((10, 10), np.float32)
    assert math.isnan(box_energy(m, [(0, 0, 10, 10)])) and pointing_game(m, [(0, 0, 10, 10)]) is None
    m[1, 1] = m[8, 8] = 3.0
    assert pointing_game(m, [(7, 7, 10, 10)]) is True  # the second maximum is inside
    assert pointing_game(m, [(3, 3, 6, 6)]) is False
    assert box_energy(m, [(7, 7, 10, 10)]) == 0.5
    assert box_energy(m, [(0, 0, 10, 10), (0, 0, 10, 10)]) == 1.0  # the same box twice counts once
    assert math.isnan(box_energy(m, [])) and pointing_game(m, []) is None  # no box region: nothing to compare
    assert math.isnan(box_energy(m, [(3.6, 3.6, 3.9, 3.9)]))  # a sliver that covers no pixel centre


def test_a_uniform_map_puts_the_box_fraction_in_the_boxes():
    boxes = [(2, 3, 9, 7), (5, 5, 12, 12)]
    assert box_energy(np.ones((16, 20)), boxes) == pytest.approx(box_fraction((16, 20), boxes))
    assert box_mask((16, 20), boxes).sum() == 7 * 4 + 7 * 7 - 4 * 2  # inclusion-exclusion of the overlap


@pytest.mark.parametrize("normalise", [False, True])
def test_stored_codes_give_exactly_what_the_map_gives(tmp_path, normalise):
    rng = np.random.default_rng(3)
    store = MapStore(tmp_path / "maps", {"test": 1})
    boxes = [(4.5, 2.0, 20.0, 18.5), (15, 10, 40, 30)]
    grid = np.geomspace(1e-4, 1.0, 40)
    curves = CodeCurves(grid)
    for image_id, m in enumerate([rng.gamma(0.3, 1e-3, (31, 45)), np.zeros((12, 9)), rng.random((40, 50)) ** 4]):
        store.write(image_id, m.astype(np.float32))
        stored = store.read(image_id)
        shown = stored / stored.max() if normalise and stored.max() > 0 else (stored * 0 if normalise else stored)
        out = curves.image(*store.read_codes(image_id), normalise, box_mask(stored.shape, boxes))
        inside, outside = inside_outside_areas(shown, boxes, grid)
        assert np.array_equal(out["inside"], inside) and np.array_equal(out["outside"], outside)
        assert np.allclose(out["area"], inside + outside, rtol=0, atol=1e-15)
        expected = box_energy(stored, boxes)
        assert (math.isnan(expected) and math.isnan(out["box_energy"])) or out["box_energy"] == pytest.approx(expected, rel=1e-12)
        assert out["pointing_game"] is pointing_game(stored, boxes)
