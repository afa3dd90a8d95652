"""Deformable DETR (mmdetection 2.x, the CEDNet fork's configs): deformable attention against a direct bilinear
computation, the matching against brute force, the loss against an independent implementation on torchvision's
focal and GIoU losses, finite differences, the per-object split, detections, checkpoints and the pipeline.

Equality with the fork's own ``inference_detector`` and ``forward_train`` (detections, all 18 terms, matching,
input gradient) is measured by ``scripts/compare_detr_with_fork.py`` (README: query-based detectors).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from gradlens.errors import CheckpointError
from gradlens.models.backbones.convnext import ConvNeXtBackbone
from gradlens.models.detectors.deformable_detr import ChannelMapper, MMDetDeformableDETR, matching_cost
from gradlens.models.detectors.matching import hungarian_match
from gradlens.models.detectors.transformer import SinePositionalEncoding, multi_scale_deformable_attn
from gradlens.models.preprocessing.transform import PreprocessConfig

PREPROCESS = PreprocessConfig(min_size=64, max_size=96, size_divisor=128, convention="mmcv")


def tiny(layers: int = 2, queries: int = 12, classes: int = 3) -> MMDetDeformableDETR:
    torch.manual_seed(0)
    body = ConvNeXtBackbone(depths=[1, 1, 1, 1], dims=[8, 16, 16, 16], out_indices=(1, 2, 3), drop_path_rate=0.0)
    det = MMDetDeformableDETR(body, classes, neck=ChannelMapper([16, 16, 16]), preprocess=PREPROCESS,
                              num_query=queries, encoder_layers=layers, decoder_layers=layers)
    with torch.no_grad():
        for p in det.parameters():
            p.add_(torch.randn_like(p) * 0.05)
            p.requires_grad_(False)  # as the pipeline runs a detector: gradients with respect to the image only
    return det.double().eval()


def scene():
    torch.manual_seed(1)
    image = F.interpolate(torch.rand(1, 3, 12, 18, dtype=torch.float64), size=(60, 90), mode="bilinear",
                          align_corners=False)[0]
    target = {"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [45.0, 10.0, 85.0, 40.0], [20.0, 30.0, 60.0, 58.0]]),
              "labels": torch.tensor([0, 1, 2])}
    return image, target


# -- building blocks --------------------------------------------------------------------------------------------


def test_deformable_attention_is_bilinear_sampling_with_zeros_outside():
    """Each output channel is the weighted sum of the value map read bilinearly at (x * w - 0.5, y * h - 0.5), zero
    outside the map: computed here point by point."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    heads, dims, queries, points = 2, 3, 5, 2
    value = torch.randn(1, sum(h * w for h, w in shapes), heads, dims, dtype=torch.float64, generator=g)
    loc = torch.rand(1, queries, heads, len(shapes), points, 2, dtype=torch.float64, generator=g) * 1.4 - 0.2
    weights = torch.rand(1, queries, heads, len(shapes), points, dtype=torch.float64, generator=g)
    out = multi_scale_deformable_attn(value, shapes, loc, weights)
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    expected = torch.zeros(1, queries, heads * dims, dtype=torch.float64)
    for q, m, level, p in itertools.product(range(queries), range(heads), range(len(shapes)), range(points)):
        h, w = shapes[level]
        x, y = float(loc[0, q, m, level, p, 0]) * w - 0.5, float(loc[0, q, m, level, p, 1]) * h - 0.5
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        sample = torch.zeros(dims, dtype=torch.float64)
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
            if 0 <= yy < h and 0 <= xx < w:
                sample += (1 - abs(x - xx)) * (1 - abs(y - yy)) * value[0, starts[level] + yy * w + xx, m]
        expected[0, q, m * dims:(m + 1) * dims] += weights[0, q, m, level, p] * sample
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-13)


def test_sine_positional_encoding_counts_only_unpadded_pixels():
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[:, 3:, :] = True
    mask[:, :, 5:] = True
    pos = SinePositionalEncoding(4, normalize=True, offset=-0.5)(mask)
    y, x = 1, 2  # unpadded pixel: its 1-based position among 3 valid rows / 5 valid columns, minus a half
    for c in range(4):
        t = 10000 ** (2 * (c // 2) / 4)
        ey = (y + 1 - 0.5) / (3 + 1e-6) * 2 * np.pi / t
        ex = (x + 1 - 0.5) / (5 + 1e-6) * 2 * np.pi / t
        trig = np.sin if c % 2 == 0 else np.cos
        assert float(pos[0, c, y, x]) == pytest.approx(trig(ey), abs=1e-6)
        assert float(pos[0, 4 + c, y, x]) == pytest.approx(trig(ex), abs=1e-6)


def test_hungarian_matching_is_the_minimum_cost_assignment():
    g = torch.Generator().manual_seed(2)
    for queries, objects in ((5, 3), (4, 4), (6, 1)):
        cost = torch.rand(queries, objects, generator=g)
        matched = hungarian_match(cost)
        assert int((matched >= 0).sum()) == objects
        total = sum(float(cost[q, j]) for q, j in enumerate(matched.tolist()) if j >= 0)
        best = min(sum(float(cost[q, j]) for j, q in enumerate(perm))
                   for perm in itertools.permutations(range(queries), objects))
        assert total == pytest.approx(best, rel=1e-6)
    assert hungarian_match(torch.zeros(4, 0)).tolist() == [-1] * 4


# -- the loss -----------------------------------------------------------------------------------------------------


def reference_loss(classes: torch.Tensor, boxes: torch.Tensor, gt: torch.Tensor, labels: torch.Tensor,
                   size, num_classes: int) -> dict[str, float]:
    """``DeformableDETRHead.loss`` written with torchvision's focal and GIoU losses, the matching cost with
    torchvision's GIoU, and scipy's assignment, per layer."""
    from scipy.optimize import linear_sum_assignment

    h, w = size
    factor = torch.tensor([w, h, w, h], dtype=boxes.dtype)

    def xyxy(b):
        return torch.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)

    gt_cxcywh = torch.stack([(gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2, gt[:, 2] - gt[:, 0],
                             gt[:, 3] - gt[:, 1]], 1) / factor
    out = {}
    layers = classes.shape[0]
    for layer in range(layers):
        logits, pred = classes[layer], boxes[layer]
        p = logits.sigmoid()
        focal_cost = 0.25 * (1 - p) ** 2 * -(p + 1e-12).log() - 0.75 * p ** 2 * -(1 - p + 1e-12).log()
        cost = 2 * focal_cost[:, labels] + 5 * torch.cdist(pred, gt_cxcywh, p=1) - 2 * generalized_box_iou(xyxy(pred) * factor, gt)
        rows, cols = linear_sum_assignment(cost.detach().numpy()) if len(gt) else ([], [])
        rows, cols = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
        onehot = torch.zeros_like(logits)
        onehot[rows, labels[cols]] = 1
        n = max(len(rows), 1)
        prefix = "" if layer == layers - 1 else f"d{layer}."
        out[prefix + "loss_cls"] = 2 * float(sigmoid_focal_loss(logits.detach(), onehot, 0.25, 2, reduction="sum")) / n
        out[prefix + "loss_bbox"] = 5 * float((pred[rows] - gt_cxcywh[cols]).abs().sum()) / n
        giou = generalized_box_iou_loss(xyxy(pred[rows]) * factor, gt[cols], reduction="sum") if len(rows) else 0.0
        out[prefix + "loss_iou"] = 2 * float(giou) / n
    return out


@pytest.mark.parametrize("objects", [3, 1, 0])
def test_loss_terms_equal_an_independent_implementation(objects):
    det = tiny()
    image, target = scene()
    target = {"boxes": target["boxes"][:objects], "labels": target["labels"][:objects]}
    with torch.no_grad():
        classes, boxes, size = det.head_outputs(image)
    gt, labels = det.gt_in_resized(image, target, size)
    expected = reference_loss(classes, boxes, gt.double(), labels, size, 3)
    terms = det.image_losses([image], [target])
    assert list(terms) == ["loss_cls", "loss_bbox", "loss_iou", "d0.loss_cls", "d0.loss_bbox", "d0.loss_iou"]
    for name, value in expected.items():
        # the same sums; mmdetection's normaliser carries + float32 eps (1.2e-7 relative), torchvision's GIoU
        # its eps inside the ratios (1e-7 of a pixel area)
        assert float(terms[name][0]) == pytest.approx(value, rel=3e-7, abs=1e-12), name
    if objects == 0:
        assert all(float(terms[n][0]) == 0 for n in terms if not n.endswith("loss_cls"))


def test_gradient_against_finite_differences():
    """The total's input gradient along a random direction, against central differences in float64 (the matching
    does not change at this step). mmcv's resize rounds to uint8 (its gradient passes straight through), so the
    check runs behind torchvision's smooth resize."""
    det = tiny()
    det.preprocess = dataclasses.replace(PREPROCESS, convention="torchvision")
    image, target = scene()
    direction = torch.randn(image.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = image.clone().requires_grad_(True)
    total = sum(t.sum() for t in det.image_losses([x], [target]).values())
    (grad,) = torch.autograd.grad(total, x)
    # the network is piecewise smooth (ReLUs, bilinear sampling): a step of 1e-6 already crosses kinks (the
    # one-sided differences disagree by 0.2 %), 1e-7 does not, and float64 round-off is ~1e-9 of the result there
    step = 1e-7
    plus = sum(t.sum() for t in det.image_losses([image + step * direction], [target]).values())
    minus = sum(t.sum() for t in det.image_losses([image - step * direction], [target]).values())
    numeric = float(plus - minus) / (2 * step)
    assert float((grad * direction).sum()) == pytest.approx(numeric, rel=1e-6)


def test_object_parts_follow_the_matching_and_add_up():
    det = tiny()
    image, target = scene()
    total = det.image_losses([image], [target])
    parts = det.object_losses([image], [target])[0]
    matches = det.matches(image, target)
    for name in total:
        assert float(parts[name].sum()) == pytest.approx(float(total[name][0]), rel=1e-12)
    # box terms have no background part; each object's entry is its matched queries' (one per layer)
    assert float(parts["loss_bbox"][0]) == 0 and float(parts["d0.loss_iou"][0]) == 0
    assert all(sorted(m[m >= 0].tolist()) == [0, 1, 2] for m in matches)
    for j in range(3):
        one = det.image_losses([image], [{**target, "object": j}])
        assert float(one["loss_cls"][0]) == pytest.approx(float(parts["loss_cls"][1 + j]), rel=1e-12)
    background = det.image_losses([image], [{**target, "object": -1}])
    assert float(background["loss_cls"][0]) == pytest.approx(float(parts["loss_cls"][0]), rel=1e-12)


def test_a_batch_gives_each_image_what_it_gives_alone():
    det = tiny()
    image, target = scene()
    other = torch.rand(3, 50, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t2 = {"boxes": torch.tensor([[3.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
    both = det.image_losses([image, other], [target, t2])
    alone = det.image_losses([other], [t2])
    for name in both:
        assert float(both[name][1]) == float(alone[name][0])


def test_detections_are_the_top_scores_over_queries_and_classes():
    det = tiny(queries=40)
    det.max_per_img = 25
    image, _ = scene()
    out = det.detect([image])[0]
    classes, boxes, size = det.head_outputs(image)
    scores = classes[-1].sigmoid()
    flat = np.sort(scores.flatten().numpy())[::-1][:25]
    assert np.array_equal(out["scores"].numpy(), flat)
    query = torch.tensor([int(torch.nonzero(scores == s)[0, 0]) for s in out["scores"]])
    h, w = size
    b = boxes[-1][query]
    xyxy = torch.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)
    xyxy = torch.minimum(torch.maximum(xyxy * torch.tensor([w, h, w, h]), torch.zeros(4)), torch.tensor([w, h, w, h]))
    scale = torch.tensor([w / image.shape[-1], h / image.shape[-2]] * 2, dtype=torch.float32)
    assert torch.allclose(out["boxes"], xyxy / scale, rtol=1e-12, atol=1e-9)
    dets, losses = det.detect_with_losses([image], [scene()[1]])
    assert torch.equal(dets[0]["scores"], out["scores"]) and "d0.loss_iou" in losses


def test_matching_cost_uses_the_configs_weights():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.4, 0.2]])
    gt = torch.tensor([[10.0, 20.0, 40.0, 60.0]])
    cost = matching_cost(logits, boxes, gt, torch.tensor([1]), (80, 100))
    p = logits[:, 1].sigmoid()
    focal = 0.25 * (1 - p) ** 2 * -(p + 1e-12).log() - 0.75 * p ** 2 * -(1 - p + 1e-12).log()
    gt_n = torch.tensor([[25 / 100, 40 / 80, 30 / 100, 40 / 80]])
    xyxy = torch.stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2, boxes[:, 0] + boxes[:, 2] / 2,
                        boxes[:, 1] + boxes[:, 3] / 2], 1) * torch.tensor([100.0, 80.0, 100.0, 80.0])
    expected = 2 * focal[:, None] + 5 * (boxes - gt_n).abs().sum(1, keepdim=True) - 2 * generalized_box_iou(xyxy, gt)
    assert torch.allclose(cost, expected, rtol=1e-5, atol=1e-6)


# -- checkpoints and the pipeline -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deformable_detr_cednet_next_tiny", "deformable_detr_convnext_tiny",
                                  "deformable_detr_resnet50"])
def test_fork_checkpoints_are_recognised_and_load(name, tmp_path):
    from gradlens import load_detector, save_detector
    from gradlens.models.registry import build_deformable_detr

    det = build_deformable_detr(name, 80)
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
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_every_fork_config_is_recognised_from_its_keys():
    """The seven configs' layouts (built on the meta device: shapes only), each back to its own name."""
    from gradlens.models.formats.mmdet import recognise_deformable_detr
    from gradlens.models.registry import DETR_ARCHITECTURES, build_deformable_detr

    assert len(DETR_ARCHITECTURES) == 7
    for name in DETR_ARCHITECTURES:
        with torch.device("meta"):
            state = build_deformable_detr(name, 80).state_dict()
        assert recognise_deformable_detr(state) == (name, {}, 80)
    with torch.device("meta"):
        state = build_deformable_detr("deformable_detr_resnet50", 5, {"num_query": 100, "decoder_layers": 3}).state_dict()
    assert recognise_deformable_detr(state) == ("deformable_detr_resnet50", {"num_query": 100, "decoder_layers": 3}, 5)


def test_box_refinement_and_two_stage_checkpoints_are_refused(tmp_path):
    from gradlens import load_detector
    from gradlens.models.registry import build_deformable_detr

    state = build_deformable_detr("deformable_detr_resnet50", 80).state_dict()
    refine = {k: (v + 1 if k == "bbox_head.cls_branches.3.weight" else v) for k, v in state.items()}
    torch.save({"state_dict": refine}, tmp_path / "refine.pth")
    with pytest.raises(CheckpointError, match="box refinement"):
        load_detector(tmp_path / "refine.pth")
    two = {**state, "bbox_head.transformer.enc_output.weight": torch.zeros(256, 256)}
    torch.save({"state_dict": two}, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match="two-stage Deformable DETR"):
        load_detector(tmp_path / "two.pth")


@pytest.mark.parametrize("change, message", [
    ({"bbox_head.query_embedding.weight": None}, "query embedding .* is missing"),
    ({"bbox_head.query_embedding.weight": torch.zeros(())}, "query embedding .* is not a matrix"),
    ({"bbox_head.transformer.level_embeds": torch.zeros(3, 256)}, "four 256-channel levels"),
    ({"bbox_head.cls_branches.0.weight": torch.zeros(80)}, "no class branch"),
])
def test_damaged_deformable_detr_checkpoints_are_refused_in_one_sentence(change, message, tmp_path):
    from gradlens import load_detector

    state = {"bbox_head.transformer.level_embeds": torch.zeros(4, 256), "bbox_head.cls_branches.0.weight": torch.zeros(80, 256),
             "bbox_head.query_embedding.weight": torch.zeros(300, 512), "backbone.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    state.update(change)
    torch.save({"state_dict": {k: v for k, v in state.items() if v is not None}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message):
        load_detector(tmp_path / "bad.pth")


def test_select_gradients_area_curve_with_a_deformable_detr(tmp_path):
    """The whole Python pipeline with a (tiny) fork-style Deformable DETR as A: its maps are the loss's input
    gradients."""
    import gradlens
    from gradlens.attribution.targets import image_targets
    from gradlens.data.images import read_image, to_tensor
    from gradlens.data.synthetic import CATEGORIES as SYNTHETIC

    coco = gradlens.make_synthetic_coco(tmp_path / "coco", num_images=5, seed=4, min_side=64, max_side=96, progress=False)
    torch.manual_seed(3)
    body = ConvNeXtBackbone(depths=[1, 1, 1, 1], dims=[8, 16, 16, 16], out_indices=(1, 2, 3), drop_path_rate=0.0)
    det = MMDetDeformableDETR(body, len(SYNTHETIC), neck=ChannelMapper([16, 16, 16]), num_query=20, encoder_layers=1,
                              decoder_layers=2, preprocess=PREPROCESS, arch_name="tiny-deformable-detr").eval()
    det.categories = [dict(c) for c in SYNTHETIC]
    run = gradlens.DetectorRun(device="cpu", cache_dir=tmp_path / "cache", batch_size=2, workers=0, detectors={"a": det})
    workdir = tmp_path / "run"
    result = gradlens.run_selection(det, [gradlens.bundled_detector_path("convnext")], coco=coco, workdir=workdir,
                                    top=3, detector_run=run)
    assert len(result.selection) == 3
    curve = gradlens.run_area_curve(workdir, thresholds=20, bootstrap=0, detector_run=run, progress=False)
    assert curve.models[0].detector is det and curve.models[0].run.computed == 3
    gt = gradlens.load_ground_truth(coco)
    image_id = int(result.selection["image_id"].iloc[0])
    target = image_targets(gt, image_id, det.categories).as_dict()
    x = to_tensor(read_image(gt.image_path(image_id))).requires_grad_(True)
    (grad,) = torch.autograd.grad(sum(t.sum() for t in det.image_losses([x], [target]).values()), x)
    magnitude = grad.abs().amax(0)
    stored = torch.as_tensor(curve.models[0].store.read(image_id), dtype=torch.float32)
    assert stored.shape == magnitude.shape
    assert torch.allclose(stored, magnitude, rtol=2e-3, atol=2e-3 * float(magnitude.max()))
