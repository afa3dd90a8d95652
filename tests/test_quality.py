"""Quality scores against hand-computed values and against a slow direct implementation."""

import numpy as np
import pandas as pd
import pytest

from gradlens.data.coco import load_ground_truth
from gradlens.data.detections import Detections, read_detections
from gradlens.data.synthetic import random_annotations
from gradlens.errors import GradlensError
from gradlens.scoring.quality import IMAGE_COLUMNS, OBJECT_COLUMNS, quality_scores

from .conftest import det, make_gt_dict, write_json
from .reference import reference_quality


def score(gt_file, results_file, images, anns, dets, **kw):
    gt = load_ground_truth(gt_file(images, anns))
    d = read_detections(results_file(dets), gt)
    return quality_scores(d, gt, **kw)


def obj_row(objects, ann_id):
    return objects.set_index("ann_id").loc[ann_id]


def test_perfect_match(gt_file, results_file):
    objects, images = score(gt_file, results_file, [1], [(1, 1, [10, 10, 20, 20], 0)], [det(1, 1, [10, 10, 20, 20], 0.9)])
    row = obj_row(objects, 1)
    assert row["matched"] and row["iou"] == 1.0 and row["confidence"] == 0.9 and row["quality"] == pytest.approx(0.9)
    assert images["quality"].tolist() == [pytest.approx(0.9)]
    assert list(objects.columns) == OBJECT_COLUMNS and list(images.columns) == IMAGE_COLUMNS


def test_iou_tie_goes_to_higher_confidence(gt_file, results_file):
    # Shifted left and right by the same amount: equal IoU (15*20 / (2*400 - 300) = 0.6).
    dets = [det(1, 1, [5, 10, 20, 20], 0.3), det(1, 1, [15, 10, 20, 20], 0.7), det(1, 1, [5, 10, 20, 20], 0.5)]
    objects, _ = score(gt_file, results_file, [1], [(1, 1, [10, 10, 20, 20], 0)], dets)
    row = obj_row(objects, 1)
    assert row["iou"] == pytest.approx(0.6) and row["confidence"] == 0.7 and row["det_index"] == 1


def test_iou_decides_before_confidence(gt_file, results_file):
    dets = [det(1, 1, [12, 10, 20, 20], 0.2), det(1, 1, [18, 10, 20, 20], 0.99)]
    objects, _ = score(gt_file, results_file, [1], [(1, 1, [10, 10, 20, 20], 0)], dets)
    assert obj_row(objects, 1)["confidence"] == 0.2


def test_exact_duplicates_pick_the_first_in_file_order(gt_file, results_file):
    dets = [det(1, 1, [0, 0, 5, 5], 0.1), det(1, 1, [10, 10, 20, 20], 0.4), det(1, 1, [10, 10, 20, 20], 0.4)]
    objects, _ = score(gt_file, results_file, [1], [(1, 1, [10, 10, 20, 20], 0)], dets)
    assert obj_row(objects, 1)["det_index"] == 1


def test_class_aware_by_default_class_agnostic_on_request(gt_file, results_file):
    args = ([1], [(1, 1, [10, 10, 20, 20], 0)], [det(1, 2, [10, 10, 20, 20], 0.8)])
    aware, _ = score(gt_file, results_file, *args)
    assert not obj_row(aware, 1)["matched"] and obj_row(aware, 1)["quality"] == 0
    agnostic, _ = score(gt_file, results_file, *args, class_agnostic=True)
    row = obj_row(agnostic, 1)
    assert row["matched"] and row["quality"] == pytest.approx(0.8) and row["det_category_id"] == 2


def test_virtual_match_when_nothing_overlaps(gt_file, results_file):
    # Touching (IoU exactly 0) and far away: both leave the object with a virtual match.
    dets = [det(1, 1, [30, 10, 20, 20], 0.9), det(1, 1, [60, 60, 5, 5], 0.9), det(2, 1, [0, 0, 10, 10], 0.5)]
    objects, images = score(gt_file, results_file, [1, 2], [(1, 1, [10, 10, 20, 20], 0), (2, 1, [0, 0, 10, 10], 0)], dets)
    row = obj_row(objects, 1)
    assert not row["matched"] and row["iou"] == 0 and row["confidence"] == 0 and row["det_index"] == -1
    assert np.isnan(row["det_x"])
    assert images.set_index("image_id").loc[1, "quality"] == 0


def test_image_without_detections_scores_zero(gt_file, results_file):
    objects, images = score(
        gt_file, results_file, [1, 2], [(1, 1, [10, 10, 20, 20], 0), (1, 2, [0, 0, 5, 5], 0), (2, 1, [0, 0, 9, 9], 0)],
        [det(2, 1, [0, 0, 9, 9], 1.0)],
    )  # fmt: skip
    img1 = images.set_index("image_id").loc[1]
    assert img1["quality"] == 0 and img1["num_detections"] == 0 and img1["num_objects"] == 2 and img1["num_matched"] == 0


def test_crowd_ignored_and_images_without_objects_excluded(gt_file, results_file):
    anns = [(1, 1, [0, 0, 50, 50], 1), (1, 1, [10, 10, 20, 20], 0), (2, 1, [0, 0, 30, 30], 1)]
    dets = [det(1, 1, [0, 0, 50, 50], 0.9), det(1, 1, [10, 10, 20, 20], 0.5), det(3, 1, [0, 0, 4, 4], 0.5)]
    result = score(gt_file, results_file, [1, 2, 3], anns, dets)
    objects, images = result
    assert objects["ann_id"].tolist() == [2]  # the crowd annotation is not an object
    assert images["image_id"].tolist() == [1]  # image 2 (crowd only) and 3 (empty) have no quality
    assert images["quality"].iloc[0] == pytest.approx(0.5)
    s = result.summary
    assert s["num_crowd_ignored"] == 2 and s["num_images_without_objects"] == 2 and s["num_images_scored"] == 1


def test_degenerate_ground_truth_box_gets_virtual_match(gt_file, results_file):
    anns = [(1, 1, [10, 10, 0, 20], 0), (1, 1, [40, 40, 10, 10], 0)]
    dets = [det(1, 1, [10, 10, 1, 20], 0.9), det(1, 1, [40, 40, 10, 10], 0.6)]
    result = score(gt_file, results_file, [1], anns, dets)
    objects, images = result
    assert obj_row(objects, 1)["quality"] == 0 and not obj_row(objects, 1)["matched"]
    assert images["quality"].iloc[0] == pytest.approx(0.3)
    assert result.summary["num_degenerate_objects"] == 1


def test_zero_area_detections_match_nothing(gt_file, results_file):
    """mmdetection keeps boxes clipped to zero area; with the highest score, they still lose to a real overlap."""
    anns = [(1, 1, [10, 10, 20, 20], 0), (1, 1, [0, 0, 5, 5], 0)]
    dets = [det(1, 1, [10, 10, 0, 20], 0.99), det(1, 1, [15, 15, 20, 20], 0.5), det(1, 1, [0, 0, 5, 0], 0.9)]
    objects, images = score(gt_file, results_file, [1], anns, dets)
    data = make_gt_dict([1], anns)
    expected_objects, expected_images = reference_quality(data, dets)
    assert obj_row(objects, 1)["det_index"] == 1 and not obj_row(objects, 2)["matched"]
    assert images["quality"].iloc[0] == pytest.approx(expected_images[1])
    assert expected_objects[2] == (0.0, 0.0, -1)


def test_image_quality_is_the_mean_over_objects(gt_file, results_file):
    anns = [(1, 1, [0, 0, 10, 10], 0), (1, 2, [20, 20, 10, 10], 0), (1, 5, [40, 40, 10, 10], 0)]
    dets = [det(1, 1, [0, 0, 10, 10], 0.9), det(1, 2, [20, 20, 10, 5], 0.8)]
    _, images = score(gt_file, results_file, [1], anns, dets)
    assert images["quality"].iloc[0] == pytest.approx((0.9 + 0.5 * 0.8 + 0) / 3)


def test_empty_detections_through_the_api(gt_file):
    gt = load_ground_truth(gt_file([1], [(1, 1, [0, 0, 10, 10], 0)]))
    empty = Detections.from_arrays([], [], np.zeros((0, 4)), [])
    objects, images = quality_scores(empty, gt)
    assert objects["quality"].tolist() == [0] and images["num_detections"].tolist() == [0]


def random_case(seed: int, lattice: bool):
    """Random ground truth and detections; on a coarse lattice, IoU and confidence ties are common."""
    rng = np.random.default_rng(seed)
    gt = random_annotations(num_images=30, objects_per_image=4, num_categories=3, seed=seed, crowd_fraction=0.15, width=60, height=40)
    gt["images"].append({"id": 999, "file_name": "x.jpg", "width": 60, "height": 40})  # an image with no objects
    results = []
    for img in gt["images"]:
        for _ in range(rng.poisson(6)):
            if lattice:
                x, y = rng.integers(0, 6, 2) * 10
                w, h = rng.integers(1, 4, 2) * 10
                s = float(rng.choice([0.25, 0.5, 0.75]))
            else:
                x, y = rng.uniform(0, 50, 2)
                w, h = rng.uniform(1, 30, 2)
                s = float(rng.uniform(0.05, 1))
            results.append(det(img["id"], int(rng.integers(1, 4)), [x, y, w, h], s))
    if lattice:
        for a in gt["annotations"]:  # snap ground truth to the lattice too (sizes at least one step)
            x, y, w, h = (float(round(v / 10) * 10) for v in a["bbox"])
            a["bbox"] = [x, y, max(w, 10.0), max(h, 10.0)]
    return gt, results


@pytest.mark.parametrize("class_agnostic", [False, True])
@pytest.mark.parametrize("lattice", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_random_cases_agree_with_direct_computation(tmp_path, seed, lattice, class_agnostic):
    gt_dict, results = random_case(seed, lattice)
    gt = load_ground_truth(write_json(tmp_path / "gt.json", gt_dict))
    dets = read_detections(write_json(tmp_path / "res.json", results), gt)
    objects, images = quality_scores(dets, gt, class_agnostic=class_agnostic, chunk_pairs=37)  # many chunks
    ref_objects, ref_images = reference_quality(gt_dict, results, class_agnostic)

    assert sorted(objects["ann_id"]) == sorted(ref_objects)
    ref = pd.DataFrame.from_dict(ref_objects, orient="index", columns=["iou", "confidence", "pos"]).loc[objects["ann_id"]]
    np.testing.assert_array_equal(objects["iou"].to_numpy(), ref["iou"].to_numpy())
    np.testing.assert_array_equal(objects["confidence"].to_numpy(), ref["confidence"].to_numpy())
    np.testing.assert_array_equal(objects["det_index"].to_numpy(), ref["pos"].to_numpy())
    assert images["image_id"].tolist() == sorted(ref_images)
    np.testing.assert_allclose(images["quality"].to_numpy(), [ref_images[i] for i in images["image_id"]], rtol=0, atol=1e-12)
    if lattice:
        assert (objects["matched"]).any()


def test_chunking_does_not_change_results(synthetic_gt):
    from gradlens.data.synthetic import simulate_detections

    dets = simulate_detections(synthetic_gt, skill=0.6, seed=5)
    whole = quality_scores(dets, synthetic_gt)
    chunked = quality_scores(dets, synthetic_gt, chunk_pairs=3)
    pd.testing.assert_frame_equal(whole.objects, chunked.objects)
    pd.testing.assert_frame_equal(whole.images, chunked.images)


def test_api_accepts_paths_lists_dicts_dataframes_and_coco(tmp_path):
    from pycocotools.coco import COCO

    import gradlens

    gt_dict, results = random_case(7, lattice=True)
    gt_path = write_json(tmp_path / "gt.json", gt_dict)
    res_path = write_json(tmp_path / "res.json", results)
    expected = gradlens.quality_scores(read_detections(res_path, load_ground_truth(gt_path)), load_ground_truth(gt_path))
    coco = COCO()
    coco.dataset = gt_dict
    coco.createIndex()
    for dets, gt in [(str(res_path), str(gt_path)), (results, gt_dict), (pd.DataFrame(results), coco)]:
        objects, images = gradlens.quality_scores(dets, gt)
        pd.testing.assert_frame_equal(objects, expected.objects)
        pd.testing.assert_frame_equal(images, expected.images)


def test_class_agnostic_scoring_accepts_unknown_categories(tmp_path, gt_file, results_file):
    from gradlens.scoring.sources import identify_source, score_source

    gt = load_ground_truth(gt_file([1], [(1, 1, [10, 10, 20, 20], 0)]))
    path = results_file([det(1, 0, [10, 10, 20, 20], 0.6)])  # a proposal network's single class 0
    scores, _ = score_source(identify_source(path), lambda: gt, class_agnostic=True)
    assert scores.objects["quality"].tolist() == [pytest.approx(0.6)]
    with pytest.raises(GradlensError, match="category id is not in the annotation file"):
        score_source(identify_source(path), lambda: gt, class_agnostic=False)



def test_best_iou_agrees_with_cocoeval(synthetic_gt):
    """Second independent reference: the IoU matrices COCOeval itself builds while evaluating."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    from gradlens.data.synthetic import simulate_detections

    dets = simulate_detections(synthetic_gt, skill=0.6, seed=9)
    objects, _ = quality_scores(dets, synthetic_gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = synthetic_gt.coco.loadRes(dets.to_records())
        evaluator = COCOeval(synthetic_gt.coco, coco_dt, "bbox")
        evaluator.evaluate()
    ours = objects.set_index("ann_id")["iou"]
    checked = 0
    for (image_id, category_id), ious in evaluator.ious.items():
        gts = evaluator._gts[image_id, category_id]
        for j, g in enumerate(gts):
            if g["iscrowd"]:
                continue
            best = float(np.max(ious[:, j])) if len(ious) else 0.0
            assert ours[g["id"]] == best, (image_id, category_id, g["id"])
            checked += 1
    assert checked == len(objects)


def test_extreme_ids_and_no_objects_at_all(tmp_path):
    big = 2**62
    gt_dict = make_gt_dict(
        [big, 3],
        [(big, -7, [0, 0, 10, 10], 0), (3, 2**40, [0, 0, 10, 10], 0)],
        categories=[{"id": -7, "name": "neg"}, {"id": 2**40, "name": "huge"}],
    )
    dets = [det(3, -7, [0, 0, 10, 10], 0.9), det(big, -7, [0, 0, 10, 10], 0.4), det(3, 2**40, [0, 0, 10, 5], 0.8)]
    objects, images = quality_scores(dets, gt_dict)
    assert objects.set_index("image_id")["quality"].to_dict() == {3: pytest.approx(0.4), big: pytest.approx(0.4)}
    empty_gt = make_gt_dict([1, 2], [])
    result = quality_scores([det(1, 1, [0, 0, 4, 4], 0.5)], empty_gt)
    assert len(result.objects) == 0 and len(result.images) == 0
    assert result.summary["num_images_without_objects"] == 2 and result.summary["mean_image_quality"] is None


def test_detections_on_images_without_objects_are_never_candidates(gt_file, results_file):
    anns = [(1, 1, [0, 0, 10, 10], 0)]
    dets = [det(2, 1, [0, 0, 10, 10], 0.9), det(1, 1, [0, 0, 10, 10], 0.3)]
    objects, images = score(gt_file, results_file, [1, 2], anns, dets)
    assert objects["quality"].tolist() == [pytest.approx(0.3)] and images["image_id"].tolist() == [1]


def test_class_agnostic_api_accepts_categories_unknown_to_the_ground_truth(gt_file):
    gt = load_ground_truth(gt_file([1], [(1, 1, [10, 10, 20, 20], 0)]))
    records = [det(1, 0, [10, 10, 20, 20], 0.6)]  # a proposal network's single class 0
    for dets in (records, pd.DataFrame(records)):
        objects, _ = quality_scores(dets, gt, class_agnostic=True)
        assert objects["quality"].tolist() == [pytest.approx(0.6)]
    with pytest.raises(GradlensError, match="^The detection list has 1 detection"):  # a singular subject
        quality_scores(records, gt)
    with pytest.raises(GradlensError, match="^The detection table has 1 detection"):
        quality_scores(pd.DataFrame(records), gt)


def test_dataframe_bbox_cells_may_be_arrays_or_tuples(gt_file):
    gt = load_ground_truth(gt_file([1], [(1, 1, [10, 10, 20, 20], 0), (1, 2, [0, 0, 5, 5], 0)]))
    records = [det(1, 1, [12, 10, 20, 20], 0.9), det(1, 2, [0, 0, 5, 4], 0.7)]
    expected = quality_scores(records, gt)
    for cell in (np.array, tuple, lambda b: tuple(np.float32(v) for v in b), lambda b: np.array(b, dtype=np.int64)):
        frame = pd.DataFrame(records)
        frame["bbox"] = [cell(r["bbox"]) for r in records]
        objects, images = quality_scores(frame, gt)
        pd.testing.assert_frame_equal(objects, expected.objects)
        pd.testing.assert_frame_equal(images, expected.images)
    numpy_records = [r | {"bbox": [np.float64(v) for v in r["bbox"]], "score": np.float64(r["score"])} for r in records]
    pd.testing.assert_frame_equal(quality_scores(numpy_records, gt).objects, expected.objects)
    frame = pd.DataFrame(records)
    frame["bbox"] = [np.array([True, False, True, True]), np.array(records[1]["bbox"])]
    with pytest.raises(GradlensError, match="not four numbers"):  # bools stay bools, not 1.0 and 0.0
        quality_scores(frame, gt)
