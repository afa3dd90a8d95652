"""Ground truth: path resolution and annotation files, good and bad."""

from pathlib import Path

import numpy as np
import pytest

from gradlens.data.coco import ENV_COCO_ROOT, load_ground_truth, resolve_coco_paths
from gradlens.errors import InputFileError

from .conftest import make_gt_dict, write_json


def test_path_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_COCO_ROOT, raising=False)
    default = resolve_coco_paths()
    assert default.ann == Path("data/coco/annotations/instances_val2017.json") and default.images == Path("data/coco/val2017")
    monkeypatch.setenv(ENV_COCO_ROOT, str(tmp_path / "env"))
    assert resolve_coco_paths().ann == tmp_path / "env/annotations/instances_val2017.json"
    assert resolve_coco_paths(tmp_path / "flag").images == tmp_path / "flag/val2017"  # flag beats the variable
    p = resolve_coco_paths(tmp_path / "flag", ann=tmp_path / "a.json", images=tmp_path / "imgs")
    assert p.ann == tmp_path / "a.json" and p.images == tmp_path / "imgs"


def test_objects_sorted_crowd_counted(tmp_path):
    d = make_gt_dict([5, 2], [(5, 1, [1, 2, 3, 4], 0), (2, 2, [0, 0, 10, 10], 1), (2, 1, [4, 4, 2, 2], 0)])
    gt = load_ground_truth(write_json(tmp_path / "gt.json", d), images_dir=tmp_path)
    assert gt.image_ids.tolist() == [2, 5]
    assert gt.obj_image_id.tolist() == [2, 5] and gt.obj_ann_id.tolist() == [3, 1]
    np.testing.assert_array_equal(gt.boxes, [[4, 4, 6, 6], [1, 2, 4, 6]])
    assert gt.num_crowd == 1 and gt.category_names[5] == "bird"
    assert gt.image_path(5) == tmp_path / "000000000005.jpg"
    assert gt.coco.getAnnIds(imgIds=[2]) == [2, 3]  # the pycocotools index is there too


def test_image_without_any_annotation(tmp_path):
    gt = load_ground_truth(write_json(tmp_path / "gt.json", make_gt_dict([1], [])))
    assert gt.num_objects == 0 and gt.boxes.shape == (0, 4)


@pytest.mark.parametrize(
    "payload, message",
    [
        ([], "expected a JSON object"),
        ({"images": []}, "no 'annotations' list"),
        ({"images": [], "annotations": [], "categories": []}, "lists no images"),
        (make_gt_dict([1], [(2, 1, [0, 0, 1, 1], 0)]), "refers to image 2"),
        (make_gt_dict([1], [(1, 9, [0, 0, 1, 1], 0)]), "category 9"),
        (make_gt_dict([1], [(1, 1, [0, 0, 1], 0)]), "not four finite numbers"),
        (make_gt_dict([1, 1], []), "Image id 1 appears more than once"),
        (make_gt_dict([1], [(1, 1, [0, 0, -1, 1], 0)]), "negative box"),
    ],
)
def test_bad_annotation_files(tmp_path, payload, message):
    with pytest.raises(InputFileError, match=message):
        load_ground_truth(write_json(tmp_path / "gt.json", payload))


def test_missing_annotation_file(tmp_path):
    with pytest.raises(InputFileError, match="annotation file .* does not exist"):
        load_ground_truth(resolve_coco_paths(tmp_path))


def _with(d: dict, section: str, key: str, value) -> dict:
    d[section] = [{**d[section][0], key: value}, *d[section][1:]]  # copies: the categories are shared by all tests
    return d


BAD_IDS = [
    ("images", "id", "7"), ("images", "id", [1]), ("images", "id", True), ("images", "id", 2**63), ("images", "id", 1e20),
    ("images", "id", 1.5), ("annotations", "id", "1"), ("annotations", "id", False), ("annotations", "id", 2.5),
    ("annotations", "image_id", "1"), ("annotations", "image_id", 2**64), ("annotations", "image_id", 1.5),
    ("annotations", "category_id", [1]), ("annotations", "category_id", None), ("annotations", "category_id", -(2**63) - 1),
    ("categories", "id", "1"), ("categories", "id", True), ("categories", "id", 1e20), ("categories", "id", 1.25),
]  # fmt: skip


@pytest.mark.parametrize("section, key, value", BAD_IDS)
def test_ids_must_be_64_bit_integers(tmp_path, section, key, value):
    d = _with(make_gt_dict([1], [(1, 1, [0, 0, 4, 4], 0)]), section, key, value)
    with pytest.raises(InputFileError, match="not an integer id of at most 64 bits") as info:
        load_ground_truth(write_json(tmp_path / "gt.json", d))
    assert "\n" not in str(info.value) and "entry 0" in str(info.value)


def test_integral_float_ids_are_accepted_as_pycocotools_does(tmp_path):
    d = make_gt_dict([4], [(4, 2, [0, 0, 4, 4], 0)])
    d["images"][0]["id"] = d["annotations"][0]["image_id"] = 4.0
    d["annotations"][0]["id"], d["annotations"][0]["category_id"] = 9.0, 2.0
    d["categories"] = [{**c, "id": float(c["id"])} for c in d["categories"]]
    gt = load_ground_truth(write_json(tmp_path / "gt.json", d))
    assert gt.image_ids.tolist() == [4] and gt.obj_ann_id.tolist() == [9] and gt.obj_category_id.tolist() == [2]
    assert gt.image_info(4)["file_name"]


def test_huge_integer_in_an_annotation_box(tmp_path):
    with pytest.raises(InputFileError, match="not four finite numbers"):
        d = make_gt_dict([1], [(1, 1, [0, 0, 4, 4], 0)])
        d["annotations"][0]["bbox"][2] = 10**400
        load_ground_truth(write_json(tmp_path / "gt.json", d))


def test_deeply_nested_annotation_file(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(InputFileError, match="nested too deeply"):
        load_ground_truth(path)


def test_given_is_only_set_when_the_user_named_the_dataset(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_COCO_ROOT, raising=False)
    assert not resolve_coco_paths().given and not resolve_coco_paths(images=tmp_path).given
    assert resolve_coco_paths(tmp_path).given and resolve_coco_paths(ann=tmp_path / "a.json").given
    monkeypatch.setenv(ENV_COCO_ROOT, str(tmp_path))
    assert resolve_coco_paths().given
