"""The map store: faithful float16, atomic files, summaries, settings keys; streaming computation and resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from gradlens.attribution.compute import compute_maps, map_store_key, plan_batches
from gradlens.attribution.methods import AttributionConfig, gradient_maps
from gradlens.attribution.store import MapStore
from gradlens.attribution.targets import image_targets
from gradlens.data.images import read_image, to_tensor
from gradlens.errors import GradlensError, InputFileError
from gradlens.models.bundled import bundled_detector_path
from gradlens.models.formats.checkpoints import load_detector
from gradlens.regions.histogram import value_histogram


def test_float16_round_trip_error_and_summary(tmp_path):
    rng = np.random.default_rng(0)
    m = (rng.lognormal(-12, 3, size=(37, 53)) * (rng.random((37, 53)) > 0.1)).astype(np.float32)
    store = MapStore(tmp_path / "s", {"k": 1})
    summary = store.write(5, m)
    back = store.read(5)
    assert back.dtype == np.float32 and back.shape == m.shape
    peak = float(m.max())
    normal = m >= 2.0**-14 * peak  # float16's normal range, relative to the max
    assert np.all(np.abs(back - m)[normal] <= 2.0**-11 * m[normal] * (1 + 1e-6))
    assert np.all(np.abs(back - m)[~normal] <= 2.0**-24 * peak * (1 + 1e-6))
    assert back.max() == pytest.approx(peak, rel=1e-7) and np.all(back[m == 0] == 0)
    s = store.summary(5)
    assert (s.height, s.width) == m.shape and s.max == summary.max
    bins, counts = value_histogram(torch.from_numpy(back))  # the summary describes the stored values
    assert np.array_equal(s.hist_bins, bins) and np.array_equal(s.hist_counts, counts)
    assert [p.name for p in (tmp_path / "s").iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_float32_store_is_exact_and_zero_maps_are_fine(tmp_path):
    m = np.random.default_rng(1).random((8, 9)).astype(np.float32)
    store = MapStore(tmp_path / "s", {"k": 1}, map_dtype="float32")
    store.write(1, m)
    assert np.allclose(store.read(1), m, rtol=2e-7, atol=0)
    store.write(2, np.zeros((3, 4), np.float32))
    assert np.all(store.read(2) == 0) and store.summary(2).max == 0.0
    assert store.image_ids() == [1, 2] and store.missing([1, 2, 3]) == [3]


def test_settings_mismatch_bad_maps_and_damage_are_clear(tmp_path):
    folder = tmp_path / "s"
    MapStore(folder, {"method": "gradient"}).write(1, np.ones((2, 2)))
    assert MapStore(folder, {"method": "gradient"}).has(1)  # same key: reused
    with pytest.raises(GradlensError, match="other settings"):
        MapStore(folder, {"method": "smoothgrad"})
    fresh = MapStore(folder, {"method": "smoothgrad"}, overwrite=True)
    assert fresh.image_ids() == []
    with pytest.raises(GradlensError, match="NaN"):
        fresh.write(3, np.array([[np.nan, 1.0]]))
    with pytest.raises(GradlensError, match="2-D"):
        fresh.write(3, np.ones((2, 2, 2)))
    fresh.path(4).write_bytes(b"not a zip")
    with pytest.raises(InputFileError, match="damaged"):
        fresh.read(4)
    with pytest.raises(InputFileError, match="no map for image 9"):
        fresh.summary(9)
    with pytest.raises(InputFileError, match="not a gradlens map store"):
        MapStore(tmp_path / "nothing")
    assert MapStore(folder).key == {"method": "smoothgrad"}  # read-only open uses the key on disk


@pytest.fixture(scope="module")
def cednet():
    det = load_detector(bundled_detector_path("cednet"))
    return det


def _key(det, gt, config=None):
    return map_store_key(det, "sha-of-checkpoint", gt, config or AttributionConfig())


def test_stored_maps_equal_the_api_one_image_at_a_time(tmp_path, cednet, synthetic_gt):
    # The network in float64: the run's batch threads and batch mates only reorder sums, which in float32 move the last
    # bits, and tip near-zero ReLU inputs, differently on every CPU. The run still gets float32 pixels from its loader and
    # stores float32 maps: three float32 roundings (the gradient at the pixels, map / max, times max on reading), so a
    # stored value is within 3 * 2**-24 of the float64 API's (rtol 2**-21; atol for float64's own last bits).
    det = copy.deepcopy(cednet).double()
    prepare = det.prepare
    det.prepare = lambda images: prepare([im.double() for im in images])  # differentiable: gradients reach the float32 pixels
    ids = [int(i) for i in synthetic_gt.image_ids[:8]]
    store = MapStore(tmp_path / "maps", _key(det, synthetic_gt), map_dtype="float32")
    run = compute_maps(det, synthetic_gt, ids, store, batch_size=3, workers=0, progress=False)
    assert run.computed == len(ids) and run.reused == 0
    images = {i: to_tensor(read_image(synthetic_gt.image_path(i))) for i in ids}
    targets = {i: image_targets(synthetic_gt, i, det.categories) for i in ids}
    for batch in plan_batches(det, synthetic_gt, ids, 3):  # the API on the same batches
        expected = gradient_maps(det, [images[i].double() for i in batch], [targets[i] for i in batch])
        for i, e in zip(batch, expected):
            assert np.allclose(store.read(i), e.numpy(), rtol=2**-21, atol=1e-10 * float(e.max())), i
    for i in ids:  # and one image at a time
        alone = gradient_maps(det, [images[i].double()], [targets[i]])[0].numpy()
        assert np.allclose(store.read(i), alone, rtol=2**-21, atol=1e-10 * float(alone.max())), i
    again = compute_maps(det, synthetic_gt, ids, store, batch_size=3, workers=0, progress=False)
    assert again.computed == 0 and again.reused == len(ids)


def test_killed_run_resumes_with_identical_maps_without_recomputing(tmp_path, cednet, synthetic_gt, monkeypatch):
    ids = [int(i) for i in synthetic_gt.image_ids[:10]]
    key = _key(cednet, synthetic_gt)
    full = MapStore(tmp_path / "full", key)
    compute_maps(cednet, synthetic_gt, ids, full, batch_size=2, workers=0, progress=False)

    killed = MapStore(tmp_path / "killed", key)
    real_write = MapStore.write
    written = []

    def dying_write(self, image_id, magnitude, **kwargs):
        if len(written) == 5:
            raise KeyboardInterrupt  # the run is killed while writing the sixth map
        written.append(image_id)
        return real_write(self, image_id, magnitude, **kwargs)

    monkeypatch.setattr(MapStore, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        compute_maps(cednet, synthetic_gt, ids, killed, batch_size=2, workers=0, progress=False)
    monkeypatch.setattr(MapStore, "write", real_write)
    assert sorted(killed.image_ids()) == sorted(written)
    stamps = {i: killed.path(i).stat().st_mtime_ns for i in written}

    resumed = compute_maps(cednet, synthetic_gt, ids, killed, batch_size=2, workers=0, progress=False)
    assert resumed.computed == len(ids) - len(written)
    assert {i: killed.path(i).stat().st_mtime_ns for i in written} == stamps  # finished maps untouched
    for i in ids:
        assert np.array_equal(killed.read(i), full.read(i))


def test_plan_batches_share_canvases_and_keep_every_image(cednet, synthetic_gt):
    ids = [int(i) for i in synthetic_gt.image_ids]
    plan = plan_batches(cednet, synthetic_gt, list(reversed(ids)), batch_size=4)
    assert sorted(i for b in plan for i in b) == sorted(ids)
    assert plan == plan_batches(cednet, synthetic_gt, ids, batch_size=4)  # the order given does not matter


def test_store_keys_separate_methods_and_checkpoints(cednet, synthetic_gt):
    a = _key(cednet, synthetic_gt, AttributionConfig(method="gradient"))
    b = _key(cednet, synthetic_gt, AttributionConfig(method="gradient", steps=99))  # steps do not affect gradients
    c = _key(cednet, synthetic_gt, AttributionConfig(method="smoothgrad"))
    assert a == b and a != c
    assert a != map_store_key(cednet, "another-checkpoint", synthetic_gt, AttributionConfig())


@pytest.mark.parametrize("per_image_normalize", [False, True])
def test_curve_from_store_codes_equals_the_curve_of_the_read_maps(tmp_path, per_image_normalize):
    from gradlens.regions.area import area_curve, area_curve_from_store, threshold_grid

    rng = np.random.default_rng(4)
    store = MapStore(tmp_path / "s", {"k": 1})
    for i in range(6):
        h, w = rng.integers(3, 50, size=2)
        store.write(i, (rng.lognormal(-10, 2, size=(h, w)) * (rng.random((h, w)) > 0.3)).astype(np.float32))
    store.write(6, np.zeros((4, 4), np.float32))
    ids = list(range(7))
    top = 1.0 if per_image_normalize else max(store.summary(i).max for i in ids)
    for grid in (threshold_grid(top, 101, "linear"), threshold_grid(top, 64, "log", 5), np.sort(rng.random(40)) * top):
        fast = area_curve_from_store(store, ids, grid, per_image_normalize)
        exact = area_curve(store.maps(ids), grid, per_image_normalize)
        assert np.allclose(fast, exact, rtol=0, atol=1e-12)
    with pytest.raises(GradlensError, match="float16"):
        MapStore(tmp_path / "f32", {"k": 2}, map_dtype="float32").read_codes(0)
