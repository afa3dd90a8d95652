"""Batched inference equals one image at a time; the cache is reused and a failed run resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gradlens.data.coco import load_ground_truth
from gradlens.data.synthetic import CATEGORIES
from gradlens.errors import GradlensError
from gradlens.inference import InferenceSettings, ShapeGroupedBatches, cached_detections, detect_images
from gradlens.models.formats.checkpoints import save_detector
from gradlens.models.registry import build_detector
from gradlens.models.preprocessing.transform import padded_size


def random_detector(arch="retinanet_cednet_mini", seed=0):
    torch.manual_seed(seed)
    det = build_detector(arch, len(CATEGORIES))
    with torch.no_grad():
        for p in det.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        det.head.classification_head.cls_logits.bias.fill_(-2.0)
    det.categories = [dict(c) for c in CATEGORIES]
    return det


def float64_detector(det):
    """``det`` in float64, casting the loader's float32 images: a check that batching is the same function must not
    hinge on float32's last bits, whose order of sums differs per CPU (detections are still post-processed in float32)."""
    det = det.double()
    prepare = det.prepare
    det.prepare = lambda images: prepare([im.double() for im in images])
    return det


@pytest.fixture(scope="module")
def gt(synthetic_coco):
    return load_ground_truth(synthetic_coco)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_detector(random_detector(), tmp_path_factory.mktemp("ckpt") / "cednet-mini.pth")


def _arrays(records):
    return np.array([[r["category_id"], *r["bbox"], r["score"]] for r in records]).reshape(-1, 6)


def test_batches_share_one_canvas_and_cover_every_image(gt):
    det = random_detector()
    sizes = {int(i): (gt.image_info(i)["height"], gt.image_info(i)["width"]) for i in gt.image_ids}
    batches = ShapeGroupedBatches(sizes, det, batch_size=3).batches
    assert sorted(i for b in batches for i in b) == sorted(sizes)
    assert all(len(b) <= 3 for b in batches)
    for batch in batches:
        assert len({padded_size(*sizes[i], det.preprocess) for i in batch}) == 1


def test_batched_equals_one_at_a_time(gt):
    # float64 network: random weights give many near-tied scores (every image fills its 100 detections), and in float32
    # the batch's summation order flips some of them at the cut-off or in NMS, how many depending on the CPU
    det = float64_detector(random_detector())
    one = detect_images(det, gt, settings=InferenceSettings(batch_size=1, workers=0), progress=False)
    many = detect_images(det, gt, settings=InferenceSettings(batch_size=6, workers=2), progress=False)
    assert one.keys() == many.keys() == {int(i) for i in gt.image_ids}
    assert sum(len(v) for v in one.values()) > 0
    for image_id in one:
        a, b = _arrays(one[image_id]), _arrays(many[image_id])
        # detections are in original pixels and use the dataset's category ids
        assert set(a[:, 0]) <= {c["id"] for c in CATEGORIES}
        assert len(a) == len(b)
        # every detection found again: the logits agree to ~1e-15, so their float32 post-processing agrees to an ulp
        # (compared as sets: an ulp may still swap two equal-looking scores in the output order)
        close = np.all(np.abs(b[None, :, :] - a[:, None, :]) <= np.array([0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-6]), axis=2)
        assert close.any(axis=1).all(), image_id


def test_batched_head_outputs_equal_one_at_a_time():
    det = random_detector().double()  # float64: the same function; float32's order of sums in a batch is the CPU's
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 100, 140, generator=g, dtype=torch.float64), torch.rand(3, 100, 150, generator=g, dtype=torch.float64),
              torch.rand(3, 90, 130, generator=g, dtype=torch.float64)]
    assert len({padded_size(*im.shape[-2:], det.preprocess) for im in images}) == 1
    with torch.no_grad():
        batch, _ = det.prepare(images)
        together, _, _ = det.head_outputs(batch)
        for i, image in enumerate(images):
            alone, _, _ = det.head_outputs(det.prepare([image])[0])
            for key in together:
                torch.testing.assert_close(together[key][i], alone[key][0], rtol=1e-10, atol=1e-10)


def test_no_detections_is_fine(gt):
    det = random_detector()
    with torch.no_grad():
        det.head.classification_head.cls_logits.bias.fill_(-20.0)
    results = detect_images(det, gt, settings=InferenceSettings(batch_size=4, workers=0), progress=False)
    assert all(v == [] for v in results.values())


def test_cache_is_reused_and_keyed_on_settings(gt, tmp_path):
    det = random_detector()
    first = cached_detections(det, "sha-a", gt, InferenceSettings(workers=0), cache_dir=tmp_path, progress=False)
    assert not first.reused and first.path.exists()
    records = json.loads(first.path.read_text())
    assert records and set(records[0]) == {"image_id", "category_id", "bbox", "score"}
    again = cached_detections(det, "sha-a", gt, InferenceSettings(workers=0), cache_dir=tmp_path, progress=False)
    assert again.reused and again.path == first.path and len(again.detections) == len(first.detections)
    other = cached_detections(det, "sha-b", gt, InferenceSettings(workers=0), cache_dir=tmp_path, progress=False)
    assert not other.reused and other.path != first.path
    # a damaged cache entry is recomputed, not trusted
    first.path.write_text("[{")
    fixed = cached_detections(det, "sha-a", gt, InferenceSettings(workers=0), cache_dir=tmp_path, progress=False)
    assert not fixed.reused and len(fixed.detections) == len(first.detections)


def test_failed_run_keeps_finished_images_and_resumes(gt, tmp_path, monkeypatch):
    det = random_detector()
    calls = {"n": 0}
    original = det.detect

    def flaky(images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return original(images)

    monkeypatch.setattr(det, "detect", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cached_detections(det, "sha", gt, InferenceSettings(batch_size=2, workers=0), cache_dir=tmp_path, progress=False)
    chunks = list((tmp_path / "detections").glob("*.partial/chunk-*.json"))
    assert len(chunks) == 1  # saved once, on the failure
    finished = json.loads(chunks[0].read_text())["results"]
    assert len(finished) >= 2
    done_before = calls["n"]
    result = cached_detections(det, "sha", gt, InferenceSettings(batch_size=2, workers=0), cache_dir=tmp_path, progress=False)
    assert not list((tmp_path / "detections").glob("*.partial*"))
    assert calls["n"] - done_before < len(gt.image_ids)  # the finished images were not redone
    fresh = cached_detections(random_detector(), "other", gt, InferenceSettings(workers=0), cache_dir=tmp_path / "x", progress=False)
    assert len(result.detections) == len(fresh.detections)


def test_precision_checks():
    det = random_detector()
    with pytest.raises(GradlensError, match="needs a CUDA device"):
        InferenceSettings(precision="fp16").check(torch.device("cpu"))
    with pytest.raises(GradlensError, match="Unknown precision"):
        InferenceSettings(precision="fp8").check(torch.device("cpu"))
    InferenceSettings(precision="bf16").check(torch.device("cpu"))
    assert det is not None


def test_loss_of_an_image_does_not_depend_on_its_batch():
    det = random_detector().double()  # float64: the same function; float32's order of sums in a batch is the CPU's
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 100, 140, generator=g, dtype=torch.float64),
              torch.rand(3, 100, 150, generator=g, dtype=torch.float64)]  # same padded canvas
    assert padded_size(100, 140, det.preprocess) == padded_size(100, 150, det.preprocess)
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no ground truth
    ]
    together = det.image_losses(images, targets)
    for i in range(2):
        alone = det.image_losses([images[i]], [targets[i]])
        for k in together:
            assert torch.allclose(together[k][i], alone[k][0], rtol=1e-10, atol=1e-12)
    assert together["bbox_regression"][1] == 0  # nothing to regress without objects
    # the loss reaches the original pixels, through resize and normalisation
    x = images[0].clone().requires_grad_()
    loss = det.image_losses([x], targets[:1])
    (grad,) = torch.autograd.grad(loss["classification"].sum() + loss["bbox_regression"].sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0


def test_records_keep_boxes_clipped_to_zero_area_and_drop_placeholder_labels():
    """As mmdetection's results2json and torchvision's COCO evaluation keep them; they match nothing."""
    from gradlens.inference import detection_records

    out = {"boxes": torch.tensor([[0.0, 5.0, 0.0, 9.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0]]),
           "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 1, 2])}
    records = detection_records(7, out, [1, 3, None])
    assert [r["bbox"] for r in records] == [[0.0, 5.0, 0.0, 4.0], [1.0, 2.0, 2.0, 2.0]]
    assert [r["category_id"] for r in records] == [1, 3]
