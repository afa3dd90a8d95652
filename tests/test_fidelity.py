"""Each checkpoint runs as its own framework runs it: references written from the upstream definitions.

- the resize against OpenCV itself (``cv2.resize``, which mmcv calls), and the
  whole mmcv test pipeline (decode, rescale, resize, normalise, pad) rebuilt
  here from cv2 calls;
- the gradient of the resize as the Jacobian of the fixed-point linear map;
- mmdetection's ``MaxIoUAssigner`` on scenes built by hand where it and
  torchvision's ``Matcher`` disagree, with the expected labels worked out by
  hand, and against a literal transcription of its loop on crowded scenes;
- torchvision's own ``RetinaNet`` object (same weights) for detections (all
  300), loss and gradient.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

from gradlens.data.images import read_image, to_tensor
from gradlens.models.detectors.assign import MaxIoUAssigner, mmdet_box_overlaps
from gradlens.models.preprocessing.resize import _matrices, cv2_resize_uint8, mmcv_resize
from gradlens.models.preprocessing.transform import PreprocessConfig, batch_images, mmcv_normalise

MMDET_MEAN = np.array([123.675, 116.28, 103.53])
MMDET_STD = np.array([58.395, 57.12, 57.375])


def _cases(seed: int, count: int):
    rng = np.random.default_rng(seed)
    fixed = [(480, 640, 800, 1067), (375, 500, 800, 1067), (33, 47, 61, 83), (100, 100, 50, 50),  # exact 2x shrink
             (64, 64, 128, 128), (17, 23, 17, 40), (9, 13, 200, 311), (5, 3, 7, 2), (1, 1, 3, 3), (2, 2, 1, 1),
             (7, 1, 9, 1), (1, 5, 1, 9), (300, 200, 600, 400)]  # exact 2x growth
    return fixed + [tuple(int(v) for v in np.r_[rng.integers(2, 200, 2), rng.integers(2, 260, 2)]) for _ in range(count)]


@pytest.mark.parametrize("channels", [3, 1])
def test_resize_equals_opencv_bit_for_bit(channels):
    rng = np.random.default_rng(channels)
    for h, w, new_h, new_w in _cases(channels, 60):
        image = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        expected = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR).reshape(new_h, new_w, channels)
        got = cv2_resize_uint8(torch.from_numpy(image).permute(2, 0, 1), (new_h, new_w)).permute(1, 2, 0).numpy()
        assert got.dtype == np.int32 and np.array_equal(got, expected), ((h, w, new_h, new_w), int((got != expected).sum()))


def test_a_float_resize_would_not_be_exact():
    """Why the integer arithmetic is reproduced: torch's float bilinear misses OpenCV's uint8 output."""
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    expected = cv2.resize(image, (267, 200), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    x = torch.from_numpy(image).permute(2, 0, 1).double()[None]
    floats = torch.nn.functional.interpolate(x, size=(200, 267), mode="bilinear", align_corners=False)[0]
    assert (torch.round(floats).permute(1, 2, 0).numpy() != expected).mean() > 0.01


def _imnormalize(image_rgb: np.ndarray) -> np.ndarray:
    """mmdetection's Normalize (float32 mean and std) calling mmcv 1.x's imnormalize_: a float32 image,
    cv2.subtract / cv2.multiply with the float64-widened mean and inverted std."""
    img = image_rgb.astype(np.float32)
    mean, std = np.array(MMDET_MEAN, dtype=np.float32), np.array(MMDET_STD, dtype=np.float32)  # Normalize.__init__
    mean = np.float64(mean.reshape(1, -1))
    stdinv = 1 / np.float64(std.reshape(1, -1))
    cv2.subtract(img, mean, img)
    cv2.multiply(img, stdinv, img)
    return img


def test_normalisation_equals_mmcv_imnormalize_for_every_value():
    values = np.tile(np.arange(256, dtype=np.uint8)[:, None, None], (1, 4, 3))
    expected = _imnormalize(values)
    got = mmcv_normalise(torch.from_numpy(values).permute(2, 0, 1).float(), PreprocessConfig())
    assert torch.equal(got.permute(1, 2, 0), torch.from_numpy(expected))


@pytest.mark.parametrize("size, scale", [((375, 500), (1333, 800)), ((427, 640), (416, 256)), ((61, 97), (96, 64))])
def test_preprocessing_equals_the_mmcv_pipeline_from_the_jpeg(tmp_path, size, scale):
    """LoadImageFromFile (cv2, BGR) -> Resize(keep_ratio) -> Normalize(to_rgb) -> Pad, rebuilt from cv2 calls."""
    from PIL import Image

    h, w = size
    rng = np.random.default_rng(h)
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.clip(np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 256], -1) + rng.normal(0, 25, (h, w, 3)), 0, 255)
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=85)

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))  # mmcv.rescale_size
    new_w, new_h = int(w * factor + 0.5), int(h * factor + 0.5)
    resized = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    normalised = _imnormalize(cv2.cvtColor(resized, cv2.COLOR_BGR2RGB))
    divisor = 32
    canvas = np.zeros((-(-new_h // divisor) * divisor, -(-new_w // divisor) * divisor, 3), np.float32)
    canvas[:new_h, :new_w] = normalised

    config = PreprocessConfig(min_size=min(scale), max_size=max(scale), size_divisor=divisor, convention="mmcv")
    batch, sizes = batch_images([to_tensor(read_image(path))], config)
    assert sizes == [(new_h, new_w)]
    assert torch.equal(batch[0].permute(1, 2, 0), torch.from_numpy(canvas))


def _slow_axis_matrix(src: int, dst: int, clamp: bool) -> np.ndarray:
    """One axis of OpenCV's INTER_LINEAR fixed-point weights, transcribed loop by loop from resize.cpp."""
    scale = 1.0 / (dst / src)
    matrix = np.zeros((dst, src))
    for d in range(dst):
        f = np.float32((d + 0.5) * scale - 0.5)
        s = int(np.floor(f))
        f = np.float32(f - np.float32(s))
        if clamp and s < 0:
            f, s = np.float32(0), 0
        if clamp and s >= src - 1:
            f, s = np.float32(0), src - 1
        w0 = int(np.rint(np.float32(np.float32(1) - f) * np.float32(2048)))
        w1 = int(np.rint(f * np.float32(2048)))
        matrix[d, min(max(s, 0), src - 1)] += w0 / 2048
        matrix[d, min(max(s + 1, 0), src - 1)] += w1 / 2048
    return matrix


@pytest.mark.parametrize("h, w, new_h, new_w", [(13, 17, 29, 23), (40, 30, 20, 15), (7, 9, 7, 9), (5, 11, 16, 3)])
def test_resize_gradient_is_the_fixed_point_linear_maps_jacobian(h, w, new_h, new_w):
    g = torch.Generator().manual_seed(h)
    x = (torch.randint(0, 256, (3, h, w), generator=g).double() / 255).requires_grad_(True)
    weights = torch.randn(3, new_h, new_w, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((mmcv_resize(x, (new_h, new_w)) * weights).sum(), x)
    rows, cols = _slow_axis_matrix(h, new_h, clamp=False), _slow_axis_matrix(w, new_w, clamp=True)
    expected = 255 * np.einsum("ia,cij,jb->cab", rows, weights.numpy(), cols)
    assert np.allclose(grad.numpy(), expected, rtol=1e-12, atol=1e-12)
    # and it is the map OpenCV rounds: cv2's uint8 output is the linear value, truncated in the vertical pass
    # (each tap loses less than 1/4 + 1/128 grey level) and rounded (+-1/2)
    pixels = (x.detach() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    exact = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    linear = np.einsum("ia,abc,jb->ijc", rows, pixels.astype(np.float64), cols)
    error = exact.reshape(linear.shape) - linear
    assert error.max() <= 0.5 and error.min() >= -0.5 - 2 * (1 / 4 + 1 / 128)


def test_the_gpu_and_cpu_backward_formulations_agree():
    """The dense matrix-product backward (used on GPUs) and the scatter one (CPU) compute the same product."""
    from gradlens.models.preprocessing.resize import resize_backward_dense, resize_backward_scatter

    g = torch.Generator().manual_seed(0)
    for h, w, new_h, new_w in [(13, 17, 29, 23), (40, 30, 20, 15), (5, 11, 16, 3), (48, 64, 80, 107)]:
        grad = torch.randn(3, new_h, new_w, generator=g, dtype=torch.float64)
        dense, scatter = resize_backward_dense(grad, (h, w)), resize_backward_scatter(grad, (h, w))
        assert dense.shape == (3, h, w) and torch.allclose(dense, scatter, rtol=1e-12, atol=1e-12)


def test_detector_gradient_passes_the_uint8_rounding_straight_through():
    """d loss / d image = 255 * A_y^T (d loss / d normalised image / std) A_x, the rounding contributing 1."""
    from tests.test_gradients import scene, tiny_detector

    det = tiny_detector(dtype=torch.float64)
    image, target = scene(50, 70, seed=3, dtype=torch.float64)
    image = torch.round(image * 255) / 255
    x = image.clone().requires_grad_(True)
    batch, sizes = batch_images([x], det.preprocess)
    leaf = batch.detach().requires_grad_(True)
    det.prepare = lambda images: (leaf, sizes)  # the same loss, seen from the preprocessed tensor
    losses = det.image_losses([image], [target])
    (grad_batch,) = torch.autograd.grad(losses["classification"].sum() + losses["bbox_regression"].sum(), leaf)
    del det.prepare
    (new_h, new_w) = sizes[0]
    rows, cols = (torch.from_numpy(m) for m in _matrices(50, 70, new_h, new_w))
    std = torch.tensor([58.395, 57.12, 57.375], dtype=torch.float32).double()[:, None, None]  # as Normalize stores it
    expected = 255 * rows.t() @ (grad_batch[0, :, :new_h, :new_w] / std) @ cols
    losses = det.image_losses([x], [target])
    (got,) = torch.autograd.grad(losses["classification"].sum() + losses["bbox_regression"].sum(), x)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))


# ---------------------------------------------------------------------------------------------
# anchor assignment


def _tv_match(gt, anchors):
    return det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)(box_iou(gt, anchors))


def _mm_match(gt, anchors):
    return MaxIoUAssigner(0.5, 0.4, 0.0).assign(mmdet_box_overlaps(gt, anchors))


T = lambda rows: torch.tensor(rows, dtype=torch.float32)  # noqa: E731

# (ground truth, anchors, mmdetection's labels, torchvision's labels): index of the object, -1 background, -2 ignored
HAND_CASES = {
    # duplicates: A0 has IoU 1 with both; argmax says object 0, the low-quality loop gives it to the later object 1.
    # A1 (IoU 0.8) stays with object 0; A2 (IoU 0.45) is ignored; A3 is background
    "duplicate boxes, the later object wins the tie": (
        T([[0, 0, 10, 10], [0, 0, 10, 10]]),
        T([[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 4.5], [20, 20, 30, 30]]),
        [1, 0, -2, -1], [0, 0, -2, -1],
    ),
    # a small object inside a large one: B0 has IoU 256/400 = 0.64 with the large object (positive for it) and
    # 100/256 = 0.39 with the small one, whose best anchor it is; mmdetection hands it to the small object,
    # torchvision keeps it with the large one (so the small object has no anchor at all)
    "small object inside a large one": (
        T([[0, 0, 20, 20], [0, 0, 10, 10]]),
        T([[0, 0, 16, 16], [0, 0, 20, 20], [10, 10, 20, 20], [30, 30, 40, 40]]),
        [1, 0, -1, -1], [0, 0, -1, -1],
    ),
    # D0 is the best anchor of both objects: IoU 110/120 = 0.917 with object 0 (its argmax) and 100/110 = 0.909
    # with object 1; the later object takes it in mmdetection's loop
    "a later object takes a shared best anchor": (
        T([[0, 0, 10, 12], [0, 0, 10, 10]]),
        T([[0, 0, 10, 11], [50, 50, 60, 60]]),
        [1, -1], [0, -1],
    ),
    # the object's best anchor (IoU 0.45) is positive by the low-quality rule; 0.44 is ignored; 0.3 background
    "low-quality match inside the ignore band": (
        T([[0, 0, 10, 10]]),
        T([[0, 0, 10, 4.5], [0, 0, 10, 4.4], [0, 0, 10, 3]]),
        [0, -2, -1], [0, -2, -1],
    ),
    # an object that overlaps no anchor has maximum IoU 0, and min_pos_iou=0 hands it every anchor with IoU 0 —
    # even F0, the other object's perfect match (upstream behaviour, kept as is)
    "an object out of every anchor's reach": (
        T([[0, 0, 10, 10], [100, 100, 110, 110]]),
        T([[0, 0, 10, 10], [20, 20, 30, 30]]),
        [1, 1], [0, 0],
    ),
}


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_assignment_by_hand(case):
    gt, anchors, mmdet_expected, torchvision_expected = HAND_CASES[case]
    assert _mm_match(gt, anchors).tolist() == mmdet_expected
    assert _tv_match(gt, anchors).tolist() == torchvision_expected


def test_assignment_without_objects_is_all_background():
    anchors = T([[0, 0, 10, 10], [5, 5, 9, 9]])
    assert _mm_match(torch.zeros(0, 4), anchors).tolist() == [-1, -1]


def _loop_assign(overlaps: torch.Tensor, pos=0.5, neg=0.4, min_pos=0.0) -> torch.Tensor:
    """MaxIoUAssigner.assign_wrt_overlaps as upstream writes it (mmdetection's codes: i + 1, 0, -1)."""
    num_gts, num_anchors = overlaps.shape
    assigned = torch.full((num_anchors,), -1, dtype=torch.long)
    max_overlaps, argmax_overlaps = overlaps.max(dim=0)
    gt_max_overlaps, _ = overlaps.max(dim=1)
    assigned[(max_overlaps >= 0) & (max_overlaps < neg)] = 0
    positive = max_overlaps >= pos
    assigned[positive] = argmax_overlaps[positive] + 1
    for i in range(num_gts):
        if gt_max_overlaps[i] >= min_pos:
            assigned[overlaps[i, :] == gt_max_overlaps[i]] = i + 1
    return torch.where(assigned > 0, assigned - 1, torch.where(assigned == 0, -1, -2))


def test_vectorised_assignment_equals_the_upstream_loop_on_crowded_scenes():
    from gradlens.models.detectors.anchors import AnchorConfig, MMDetAnchorGenerator

    anchors = torch.cat(MMDetAnchorGenerator(AnchorConfig()).level_anchors([(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)], "cpu"))
    g = torch.Generator().manual_seed(0)
    disagreements = 0
    for _ in range(20):
        n = int(torch.randint(2, 40, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([220.0, 160.0])
        wh = 4 + torch.rand(n, 2, generator=g) ** 2 * 120
        boxes = torch.cat([xy, xy + wh], 1)
        boxes = torch.cat([boxes, boxes[: n // 4]])  # duplicates
        nested = boxes[: n // 3].clone()
        nested[:, 2:] = nested[:, :2] + (nested[:, 2:] - nested[:, :2]) * 0.4  # small objects inside larger ones
        boxes = torch.cat([boxes, nested])
        overlaps = mmdet_box_overlaps(boxes, anchors)
        got = MaxIoUAssigner().assign(overlaps)
        assert torch.equal(got, _loop_assign(overlaps))
        disagreements += int((got != _tv_match(boxes, anchors)).sum())
    assert disagreements > 0  # the scenes are crowded enough for the two rules to differ


def test_mmdet_box_overlaps_equals_the_upstream_formula():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(7, 2, generator=g) * 50
    a = torch.cat([a, a + torch.rand(7, 2, generator=g) * 30], 1)
    a[0, 2] = a[0, 0]  # a degenerate box: IoU 0 against everything, never NaN
    b = torch.rand(9, 2, generator=g) * 50
    b = torch.cat([b, b + torch.rand(9, 2, generator=g) * 30], 1)
    got = mmdet_box_overlaps(a, b)
    eps = torch.tensor(1e-6)
    for i in range(7):
        for j in range(9):  # float32 scalar by scalar, in upstream's order of operations: equal to the last bit
            iw = (torch.min(a[i, 2], b[j, 2]) - torch.max(a[i, 0], b[j, 0])).clamp(min=0)
            ih = (torch.min(a[i, 3], b[j, 3]) - torch.max(a[i, 1], b[j, 1])).clamp(min=0)
            overlap = iw * ih
            union = (a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1]) + (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1]) - overlap
            assert got[i, j] == overlap / torch.max(union, eps), (i, j)
    assert torch.all(got[0] == 0)


def test_mmdetection_checkpoints_use_max_iou_assigner_and_torchvision_ones_the_matcher():
    from gradlens.models.registry import build_detector

    gt, anchors, mmdet_expected, torchvision_expected = HAND_CASES["small object inside a large one"]
    mm = build_detector("retinanet_cednet_mini", 3)
    tv = build_detector("torchvision_retinanet_resnet50_fpn", 91)
    assert mm.framework == "mmdetection" and tv.framework == "torchvision"
    assert mm.match(gt, anchors).tolist() == mmdet_expected
    assert tv.match(gt, anchors).tolist() == torchvision_expected


# ---------------------------------------------------------------------------------------------
# torchvision checkpoints, against torchvision's own RetinaNet object


def _torchvision_pair(dtype=torch.float32):
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.retinanet import _default_anchorgen
    from torchvision.models.resnet import resnet50
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    from gradlens.models.formats.checkpoints import detector_from_object
    from gradlens.models.registry import with_preprocess

    torch.manual_seed(0)
    # retinanet_resnet50_fpn as torchvision builds it for pretrained weights (frozen batch norm), at a small test size
    body = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 5, returned_layers=[2, 3, 4],
                                 extra_blocks=LastLevelP6P7(256, 256))
    reference = RetinaNet(body, 91, anchor_generator=_default_anchorgen(), min_size=160, max_size=256)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.startswith("backbone.body") and p.dim() > 1:
                p.mul_(0.7)  # keep random activations in range through 50 layers
        for module in reference.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_var.fill_(1.0)
        reference.head.classification_head.cls_logits.bias.fill_(-1.5)  # sigmoid 0.18 > 0.05: plenty of detections
    det = detector_from_object(reference.state_dict(), "tv.pth", arch="torchvision_retinanet_resnet50_fpn")
    det = with_preprocess(det, min_size=160, max_size=256)
    return reference.to(dtype).eval(), det.to(dtype).eval()


def test_torchvision_checkpoint_gives_torchvisions_300_detections():
    reference, det = _torchvision_pair()
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, 120, 170), generator=g).float() / 255,
              torch.randint(0, 256, (3, 190, 140), generator=g).float() / 255]
    with torch.no_grad():
        expected = reference(images)
    got = det.detect(images)
    for e, o in zip(expected, got):
        assert len(e["scores"]) == 300 and len(o["scores"]) == 300
        assert torch.equal(o["labels"], e["labels"])
        assert torch.allclose(o["scores"], e["scores"], rtol=0, atol=1e-5)
        assert torch.allclose(o["boxes"], e["boxes"], rtol=0, atol=1e-3)


def test_torchvision_checkpoint_loss_and_gradient_equal_torchvisions():
    reference, det = _torchvision_pair(torch.float64)
    g = torch.Generator().manual_seed(4)
    image = torch.randint(0, 256, (3, 100, 130), generator=g).double() / 255
    target = {"boxes": torch.tensor([[10.0, 12.0, 80.0, 90.0], [40.0, 30.0, 60.0, 50.0], [42.0, 30.0, 61.0, 52.0]],
                                    dtype=torch.float64), "labels": torch.tensor([1, 3, 18])}
    x = image.clone().requires_grad_(True)
    reference.train()  # torchvision returns losses only in training mode (frozen batch norm: same arithmetic)
    losses = reference([x], [target])
    expected_loss = losses["classification"] + losses["bbox_regression"]
    (expected_grad,) = torch.autograd.grad(expected_loss, x)
    x = image.clone().requires_grad_(True)
    ours = det.image_losses([x], [target])
    loss = ours["classification"].sum() + ours["bbox_regression"].sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert abs(loss.item() - expected_loss.item()) <= 1e-10 * abs(expected_loss.item())
    assert float((grad - expected_grad).norm() / expected_grad.norm()) <= 1e-10


def test_conventions_are_checked_and_old_files_read():
    with pytest.raises(ValueError, match="convention"):
        PreprocessConfig(convention="pil")
    # files written before the conventions had names
    assert PreprocessConfig.from_dict({"rounding": "floor"}).convention == "torchvision"
    assert PreprocessConfig.from_dict({"rounding": "round"}).convention == "mmcv"


# ---------------------------------------------------------------------------------------------
# mmdetection's loss pieces, bit for bit against transcriptions of the upstream functions


def _py_sigmoid_focal_loss(pred, target, gamma=2.0, alpha=0.25):
    """mmdet/models/losses/focal_loss.py: py_sigmoid_focal_loss, elementwise (reduction 'none')."""
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return torch.nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight


def _bbox2delta(proposals, gt):
    """mmdet/core/bbox/coder/delta_xywh_bbox_coder.py: bbox2delta with means 0 and stds 1."""
    px, py = (proposals[..., 0] + proposals[..., 2]) * 0.5, (proposals[..., 1] + proposals[..., 3]) * 0.5
    pw, ph = proposals[..., 2] - proposals[..., 0], proposals[..., 3] - proposals[..., 1]
    gx, gy = (gt[..., 0] + gt[..., 2]) * 0.5, (gt[..., 1] + gt[..., 3]) * 0.5
    gw, gh = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    return deltas.sub_(deltas.new_tensor([0.0] * 4)).div_(deltas.new_tensor([1.0] * 4))


def _mmdet_detector():
    from gradlens.models.registry import build_detector

    return build_detector("retinanet_cednet_mini", 5)


def test_focal_loss_is_mmdetections_elementwise():
    det = _mmdet_detector()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, generator=g) * 4
    targets = (torch.rand(400, generator=g) < 0.3).float()
    # one element at a time on both sides: torch's vector and scalar kernels round differently
    expected = torch.cat([_py_sigmoid_focal_loss(logits[i:i + 1], targets[i:i + 1]) for i in range(400)])
    got = torch.stack([det._focal_loss(logits[i:i + 1], targets[i:i + 1]) for i in range(400)])
    assert torch.equal(got, expected)


def test_box_encoding_is_mmdetections_bit_for_bit():
    det = _mmdet_detector()
    g = torch.Generator().manual_seed(1)
    anchors = torch.rand(500, 2, generator=g) * 300
    anchors = torch.cat([anchors, anchors + 8 + torch.rand(500, 2, generator=g) * 200], 1)
    boxes = torch.rand(500, 2, generator=g) * 300
    boxes = torch.cat([boxes, boxes + 1 + torch.rand(500, 2, generator=g) * 200], 1)
    assert torch.equal(det._encode(boxes, anchors), _bbox2delta(anchors, boxes))


def test_ground_truth_is_rescaled_and_clipped_as_mmdetections_resize():
    """Resize._resize_bboxes: float32 boxes times the float32 scale factor, then clipped to the resized image."""
    det = _mmdet_detector()
    boxes = np.array([[10.3, 20.7, 200.1, 150.9], [600.0, 400.0, 700.5, 490.0], [-3.0, -2.0, 50.0, 40.0]], np.float32)
    original, size = (480, 640), (256, 341)
    scale = np.array([size[1] / original[1], size[0] / original[0]] * 2, dtype=np.float32)
    expected = boxes * scale
    expected[:, 0::2] = np.clip(expected[:, 0::2], 0, size[1])
    expected[:, 1::2] = np.clip(expected[:, 1::2], 0, size[0])
    got = det._scaled_targets(torch.from_numpy(boxes), original, size, torch.zeros(1, 4))
    assert np.array_equal(got.numpy(), expected)


def test_mmdetection_loss_matches_finite_differences_on_the_preprocessed_image():
    """The mmdetection loss path (assigner, encoding, focal loss) is differentiated right: d loss / d batch."""
    from tests.test_gradients import scene, tiny_detector

    det = tiny_detector(dtype=torch.float64)
    assert det.framework == "mmdetection"
    image, target = scene(48, 70, seed=1, dtype=torch.float64)
    batch, sizes = det.prepare([image])

    def loss_of(b):
        det.prepare = lambda images: (b, sizes)
        try:
            losses = det.image_losses([image], [target])
        finally:
            del det.prepare
        return losses["classification"].sum() + losses["bbox_regression"].sum()

    leaf = batch.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(leaf), leaf)
    g = torch.Generator().manual_seed(2)
    eps = 1e-6
    with torch.no_grad():
        for _ in range(3):
            direction = torch.randn(batch.shape, generator=g, dtype=torch.float64)
            numeric = (loss_of(batch + eps * direction) - loss_of(batch - eps * direction)) / (2 * eps)
            analytic = (grad * direction).sum()
            assert abs(float(numeric - analytic)) <= 1e-5 * abs(float(analytic)) + 1e-9


def test_exif_setting_is_part_of_every_key_and_recorded_by_select(tmp_path, synthetic_coco, synthetic_gt):
    from dataclasses import replace

    from gradlens.attribution.compute import map_store_key
    from gradlens.attribution.methods import AttributionConfig
    from gradlens.attribution.workdir import workdir_ground_truth
    from gradlens.data.coco import load_ground_truth
    from gradlens.data.detections import write_detections
    from gradlens.data.synthetic import simulate_detections
    from gradlens.inference import InferenceSettings, cache_key
    from gradlens.selection.run import run_selection

    det = _mmdet_detector()
    det.categories = [{"id": i + 1, "name": str(i)} for i in range(5)]
    turned = load_ground_truth(replace(synthetic_coco, exif_orientation="apply"))
    assert turned.exif_orientation == "apply" and synthetic_gt.exif_orientation == "ignore"
    assert cache_key("x", turned, det, InferenceSettings()) != cache_key("x", synthetic_gt, det, InferenceSettings())
    config = AttributionConfig()
    assert map_store_key(det, "x", turned, config) != map_store_key(det, "x", synthetic_gt, config)
    a, b = (write_detections(simulate_detections(synthetic_gt, skill=s, seed=1), tmp_path / f"{s}.json") for s in (0.9, 0.3))
    result = run_selection(a, [b], coco=replace(synthetic_coco, exif_orientation="apply"), workdir=tmp_path / "w", top=3)
    assert result.manifest["dataset"]["exif_orientation"] == "apply"
    assert workdir_ground_truth(result.manifest).exif_orientation == "apply"
    assert workdir_ground_truth(result.manifest, synthetic_coco).exif_orientation == "apply"  # paths given, setting kept
