"""detectron2 RetinaNet checkpoints load and detect as detectron2 does (gradlens.models.formats.detectron2).

The references are written here from detectron2's source (github:facebookresearch/detectron2):

- the key layout of ``retinanet_R_50_FPN`` from the module definitions: ``modeling/backbone/resnet.py``
  (``BasicStem``, ``BottleneckBlock``, ``ResNet.make_default_stages(depth=50)``, ``build_resnet_backbone``),
  ``layers/wrappers.py`` (``Conv2d(..., norm=...)``), ``layers/batch_norm.py`` (``FrozenBatchNorm2d``'s four
  buffers, ``num_batches_tracked`` None), ``modeling/backbone/fpn.py`` (``fpn_lateral{N}``, ``fpn_output{N}``,
  ``LastLevelP6P7``), ``modeling/meta_arch/retinanet.py`` (``RetinaNetHead``);
- the network's forward (``resnet.py``, ``fpn.py``, ``RetinaNetHead.forward``, ``permute_to_N_HWA_K`` in
  ``meta_arch/dense_detector.py``), in plain ``F.conv2d`` calls on the detectron2 state dict;
- anchors (``modeling/anchor_generator.py``: ``generate_cell_anchors``, ``_create_grid_offsets``,
  ``_grid_anchors``), ``Matcher`` (``modeling/matcher.py``), ``Box2BoxTransform`` (``box_regression.py``),
  ``RetinaNet.label_anchors``/``losses`` with fvcore's ``sigmoid_focal_loss`` and ``smooth_l1_loss``;
- inference (``DenseDetector._decode_per_level_predictions``, ``RetinaNet.inference_single_image`` with a
  greedy per-class NMS written out, ``modeling/postprocessing.py:detector_postprocess``);
- the input (``data/detection_utils.py:read_image`` with format BGR, ``data/transforms/augmentation_impl.py:
  ResizeShortestEdge.get_output_shape``, ``transforms/transform.py:ResizeTransform.apply_image`` with Pillow,
  ``dataset_mapper.py``, ``DenseDetector.preprocess_image``, ``structures/image_list.py:from_tensors``).

The synthetic checkpoints are written as detectron2 writes them: a model-zoo ``.pkl`` (``{"model": {name:
numpy array}, "__author__": ...}`` pickled) and a ``DetectionCheckpointer`` ``.pth``.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gradlens.data.images import read_image, to_tensor
from gradlens.errors import CheckpointError
from gradlens.models.formats import detectron2 as d2
from gradlens.models.formats.checkpoints import load_detector, save_detector
from gradlens.models.registry import build_detector, with_preprocess
from gradlens.models.preprocessing.transform import detectron2_output_shape, padded_size

SMALL = {"min_size": 96, "max_size": 160}  # a small ResizeShortestEdge so the full-size R-50 runs fast
K = 80


# ---------------------------------------------------------------------------------------------
# the key layout


def expected_layout(num_classes: int = K) -> dict[str, tuple]:
    """retinanet_R_50_FPN's state dict as detectron2's modules name it (see the module docstring for files)."""
    keys: dict[str, tuple] = {}

    def conv_norm(prefix, cin, cout, k):  # Conv2d(bias=False, norm=FrozenBatchNorm2d(cout))
        keys[f"{prefix}.weight"] = (cout, cin, k, k)
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.norm.{buffer}"] = (cout,)

    conv_norm("backbone.bottom_up.stem.conv1", 3, 64, 7)  # BasicStem
    in_channels = 64
    for stage, blocks, out_channels in zip(range(2, 6), (3, 4, 6, 3), (256, 512, 1024, 2048)):
        bottleneck = out_channels // 4
        for i in range(blocks):
            prefix = f"backbone.bottom_up.res{stage}.{i}"
            if i == 0:  # in_channels != out_channels: a projection shortcut
                conv_norm(f"{prefix}.shortcut", in_channels, out_channels, 1)
            conv_norm(f"{prefix}.conv1", in_channels if i == 0 else out_channels, bottleneck, 1)
            conv_norm(f"{prefix}.conv2", bottleneck, bottleneck, 3)
            conv_norm(f"{prefix}.conv3", bottleneck, out_channels, 1)
        in_channels = out_channels
    for level, channels in zip((3, 4, 5), (512, 1024, 2048)):  # FPN(norm=""): biases
        keys[f"backbone.fpn_lateral{level}.weight"], keys[f"backbone.fpn_lateral{level}.bias"] = (256, channels, 1, 1), (256,)
        keys[f"backbone.fpn_output{level}.weight"], keys[f"backbone.fpn_output{level}.bias"] = (256, 256, 3, 3), (256,)
    keys["backbone.top_block.p6.weight"], keys["backbone.top_block.p6.bias"] = (256, 2048, 3, 3), (256,)
    keys["backbone.top_block.p7.weight"], keys["backbone.top_block.p7.bias"] = (256, 256, 3, 3), (256,)
    for subnet in ("cls_subnet", "bbox_subnet"):  # Sequential(Conv2d, ReLU) x 4
        for i in (0, 2, 4, 6):
            keys[f"head.{subnet}.{i}.weight"], keys[f"head.{subnet}.{i}.bias"] = (256, 256, 3, 3), (256,)
    keys["head.cls_score.weight"], keys["head.cls_score.bias"] = (9 * num_classes, 256, 3, 3), (9 * num_classes,)
    keys["head.bbox_pred.weight"], keys["head.bbox_pred.bias"] = (36, 256, 3, 3), (36,)
    return keys


def _random_detector(seed: int = 0):
    """A detectron2 R-50 RetinaNet with random weights whose scores spread around the 0.05 threshold."""
    torch.manual_seed(seed)
    det = build_detector(d2.ARCH, K)
    with torch.no_grad():
        for name, value in det.state_dict().items():
            if name.endswith("norm.running_var"):
                value.uniform_(0.5, 1.5)
            elif name.endswith("norm.running_mean") or name.endswith("norm.bias"):
                value.normal_(0, 0.05)
            elif name.endswith("norm.weight"):
                value.uniform_(0.3, 0.8)
            elif name.endswith("cls_logits.bias"):
                value.normal_(-3.2, 0.3)  # about a quarter of the scores above 0.05
            elif name.startswith("head."):
                value.normal_(0, 0.02) if name.endswith("weight") else value.zero_()
            else:
                value.add_(torch.randn_like(value) * 0.01)
    return with_preprocess(det, **SMALL)


@pytest.fixture(scope="module")
def detector():
    return _random_detector()


@pytest.fixture(scope="module")
def d2_state(detector):
    return {k: v.clone() for k, v in d2.to_detectron2(detector.state_dict()).items()}


def test_key_layout_is_detectron2s(d2_state):
    expected = expected_layout()
    assert len(expected) == 301
    assert {k: tuple(v.shape) for k, v in d2_state.items()} == expected
    # and back: every detectron2 name lands on a gradlens parameter
    assert set(d2.to_gradlens(d2_state)) == set(build_detector(d2.ARCH, K).state_dict())


# ---------------------------------------------------------------------------------------------
# the input


def _jpeg(folder: Path, h: int, w: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.clip(np.stack([xx * 255 / w, yy * 255 / h, (xx * yy) % 256], -1) + rng.normal(0, 30, (h, w, 3)), 0, 255)
    path = folder / f"image_{h}x{w}.jpg"
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    return path


def get_output_shape(oldh, oldw, short_edge_length, max_size):
    """augmentation_impl.py: ResizeShortestEdge.get_output_shape, verbatim."""
    h, w = oldh, oldw
    size = short_edge_length * 1.0
    scale = size / min(h, w)
    if h < w:
        newh, neww = size, scale * w
    else:
        newh, neww = scale * h, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    neww = int(neww + 0.5)
    newh = int(newh + 0.5)
    return (newh, neww)


def _d2_batch(path: Path, short: int, longest: int):
    """read_image(format="BGR") -> ResizeShortestEdge -> DatasetMapper's tensor -> preprocess_image."""
    with Image.open(path) as img:
        bgr = np.asarray(img.convert("RGB"))[:, :, ::-1]  # convert_PIL_to_numpy(format="BGR")
    newh, neww = get_output_shape(*bgr.shape[:2], short, longest)
    resized = np.asarray(Image.fromarray(bgr).resize((neww, newh), Image.BILINEAR))  # ResizeTransform, uint8
    image = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    pixel_mean = torch.tensor([103.530, 116.280, 123.675]).view(-1, 1, 1)
    pixel_std = torch.tensor([1.0, 1.0, 1.0]).view(-1, 1, 1)
    x = (image - pixel_mean) / pixel_std
    stride = 32  # ImageList.from_tensors(size_divisibility=FPN's 32), pad value 0
    h, w = x.shape[-2:]
    padded = F.pad(x, [0, (w + stride - 1) // stride * stride - w, 0, (h + stride - 1) // stride * stride - h], value=0.0)
    return padded[None], (newh, neww)


def test_output_shape_is_resize_shortest_edge():
    for h, w in [(480, 640), (640, 480), (427, 640), (1, 1), (333, 1000), (1000, 333), (799, 1333), (800, 801),
                 (500, 500), (2000, 100), (37, 53)]:
        for short, longest in [(800, 1333), (96, 160), (600, 1000)]:
            assert detectron2_output_shape(h, w, short, longest) == get_output_shape(h, w, short, longest)
    config = with_preprocess(build_detector(d2.ARCH, 3), **SMALL).preprocess
    assert padded_size(70, 100, config) == (96, 160)  # 96 x 137 padded to multiples of 32


def test_batch_from_the_jpeg_is_detectron2s(tmp_path, detector):
    """Pillow decode, BGR, Pillow uint8 resize (up, and down with antialiasing), float32 (x - mean) / std,
    zero padding to 32: the tensor gradlens builds equals detectron2's element for element."""
    for h, w in [(70, 100), (300, 120), (150, 151)]:
        path = _jpeg(tmp_path, h, w, seed=h)
        expected, size = _d2_batch(path, SMALL["min_size"], SMALL["max_size"])
        batch, sizes = detector.prepare([to_tensor(read_image(path))])
        assert sizes == [size]
        assert torch.equal(batch, expected), (h, w)


# ---------------------------------------------------------------------------------------------
# anchors, the network, inference


def _d2_anchors(feature_sizes):
    """generate_cell_anchors (double, then float32), _create_grid_offsets (float32 arange, offset 0), one loop."""
    levels = []
    for (fh, fw), stride, base in zip(feature_sizes, d2.ANCHOR_STRIDES, (32, 64, 128, 256, 512)):
        cells = []
        for size in (base, base * 2 ** (1.0 / 3), base * 2 ** (2.0 / 3)):
            for ratio in (0.5, 1.0, 2.0):
                w = math.sqrt(size ** 2.0 / ratio)
                h = ratio * w
                cells.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        cells = np.array(cells, dtype=np.float32)
        rows = []
        for y in range(fh):
            for x in range(fw):
                shift = np.array([x * stride, y * stride] * 2, dtype=np.float32)
                rows.extend(shift + cells)  # float32 + float32
        levels.append(torch.from_numpy(np.array(rows, dtype=np.float32)))
    return levels


def test_anchors_are_detectron2s():
    sizes = [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]
    ours = d2.Detectron2AnchorGenerator().level_anchors(sizes, "cpu")
    for mine, theirs in zip(ours, _d2_anchors(sizes)):
        assert mine.dtype == torch.float32 and torch.equal(mine, theirs)
    # size-major cell anchors (detectron2), not ratio-major (mmdetection): the second is (32, ratio 1)
    assert torch.allclose(ours[0][1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))


def _d2_network(sd, x):
    """ResNet-50 (stride_in_1x1) + FPN + LastLevelP6P7 + RetinaNetHead on a detectron2 state dict, in
    eval mode without gradient (FrozenBatchNorm2d's F.batch_norm path); per level (N, HWA, K) and (N, HWA, 4)."""
    def conv_norm(prefix, t, stride=1, padding=0):
        t = F.conv2d(t, sd[f"{prefix}.weight"], None, stride, padding)
        return F.batch_norm(t, sd[f"{prefix}.norm.running_mean"], sd[f"{prefix}.norm.running_var"],
                            sd[f"{prefix}.norm.weight"], sd[f"{prefix}.norm.bias"], training=False, eps=1e-5)

    x = F.max_pool2d(F.relu(conv_norm("backbone.bottom_up.stem.conv1", x, 2, 3)), kernel_size=3, stride=2, padding=1)
    features = {}
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for i in range(blocks):
            prefix = f"backbone.bottom_up.res{stage}.{i}"
            stride = 2 if i == 0 and stage > 2 else 1
            out = F.relu(conv_norm(f"{prefix}.conv1", x, stride))  # the stride in the 1x1 conv
            out = F.relu(conv_norm(f"{prefix}.conv2", out, 1, 1))
            out = conv_norm(f"{prefix}.conv3", out)
            shortcut = conv_norm(f"{prefix}.shortcut", x, stride) if i == 0 else x
            x = F.relu(out + shortcut)
        features[stage] = x

    def conv(name, t, stride=1, padding=0):
        return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], stride, padding)

    prev = conv("backbone.fpn_lateral5", features[5])
    results = [conv("backbone.fpn_output5", prev, 1, 1)]
    for level in (4, 3):
        prev = conv(f"backbone.fpn_lateral{level}", features[level]) + F.interpolate(prev, scale_factor=2.0, mode="nearest")
        results.insert(0, conv(f"backbone.fpn_output{level}", prev, 1, 1))
    p6 = conv("backbone.top_block.p6", features[5], 2, 1)
    results += [p6, conv("backbone.top_block.p7", F.relu(p6), 2, 1)]

    def permute(t, k):  # permute_to_N_HWA_K
        n, _, h, w = t.shape
        return t.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k)

    logits, deltas = [], []
    for feature in results:
        cls_t, box_t = feature, feature
        for i in (0, 2, 4, 6):
            cls_t = F.relu(conv(f"head.cls_subnet.{i}", cls_t, 1, 1))
            box_t = F.relu(conv(f"head.bbox_subnet.{i}", box_t, 1, 1))
        logits.append(permute(conv("head.cls_score", cls_t, 1, 1), K))
        deltas.append(permute(conv("head.bbox_pred", box_t, 1, 1), 4))
    return logits, deltas


def _decode(deltas, boxes):
    """Box2BoxTransform.apply_deltas, weights 1, scale_clamp log(1000/16)."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    dw = torch.clamp(deltas[:, 2], max=math.log(1000.0 / 16))
    dh = torch.clamp(deltas[:, 3], max=math.log(1000.0 / 16))
    px, py = deltas[:, 0] * widths + ctr_x, deltas[:, 1] * heights + ctr_y
    pw, ph = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], dim=1)


def _iou(a, b):
    """torchvision's nms IoU of one box with many (float32)."""
    inter_w = (torch.min(a[2], b[:, 2]) - torch.max(a[0], b[:, 0])).clamp(min=0)
    inter_h = (torch.min(a[3], b[:, 3]) - torch.max(a[1], b[:, 1])).clamp(min=0)
    inter = inter_w * inter_h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)


def _d2_inference(logits, deltas, anchors, image_size, original):
    """inference_single_image + detector_postprocess, written out (greedy NMS per class, in score order)."""
    boxes, scores, classes = [], [], []
    for lg, dl, an in zip(logits, deltas, anchors):
        prob = lg[0].sigmoid()
        keep = prob > 0.05
        values, where = prob[keep], torch.nonzero(keep)
        values, idx = values.topk(min(where.shape[0], 1000))
        where = where[idx]
        boxes.append(_decode(dl[0][where[:, 0]], an[where[:, 0]]))
        scores.append(values)
        classes.append(where[:, 1])
    boxes, scores, classes = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
    order = torch.sort(scores, descending=True, stable=True).indices
    kept, kept_of_class, labels = [], {}, classes.tolist()
    for i in order.tolist():
        same = kept_of_class.setdefault(labels[i], [])
        if not same or bool((_iou(boxes[i], boxes[same]) <= 0.5).all()):
            kept.append(i)
            same.append(i)
    kept = torch.tensor(kept[:100], dtype=torch.int64)
    boxes, scores, classes = boxes[kept].clone(), scores[kept], classes[kept]
    out_h, out_w = original
    boxes[:, 0::2] *= out_w / image_size[1]  # Boxes.scale
    boxes[:, 1::2] *= out_h / image_size[0]
    boxes = torch.stack([boxes[:, 0].clamp(0, out_w), boxes[:, 1].clamp(0, out_h), boxes[:, 2].clamp(0, out_w),
                         boxes[:, 3].clamp(0, out_h)], dim=1)  # Boxes.clip
    nonempty = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    return boxes[nonempty], scores[nonempty], classes[nonempty]


def test_detections_are_detectron2s(tmp_path, detector, d2_state):
    """From the JPEG: detectron2's batch, its network on its own keys, its inference and rescaling, written
    out here, give the detections gradlens gives."""
    path = _jpeg(tmp_path, 90, 130, seed=4)
    batch, size = _d2_batch(path, SMALL["min_size"], SMALL["max_size"])
    with torch.no_grad():
        logits, deltas = _d2_network(d2_state, batch)
        outputs, levels, _ = detector.head_outputs(batch)
    assert torch.equal(torch.cat(logits, 1), outputs["cls_logits"])  # the renamed weights compute the same
    assert torch.equal(torch.cat(deltas, 1), outputs["bbox_regression"])
    feature_sizes = [tuple(t.shape[-2:]) for t in detector.backbone(batch)]
    boxes, scores, classes = _d2_inference(logits, deltas, _d2_anchors(feature_sizes), size, (90, 130))
    result = detector.detect([to_tensor(read_image(path))])[0]
    assert 20 < len(scores) <= 100 and len(torch.unique(classes)) > 3
    assert torch.equal(result["labels"], classes)
    assert torch.equal(result["scores"], scores)
    assert torch.equal(result["boxes"], boxes)


# ---------------------------------------------------------------------------------------------
# the loss


def _d2_loss(logits, deltas, anchors, gt_boxes, gt_classes, original, size):
    """label_anchors (Matcher written as loops) + losses (fvcore focal, smooth-L1 with beta 0 = L1), normalised
    by the image's positives."""
    scale = np.array([size[1] * 1.0 / original[1], size[0] * 1.0 / original[0]] * 2)
    boxes = np.minimum((gt_boxes.double().numpy() * scale).clip(min=0), [size[1], size[0]] * 2)  # apply_box, clip
    boxes = torch.from_numpy(boxes).float()
    keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)  # filter_empty_instances
    boxes, gt_classes = boxes[keep], gt_classes[keep]
    anchors = torch.cat(anchors)
    logits, deltas = torch.cat(logits, 1)[0], torch.cat(deltas, 1)[0]
    iou = d2.pairwise_iou(boxes, anchors).numpy()
    labels = np.full(anchors.shape[0], K)
    matched = np.zeros(anchors.shape[0], dtype=np.int64)
    positive = np.zeros(anchors.shape[0], dtype=bool)
    for a in range(anchors.shape[0]):
        best = int(np.argmax(iou[:, a]))  # the first maximum, as torch.max(dim=0)
        matched[a] = best
        value = iou[best, a]
        labels[a] = K if value < 0.4 else (-1 if value < 0.5 else gt_classes[best])
        positive[a] = value >= 0.5
    for g in range(iou.shape[0]):  # set_low_quality_matches_: every anchor at an object's maximum IoU
        for a in np.flatnonzero(iou[g] == iou[g].max()):
            labels[a], positive[a] = gt_classes[matched[a]], True
    valid = labels >= 0
    target = torch.zeros(int(valid.sum()), K)
    rows = np.flatnonzero(labels[valid] != K)
    target[rows, torch.as_tensor(labels[valid][rows])] = 1.0
    x = logits[torch.from_numpy(valid)]
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    focal = (0.25 * target + 0.75 * (1 - target)) * (ce * (1 - p_t) ** 2)
    pos = torch.from_numpy(positive)
    src, tgt = anchors[pos], boxes[torch.from_numpy(matched)[pos]]
    sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    tw, th = tgt[:, 2] - tgt[:, 0], tgt[:, 3] - tgt[:, 1]
    wanted = torch.stack([((tgt[:, 0] + 0.5 * tw) - (src[:, 0] + 0.5 * sw)) / sw,
                          ((tgt[:, 1] + 0.5 * th) - (src[:, 1] + 0.5 * sh)) / sh,
                          torch.log(tw / sw), torch.log(th / sh)], dim=1)
    normaliser = max(1, int(pos.sum()))
    return float(focal.sum()) / normaliser, float((deltas[pos] - wanted).abs().sum()) / normaliser, int(pos.sum())


def _scene():
    # overlapping objects, one too small for any anchor to reach IoU 0.4 (a low-quality match), one cut by
    # the border, one so thin that the resize makes it empty (detectron2 drops it)
    boxes = torch.tensor([[10.0, 8.0, 60.0, 50.0], [30.0, 20.0, 80.0, 70.0], [70.5, 40.25, 73.0, 42.0],
                          [100.0, 60.0, 130.0, 95.0], [5.0, 5.0, 5.000001, 30.0]])
    return {"boxes": boxes, "labels": torch.tensor([3, 3, 17, 41, 5])}


def test_loss_is_detectron2s_with_the_images_own_normaliser(tmp_path, detector, d2_state):
    path = _jpeg(tmp_path, 90, 130, seed=9)
    target = _scene()
    batch, size = _d2_batch(path, SMALL["min_size"], SMALL["max_size"])
    with torch.no_grad():
        logits, deltas = _d2_network(d2_state, batch)
        feature_sizes = [tuple(t.shape[-2:]) for t in detector.backbone(batch)]
    cls_loss, box_loss, positives = _d2_loss(logits, deltas, _d2_anchors(feature_sizes), target["boxes"],
                                             target["labels"], (90, 130), size)
    ours = detector.image_losses([to_tensor(read_image(path))], [target])
    assert int(ours["num_foreground"][0]) == positives > 5
    assert math.isclose(float(ours["classification"][0].detach()), cls_loss, rel_tol=1e-5)
    assert math.isclose(float(ours["bbox_regression"][0].detach()), box_loss, rel_tol=1e-5)
    with torch.no_grad():
        parts = detector.object_losses([to_tensor(read_image(path))], [target])[0]
    assert float(parts["classification"][5] + parts["bbox_regression"][5]) == 0.0  # the emptied object owns nothing
    assert math.isclose(float(parts["classification"].sum()), cls_loss, rel_tol=1e-5)


def test_gradient_does_not_depend_on_earlier_images(tmp_path, detector):
    """detectron2's loss_normalizer is a moving average over calls; gradlens divides by each image's own
    positives, so an image's gradient is the same alone, after another image and beside it in a batch."""
    image_a = to_tensor(read_image(_jpeg(tmp_path, 90, 130, seed=1)))
    image_b = to_tensor(read_image(_jpeg(tmp_path, 91, 129, seed=2)))  # the same canvas: batched together
    target_a, target_b = _scene(), {"boxes": torch.tensor([[4.0, 4.0, 120.0, 90.0]]), "labels": torch.tensor([0])}

    def gradient(images, targets, which=0):
        images = [im.clone().requires_grad_(True) for im in images]
        losses = detector.image_losses(images, targets)
        (losses["classification"] + losses["bbox_regression"]).sum().backward()
        return images[which].grad

    alone = gradient([image_a], [target_a])
    gradient([image_b], [target_b])  # another image in between (detectron2 would update its moving average)
    assert torch.equal(gradient([image_a], [target_a]), alone)
    batched = gradient([image_b, image_a], [target_b, target_a], which=1)  # equal up to summation order
    assert float((batched - alone).abs().max()) <= 1e-4 * float(alone.abs().max())
    assert alone.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# checkpoints


def _numpy_model(state):
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


@pytest.mark.parametrize("protocol", [4, 5])
def test_model_zoo_pkl_loads_and_detects(tmp_path, detector, d2_state, protocol):
    path = tmp_path / "model_final_5bd44e.pkl"
    with open(path, "wb") as f:  # as the model zoo's files: numpy arrays under "model", an author
        pickle.dump({"model": _numpy_model(d2_state), "__author__": "Detectron2 Model Zoo",
                     "matching_heuristics": True}, f, protocol=protocol)
    loaded = with_preprocess(load_detector(path), **SMALL)
    assert type(loaded) is d2.Detectron2RetinaNet and loaded.checkpoint_format == "detectron2"
    assert loaded.arch_name == d2.ARCH and loaded.categories[0] == {"id": 1, "name": "person"}
    assert loaded.categories[-1]["id"] == 90 and len(loaded.categories) == K
    image = to_tensor(read_image(_jpeg(tmp_path, 80, 110, seed=3)))
    theirs, ours = loaded.detect([image])[0], detector.detect([image])[0]
    assert len(ours["scores"]) > 0 and all(torch.equal(theirs[k], ours[k]) for k in ("boxes", "scores", "labels"))


def test_pkl_is_a_checkpoint_on_the_command_line(tmp_path):
    from gradlens.scoring.sources import identify_source

    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "__author__": "Detectron2 Model Zoo"}))
    assert identify_source(path).kind == "checkpoint"


def test_protocol_2_pickles_of_arrays_are_read(tmp_path):
    """Detectron1-era and Python 2 pickles: protocol 2, bytes as _codecs.encode(text, "latin1"), OrderedDict."""
    import collections

    arrays = collections.OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.float64(2.5), c=[1, (2, "x")])
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "Detectron2 Model Zoo"}, protocol=2))
    loaded = d2.read_pkl(path)
    assert list(loaded["model"]) == ["a", "b", "c"] and loaded["model"]["c"] == [1, (2, "x")]
    np.testing.assert_array_equal(loaded["model"]["a"], arrays["a"])
    assert loaded["model"]["b"] == 2.5


def test_checkpointer_pth_loads_and_detects(tmp_path, detector, d2_state):
    """DetectionCheckpointer.save: {"model": state_dict, "iteration": ...}; DDP's module. prefix and the
    pixel_mean/pixel_std and cell-anchor buffers of old checkpoints are ignored, as detectron2 ignores them."""
    state = {f"module.{k}": v for k, v in d2_state.items()}
    state["module.pixel_mean"] = torch.tensor([1.0, 2.0, 3.0]).view(-1, 1, 1)
    state["module.anchor_generator.cell_anchors.0"] = torch.zeros(9, 4)
    path = tmp_path / "model_0089999.pth"
    torch.save({"model": state, "iteration": 89999, "scheduler": {"last_epoch": 89999, "base_lrs": [0.01]}}, path)
    loaded = with_preprocess(load_detector(path), **SMALL)
    assert type(loaded) is d2.Detectron2RetinaNet and loaded.checkpoint_format == "detectron2"
    image = to_tensor(read_image(_jpeg(tmp_path, 60, 75, seed=5)))
    theirs, ours = loaded.detect([image])[0], detector.detect([image])[0]
    assert all(torch.equal(theirs[k], ours[k]) for k in ("boxes", "scores", "labels"))
    # gradlens' own format keeps the detectron2 arithmetic
    again = with_preprocess(load_detector(save_detector(loaded, tmp_path / "converted.pth")), **SMALL)
    assert type(again) is d2.Detectron2RetinaNet and again.preprocess.convention == "detectron2"
    assert torch.equal(again.detect([image])[0]["boxes"], ours["boxes"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pkl_is_refused_without_running(tmp_path, d2_state):
    marker = tmp_path / "ran"
    small = {k: v.numpy() for k, v in list(d2_state.items())[:3]}
    for i, payload in enumerate([
        {"model": {**small, "evil": _Evil(marker)}, "__author__": "x"},  # a global: os.system / posix.system
        {"model": {"w": np.array([_Evil(marker)], dtype=object)}, "__author__": "x"},  # inside an object array
        _Evil(marker),
    ]):
        path = tmp_path / f"evil{i}.pkl"
        path.write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(CheckpointError, match="needs code beyond numpy arrays.*--trust-checkpoint"):
            load_detector(path)
        assert not marker.exists()
    path = tmp_path / "eval.pkl"  # another dangerous builtin, by hand: builtins.eval("...")
    path.write_bytes(b"\x80\x02cbuiltins\neval\nq\x00X\x0b\x00\x00\x00print('hi')q\x01\x85q\x02Rq\x03.")
    with pytest.raises(CheckpointError, match="builtins.eval is not allowed"):
        load_detector(path)
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps({"model": small}, protocol=2)[:40])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_detector(tmp_path / "cut.pkl")


def test_what_is_not_run_is_refused_in_one_sentence(tmp_path, d2_state):
    caffe2 = tmp_path / "R-50.pkl"  # an ImageNet/Detectron1 pickle: Caffe2 blob names
    caffe2.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32)}}, protocol=2))
    with pytest.raises(CheckpointError, match="Caffe2/Detectron1"):
        load_detector(caffe2)
    keys = {k: torch.zeros(1) for k in d2_state}
    keys["head.cls_score.weight"] = torch.zeros(720, 256, 3, 3)
    r101 = dict(keys, **{f"backbone.bottom_up.res4.{i}.conv1.weight": torch.zeros(1) for i in range(6, 23)})
    with pytest.raises(CheckpointError, match="ResNet-101; gradlens runs detectron2's ResNet-50"):
        d2.recognise(r101)
    normed = dict(keys, **{"head.cls_subnet.1.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="normalisation layers in its head"):
        d2.recognise(normed)
    assert d2.recognise(keys) == (d2.ARCH, {"stride_in_1x1": True}, K)
    faster_rcnn = {k: v for k, v in keys.items() if not k.startswith("head.")}
    faster_rcnn["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 1024)
    path = tmp_path / "faster_rcnn.pth"
    torch.save({"model": faster_rcnn, "iteration": 1}, path)
    with pytest.raises(CheckpointError, match="a detectron2 model but no RetinaNet"):
        load_detector(path)
    with pytest.raises(CheckpointError, match="not the retinanet_resnet50 named by --arch"):
        path = tmp_path / "m.pth"
        torch.save({"model": d2_state}, path)
        load_detector(path, arch="retinanet_resnet50")
