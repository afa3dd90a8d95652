"""gradlens' mmdetection post-processing keeps the boxes mmcv's own ``batched_nms`` keeps, in its order.

The reference is mmcv 1.7.2's Python ``batched_nms`` over its C++ CPU NMS, compiled from mmcv's source
(``scripts/make_nms_reference.py``), on float32 boxes whose scores tie everywhere (a third exactly 1.0, as a
saturated detector gives; the rest quantised to two decimals). NMS is discrete: the kept indices must be equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.ops import batched_nms

from gradlens.models.detectors.nms import SPLIT_THRESHOLD, mmcv_batched_nms, mmcv_nms

REFERENCE = torch.load(Path(__file__).parent / "data" / "mmcv_nms_reference.pt", weights_only=True)


@pytest.mark.parametrize("name", sorted(REFERENCE["cases"]))
def test_keeps_what_mmcv_keeps(name):
    case = REFERENCE["cases"][name]
    keep = mmcv_batched_nms(case["boxes"], case["scores"], case["labels"], case["iou"])
    assert torch.equal(keep, case["keep"])
    assert (len(case["boxes"]) >= SPLIT_THRESHOLD) == (name == "split_path")  # both of mmcv's paths are tested


def test_the_reference_tells_torchvision_apart():
    """torchvision's batched_nms (stable sort of ties, one NMS per class on the CPU) keeps other boxes here:
    the fixture exercises what gradlens had to change."""
    differ = 0
    for case in REFERENCE["cases"].values():
        theirs = batched_nms(case["boxes"], case["scores"], case["labels"], case["iou"])
        differ += not torch.equal(theirs, case["keep"])
    assert differ >= 2


def test_ties_follow_torch_sort_order_and_the_float_threshold():
    # two identical boxes of one class with one score: the kept one is the first in torch.sort's order
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2 + [[100.0, 100.0, 110.0, 110.0]])
    scores = torch.tensor([0.5, 0.5, 0.5])
    order = scores.sort(0, descending=True)[1]
    keep = mmcv_nms(boxes, scores, 0.5)
    assert keep.tolist() == [i for i in order.tolist() if i != (order[:2].tolist()[1])]
    # an overlap exactly float32(0.6) is above the double 0.6 but not above the kernel's float threshold
    a = torch.tensor([[0.0, 0.0, 10.0, 1.0]])
    for width in torch.linspace(5.0, 7.0, 20001):
        b = torch.tensor([[0.0, 0.0, float(width), 1.0]])
        iou = float((b[0, 2] * 1.0) / (10.0 * 1.0))
        if iou == float(torch.tensor(0.6)):
            break
    else:
        pytest.fail("no box pair with overlap float32(0.6)")
    pair = torch.cat([a, b])
    assert mmcv_nms(pair, torch.tensor([0.9, 0.8]), 0.6).tolist() == [0, 1]  # kept: 0.6f > 0.6f is false
    assert torch.ops.torchvision.nms(pair, torch.tensor([0.9, 0.8]), 0.6).tolist() == [0]


def test_empty_and_classes_apart():
    empty = torch.zeros(0, 4)
    assert mmcv_batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2)
    assert sorted(mmcv_batched_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5).tolist()) == [0, 1]
