"""gradlens' total loss for torchvision's Faster and Mask R-CNN: the expectation of the sampled training loss.

References, all torchvision's own code path: the model's training-mode ``forward(images, targets)`` (its
``BalancedPositiveNegativeSampler`` drawing with ``torch.randperm``), averaged over seeded draws; the expected
terms and input gradient must lie within 3 standard errors of that Monte-Carlo mean. With samplers whose ``num``
exceeds every candidate, the official loss draws every candidate and must equal gradlens' exactly (float64).
Small networks (a two-layer backbone, one pyramid level) keep the hundreds of official passes fast.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from gradlens.errors import GradlensError
from gradlens.models.detectors.adapter import LossDictDetector, mode_view
from gradlens.models.detectors.rcnn import ExpectedLossRCNN
from gradlens.models.detectors.sampling import balanced_draw
from tests.monte_carlo import assert_expectation_is_the_monte_carlo_mean

CATEGORIES = [None, {"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]


class TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.out_channels = 16

    def forward(self, x):
        return OrderedDict([("0", self.body(x))])


def tiny(kind: str, rpn_num: int, roi_num: int) -> nn.Module:
    torch.manual_seed(0)
    common = dict(rpn_anchor_generator=AnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
                  box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(16 * 7 * 7, 32),
                  box_predictor=FastRCNNPredictor(32, 4), min_size=96, max_size=128,
                  rpn_batch_size_per_image=rpn_num, box_batch_size_per_image=roi_num,
                  rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=120)
    if kind == "faster":
        model = FasterRCNN(TinyBackbone(), **common)
    else:
        model = MaskRCNN(TinyBackbone(), mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
                         mask_head=MaskRCNNHeads(16, (16,), 1), mask_predictor=MaskRCNNPredictor(16, 16, 4), **common)
    with torch.no_grad():  # objectness spread out, so proposals and their labels vary
        model.rpn.head.cls_logits.weight.mul_(20)
    return model.double()


def scene():
    torch.manual_seed(1)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, dtype=torch.float64), size=(96, 128),
                                            mode="bilinear", align_corners=False)[0]
    boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 120.0, 70.0], [30.0, 50.0, 70.0, 90.0]],
                         dtype=torch.float64)
    masks = torch.zeros(3, 96, 128, dtype=torch.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
        m[y1:y2, x1 + (x2 - x1) // 4:x2] = 1  # not the whole box: the mask targets differ from the box
    return image, {"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "masks": masks}


def official(model, image, target, seed: int, directions):
    """One draw of torchvision's own training loss and its input gradient, projected on ``directions``."""
    torch.manual_seed(seed)
    x = image.clone().requires_grad_(True)
    losses = mode_view(model, training=True)([x], [target])
    total = sum(losses.values())
    (grad,) = torch.autograd.grad(total, x)
    return {k: float(v.detach()) for k, v in losses.items()}, torch.stack([(grad * d).sum() for d in directions])


def expected(model, image, target, directions):
    det = ExpectedLossRCNN(model, CATEGORIES)
    x = image.clone().requires_grad_(True)
    terms = det.image_losses([x], [target])
    (grad,) = torch.autograd.grad(sum(t.sum() for t in terms.values()), x)
    return {k: float(v.detach()) for k, v in terms.items()}, torch.stack([(grad * d).sum() for d in directions]), grad


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_expected_loss_and_gradient_match_the_monte_carlo_mean(kind):
    model = tiny(kind, rpn_num=8, roi_num=12)
    image, target = scene()
    if kind == "faster":
        target = {k: v for k, v in target.items() if k != "masks"}
    assert_expectation_is_the_monte_carlo_mean(lambda directions: expected(model, image, target, directions),
                                               lambda seed, directions: official(model, image, target, seed, directions),
                                               image.shape, draws=400)


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_every_candidate_drawn_gives_the_official_loss_exactly(kind):
    model = tiny(kind, rpn_num=10**6, roi_num=10**6)
    image, target = scene()
    directions = [torch.randn(image.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))]
    terms, projected, _ = expected(model, image, target, directions)
    for seed in (0, 1):  # any draw is the whole set
        theirs, their_projection = official(model, image, target, seed, directions)
        for name, value in terms.items():
            # torchvision's RPN labels are float32 whatever the model's dtype, so its objectness loss comes out in
            # float32 (rounding ~6e-8 per term, a mean over ~1,700 anchors): held to 1e-6; every other term in float64
            rel = 1e-6 if name == "loss_objectness" else 1e-12
            assert theirs[name] == pytest.approx(value, rel=rel, abs=1e-15), name
        assert float(their_projection[0]) == pytest.approx(float(projected[0]), rel=1e-10)


def test_balanced_draw_counts():
    assert balanced_draw(10, 1000, 256, 0.5) == balanced_draw(10, 1000, 256, 0.5)
    d = balanced_draw(10, 1000, 256, 0.5)
    assert (d.positives, d.negatives, d.p_positive, d.p_negative) == (10, 246, 1.0, 246 / 1000)
    d = balanced_draw(300, 1000, 512, 0.25)  # more positives than int(512 * 0.25) = 128
    assert (d.positives, d.negatives) == (128, 384) and d.p_positive == 128 / 300
    d = balanced_draw(0, 5, 256, 0.5)  # no positive: negatives fill the sample, all of them here
    assert (d.positives, d.negatives, d.p_positive, d.p_negative) == (0, 5, 0.0, 1.0)


def test_the_plain_adapter_still_refuses_samplers_and_points_here():
    with pytest.raises(GradlensError, match="ExpectedLossRCNN"):
        LossDictDetector(tiny("faster", 32, 24), CATEGORIES)
    with pytest.raises(GradlensError, match="Faster or Mask R-CNN"):
        ExpectedLossRCNN(nn.Conv2d(3, 3, 1), CATEGORIES)


def tiny_mask_rcnn_for(categories) -> MaskRCNN:
    torch.manual_seed(3)
    return MaskRCNN(TinyBackbone(), rpn_anchor_generator=AnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
                    box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(16 * 7 * 7, 32),
                    box_predictor=FastRCNNPredictor(32, len(categories)), min_size=64, max_size=96,
                    mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2), mask_head=MaskRCNNHeads(16, (16,), 1),
                    mask_predictor=MaskRCNNPredictor(16, 16, len(categories)), box_score_thresh=0.01,
                    rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=120)


def test_masks_come_from_the_annotations_in_box_order(synthetic_gt):
    from gradlens.attribution.targets import image_targets

    image_id = int(synthetic_gt.image_ids[0])
    categories = [{"id": c, "name": n} for c, n in sorted(synthetic_gt.category_names.items())]
    plain = image_targets(synthetic_gt, image_id, categories)
    with_masks = image_targets(synthetic_gt, image_id, categories, masks=True)
    assert plain.masks is None and "masks" not in plain.as_dict()
    info = synthetic_gt.image_info(image_id)
    assert with_masks.masks.shape == (len(with_masks.boxes), info["height"], info["width"])
    for mask, box, ann_id in zip(with_masks.masks, with_masks.boxes, with_masks.ann_ids):
        assert torch.equal(mask, torch.from_numpy(synthetic_gt.coco.annToMask(synthetic_gt.coco.anns[ann_id])))
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(ys) and xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]


def test_select_gradients_area_curve_with_a_mask_rcnn(tmp_path):
    """The whole Python pipeline with a (tiny) Mask R-CNN as A: its maps are those of the expected loss, masks
    included, and equal to the detector's own image_losses gradient."""
    import gradlens
    from gradlens.attribution.targets import image_targets
    from gradlens.data.synthetic import CATEGORIES as SYNTHETIC

    coco = gradlens.make_synthetic_coco(tmp_path / "coco", num_images=5, seed=4, min_side=64, max_side=96,
                                        progress=False)
    categories = [None, *[dict(c) for c in SYNTHETIC]]
    det = ExpectedLossRCNN(tiny_mask_rcnn_for(categories).eval(), categories, name="tiny-mask-rcnn")
    assert det.needs_masks
    run = gradlens.DetectorRun(device="cpu", cache_dir=tmp_path / "cache", batch_size=2, workers=0, detectors={"a": det})
    workdir = tmp_path / "run"
    result = gradlens.run_selection(det, [gradlens.bundled_detector_path("convnext")], coco=coco, workdir=workdir,
                                    top=3, detector_run=run)
    assert len(result.selection) == 3
    curve = gradlens.run_area_curve(workdir, thresholds=20, bootstrap=0, detector_run=run, progress=False)
    assert curve.models[0].detector is det and curve.models[0].run.computed == 3
    gt = gradlens.load_ground_truth(coco)
    image_id = int(result.selection["image_id"].iloc[0])
    target = image_targets(gt, image_id, det.categories, masks=True).as_dict()
    assert "masks" in target
    stored = curve.models[0].store.read(image_id)
    from gradlens.data.images import read_image, to_tensor
    x = to_tensor(read_image(gt.image_path(image_id))).requires_grad_(True)
    terms = det.image_losses([x], [target])
    assert "loss_mask" in terms
    (grad,) = torch.autograd.grad(sum(t.sum() for t in terms.values()), x)
    magnitude = grad.abs().amax(0)
    assert stored.shape == magnitude.shape
    assert torch.allclose(torch.as_tensor(stored, dtype=torch.float32), magnitude, rtol=2e-3, atol=2e-3 * float(magnitude.max()))


@pytest.mark.parametrize("arch", ["torchvision_fasterrcnn_resnet50_fpn", "torchvision_maskrcnn_resnet50_fpn_v2"])
def test_torchvision_state_dicts_load_and_detect_as_torchvision(arch, tmp_path):
    """A state dict of torchvision's own builder loads with --arch; detections are the model's own eval output,
    and with samplers that draw every candidate the loss is torchvision's training loss."""
    import torchvision.models.detection as detection

    from gradlens.models.detectors.rcnn import TORCHVISION_TWO_STAGE
    from gradlens.models.formats.checkpoints import load_detector

    torch.manual_seed(5)
    reference = getattr(detection, TORCHVISION_TWO_STAGE[arch])(weights=None, weights_backbone=None, num_classes=5,
                                                                min_size=96, max_size=128).eval()
    with torch.no_grad():
        reference.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([-2.0, 1.0, 0.5, 0.0, 0.3]))
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    det = load_detector(path, arch=arch)
    assert det.arch_name == f"{arch}+expected-sampler-loss" and det.num_classes == 5
    assert det.needs_masks == ("maskrcnn" in arch) and det.categories[0]["id"] is None
    det.model.transform.min_size, det.model.transform.max_size = (96,), 128  # the small test scale, as the reference
    image, target = scene()
    image = image.float()
    target = {k: v.float() if k == "boxes" else v for k, v in target.items()}
    target["labels"] = torch.tensor([1, 2, 4])
    with torch.no_grad():
        ours, theirs = det.detect([image])[0], reference([image])[0]
    assert len(theirs["boxes"]) > 0
    assert all(torch.equal(ours[k], theirs[k]) for k in ("boxes", "scores", "labels"))
    for model in (det.model, reference):
        model.rpn.fg_bg_sampler.batch_size_per_image = 10**6
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 10**6
    with torch.no_grad():
        expected_terms = det.image_losses([image], [target if det.needs_masks else {k: v for k, v in target.items() if k != "masks"}])
        official_terms = mode_view(reference, training=True)([image], [target if det.needs_masks else {k: v for k, v in target.items() if k != "masks"}])
    assert set(expected_terms) == set(official_terms)
    for name, value in official_terms.items():  # float32: sums of up to ~2,000 terms in another order
        assert float(expected_terms[name][0]) == pytest.approx(float(value), rel=2e-5, abs=1e-6), name
    with pytest.raises(GradlensError, match="does not fit"):
        other = "torchvision_fasterrcnn_resnet50_fpn_v2" if arch.endswith("_fpn") else "torchvision_maskrcnn_resnet50_fpn"
        load_detector(path, arch=other)


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_object_parts_add_up_and_follow_the_matching(kind):
    """Each candidate's term belongs to the object it is matched to (negatives: the background); the parts add
    up to the total, and ``image_losses`` with ``object = j`` is part ``1 + j``."""
    import gradlens

    model = tiny(kind, rpn_num=8, roi_num=12)
    image, target = scene()
    if kind == "faster":
        target = {k: v for k, v in target.items() if k != "masks"}
    det = ExpectedLossRCNN(model, CATEGORIES)
    total = det.image_losses([image], [target])
    (parts,) = det.object_losses([image], [target])
    assert set(parts) == set(total)
    for name, split in parts.items():
        assert split.shape == (1 + len(target["boxes"]),)
        assert float(split.sum()) == pytest.approx(float(total[name][0]), rel=1e-12, abs=1e-15), name
    assert float(parts["loss_rpn_box_reg"][0]) == 0.0 and float(parts["loss_box_reg"][0]) == 0.0  # no box for background
    assert float(parts["loss_classifier"][1:].min()) > 0  # every object owns its ground-truth proposal at least
    for j in (-1, 1):
        one = det.image_losses([image], [{**target, "object": j}])
        assert all(float(one[name][0]) == pytest.approx(float(parts[name][j + 1]), rel=1e-12, abs=1e-15) for name in parts)
    # the pipeline's per-object gradients (one forward pass per image) equal autograd of each part
    grads = gradlens.input_gradients(det, [image, image], [{**target, "object": 0}, {**target, "object": 2}])
    for grad, j in zip(grads, (0, 2)):
        x = image.clone().requires_grad_(True)
        (mine,) = det.object_losses([x], [target])
        (expected_grad,) = torch.autograd.grad(sum(v[j + 1] for v in mine.values()), x)
        assert torch.allclose(grad.double(), expected_grad, rtol=1e-6, atol=1e-9 * float(expected_grad.abs().max()))
