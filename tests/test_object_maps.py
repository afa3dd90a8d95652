"""Per-object attribution: the parts add up to the total loss; each object's map is autograd of its own loss."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from gradlens.attribution.compute import map_store_key
from gradlens.attribution.methods import AttributionConfig, frozen_inference_mode
from gradlens.attribution.objects import compute_object_maps, object_losses
from gradlens.attribution.store import MapStore
from gradlens.attribution.targets import image_targets
from gradlens.data.images import read_image, to_tensor
from gradlens.errors import GradlensError
from gradlens.models.bundled import bundled_detector_path
from gradlens.models.formats.checkpoints import load_detector
from gradlens.models.registry import with_preprocess
from tests.test_detector_cli import run


@pytest.fixture(scope="module")
def cednet():
    return load_detector(bundled_detector_path("cednet"))


def _float64(det):
    """A float64 copy of ``det`` that casts the float32 images it is given (differentiably: gradients reach them).

    For checks that two ways of computing are the same function: in float32 their different orders of sums (shared
    forward pass, batch threads, index_add vs sum) move the last bits, and can tip a near-zero ReLU input, differently
    on every CPU; in float64 they agree to ~1e-15.
    """
    det = copy.deepcopy(det).double()
    prepare = det.prepare
    det.prepare = lambda images: prepare([im.double() for im in images])
    return det


def _crowded(gt, detector, least=3):
    """Images with several objects (the synthetic scenes have overlapping ones)."""
    ids = [int(i) for i in gt.image_ids if len(image_targets(gt, int(i), detector.categories).ann_ids) >= least]
    assert len(ids) >= 2
    return ids


@pytest.mark.parametrize("framework", ["mmdetection", "torchvision"])
def test_the_objects_and_the_background_add_up_to_the_total_loss(cednet, synthetic_gt, framework):
    det = cednet if framework == "mmdetection" else with_preprocess(load_detector(bundled_detector_path("cednet")), convention="torchvision")
    assert det.framework == framework
    for image_id in _crowded(synthetic_gt, det)[:3] + [int(synthetic_gt.image_ids[0])]:
        image = to_tensor(read_image(synthetic_gt.image_path(image_id))).double()
        det64 = det.double()
        targets = image_targets(synthetic_gt, image_id, det.categories)
        with torch.no_grad():
            losses = det64.image_losses([image], [targets.as_dict()])
            total = float(losses["classification"][0] + losses["bbox_regression"][0])
            background, objects = object_losses(det64, image, targets)
            # each part through image_losses' own "object" entry too
            one = [det64.image_losses([image], [targets.for_object(j)]) for j in range(-1, len(targets.ann_ids))]
        assert len(objects) == len(targets.ann_ids)
        assert float(background + objects.sum()) == pytest.approx(total, rel=1e-12)
        singles = [float(o["classification"][0] + o["bbox_regression"][0]) for o in one]
        assert np.allclose(singles, [float(background)] + objects.tolist(), rtol=1e-12)
        assert (objects >= 0).all() and float(background) > 0
    det.float()


def test_an_image_without_objects_is_all_background(cednet, gt_file):
    from gradlens.data.coco import load_ground_truth

    path = gt_file([{"id": 1, "width": 64, "height": 48, "file_name": "x.jpg"}], [])
    gt = load_ground_truth(path)
    targets = image_targets(gt, 1, cednet.categories)
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))
    det = _float64(cednet)  # float64: another summation order of the same terms
    with torch.no_grad():
        background, objects = object_losses(det, image, targets)
        losses = det.image_losses([image], [targets.as_dict()])
    assert objects.numel() == 0
    assert float(background) == pytest.approx(float(losses["classification"][0]), rel=1e-10)


def test_object_maps_equal_autograd_of_each_objects_loss(cednet, synthetic_gt, tmp_path):
    # the run gets float32 pixels and stores float32 maps: three roundings (the gradient at the pixels, map / max, times
    # max on reading), so a stored value is within 3 * 2**-24 of the float64 gradient's (rtol 2**-21)
    det = _float64(cednet)
    ids = _crowded(synthetic_gt, det)[:2]
    config = AttributionConfig(target="object")
    store = MapStore(tmp_path / "objects", map_store_key(det, "sha", synthetic_gt, config), map_dtype="float32")
    run_ = compute_object_maps(det, synthetic_gt, ids, store, config, batch_size=3, progress=False)
    expected_ids = [a for i in ids for a in image_targets(synthetic_gt, i, det.categories).ann_ids]
    assert run_.computed == len(expected_ids) and sorted(store.image_ids()) == sorted(expected_ids)
    image_id = ids[0]
    image = to_tensor(read_image(synthetic_gt.image_path(image_id))).double()
    targets = image_targets(synthetic_gt, image_id, det.categories)
    grads = []
    with frozen_inference_mode(det):
        for j, ann in enumerate(targets.ann_ids):
            x = image.clone().requires_grad_(True)
            losses = det.image_losses([x], [targets.for_object(j)])
            (g,) = torch.autograd.grad(losses["classification"].sum() + losses["bbox_regression"].sum(), x)
            grads.append(g)
            expected = g.abs().amax(dim=0).numpy()
            assert np.allclose(store.read(ann), expected, rtol=2**-21, atol=1e-10 * float(expected.max())), ann
        x = image.clone().requires_grad_(True)
        losses = det.image_losses([x], [targets.for_object(-1)])
        (background,) = torch.autograd.grad(losses["classification"].sum(), x)
        x = image.clone().requires_grad_(True)
        losses = det.image_losses([x], [targets.as_dict()])
        (total,) = torch.autograd.grad(losses["classification"].sum() + losses["bbox_regression"].sum(), x)
    # the gradient is linear: the objects' and the background's gradients add up to the image's
    assert torch.allclose(sum(grads) + background, total, rtol=1e-10, atol=1e-10 * float(total.abs().max()))
    again = compute_object_maps(det, synthetic_gt, ids, store, config, batch_size=3, progress=False)
    assert again.computed == 0 and again.reused == len(expected_ids)


def test_object_target_from_the_command_line(synthetic_coco, synthetic_gt, tmp_path, capsys):
    det = load_detector(bundled_detector_path("cednet"))
    image_id = _crowded(synthetic_gt, det)[0]
    anns = image_targets(synthetic_gt, image_id, det.categories).ann_ids
    out = tmp_path / "objects"
    args = ["gradients", "--model", bundled_detector_path("cednet"), "--image-ids", image_id, "--target", "object",
            "--out", out, "--ann", synthetic_coco.ann, "--images", synthetic_coco.images, "--device", "cpu", "--no-progress"]
    code, text, err = run(args, capsys)
    assert code == 0, err
    assert f"{len(anns)} object maps computed" in text
    assert sorted(int(p.stem) for p in out.glob("*.npz")) == sorted(anns)
    assert json.loads((out / "store.json").read_text())["key"]["attribution"]["target"] == "object"
    code, text, err = run(args, capsys)
    assert code == 0 and f"0 object maps computed, {len(anns)} reused" in text
    # a folder of image maps is not mixed with object maps
    code, text, err = run(args[:5] + args[7:], capsys)
    assert code != 0 and "other settings" in err


def test_total_target_keeps_the_store_key_of_earlier_versions():
    assert "target" not in AttributionConfig().to_dict() and AttributionConfig(target="object").to_dict()["target"] == "object"
    with pytest.raises(GradlensError):
        AttributionConfig(target="pixel").check()


def test_a_resumed_or_partial_run_gives_the_same_object_maps(cednet, synthetic_gt, tmp_path):
    ids = _crowded(synthetic_gt, cednet)[:3]
    config = AttributionConfig(target="object")
    key = map_store_key(cednet, "sha", synthetic_gt, config, batch_size=2)
    whole = MapStore(tmp_path / "whole", key, map_dtype="float32")
    compute_object_maps(cednet, synthetic_gt, ids, whole, config, batch_size=2, progress=False)
    part = MapStore(tmp_path / "part", key, map_dtype="float32")
    later = image_targets(synthetic_gt, ids[1], cednet.categories).ann_ids
    run_ = compute_object_maps(cednet, synthetic_gt, [ids[1]], part, config, batch_size=2, progress=False, plan_ids=ids)
    assert run_.reused == 0 and all(part.has(a) for a in later)
    for ann in later:  # one image asked for alone, planned as in the whole run: the very same maps
        assert np.array_equal(part.read(ann), whole.read(ann)), ann
    whole.path(later[0]).unlink()  # a run killed before this object's map was written
    again = compute_object_maps(cednet, synthetic_gt, ids, whole, config, batch_size=2, progress=False)
    assert again.computed == 1 and np.array_equal(whole.read(later[0]), part.read(later[0]))


def test_stored_object_maps_are_judged_by_the_decoded_image_and_damaged_ones_replaced(cednet, synthetic_coco,
                                                                                     synthetic_gt, tmp_path):
    from gradlens.data.coco import load_ground_truth

    ids = _crowded(synthetic_gt, cednet)[:2]
    data = json.loads(open(synthetic_coco.ann).read())
    for image in data["images"]:
        if image["id"] == ids[0]:
            image["width"] += 7  # the annotation file disagrees with the JPEG: maps have the decoded size
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    gt = load_ground_truth(ann, synthetic_coco.images)
    config = AttributionConfig(target="object")
    store = MapStore(tmp_path / "maps", map_store_key(cednet, "sha", gt, config, batch_size=2), map_dtype="float32")
    done = compute_object_maps(cednet, gt, ids, store, config, batch_size=2, progress=False)
    objects = sum(len(image_targets(gt, i, cednet.categories).ann_ids) for i in ids)
    assert done.computed == objects > 0
    again = compute_object_maps(cednet, gt, ids, store, config, batch_size=2, progress=False)
    assert (again.computed, again.reused, again.replaced) == (0, objects, 0)
    victim = image_targets(gt, ids[-1], cednet.categories).ann_ids[0]
    before = store.read(victim)
    store.path(victim).write_bytes(b"not a map")
    fixed = compute_object_maps(cednet, gt, ids, store, config, batch_size=2, progress=False)
    assert fixed.replaced == 1 and fixed.computed >= 1 and np.array_equal(store.read(victim), before)


def test_plain_object_gradients_share_one_forward_pass_per_image(cednet, synthetic_gt):
    from gradlens.attribution.methods import input_gradients

    det = _float64(cednet)  # float64: a shared forward pass and one per object are the same function
    ids = _crowded(synthetic_gt, det)[:2]
    images = {i: to_tensor(read_image(synthetic_gt.image_path(i))).double() for i in ids}
    targets = {i: image_targets(synthetic_gt, i, det.categories) for i in ids}
    entries = [(i, j) for j in range(len(targets[ids[0]].ann_ids)) for i in ids if j < len(targets[i].ann_ids)]
    entries.append((ids[1], -1))  # the background's part too
    passes = []
    hook = det.backbone.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0]))
    try:
        shared = input_gradients(det, [images[i] for i, _ in entries], [targets[i].for_object(j) for i, j in entries])
        assert passes == [1, 1]  # one forward pass per image, its objects interleaved with the other image's
    finally:
        hook.remove()
    passes.clear()
    hook = cednet.backbone.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0]))
    try:  # (only counted: float32 will do)
        input_gradients(cednet, [images[i].float() for i, _ in entries], [targets[i].for_object(j) for i, j in entries],
                        method="input_x_gradient", batch_size=len(entries))
        assert sum(passes) == len(entries)  # the other methods run a copy of the image per object
    finally:
        hook.remove()
    with frozen_inference_mode(det):
        for (i, j), got in zip(entries, shared):
            x = images[i].clone().requires_grad_(True)
            losses = det.image_losses([x], [targets[i].for_object(j)])
            (expected,) = torch.autograd.grad(losses["classification"].sum() + losses["bbox_regression"].sum(), x)
            assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max())), (i, j)
