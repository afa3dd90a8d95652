"""Bring your own detector: a torchvision-convention model wrapped in gradlens.LossDictDetector.

The wrapped model here is torchvision's own ``FCOS`` class on a tiny backbone (batch norm with non-trivial running
statistics and a dropout, so that training and inference mode differ), small enough for float64 comparisons.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator

import gradlens
from gradlens.attribution.compute import map_store_key
from gradlens.attribution.methods import AttributionConfig
from gradlens.data.synthetic import CATEGORIES
from gradlens.errors import GradlensError
from gradlens.inference import InferenceSettings, cache_key
from gradlens.models.detectors.adapter import keeps_inference_mode, mode_view


class TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.5),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
        )
        self.out_channels = 32

    def forward(self, x):
        return OrderedDict([("0", self.body(x))])


def tiny_fcos(seed=0, dtype=torch.float64, num_classes=len(CATEGORIES)) -> FCOS:
    torch.manual_seed(seed)
    model = FCOS(TinyBackbone(), num_classes, min_size=64, max_size=96, score_thresh=0.05,
                 anchor_generator=AnchorGenerator(((32,),), ((1.0,),)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # running statistics unlike a batch's: eval and train mode differ
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        model.head.classification_head.cls_logits.bias.fill_(0.5)  # it detects something
    return model.to(dtype)


def wrap(model, **kwargs) -> gradlens.LossDictDetector:
    categories = kwargs.pop("categories", [dict(c) for c in CATEGORIES])
    return gradlens.LossDictDetector(model, categories, name="tiny-fcos", **kwargs)


def scene(h, w, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g, dtype=torch.float64).to(dtype)
    boxes = torch.tensor([[0.1 * w, 0.15 * h, 0.6 * w, 0.7 * h], [0.5 * w, 0.4 * h, 0.95 * w, 0.9 * h]], dtype=dtype)
    return image, {"boxes": boxes, "labels": torch.tensor([1, 3])}


def own_loss(model, image, target) -> dict:
    """The wrapped model's own training-mode loss dict, with normalisation and dropout layers in eval mode."""
    model.train()
    for m in model.modules():
        if keeps_inference_mode(m):
            m.eval()
    try:
        return model([image], [target])
    finally:
        model.eval()


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and message.count(". ") <= 1


def test_image_losses_equal_the_models_own_training_loss():
    model = tiny_fcos()
    det = wrap(model)
    image, target = scene(50, 70, seed=1)
    ours = det.image_losses([image], [target])
    theirs = own_loss(model, image, target)
    assert list(ours) == list(theirs) == ["classification", "bbox_regression", "bbox_ctrness"]
    for name in theirs:
        assert ours[name].shape == (1,) and ours[name].dtype == torch.float64
        torch.testing.assert_close(ours[name][0], theirs[name], rtol=0, atol=1e-12)
    # batch norm and dropout really were in inference mode: plain train mode gives another (random) loss
    plain = copy.deepcopy(model).train()([image], [target])  # (a copy: train mode updates the running statistics)
    assert not torch.allclose(plain["classification"], theirs["classification"])
    # the model's own flags are not touched, whatever mode it is in
    model.train()
    again = det.image_losses([image], [target])
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    assert gradlens.total_loss(det, ours).shape == (1,)


def test_detect_equals_the_models_eval_output():
    model = tiny_fcos().eval()
    det = wrap(model)
    images = [scene(50, 70, seed=2)[0], scene(64, 40, seed=3)[0]]
    with torch.no_grad():
        theirs = [model([im])[0] for im in images]
    ours = det.detect(images)
    assert all(len(o["boxes"]) for o in ours), "the tiny FCOS should detect something"
    for o, t in zip(ours, theirs):
        assert set(o) == {"boxes", "scores", "labels"}
        for k in o:
            assert torch.equal(o[k], t[k])
    detections, losses = det.detect_with_losses(images, [scene(50, 70, 2)[1], scene(64, 40, 3)[1]])
    assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(detections, ours)) and losses["classification"].shape == (2,)


def test_gradient_equals_autograd_on_the_wrapped_model():
    model = tiny_fcos()
    det = wrap(model)
    image, target = scene(50, 70, seed=4)
    (ours,) = gradlens.input_gradients(det, [image], [target])
    x = image.clone().requires_grad_(True)
    losses = own_loss(model, x, target)
    (theirs,) = torch.autograd.grad(sum(losses.values()), x)
    assert ours.dtype == torch.float64 and ours.shape == image.shape and theirs.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
    assert all(p.requires_grad for p in model.parameters())  # restored after the gradient pass


def test_each_images_loss_is_its_own():
    det = wrap(tiny_fcos())
    a, ta = scene(50, 70, seed=5)
    b, tb = scene(90, 60, seed=6)  # another size: a batch of the model itself would pad a to b's canvas
    alone = det.image_losses([a], [ta])
    together = det.image_losses([a, b], [ta, tb])
    reversed_ = det.image_losses([b, a], [tb, ta])
    for name in alone:
        assert torch.equal(together[name][0], alone[name][0]) and torch.equal(reversed_[name][1], alone[name][0])
    grads = gradlens.input_gradients(det, [a, b], [ta, tb])
    (grad_alone,) = gradlens.input_gradients(det, [a], [ta])
    torch.testing.assert_close(grads[0], grad_alone, rtol=1e-12, atol=1e-15)


def test_identity_changes_with_any_weight_or_setting(synthetic_gt):
    model = tiny_fcos()
    det = wrap(model)
    first = det.identity_sha256
    assert first == wrap(tiny_fcos()).identity_sha256  # the same weights, the same identity
    key = map_store_key(det, det.identity_sha256, synthetic_gt, AttributionConfig())
    cached = cache_key(det.identity_sha256, synthetic_gt, det, InferenceSettings())
    with torch.no_grad():
        model.head.regression_head.bbox_reg.weight[0, 0, 0, 0] += 1e-6
    second = det.identity_sha256
    assert second != first
    assert map_store_key(det, second, synthetic_gt, AttributionConfig()) != key
    assert cache_key(second, synthetic_gt, det, InferenceSettings()) != cached
    model.score_thresh = 0.3  # a setting that changes detections, not a weight
    assert det.identity_sha256 not in (first, second)
    model.bn_stats = None  # an attribute that is no setting of the computation may be added freely...
    with torch.no_grad():
        model.backbone.body[1].running_var[0] += 1.0  # ...but a buffer counts
    assert det.identity_sha256 != second


def test_per_object_maps_are_refused_in_one_sentence(synthetic_gt):
    det = wrap(tiny_fcos())
    image, target = scene(50, 70, seed=7)
    with pytest.raises(gradlens.NoObjectSplitError) as caught:
        det.object_losses([image], [target])
    assert isinstance(caught.value, GradlensError) and one_sentence(str(caught.value))
    assert "--target object" in str(caught.value)
    with pytest.raises(gradlens.NoObjectSplitError) as through_api:  # what --target object computes
        gradlens.input_gradients(det, [image], [{**target, "object": 0}])
    assert str(through_api.value) == str(caught.value)
    image_id = next(i for i in synthetic_gt.image_ids if len(gradlens.image_targets(synthetic_gt, i, det.categories).boxes))
    targets = gradlens.image_targets(synthetic_gt, image_id, det.categories)
    with pytest.raises(gradlens.NoObjectSplitError):
        gradlens.gradient_maps(det, [torch.rand(3, 60, 80, dtype=torch.float64)], [targets.for_object(0)])


class NoTargets(nn.Module):
    def forward(self, images):
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]


class TensorLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, images, targets=None):
        return torch.stack([self.conv(im[None]).mean() for im in images])  # a tensor, not a dict of terms


def test_models_that_break_the_convention_are_refused_in_one_sentence():
    with pytest.raises(GradlensError) as no_targets:  # at wrap time
        gradlens.LossDictDetector(NoTargets(), [dict(c) for c in CATEGORIES])
    assert one_sentence(str(no_targets.value)) and "forward" in str(no_targets.value)
    det = gradlens.LossDictDetector(TensorLoss(), [dict(c) for c in CATEGORIES])
    image, target = scene(20, 30, seed=8, dtype=torch.float32)
    with pytest.raises(GradlensError) as tensor_loss:  # at the first use
        det.image_losses([image], [target])
    assert one_sentence(str(tensor_loss.value)) and "not a dict of named loss tensors" in str(tensor_loss.value)
    with pytest.raises(GradlensError) as not_detections:
        det.detect([image])
    assert one_sentence(str(not_detections.value))
    with pytest.raises(GradlensError) as through_api:
        gradlens.input_gradients(det, [image], [target])
    assert str(through_api.value) == str(tensor_loss.value)

    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

    class Sampled(TensorLoss):  # as torchvision's Faster R-CNN: a training loss on a random sample
        def __init__(self):
            super().__init__()
            self.fg_bg_sampler = BalancedPositiveNegativeSampler(256, 0.5)

    with pytest.raises(GradlensError) as sampled:
        gradlens.LossDictDetector(Sampled(), [dict(c) for c in CATEGORIES])
    assert one_sentence(str(sampled.value)) and "random sample" in str(sampled.value)
    with pytest.raises(GradlensError) as bad_categories:
        gradlens.LossDictDetector(TensorLoss(), [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    assert one_sentence(str(bad_categories.value))


def test_labels_beyond_the_categories_are_refused():
    det = wrap(tiny_fcos(num_classes=len(CATEGORIES)), categories=[dict(c) for c in CATEGORIES[:2]])
    with pytest.raises(GradlensError, match="categories list has 2 labels"):
        det.detect([scene(50, 70, seed=9)[0]])


def test_mode_view_shares_weights_and_keeps_flags():
    model = tiny_fcos().eval()
    view = mode_view(model, training=True)
    assert view.training and view.head.training and not view.backbone.body[1].training  # batch norm: inference
    assert not view.backbone.body[3].training and not view.transform.training  # dropout, the random resize
    assert view.head.classification_head.cls_logits.weight is model.head.classification_head.cls_logits.weight
    assert not any(m.training for m in model.modules())
    assert torchvision_categories_are_coco_ids()


def torchvision_categories_are_coco_ids() -> bool:
    cats = gradlens.torchvision_coco_categories()
    return (len(cats) == 91 and cats[1] == {"id": 1, "name": "person"} and cats[0]["id"] is None
            and cats[12]["id"] is None and cats[90] == {"id": 90, "name": "toothbrush"})


def test_select_gradients_area_curve_with_a_detector_object(tmp_path):
    """The whole Python pipeline with an in-memory detector as A and the bundled ConvNeXt checkpoint as B."""
    coco = gradlens.make_synthetic_coco(tmp_path / "coco", num_images=6, seed=11, min_side=64, max_side=96,
                                        progress=False)
    fcos = wrap(tiny_fcos(dtype=torch.float32))
    with pytest.raises(GradlensError, match="LossDictDetector"):  # an unwrapped model: one sentence naming the adapter
        gradlens.run_selection(fcos.model, [gradlens.bundled_detector_path("convnext")], coco=coco, workdir=tmp_path)
    run = gradlens.DetectorRun(device="cpu", cache_dir=tmp_path / "cache", batch_size=2, workers=0,
                               detectors={"a": fcos})
    workdir = tmp_path / "run"
    result = gradlens.run_selection(fcos, [gradlens.bundled_detector_path("convnext")], coco=coco, workdir=workdir,
                                    top=3, detector_run=run)
    a = result.manifest["models"][0]
    assert a["kind"] == "detector" and a["label"] == "tiny-fcos" and a["source"] is None
    assert a["sha256"] == fcos.identity_sha256 and len(result.selection) == 3
    curve = gradlens.run_area_curve(workdir, thresholds=20, bootstrap=0, detector_run=run, progress=False)
    assert sorted(curve.table["role"].unique()) == ["a", "b"] and curve.models[0].detector is fcos
    assert curve.models[0].checkpoint is None and curve.models[0].run.computed == 3
    again = gradlens.run_area_curve(workdir, thresholds=20, bootstrap=0, detector_run=run, progress=False)
    assert again.models[0].run.computed == 0  # the same object: its maps are reused
    with pytest.raises(GradlensError) as randomise:  # re-initialising needs a checkpoint file to load a copy from
        gradlens.run_faithfulness(workdir, detector_run=run, randomise=True, progress=False)
    assert one_sentence(str(randomise.value)) and "detector object" in str(randomise.value)

    recorded = gradlens.DetectorRun.recorded(workdir, device="cpu")  # no object given for A: one sentence
    with pytest.raises(GradlensError) as missing:
        gradlens.workdir_maps(workdir, detector_run=recorded)
    assert one_sentence(str(missing.value)) and "detectors={'a': detector}" in str(missing.value)
    with torch.no_grad():
        fcos.model.head.classification_head.cls_logits.bias.add_(0.1)  # other weights than select scored
    with pytest.raises(GradlensError, match="not the one select scored"):
        gradlens.workdir_maps(workdir, detector_run=run)
