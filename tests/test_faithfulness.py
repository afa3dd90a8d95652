"""Deletion and insertion curves (issue 24): perturbations by their stated rules, a detector whose dependence on
the pixels is known by construction, scoring as ``score`` scores, q = 0 against the detector's own quality,
seeds, resuming after a kill, the statistics against direct computations, the record and the command line."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from gradlens.errors import GradlensError, InputFileError
from gradlens.faithfulness.compute import FaithfulnessConfig, ResultStore, expected_rows, image_rows, image_variants
from gradlens.faithfulness.curves import area_under, faithfulness_curves, faithfulness_paired
from gradlens.faithfulness.perturb import (
    check_fractions,
    fill_image,
    map_order,
    perturbed,
    pixel_count,
    random_order,
    ranks,
)
from gradlens.scoring.quality import quality_scores, variant_qualities
from tests.conftest import make_gt_dict, write_json

# -- the perturbations, by their stated rules ---------------------------------------------------------------


def test_pixel_count_is_the_nearest_whole_pixel():
    assert [pixel_count(q, 1000) for q in (0, 0.0004, 0.0005, 0.005, 0.5, 1)] == [0, 0, 1, 5, 500, 1000]
    assert pixel_count(0.5, 3) == 2  # 1.5 rounds half up
    assert pixel_count(1.0, 7) == 7


def test_map_order_largest_first_ties_top_left_first():
    m = np.array([[1.0, 3.0, 3.0], [0.0, 3.0, 2.0]])
    assert list(map_order(m)) == [1, 2, 4, 5, 0, 3]
    codes = m.astype(np.float16).view(np.uint16)  # a float16 store's raw codes give the same order
    assert list(map_order(codes)) == list(map_order(m))
    rng = np.random.default_rng(0)
    values = rng.choice([0.0, 0.25, 0.5, 1.0, 1e-3], size=(30, 40)).astype(np.float16)
    expected = sorted(range(values.size), key=lambda p: (-float(values.reshape(-1)[p]), p))  # the rule, directly
    assert list(map_order(values.view(np.uint16))) == expected
    r = ranks(map_order(m))
    assert list(r) == [4, 0, 1, 5, 2, 3]


def test_random_order_is_a_seeded_permutation_per_image():
    a = random_order(500, seed=3, image_id=42)
    assert sorted(a) == list(range(500))
    assert np.array_equal(a, random_order(500, 3, 42))
    assert not np.array_equal(a, random_order(500, 4, 42))
    assert not np.array_equal(a, random_order(500, 3, 43))
    assert np.array_equal(a, np.random.default_rng([3, 42]).permutation(500))  # the stated generator


def test_fills():
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 40, 60), dtype=np.uint8))
    mean = fill_image(image, "mean", (0.485, 0.456, 0.406))
    assert mean.dtype == torch.uint8 and mean.shape == image.shape
    assert mean[:, 0, 0].tolist() == [124, 116, 104]  # round(123.675), round(116.28), round(103.53)
    noise = fill_image(image, "noise", (0.5,) * 3, seed=2, image_id=9)
    assert torch.equal(noise, fill_image(image, "noise", (0.5,) * 3, seed=2, image_id=9))
    assert not torch.equal(noise, fill_image(image, "noise", (0.5,) * 3, seed=3, image_id=9))
    # blur: a Gaussian of sigma 2 % of the longer side, reflected at the borders, against scipy in float64
    from scipy.ndimage import gaussian_filter

    blur = fill_image(image, "blur", (0.5,) * 3).numpy().astype(np.float64)
    sigma = 0.02 * 60
    radius = math.ceil(3 * sigma)
    reference = np.stack([gaussian_filter(c.astype(np.float64), sigma, mode="mirror", truncate=radius / sigma)
                          for c in image.numpy()])
    # torchvision blurs in float32 and rounds to 8 bits: within one level of the exact value
    assert np.abs(blur - reference).max() <= 1.0
    with pytest.raises(ValueError, match="Unknown fill"):
        fill_image(image, "zeros", (0.5,) * 3)


def test_deletion_and_insertion_change_exactly_the_top_pixels():
    rng = np.random.default_rng(2)
    image = torch.from_numpy(rng.integers(0, 200, (3, 20, 30), dtype=np.uint8))
    filled = torch.full_like(image, 255)
    order = ranks(random_order(600, 0, 1))
    for q in (0.0, 0.01, 0.1, 0.5, 1.0):
        k = pixel_count(q, 600)
        top = torch.from_numpy(order.reshape(20, 30) < k)
        deleted = perturbed(image, filled, order, q, "deletion")
        inserted = perturbed(image, filled, order, q, "insertion")
        assert int((deleted != image).any(dim=0).sum()) == k  # no image pixel is 255
        assert torch.equal(deleted[:, top], filled[:, top]) and torch.equal(deleted[:, ~top], image[:, ~top])
        assert torch.equal(inserted[:, top], image[:, top]) and torch.equal(inserted[:, ~top], filled[:, ~top])


@pytest.mark.parametrize("fractions, message", [
    ((0.1, 0.2), "start at 0"), ((0, 0.2, 0.1), "ascending"), ((0, 0.1, 0.1), "distinct"), ((0, 1.5), "in \\[0, 1\\]"),
    ((0,), "at least one more"), ((0, float("nan")), "in \\[0, 1\\]"),
])  # fmt: skip
def test_bad_fractions_are_one_sentence(fractions, message):
    with pytest.raises(ValueError, match=message):
        check_fractions(fractions)
    with pytest.raises(GradlensError, match=message):
        FaithfulnessConfig(fractions=fractions).check()


# -- a detector whose dependence on the pixels is known ------------------------------------------------------


class BrightnessDetector(torch.nn.Module):
    """Finds the one object exactly (IoU 1) with confidence = the mean brightness inside its box; its loss is
    1 - that confidence. So an image's quality is the box's mean brightness, known for any perturbation."""

    def __init__(self, box):
        super().__init__()
        self.box = box  # x1, y1, x2, y2 (whole pixels)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        from gradlens.models.preprocessing.transform import PreprocessConfig

        self.preprocess = PreprocessConfig(mean=(0.5, 0.5, 0.5))
        self.categories = [{"id": 1, "name": "cat"}]
        self.forwards = 0

    def detect_with_losses(self, images, targets):
        x1, y1, x2, y2 = self.box
        outputs, losses = [], []
        for image in images:
            self.forwards += 1
            score = image[:, y1:y2, x1:x2].mean().float()
            outputs.append({"boxes": torch.tensor([[float(x1), float(y1), float(x2), float(y2)]]),
                            "scores": score.reshape(1), "labels": torch.zeros(1, dtype=torch.int64)})
            losses.append(1 - score)
        losses = torch.stack(losses)
        return outputs, {"classification": losses, "bbox_regression": torch.zeros_like(losses)}


def test_curves_of_a_known_detector_equal_the_hand_computed_ones(tmp_path):
    from gradlens.data.coco import load_ground_truth

    h, w, box = 12, 16, (4, 2, 10, 8)  # a 6 x 6 object
    ann = write_json(tmp_path / "annotations" / "instances_val2017.json", make_gt_dict(
        [{"id": 7, "file_name": "x.jpg", "width": w, "height": h}], [(7, 1, [4, 2, 6, 6], 0)]))
    gt = load_ground_truth(ann, tmp_path)
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[:, 2:8, 4:10] = 255  # a white object on black
    inside = np.zeros((h, w), dtype=bool)
    inside[2:8, 4:10] = True
    magnitude = np.where(inside, 1.0, 0.0)  # the map: the object, all ties (row-major order decides)
    config = FaithfulnessConfig(fill="mean", fractions=(0.0, 0.05, 0.1, 0.25, 0.5), seed=5).check()
    detector = BrightnessDetector(box)
    order_ranks = {"map": ranks(map_order(magnitude)), "random": ranks(random_order(h * w, 5, 7))}
    rows = image_rows(detector, gt, 7, image, order_ranks, config, batch_size=4, precision="fp32", class_agnostic=False)
    assert detector.forwards == len(image_variants(config)) == 2 + 2 * 2 * 4  # q = 0 once per mode

    fill = 128  # round(0.5 * 255)
    order = {"map": np.argsort(-magnitude.reshape(-1), kind="stable"), "random": np.random.default_rng([5, 7]).permutation(h * w)}
    for row in rows:
        k = int(math.floor(row["q"] * h * w + 0.5))
        changed = np.zeros(h * w, dtype=bool)
        changed[order[row["order"]][:k]] = True
        in_box = int((changed & inside.reshape(-1)).sum())  # object pixels deleted (or restored)
        if row["mode"] == "deletion":
            brightness = (255 * (36 - in_box) + fill * in_box) / (36 * 255)
        else:
            brightness = (fill * (36 - in_box) + 255 * in_box) / (36 * 255)
        # the detector works in float32 (each pixel divided by 255, then a mean of 108 values): well within 1e-6
        assert row["quality"] == pytest.approx(brightness, abs=1e-6), row
        assert row["loss"] == pytest.approx(1 - brightness, abs=1e-6), row
        assert row["detections"] == 1
    import gradlens

    # the public entry point (pixels as an HxWx3 array, the map as is) gives the same rows
    assert gradlens.faithfulness_rows(detector, gt, 7, image.permute(1, 2, 0).numpy(), magnitude, config) == rows
    deletion = {(r["order"], r["q"]): r["quality"] for r in rows if r["mode"] == "deletion"}
    # the map deletes object pixels first: at 25 % (48 pixels) the whole object is filled
    assert deletion[("map", 0.25)] == pytest.approx(128 / 255, abs=1e-6)
    assert deletion[("random", 0.25)] > deletion[("map", 0.25)]


# -- scoring as score scores --------------------------------------------------------------------------------


def test_variant_qualities_equal_quality_scores_on_each_variant(synthetic_gt):
    gt = synthetic_gt
    rng = np.random.default_rng(4)
    ids = [int(i) for i in gt.image_ids]
    detections = {}
    for i in ids:  # jittered copies of the objects, other categories, duplicates with equal IoU and score
        rows = np.flatnonzero(gt.obj_image_id == i)
        records = []
        for r in rows:
            x, y, bw, bh = gt.obj_xywh[r]
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, 3, 4)
                cat = int(gt.obj_category_id[r]) if rng.random() < 0.8 else int(rng.choice(list(gt.category_names)))
                records.append({"image_id": i, "category_id": cat, "score": float(np.round(rng.random(), 2)),
                                "bbox": [float(x + jitter[0]), float(y + jitter[1]), float(max(bw + jitter[2], 0)),
                                         float(max(bh + jitter[3], 0))]})
            if records and rng.random() < 0.3:
                records.append(dict(records[-1]))  # an exact tie: the earlier record wins
        detections[i] = records
    everything = [r for i in ids for r in detections[i]]
    for agnostic in (False, True):
        reference = quality_scores(everything, gt, class_agnostic=agnostic).images.set_index("image_id")["quality"]
        order = ids[::-1] + ids[:5]  # any order, an image more than once
        got = variant_qualities(gt, order, [detections[i] for i in order], class_agnostic=agnostic)
        for i, value in zip(order, got):
            if i in reference.index:
                assert value == reference[i]  # bit for bit: the same matching and the same sums
            else:
                assert np.isnan(value)
    # a record of another image is no candidate for a variant of this one
    one = ids[0]
    stray = [dict(r, image_id=ids[1]) for r in detections[one]]
    assert variant_qualities(gt, [one], [stray])[0] == variant_qualities(gt, [one], [[]])[0]


def test_detect_with_losses_is_detect_and_image_losses_from_one_pass(synthetic_gt):
    import gradlens
    from gradlens.attribution.targets import image_targets
    from gradlens.data.images import read_image
    from gradlens.models.bundled import bundled_detector_path

    ids = [int(i) for i in synthetic_gt.image_ids[:2]]
    images = [torch.from_numpy(read_image(synthetic_gt.image_path(i))).permute(2, 0, 1).float() / 255 for i in ids]
    for name in ("cednet", "convnext"):
        detector = gradlens.load_detector(bundled_detector_path(name), device="cpu").eval()
        targets = [image_targets(synthetic_gt, i, detector.categories).as_dict() for i in ids]
        for image, target in zip(images, targets):
            with torch.no_grad():
                alone, loss = detector.detect([image])[0], detector.image_losses([image], [target])
            both, both_loss = detector.detect_with_losses([image], [target])
            assert all(torch.equal(alone[k], both[0][k]) for k in alone)
            assert all(torch.equal(loss[k], both_loss[k]) for k in loss)


# -- the command on the demo ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo work directory (12 selected images, maps computed by the faithfulness run itself)."""
    from gradlens.demo import run_demo

    out = tmp_path_factory.mktemp("faithfulness")
    return run_demo(out, num_images=24, top=12, device="cpu", progress=False, workers=0, gradients=False).selection.workdir


FRACTIONS = (0.0, 0.01, 0.1, 0.5)


def run(workdir, **kwargs):
    from gradlens.faithfulness.run import run_faithfulness
    from gradlens.runner import DetectorRun

    return run_faithfulness(workdir, fractions=kwargs.pop("fractions", FRACTIONS), bootstrap=kwargs.pop("bootstrap", 200),
                            detector_run=DetectorRun.recorded(workdir, device="cpu", workers=0), progress=False, **kwargs)


@pytest.fixture(scope="module")
def first(demo):
    return run(demo)


def test_table_has_every_row_and_q0_is_the_detectors_own_quality(demo, first):
    table, ids = first.table, pd.read_csv(demo / "selection.csv")
    assert len(table) == len(ids) * 2 * 2 * 2 * len(FRACTIONS)
    assert list(table.columns) == ["image_id", "rank", "role", "label", "mode", "order", "q", "quality", "loss", "detections"]
    for role in ("a", "b"):
        for order in ("map", "random"):
            start = table[(table["role"] == role) & (table["mode"] == "deletion") & (table["order"] == order)
                          & (table["q"] == 0)].sort_values("rank")
            assert start["quality"].tolist() == ids[f"quality_{role}"].tolist()  # exactly what select scored
        # the rerun of the unperturbed image in this step's batches: float32 detections whose batch mates differ,
        # so at most a few float32 ulps of a quality below 1
        assert first.q0_difference[role] < 1e-6
        shared = table[(table["role"] == role) & (table["q"] == 0)]
        for mode in ("deletion", "insertion"):  # both orders start from the same image
            rows = shared[shared["mode"] == mode].sort_values(["order", "rank"])
            half = len(rows) // 2
            assert rows["loss"].iloc[:half].tolist() == rows["loss"].iloc[half:].tolist()
    inserted = table[(table["mode"] == "insertion") & (table["q"] == 0)]
    assert (inserted["quality"] < table[(table["mode"] == "deletion") & (table["q"] == 0)]["quality"].mean()).all()


def test_statistics_against_direct_computations(first):
    table = first.table
    curves = faithfulness_curves(table, 0, 0, 0.95)
    for (role, mode, order, q), rows in table.groupby(["role", "mode", "order", "q"]):
        c = curves[(curves["role"] == role) & (curves["mode"] == mode) & (curves["order"] == order) & (curves["q"] == q)]
        assert c["quality"].iloc[0] == pytest.approx(rows["quality"].mean(), rel=1e-12)
        assert c["loss"].iloc[0] == pytest.approx(rows["loss"].mean(), rel=1e-12)
    paired = first.paired
    for role in ("a", "b"):
        per_image = {}
        for order in ("map", "random"):
            wide = table[(table["role"] == role) & (table["mode"] == "deletion") & (table["order"] == order)].pivot(
                index="rank", columns="q", values="quality")
            q = wide.columns.to_numpy(float)
            per_image[order] = np.trapezoid(wide.to_numpy(), q, axis=1) / (q[-1] - q[0])
            assert np.allclose(area_under(wide.to_numpy(), q), per_image[order], rtol=1e-12)
        row = paired[(paired["comparison"] == "map - random") & (paired["role"] == role) & (paired["mode"] == "deletion")
                     & (paired["metric"] == "quality") & paired["q"].isna()].iloc[0]
        d = per_image["map"] - per_image["random"]
        assert row["estimate"] == pytest.approx(d.mean(), rel=1e-12)
        from scipy.stats import wilcoxon

        assert row["p_value"] == pytest.approx(wilcoxon(d).pvalue, rel=1e-12)
        assert row["low"] <= row["estimate"] <= row["high"]
    again = faithfulness_paired(table, 200, 0, 0.95)
    pd.testing.assert_frame_equal(again, paired)  # seeded: the same intervals every time


def test_a_killed_run_resumes_to_the_same_table(demo, first, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(demo, copy, symlinks=True)
    folder = copy / first.runs["a"].results.folder.relative_to(demo)
    reference = (demo / "faithfulness.csv").read_bytes()
    files = sorted(folder.glob("*.json"))
    files = [f for f in files if f.name != "store.json"]
    for f in files[:3]:  # a kill before these images were written
        f.unlink()
    files[3].write_text(files[3].read_text().replace('"deletion"', '"deletion!"', 1))  # and one damaged file
    again = run(copy)
    assert again.runs["a"].computed == 4 and again.runs["b"].computed == 0
    assert (copy / "faithfulness.csv").read_bytes() == reference


def test_the_random_order_follows_its_seed(demo, first, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(demo, copy, symlinks=True)
    other = run(copy, seed=1).table
    same = run(copy, seed=0).table
    pd.testing.assert_frame_equal(same, first.table)  # reproducible (reused: the seed names the store)
    by_map = lambda t: t[(t["order"] == "map") & (t["mode"] == "deletion")].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(by_map(other), by_map(first.table))  # the map's order has no seed
    random = lambda t: t[(t["order"] == "random") & (t["q"] > 0)]["quality"].to_numpy()  # noqa: E731
    assert not np.array_equal(random(other), random(first.table))


def test_result_store_refuses_what_it_did_not_write(demo, first):
    store = first.runs["b"].results
    image_id = int(first.table["image_id"].iloc[0])
    assert store.has(image_id)
    fresh = ResultStore(store.folder)  # opened from its own key, as another torchrun rank does
    assert fresh.rows(image_id) == store.rows(image_id)
    text = store.path(image_id).read_text()
    data = json.loads(text)
    for bad in ({"key": "0" * 16}, {"image_id": image_id + 1}, {"rows": data["rows"][:-1]}):
        store.path(image_id).write_text(json.dumps({**data, **bad}))
        assert not store.has(image_id)
    rows = [list(r) for r in data["rows"]]
    for k, value in ((3, 1.5), (4, -1.0), (4, "1"), (5, -2)):
        broken = [list(r) for r in rows]
        broken[0][k] = value
        store.path(image_id).write_text(json.dumps({**data, "rows": broken}))
        assert not store.has(image_id)
    # NaN (null) is only what a constant map's map-order rows hold: in a random-order or q = 0 row it is damage
    for k, row in enumerate(rows):
        broken = [list(r) for r in rows]
        broken[k][3] = None
        store.path(image_id).write_text(json.dumps({**data, "rows": broken}))
        assert store.has(image_id) is False or (row[1] == "map" and row[2] > 0 and row[4] is None), row
    store.path(image_id).write_text(text)
    assert store.has(image_id)
    assert [tuple(r[:3]) for r in rows] == expected_rows(store.config)


def test_record_lists_its_files_and_refuses_tampering(demo, first, tmp_path):
    from gradlens.faithfulness.run import load_faithfulness_record

    record = load_faithfulness_record(demo)
    assert set(record["sha256"]) >= {"faithfulness.csv", "faithfulness_curves.csv", "faithfulness_paired.csv",
                                     "faithfulness.png", "faithfulness.pdf"}
    assert record["sentences"] == first.sentences and len(first.sentences) == 2
    assert all("deleting the top 10% of the pixels" in s for s in first.sentences)
    copy = tmp_path / "run"
    shutil.copytree(demo, copy, symlinks=True)
    curves = copy / "faithfulness_curves.csv"
    curves.write_text(curves.read_text() + "\n")
    with pytest.raises(InputFileError, match="do not match it .*run 'gradlens faithfulness' again"):
        load_faithfulness_record(copy)
    hostile = dict(record, sha256={"../outside.csv": "0" * 64})
    (copy / "faithfulness.json").write_text(json.dumps(hostile))
    with pytest.raises(InputFileError, match="sha256"):
        load_faithfulness_record(copy)
    assert load_faithfulness_record(tmp_path, missing_ok=True) == {}


def test_command_line(demo, first, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(demo, copy, symlinks=True)
    base = [sys.executable, "-m", "gradlens", "faithfulness", "--workdir", str(copy), "--device", "cpu", "--workers", "0"]
    done = subprocess.run(base + ["--fractions", "0,0.01,0.1,0.5", "--bootstrap", "200"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "a (cednet): 0 images computed, 12 reused" in done.stdout
    assert "deletion, a: own map - random: area under the quality curve" in done.stdout
    assert first.sentences[0] in done.stdout and f"Wrote {copy / 'faithfulness.png'}" in done.stdout
    for args, message in ((["--fractions", "0.1,0.5"], "must start at 0"), (["--fractions", "0,x"], "--fractions expects"),
                          (["--fractions", "0,0.5,0.2"], "ascending"), (["--name", "../x"], "name")):
        bad = subprocess.run(base + args, capture_output=True, text=True, timeout=600)
        assert bad.returncode == 1 and bad.stderr.startswith("gradlens: error:") and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run(base + ["--fill", "zeros"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "zeros" in bad.stderr


# -- after review: stale results, sentences, edge cases -------------------------------------------------------


def test_other_maps_or_arithmetic_get_their_own_results(demo, first, tmp_path):
    """Rows ranked by float16 maps are not reused for float32 maps, nor rows computed one way on resume another."""
    copy = tmp_path / "run"
    shutil.copytree(demo, copy, symlinks=True)
    other = run(copy, map_dtype="float32")
    assert other.runs["a"].computed == 12 and other.runs["a"].results.folder != first.runs["a"].results.folder
    from gradlens.faithfulness.compute import faithfulness_key

    store = first.runs["a"].results
    key = dict(store.key)
    assert key["single_threaded"] in (True, False) and key["device_type"] == "cpu"
    assert key["map_store"] != other.runs["a"].results.key["map_store"]
    assert faithfulness_key  # the one function that names everything above


def test_sentences_follow_the_sign_without_intervals():
    from gradlens.faithfulness.curves import faithfulness_sentences

    rng = np.random.default_rng(0)
    rows = []
    for image in range(10):
        for order, drop in (("map", 0.05), ("random", 0.3)):  # deleting by the map hurts LESS than random
            for q in (0.0, 0.1, 0.5):
                quality = 0.6 - (drop * q / 0.1 if q else 0.0) + rng.normal(0, 0.005) * (q > 0)
                rows.append({"image_id": image, "rank": image + 1, "role": "a", "label": "A", "mode": "deletion",
                             "order": order, "q": q, "quality": quality, "loss": 1.0, "detections": 1})
    table = pd.DataFrame(rows)
    for bootstrap in (0, 200):
        curves, paired = faithfulness_curves(table, bootstrap, 0, 0.95), faithfulness_paired(table, bootstrap, 0, 0.95)
        (sentence,) = faithfulness_sentences(curves, paired)
        assert "matter less than random ones" in sentence and "needs the region" not in sentence, sentence
    only_half = table[table["q"].isin([0.0, 0.5])]
    (sentence,) = faithfulness_sentences(faithfulness_curves(only_half, 0, 0, 0.95),
                                         faithfulness_paired(only_half, 0, 0, 0.95))
    assert "top 50% of the pixels" in sentence  # the headline q is the grid's nearest to 10 %, never 0


def test_areas_are_the_mean_per_image_areas(first):
    areas = first.areas
    table = first.table
    for _, row in areas.iterrows():
        values, q = (table[(table["role"] == row["role"]) & (table["mode"] == row["mode"]) & (table["order"] == row["order"])]
                     .pivot(index="rank", columns="q", values=row["metric"]), None)
        grid = values.columns.to_numpy(float)
        direct = (np.trapezoid(values.to_numpy(), grid, axis=1) / (grid[-1] - grid[0])).mean()
        assert row["area"] == pytest.approx(direct, rel=1e-12) and row["low"] <= row["area"] <= row["high"]
    assert len(areas) == 2 * 2 * 2 * 2


def test_a_constant_map_ranks_nothing(tmp_path):
    from gradlens.data.coco import load_ground_truth

    ann = write_json(tmp_path / "annotations" / "instances_val2017.json", make_gt_dict(
        [{"id": 7, "file_name": "x.jpg", "width": 16, "height": 12}], [(7, 1, [4, 2, 6, 6], 0)]))
    gt = load_ground_truth(ann, tmp_path)
    image = torch.zeros(3, 12, 16, dtype=torch.uint8)
    image[:, 2:8, 4:10] = 255
    import gradlens

    detector = BrightnessDetector((4, 2, 10, 8))
    config = FaithfulnessConfig(fractions=(0.0, 0.1, 0.5)).check()
    rows = gradlens.faithfulness_rows(detector, gt, 7, image, np.zeros((12, 16)), config)
    by_map = [r for r in rows if r["order"] == "map" and r["q"] > 0]
    assert by_map and all(math.isnan(r["quality"]) and math.isnan(r["loss"]) for r in by_map)
    assert all(not math.isnan(r["quality"]) for r in rows if r["order"] == "random" or r["q"] == 0)
    assert detector.forwards == 2 + 2 * 2  # the map order's perturbations are not run
    with pytest.raises(GradlensError, match="8-bit pixels"):
        gradlens.faithfulness_rows(detector, gt, 7, image.float() / 255, np.ones((12, 16)), config)


def test_names_seeds_and_records_are_checked_before_any_work(demo, first, tmp_path):
    from gradlens.faithfulness.run import load_faithfulness_record

    for name, message in (("manifest", "own manifest files"), ("selection", "own selection files"),
                          ("area_curve", None)):
        copy = tmp_path / name
        shutil.copytree(demo, copy, symlinks=True, ignore=shutil.ignore_patterns("maps", "faithfulness"))
        if name == "area_curve":  # the default area-curve run's name: refused whatever is on disk
            message = "default run of 'gradlens area-curve'"
        with pytest.raises(GradlensError, match=message):
            run(copy, name=name)
    for seed in (-1, 2**63, 2**64):
        with pytest.raises(GradlensError, match="--randomise-seed must be"):
            run(demo, randomise=True, randomise_seed=seed)
    with pytest.raises(GradlensError, match="--top must be"):
        run(demo, top=0)
    copy = tmp_path / "nohash"
    shutil.copytree(demo, copy, symlinks=True, ignore=shutil.ignore_patterns("maps", "faithfulness"))
    record = json.loads((copy / "faithfulness.json").read_text())
    (copy / "faithfulness.json").write_text(json.dumps({k: v for k, v in record.items() if k != "sha256"}))
    with pytest.raises(InputFileError, match="sha256"):
        load_faithfulness_record(copy)
    partial = dict(record, sha256={k: v for k, v in record["sha256"].items() if k != "faithfulness.png"})
    (copy / "faithfulness.json").write_text(json.dumps(partial))
    with pytest.raises(InputFileError, match="faithfulness.png"):
        load_faithfulness_record(copy)
    for field_name, value in (("confidence_level", "NaN"), ("bootstrap", "1e999"), ("fill", '"<b>x</b>"'),
                              ("fractions", "[0, 2]"), ("randomise", '"yes"')):
        edited = dict(record, settings=dict(record["settings"], **{field_name: "RAW"}))
        text = json.dumps(edited).replace('"RAW"', value)
        (copy / "faithfulness.json").write_text(text)
        with pytest.raises(InputFileError, match=f"settings.{field_name} is"):
            load_faithfulness_record(copy)


def test_area_curve_names_follow_the_same_rule(demo, first, tmp_path):
    from gradlens.regions.run import run_area_curve

    copy = tmp_path / "run"
    shutil.copytree(demo, copy, symlinks=True, ignore=shutil.ignore_patterns("maps", "faithfulness"))
    for name, message in (("manifest", "own manifest files"), ("faithfulness", "default run of 'gradlens faithfulness'"),
                          ("faithfulness_randomisation", "default run of 'gradlens faithfulness'"),
                          ("area_curve_per_image", "default run of 'gradlens area-curve'"),
                          ("area_curve_mass_area", "share area_curve_mass_area"),
                          ("metrics_x", "own metrics_x files")):
        with pytest.raises(GradlensError, match=message):
            run_area_curve(copy, name=name, progress=False)
    # a name that only begins like a default run shares none of its files: allowed (the Figure A2 notebook's)
    from gradlens.regions.record import check_name_is_free
    check_name_is_free(copy, "area_curve_normalized", "area-curve")
    check_name_is_free(copy, "faithfulness_strict", "faithfulness")
