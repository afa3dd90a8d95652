"""Reading COCO results files: the happy path, and one clear error for each kind of bad input."""

import json
import math

import numpy as np
import pytest

from gradlens.data.coco import load_ground_truth
from gradlens.data.detections import Detections, read_detections, write_detections
from gradlens.errors import InputFileError, InvalidDetectionsError

from .conftest import det


@pytest.fixture
def gt(gt_file):
    return load_ground_truth(gt_file([1, 2], [(1, 1, [0, 0, 10, 10], 0), (2, 2, [5, 5, 10, 10], 0)]))


def test_round_trip(tmp_path, gt):
    d = Detections.from_arrays([1, 2, 2], [1, 2, 5], [[0, 0, 10, 10], [1.5, 2.5, 3, 4], [0, 0, 1, 1]], [0.5, 1.0, 0.05])
    path = write_detections(d, tmp_path / "out" / "r.json")
    back = read_detections(path, gt)
    np.testing.assert_array_equal(back.xywh, d.xywh)
    np.testing.assert_array_equal(back.score, d.score)
    assert back.sha256 and len(back) == 3 and back.dropped == {}
    assert json.loads(path.read_text())[1] == {"image_id": 2, "category_id": 2, "bbox": [1.5, 2.5, 3.0, 4.0], "score": 1.0}


def test_extra_fields_such_as_segmentation_are_accepted(results_file, gt):
    rec = det(1, 1, [0, 0, 5, 5], 0.5) | {"segmentation": {"size": [80, 100], "counts": "abc"}, "area": 25}
    assert len(read_detections(results_file([rec]), gt)) == 1


def test_integral_float_ids_are_ids(results_file, gt):
    d = read_detections(results_file([det(1, 1, [0, 0, 5, 5], 0.5) | {"image_id": 2.0, "category_id": 5.0}]), gt)
    assert d.image_id.tolist() == [2] and d.category_id.tolist() == [5] and d.image_id.dtype == np.int64


def test_integer_boxes_and_scores_are_numbers(results_file, gt):
    d = read_detections(results_file([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}]), gt)
    assert d.xywh.dtype == np.float64 and d.score[0] == 1.0


BAD = {
    "not a list": ({"image_id": 1}, "expected a JSON list"),
    "annotation file": ({"images": [], "annotations": [], "categories": []}, "annotation file, not a results file"),
    "empty list": ([], "contains no detections"),
    "entry not an object": ([det(1, 1, [0, 0, 1, 1], 0.5), [1, 2]], "Entry 1"),
    "missing score": ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}], "has no 'score'"),
    "short bbox": ([det(1, 1, [0, 0, 1, 1], 0.5) | {"bbox": [0, 0, 1]}], "not four numbers"),
    "string score": ([det(1, 1, [0, 0, 1, 1], 0.5) | {"score": "0.5"}], "not a number"),
    "string image id": ([det(1, 1, [0, 0, 1, 1], 0.5) | {"image_id": "1"}], "non-integer image_id"),
    "fractional category": ([det(1, 1, [0, 0, 1, 1], 0.5) | {"category_id": 1.5}], "non-integer category_id"),
    "unknown image": ([det(1, 1, [0, 0, 1, 1], 0.5), det(7, 1, [0, 0, 1, 1], 0.5)], "image id is not in the annotation file"),
    "unknown category": ([det(1, 3, [0, 0, 1, 1], 0.5)], "category id is not in the annotation file"),
    "negative width": ([det(1, 1, [0, 0, -1e-3, 4], 0.5)], "negative box width or height"),
    "negative height": ([det(1, 1, [0, 0, 4, -2], 0.5)], "negative box width or height"),
    "score above one": ([det(1, 1, [0, 0, 4, 4], 1.5)], "score outside [0, 1]"),
    "negative score": ([det(1, 1, [0, 0, 4, 4], -0.1)], "score outside [0, 1]"),
    "nan": ([det(1, 1, [0, 0, 4, 4], 0.5) | {"score": math.nan}], "non-finite"),
    "image id 2**63": ([det(1, 1, [0, 0, 1, 1], 0.5), det(1, 1, [0, 0, 1, 1], 0.5) | {"image_id": 2**63}], "Entry 1 of"),
    "image id 2**64": ([det(1, 1, [0, 0, 1, 1], 0.5) | {"image_id": 2**64}], "image_id 18446744073709551616 beyond the 64-bit"),
    "category id 1e20": ([det(1, 1, [0, 0, 1, 1], 0.5) | {"category_id": 1e20}], "category_id 1e+20 beyond the 64-bit"),
    "image id below int64": ([det(1, 1, [0, 0, 1, 1], 0.5) | {"image_id": -(2**63) - 1}], "beyond the 64-bit"),
    "string in bbox": ([det(1, 1, [0, 0, 1, 1], 0.5) | {"bbox": [0, "0", 4, 4]}], "not four numbers"),
    "bool in bbox": ([det(1, 1, [0, 0, 1, 1], 0.5) | {"bbox": [0, 0, True, 4]}], "not four numbers"),
    "null in bbox": ([det(1, 1, [0, 0, 1, 1], 0.5) | {"bbox": [0, 0, 4, None]}], "not four numbers"),
    "bool score": ([det(1, 1, [0, 0, 1, 1], 0.5) | {"score": True}], "not a number"),
    "huge int in bbox": ([det(1, 1, [0, 0, 1, 1], 0.5) | {"bbox": [0, 0, 10**400, 4]}], "beyond floating-point range"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_results_get_one_clear_sentence(results_file, gt, case):
    records, message = BAD[case]
    with pytest.raises(InvalidDetectionsError) as info:
        read_detections(results_file(records), gt)
    text = str(info.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize(
    "content, message",
    [("", "is empty"), ("[{\"image_id\": 1,", "not valid JSON"), (b"\xff\xfe\x00", "not UTF-8")],
)
def test_unparseable_files(tmp_path, gt, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputFileError, match=message):
        read_detections(path, gt)


def test_missing_file_and_directory(tmp_path, gt):
    with pytest.raises(InputFileError, match="does not exist"):
        read_detections(tmp_path / "nope.json", gt)
    with pytest.raises(InputFileError, match="is not a file"):
        read_detections(tmp_path, gt)


def test_drop_invalid_skips_and_counts(results_file, gt):
    records = [
        det(1, 1, [0, 0, 4, 4], 0.5),
        det(1, 1, [0, 0, -3, 4], 0.5),
        det(1, 1, [0, 0, 4, -1], 0.5),
        det(2, 2, [0, 0, 4, 4], 1.2),
        det(2, 2, [1, 1, 4, 4], 0.7),
    ]
    d = read_detections(results_file(records), gt, drop_invalid=True)
    assert d.index.tolist() == [0, 4]
    assert d.dropped == {"negative box width or height": 2, "score outside [0, 1]": 1}


def test_zero_area_boxes_are_valid_detections(results_file, gt):
    """mmdetection writes boxes clipped to zero area at the border; they are read, and simply match nothing."""
    d = read_detections(results_file([det(1, 1, [0, 0, 0, 4], 0.5), det(1, 1, [3, 3, 2, 0], 0.4)]), gt)
    assert len(d) == 2 and d.xywh[:, 2:].min() == 0 and not d.dropped


def test_drop_invalid_does_not_hide_foreign_image_ids(results_file, gt):
    with pytest.raises(InvalidDetectionsError, match="not in the annotation file"):
        read_detections(results_file([det(9, 1, [0, 0, 4, 4], 0.5)]), gt, drop_invalid=True)


def test_all_invalid_is_an_error_even_when_dropping(results_file, gt):
    with pytest.raises(InvalidDetectionsError, match="Every detection"):
        read_detections(results_file([det(1, 1, [0, 0, -1, 4], 0.5)]), gt, drop_invalid=True)


@pytest.mark.parametrize("case", ["string in bbox", "bool in bbox", "null in bbox", "image id 2**63"])
def test_format_errors_are_not_droppable(results_file, gt, case):
    # The slow path is taken too when another record needs it (an integral float id).
    records = [det(1, 1, [0, 0, 4, 4], 0.5) | {"image_id": 1.0}] + BAD[case][0]
    with pytest.raises(InvalidDetectionsError, match=BAD[case][1] if case != "image id 2**63" else "beyond the 64-bit"):
        read_detections(results_file(records), gt, drop_invalid=True)


def test_values_are_droppable_with_integral_float_ids(results_file, gt):
    records = [det(1, 1, [0, 0, 4, 4], 0.5) | {"image_id": 1.0}, det(1, 1, [0, 0, -4, 4], 0.5)]
    assert read_detections(results_file(records), gt, drop_invalid=True).dropped == {"negative box width or height": 1}


def test_in_memory_records_are_checked_alike(gt):
    from gradlens.data.detections import detections_from_records

    with pytest.raises(InvalidDetectionsError, match="Entry 0 of the detection list has a bbox"):
        detections_from_records([det(1, 1, [0, 0, 1, 1], 0.5) | {"bbox": ["0", 0, 1, 1]}], gt)
    with pytest.raises(InvalidDetectionsError, match="^The detection list has 1 detection"):
        detections_from_records([det(1, 1, [0, 0, -1, 1], 0.5)], gt)


@pytest.mark.parametrize("content", ["[" * 100000 + "]" * 100000, "[" + "1" * 5000 + "]"])
def test_unreadable_json_is_one_sentence(tmp_path, gt, content):
    path = tmp_path / "deep.json"
    path.write_text(content)
    with pytest.raises(InputFileError) as info:
        read_detections(path, gt)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
