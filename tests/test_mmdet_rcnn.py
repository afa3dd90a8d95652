"""mmdetection 2.x Mask R-CNN and Cascade Mask R-CNN (the CEDNet fork's two-stage detectors): the expected loss
over the samplers against a draw-by-draw reimplementation of mmdetection's ``forward_train`` (its
``RandomSampler`` drawing with ``torch.randperm``, the sampled RoIs through the heads, each loss as mmdetection
reduces it), finite differences, checkpoints, and the pipeline at reduced scale.

The reference below is written from mmdetection 2.28's code path (``RPNHead.forward_train`` / ``AnchorHead.loss``,
``StandardRoIHead.forward_train``, ``CascadeRoIHead.forward_train`` with ``refine_bboxes``, ``BBoxHead.loss``,
``FCNMaskHead.loss``, ``mask_target``), not from gradlens' expectation: it shares only the network, the
proposal step and the assigner, which other tests hold to upstream.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from gradlens.errors import CheckpointError
from gradlens.models.backbones.convnext import ConvNeXtBackbone
from gradlens.models.detectors.assign import MaxIoUAssigner, mmdet_box_overlaps
from gradlens.models.detectors.boxes import giou_loss
from gradlens.models.detectors.mmdet_rcnn import (
    CASCADE_CONFIG, EPS, STAGE_IOUS, STAGE_STDS, MMDetFPN, MMDetTwoStage, ProposalConfig, RCNNConfig, delta_decode,
    delta_encode)
from gradlens.models.detectors.mmdet_targets import nearest_rescale
from gradlens.models.preprocessing.transform import PreprocessConfig
from tests.monte_carlo import assert_expectation_is_the_monte_carlo_mean

PREPROCESS = PreprocessConfig(min_size=96, max_size=128, size_divisor=32, convention="mmcv")


def tiny(cascade: bool = False, rpn_num: int = 8, rcnn_num: int = 12) -> MMDetTwoStage:
    torch.manual_seed(0)
    body = ConvNeXtBackbone(depths=[1, 1, 1, 1], dims=[8, 16, 16, 16], out_indices=(0, 1, 2, 3), drop_path_rate=0.0)
    base = CASCADE_CONFIG if cascade else RCNNConfig()
    config = dataclasses.replace(base, rpn_num=rpn_num, rcnn_num=rcnn_num,
                                 rpn_train=ProposalConfig(nms_pre=300, max_per_img=60))
    det = MMDetTwoStage(body, 3, neck=MMDetFPN([8, 16, 16, 16], 16), cascade=cascade, preprocess=PREPROCESS,
                        config=config, channels=16, fc_channels=32)
    with torch.no_grad():
        for p in det.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        det.rpn_head.rpn_cls.weight.mul_(20)  # objectness spread out, so proposals and their labels vary
    return det.double().eval()


def scene():
    torch.manual_seed(1)
    image = F.interpolate(torch.rand(1, 3, 12, 16, dtype=torch.float64), size=(96, 128), mode="bilinear",
                          align_corners=False)[0]
    boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 120.0, 70.0], [30.0, 50.0, 70.0, 90.0]])
    masks = torch.zeros(3, 96, 128, dtype=torch.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
        m[y1:y2, x1 + (x2 - x1) // 4:x2] = 1  # not the whole box: the mask targets differ from the box
    return image, {"boxes": boxes, "labels": torch.tensor([0, 1, 2]), "masks": masks}


# -- mmdetection's forward_train, one draw -----------------------------------------------------------------


def random_sample(labels: torch.Tensor, num: int, pos_fraction: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``RandomSampler.sample`` on assigned labels (1 positive, 0 negative): ``randperm`` choices, as upstream."""
    pos = torch.nonzero(labels == 1).squeeze(1)
    expected_pos = int(num * pos_fraction)
    if pos.numel() > expected_pos:
        pos = pos[torch.randperm(pos.numel(), generator=generator)[:expected_pos]]
    pos = pos.unique()
    neg = torch.nonzero(labels == 0).squeeze(1)
    expected_neg = num - pos.numel()
    if neg.numel() > expected_neg:
        neg = neg[torch.randperm(neg.numel(), generator=generator)[:expected_neg]]
    return pos, neg.unique()


def sampled_loss(det: MMDetTwoStage, image: torch.Tensor, target: dict, generator) -> dict[str, torch.Tensor]:
    cfg = det.config
    batch, (size,) = det.prepare([image])
    feats = det.features(batch)
    gt, gt_labels = det.gt_in_resized(image, target, size)
    logits, deltas, levels = det.rpn(feats)
    anchors = torch.cat(levels)
    # RPN: AnchorHead.get_targets + loss_single (sampling=True)
    matched = det.rpn_assigner.assign(mmdet_box_overlaps(gt, anchors))
    labels = torch.where(matched >= 0, 1, torch.where(matched == -1, 0, -1))
    pos, neg = random_sample(labels, cfg.rpn_num, cfg.rpn_pos_fraction, generator)
    avg = max(pos.numel(), 1) + max(neg.numel(), 1)
    weights = torch.zeros_like(logits)
    weights[pos] = 1
    weights[neg] = 1
    target_cls = torch.zeros_like(logits)
    target_cls[pos] = 1
    bce = F.binary_cross_entropy_with_logits(logits, target_cls, reduction="none")
    losses = {"loss_rpn_cls": (bce * weights).sum() / (avg + EPS)}
    box_targets = torch.zeros_like(deltas)
    box_weights = torch.zeros_like(deltas)
    box_targets[pos] = delta_encode(anchors[pos], gt[matched[pos]]).to(deltas.dtype)
    box_weights[pos] = 1
    diff = (deltas - box_targets).abs()
    beta = cfg.rpn_smooth_l1_beta  # mmdetection's smooth_l1_loss (Cascade's RPN), else l1_loss
    per_coordinate = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta) if beta > 0 else diff
    losses["loss_rpn_bbox"] = (per_coordinate * box_weights).sum() / (avg + EPS)
    # RoI stages: StandardRoIHead / CascadeRoIHead.forward_train
    proposals = det.proposals(logits, deltas, levels, size, cfg.rpn_train)
    masks = det._resized_masks(target, size, tuple(batch.shape[-2:]))
    stages = 3 if det.cascade else 1
    for stage in range(stages):
        weight = cfg.stage_loss_weights[stage] if det.cascade else 1.0
        thr = STAGE_IOUS[stage] if det.cascade else 0.5
        assigner = MaxIoUAssigner(thr, thr, thr, match_low_quality=cfg.rcnn_low_quality)
        assigned = assigner.assign(mmdet_box_overlaps(gt, proposals))
        bboxes = torch.cat([gt, proposals])  # add_gt_as_proposals: the ground truth first
        assigned = torch.cat([torch.arange(len(gt)), assigned])
        labels = torch.where(assigned >= 0, 1, torch.where(assigned == -1, 0, -1))
        pos, neg = random_sample(labels, cfg.rcnn_num, cfg.rcnn_pos_fraction, generator)
        rois = torch.cat([bboxes[pos], bboxes[neg]])
        roi_labels = torch.cat([gt_labels[assigned[pos]], torch.full((neg.numel(),), det.num_classes)])
        cls_score, bbox_pred = det.box_forward(stage, feats, rois)
        n = rois.shape[0]
        losses[f"s{stage}.loss_cls"] = F.cross_entropy(cls_score, roi_labels, reduction="sum") / (max(n, 1) + EPS) * weight
        p = pos.numel()
        pred = bbox_pred.view(n, -1, 4)[torch.arange(p), roi_labels[:p]]
        if det.cascade:
            decoded = delta_decode(rois[:p], pred, STAGE_STDS[stage])
            box = 10 * giou_loss(decoded, gt[assigned[pos]]).sum()
        else:
            box = (pred - delta_encode(rois[:p], gt[assigned[pos]], STAGE_STDS[0])).abs().sum()
        losses[f"s{stage}.loss_bbox"] = box / (n + EPS) * weight
        # mask_target + FCNMaskHead.loss (mean over the sampled positives' 28 x 28 targets)
        mask_pred = det.mask_forward(stage, feats, rois[:p])
        h, w = masks.shape[-2:]
        boxes = torch.stack([rois[:p, 0].clamp(0, w), rois[:p, 1].clamp(0, h), rois[:p, 2].clamp(0, w),
                             rois[:p, 3].clamp(0, h)], 1)
        index = torch.arange(p, dtype=boxes.dtype)[:, None]
        mask_targets = roi_align(masks[assigned[pos]][:, None].to(boxes.dtype), torch.cat([index, boxes], 1), 28,
                                 1.0, 0, True)[:, 0] >= 0.5
        logits_pos = mask_pred[torch.arange(p), roi_labels[:p]]
        losses[f"s{stage}.loss_mask"] = F.binary_cross_entropy_with_logits(
            logits_pos, mask_targets.to(logits_pos.dtype)) * weight if p else mask_pred.sum()
        if stage < stages - 1:  # refine_bboxes: the sampled RoIs regressed, the ground truth among them dropped
            with torch.no_grad():
                best = torch.where(roi_labels == det.num_classes, cls_score[:, :-1].argmax(1), roi_labels)
                moved = bbox_pred.view(n, -1, 4)[torch.arange(n), best]
                refined = delta_decode(rois, moved, STAGE_STDS[stage], max_shape=size)
            is_gt = torch.cat([pos < len(gt), torch.zeros(neg.numel(), dtype=torch.bool)])
            proposals = refined[~is_gt].detach()
    total = {"loss_rpn_cls": losses["loss_rpn_cls"], "loss_rpn_bbox": losses["loss_rpn_bbox"]}
    for name in ("loss_cls", "loss_bbox", "loss_mask"):
        total[name] = sum(losses[f"s{s}.{name}"] for s in range(stages))
    return total


def official(det, image, target, seed: int, directions):
    generator = torch.Generator().manual_seed(seed)
    x = image.clone().requires_grad_(True)
    losses = sampled_loss(det, x, target, generator)
    (grad,) = torch.autograd.grad(sum(losses.values()), x)
    return {k: float(v.detach()) for k, v in losses.items()}, torch.stack([(grad * d).sum() for d in directions])


def expected(det, image, target, directions):
    x = image.clone().requires_grad_(True)
    terms = det.image_losses([x], [target])
    (grad,) = torch.autograd.grad(sum(t.sum() for t in terms.values()), x)
    return {k: float(v.detach()) for k, v in terms.items()}, torch.stack([(grad * d).sum() for d in directions]), grad


# -- the tests --------------------------------------------------------------------------------------------


def test_expected_loss_and_gradient_match_the_monte_carlo_mean_of_mmdetection_draws():
    det = tiny()
    image, target = scene()
    assert_expectation_is_the_monte_carlo_mean(lambda directions: expected(det, image, target, directions),
                                               lambda seed, directions: official(det, image, target, seed, directions),
                                               image.shape, draws=300)


@pytest.mark.parametrize("cascade", [False, True])
def test_every_candidate_drawn_gives_mmdetections_loss_exactly(cascade):
    det = tiny(cascade, rpn_num=10**6, rcnn_num=10**6)
    image, target = scene()
    directions = [torch.randn(image.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))]
    terms, projected, _ = expected(det, image, target, directions)
    for seed in (0, 1):  # any draw is the whole set
        theirs, their_projection = official(det, image, target, seed, directions)
        for name, value in terms.items():
            assert theirs[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
        assert float(their_projection[0]) == pytest.approx(float(projected[0]), rel=1e-10)


def test_cascade_later_stages_when_the_first_draws_every_positive():
    """Stage 1 draws every positive and a sample of the negatives; stages 2 and 3 then draw all they get. Their
    expectation is then exact: the Monte-Carlo mean of mmdetection's nested draws agrees within 3 SE."""
    det = tiny(True, rpn_num=8, rcnn_num=40)
    image, target = scene()
    directions = [torch.randn(image.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))]
    terms, projected, _ = expected(det, image, target, directions)
    draws = 100
    samples = [official(det, image, target, seed, directions) for seed in range(draws)]
    for name in terms:
        values = torch.tensor([s[0][name] for s in samples], dtype=torch.float64)
        se = float(values.std() / draws ** 0.5)
        # (a term no draw moves -- the box terms of an always-drawn set -- agrees to summation order)
        assert abs(float(values.mean()) - terms[name]) <= 3 * se + 1e-9 * abs(terms[name]), (name, float(values.mean()), terms[name], se)
    g = torch.stack([s[1] for s in samples])
    se = g.std(0) / draws ** 0.5
    assert bool(((g.mean(0) - projected).abs() <= 3 * se).all()), ((g.mean(0) - projected) / se)


@pytest.mark.parametrize("cascade", [False, True])
def test_object_parts_add_up_to_the_total(cascade):
    det = tiny(cascade)
    image, target = scene()
    total = det.image_losses([image], [target])
    parts = det.object_losses([image], [target])[0]
    for name, value in total.items():
        assert parts[name].shape == (4,)
        assert float(parts[name].sum().detach()) == pytest.approx(float(value[0].detach()), rel=1e-12)
    assert float(parts["loss_rpn_bbox"][0].detach()) == 0 and float(parts["loss_bbox"][0].detach()) == 0  # no box term
    assert float(parts["loss_mask"][0].detach()) == 0
    for j in range(3):  # one object's part is what the pipeline's per-object target computes
        one = det.image_losses([image], [{**target, "object": j}])
        for name in total:
            assert float(one[name][0].detach()) == pytest.approx(float(parts[name][j + 1].detach()), rel=1e-12)


def test_gradient_against_finite_differences():
    """Every term's input gradient along a random direction, against central differences in float64 (the
    assignment does not move at this step). mmcv's resize rounds to uint8 (its gradient passes straight through),
    so the check runs the same detector behind torchvision's smooth resize; and the proposals, detached upstream,
    are held where the unperturbed image puts them."""
    det = tiny()
    det.preprocess = dataclasses.replace(PREPROCESS, convention="torchvision")
    image, target = scene()
    held = []
    propose = det.proposals
    det.proposals = lambda *args: held[0] if held else held.append(propose(*args)) or held[0]
    direction = torch.randn(image.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = image.clone().requires_grad_(True)
    terms = det.image_losses([x], [target])
    step = 1e-6
    plus = det.image_losses([image + step * direction], [target])
    minus = det.image_losses([image - step * direction], [target])
    for name, value in terms.items():
        (grad,) = torch.autograd.grad(value.sum(), x, retain_graph=True)
        numeric = float((plus[name] - minus[name]).sum()) / (2 * step)
        assert float((grad * direction).sum()) == pytest.approx(numeric, rel=1e-5, abs=1e-9), name


def test_no_objects_gives_the_background_terms_only():
    det = tiny()
    image, _ = scene()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 96, 128, dtype=torch.uint8)}
    terms = det.image_losses([image], [empty])
    assert float(terms["loss_rpn_cls"][0]) > 0 and float(terms["loss_cls"][0]) > 0
    for name in ("loss_rpn_bbox", "loss_bbox", "loss_mask"):
        assert float(terms[name][0]) == 0
    ref = sampled_loss(tiny(rpn_num=10**6, rcnn_num=10**6), image, empty, torch.Generator().manual_seed(0))
    full = tiny(rpn_num=10**6, rcnn_num=10**6).image_losses([image], [empty])
    for name in full:
        assert float(ref[name]) == pytest.approx(float(full[name][0]), rel=1e-12, abs=1e-15), name


def test_nearest_rescale_follows_opencvs_index_rule():
    """cv2.INTER_NEAREST picks source index floor(x * src / dst), capped at the last pixel."""
    masks = torch.arange(7 * 9, dtype=torch.uint8).reshape(1, 7, 9)
    out = nearest_rescale(masks, (11, 5))
    for y in range(11):
        for x in range(5):
            sy, sx = min(int(y * 7 / 11), 6), min(int(x * 9 / 5), 8)
            assert int(out[0, y, x]) == int(masks[0, sy, sx])


@pytest.mark.parametrize("name", ["mask_rcnn_cednet_next_tiny", "cascade_mask_rcnn_cednet_next_tiny", "mask_rcnn_swin_tiny"])
def test_fork_checkpoints_are_recognised_and_load(name, tmp_path):
    from gradlens import load_detector, save_detector
    from gradlens.models.registry import build_two_stage

    det = build_two_stage(name, 80)
    config = ("img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)\n"
              "test_pipeline = [dict(type='MultiScaleFlipAug', img_scale=(160, 96), transforms=[dict(type='Pad', size_divisor=128)])]\n")
    torch.save({"meta": {"config": config}, "state_dict": det.state_dict()}, tmp_path / "m.pth")
    loaded = load_detector(tmp_path / "m.pth")
    assert loaded.arch_name == name and loaded.checkpoint_format == "mmdetection"
    assert (loaded.preprocess.min_size, loaded.preprocess.max_size, loaded.preprocess.size_divisor) == (96, 160, 128)
    assert loaded.categories[0] == {"id": 1, "name": "person"}
    save_detector(loaded, tmp_path / "g.pth")
    again = load_detector(tmp_path / "g.pth")
    image = torch.rand(3, 90, 150)
    a, b = loaded.detect([image])[0], again.detect([image])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])


def test_two_stage_checkpoints_without_a_mask_head_are_refused(tmp_path):
    from gradlens import load_detector
    from gradlens.models.registry import build_two_stage

    state = {k: v for k, v in build_two_stage("mask_rcnn_swin_tiny", 80).state_dict().items() if "mask_head" not in k}
    torch.save({"state_dict": state}, tmp_path / "faster.pth")
    with pytest.raises(CheckpointError, match="without a mask head"):
        load_detector(tmp_path / "faster.pth")


def test_select_gradients_area_curve_with_a_mask_rcnn(tmp_path):
    """The whole Python pipeline with a (tiny) fork-style Mask R-CNN as A: its maps are the expected loss's
    input gradients (masks from the annotations), and its results file keeps each detection's mask as COCO RLE."""
    import json

    from pycocotools import mask as mask_utils

    import gradlens
    from gradlens.attribution.targets import image_targets
    from gradlens.data.images import read_image, to_tensor
    from gradlens.data.synthetic import CATEGORIES as SYNTHETIC

    coco = gradlens.make_synthetic_coco(tmp_path / "coco", num_images=5, seed=4, min_side=64, max_side=96, progress=False)
    torch.manual_seed(3)
    body = ConvNeXtBackbone(depths=[1, 1, 1, 1], dims=[8, 16, 16, 16], out_indices=(0, 1, 2, 3), drop_path_rate=0.0)
    det = MMDetTwoStage(body, len(SYNTHETIC), neck=MMDetFPN([8, 16, 16, 16], 16), channels=16, fc_channels=32,
                        preprocess=PreprocessConfig(min_size=64, max_size=96, size_divisor=32, convention="mmcv"),
                        config=dataclasses.replace(RCNNConfig(), score_thr=0.01), arch_name="tiny-mask-rcnn").eval()
    det.categories = [dict(c) for c in SYNTHETIC]
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
    x = to_tensor(read_image(gt.image_path(image_id))).requires_grad_(True)
    terms = det.image_losses([x], [target])
    assert float(terms["loss_mask"][0].detach()) > 0
    (grad,) = torch.autograd.grad(sum(t.sum() for t in terms.values()), x)
    magnitude = grad.abs().amax(0)
    stored = torch.as_tensor(curve.models[0].store.read(image_id), dtype=torch.float32)
    assert stored.shape == magnitude.shape
    assert torch.allclose(stored, magnitude, rtol=2e-3, atol=2e-3 * float(magnitude.max()))
    # the results file: each record's segmentation decodes to the mask detect() gives
    files = [p for p in (tmp_path / "cache").rglob("*.json") if not p.name.endswith(".meta.json")]
    records = [r for p in files for r in json.loads(p.read_text()) if isinstance(r, dict) and "segmentation" in r]
    assert records
    mine = det.detect([to_tensor(read_image(gt.image_path(records[0]["image_id"])))])[0]
    decoded = [r for r in records if r["image_id"] == records[0]["image_id"]]
    assert len(decoded) == len(mine["masks"])
    for r, m in zip(decoded, mine["masks"]):
        assert torch.equal(torch.from_numpy(mask_utils.decode(r["segmentation"])).bool(), m)
