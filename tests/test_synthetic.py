"""The synthetic dataset is real COCO: valid annotations, decodable JPEGs, every edge case present, reproducible."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from gradlens.data.images import read_image
from gradlens.data.synthetic import CATEGORIES, make_synthetic_coco, random_annotations, simulate_detections
from gradlens.errors import GradlensError
from gradlens.scoring.quality import quality_scores


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", num_images=6, seed=11, progress=False)
    b = make_synthetic_coco(tmp_path / "b", num_images=6, seed=11, progress=False)
    c = make_synthetic_coco(tmp_path / "c", num_images=6, seed=12, progress=False)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b") != tree_digest(tmp_path / "c")
    assert a.ann.name == "instances_val2017.json" and a.images.name == "val2017" and c.ann.exists()


def test_dataset_is_valid_coco_with_every_edge_case(synthetic_coco, synthetic_gt):
    data = json.loads(synthetic_coco.ann.read_text())
    assert data["categories"] == CATEGORIES
    anns = data["annotations"]
    assert len({a["id"] for a in anns}) == len(anns)
    images = {i["id"]: i for i in data["images"]}
    annotated = {a["image_id"] for a in anns if not a["iscrowd"]}
    assert any(i not in annotated for i in images), "some images have no objects"
    assert any(a["iscrowd"] for a in anns), "some crowd annotations"
    assert len({a["category_id"] for a in anns}) >= 4, "several categories"
    areas = [a["bbox"][2] * a["bbox"][3] for a in anns if not a["iscrowd"]]
    assert min(areas) < 32**2 and max(areas) > 96**2, "small and large objects"
    modes = {Image.open(synthetic_coco.images / i["file_name"]).mode for i in images.values()}
    assert modes == {"RGB", "L"}, "colour and grayscale JPEGs"
    sizes = {(i["width"], i["height"]) for i in images.values()}
    assert len(sizes) > 10, "varied sizes"
    for a in anns:
        img = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"] and w > 0 and h > 0
        m = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
        assert m.shape == (img["height"], img["width"]) and m.sum() == a["area"]
        np.testing.assert_allclose(mask_utils.toBbox({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}), a["bbox"])
    for info in images.values():
        assert read_image(synthetic_coco.images / info["file_name"]).shape == (info["height"], info["width"], 3)
    assert synthetic_gt.num_crowd > 0


def test_occlusion_makes_boxes_overlap(synthetic_gt):
    from gradlens.scoring.iou import paired_iou
    import torch

    same_image = synthetic_gt.obj_image_id[:, None] == synthetic_gt.obj_image_id[None, :]
    i, j = np.nonzero(np.triu(same_image, 1))
    ious = paired_iou(torch.as_tensor(synthetic_gt.obj_xywh[i]), torch.as_tensor(synthetic_gt.obj_xywh[j]))
    assert (ious > 0).sum() > 5


def test_simulated_skill_orders_quality(synthetic_gt):
    good = quality_scores(simulate_detections(synthetic_gt, skill=0.95, seed=1), synthetic_gt).summary["mean_image_quality"]
    poor = quality_scores(simulate_detections(synthetic_gt, skill=0.3, seed=1), synthetic_gt).summary["mean_image_quality"]
    assert good > poor + 0.1


def test_simulated_detections_respect_the_per_image_cap(synthetic_gt):
    d = simulate_detections(synthetic_gt, skill=0.5, seed=0, max_per_image=3, false_positives=10)
    _, counts = np.unique(d.image_id, return_counts=True)
    assert counts.max() == 3 and ((d.score >= 0) & (d.score <= 1)).all() and (d.xywh[:, 2:] > 0).all()


def test_random_annotations_shape():
    d = random_annotations(50, objects_per_image=3, num_categories=4, seed=1, crowd_fraction=0.2)
    assert len(d["images"]) == 50 and {a["category_id"] for a in d["annotations"]} <= {1, 2, 3, 4}
    assert any(a["iscrowd"] for a in d["annotations"])


@pytest.mark.parametrize("num_images", [3, 4, 6])
@pytest.mark.parametrize("seed", range(8))
def test_small_datasets_have_every_edge_case(tmp_path, num_images, seed):
    paths = make_synthetic_coco(tmp_path, num_images=num_images, seed=seed, progress=False)
    data = json.loads(paths.ann.read_text())
    annotated = {a["image_id"] for a in data["annotations"] if not a["iscrowd"]}
    assert any(a["iscrowd"] for a in data["annotations"]), "a crowd region"
    assert any(i["id"] not in annotated for i in data["images"]), "an image without objects"
    assert any(Image.open(paths.images / i["file_name"]).mode == "L" for i in data["images"]), "a grayscale JPEG"
    assert len(data["images"]) == num_images


def test_rerun_with_fewer_images_leaves_no_stale_jpegs(tmp_path):
    first = make_synthetic_coco(tmp_path / "d", num_images=8, seed=1, progress=False)
    before = {i["file_name"] for i in json.loads(first.ann.read_text())["images"]}
    (tmp_path / "d/val2017/notes.txt").write_text("kept")
    (tmp_path / "d/val2017/my_photo.jpg").write_bytes(b"\xff\xd8 the user's own")  # not gradlens' to delete
    removed = []
    paths = make_synthetic_coco(tmp_path / "d", num_images=4, seed=2, progress=False, on_remove=removed.append)
    listed = {i["file_name"] for i in json.loads(paths.ann.read_text())["images"]}
    assert {p.name for p in paths.images.glob("*.jpg")} == listed | {"my_photo.jpg"} and len(listed) == 4
    assert {p.name for p in removed} == before - listed and removed  # each removal reported
    assert (paths.images / "notes.txt").is_file()
    (paths.images / "notes.txt").unlink()
    (paths.images / "my_photo.jpg").unlink()
    fresh = make_synthetic_coco(tmp_path / "fresh", num_images=4, seed=2, progress=False)
    assert tree_digest(tmp_path / "fresh") == tree_digest(tmp_path / "d"), "same as a dataset made from scratch"


def test_foreign_datasets_are_not_overwritten(tmp_path):
    (tmp_path / "real/annotations").mkdir(parents=True)
    (tmp_path / "real/annotations/instances_val2017.json").write_text('{"info": {"description": "COCO 2017"}}')
    with pytest.raises(GradlensError, match="not a gradlens synthetic dataset"):
        make_synthetic_coco(tmp_path / "real", num_images=3, progress=False)
    (tmp_path / "photos/val2017").mkdir(parents=True)
    (tmp_path / "photos/val2017/holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(GradlensError, match="already holds JPEG images"):
        make_synthetic_coco(tmp_path / "photos", num_images=3, progress=False)
    assert (tmp_path / "photos/val2017/holiday.jpg").is_file()
    assert not (tmp_path / "photos/annotations").exists()
