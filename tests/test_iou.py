import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from gradlens.scoring.iou import paired_iou


def coco_iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([mask_utils.iou(b[i : i + 1], a[i : i + 1], [0])[0, 0] for i in range(len(a))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_pairs_match_pycocotools_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    a = np.concatenate([rng.uniform(0, 100, (n, 2)), rng.uniform(0, 60, (n, 2))], axis=1)
    b = np.concatenate([a[:, :2] + rng.normal(0, 15, (n, 2)), np.abs(a[:, 2:] + rng.normal(0, 15, (n, 2)))], axis=1)
    b[::17, 2] = 0.0  # degenerate widths
    a[::23, 3] = 0.0  # degenerate heights
    ours = paired_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ref = coco_iou_pairs(a, b)
    np.testing.assert_array_equal(ours, ref)


def test_special_cases():
    boxes = [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),  # identical
        ([0, 0, 10, 10], [10, 0, 10, 10], 0.0),  # touching edges: no overlap
        ([0, 0, 10, 10], [20, 20, 5, 5], 0.0),  # disjoint
        ([0, 0, 10, 10], [0, 0, 5, 10], 0.5),  # contained half
        ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # two points: empty union is 0, not NaN
        ([0, 0, 4, 4], [2, 2, 4, 4], 4 / 28),
    ]
    a = torch.tensor([x for x, _, _ in boxes], dtype=torch.float64)
    b = torch.tensor([y for _, y, _ in boxes], dtype=torch.float64)
    expected = torch.tensor([e for _, _, e in boxes], dtype=torch.float64)
    torch.testing.assert_close(paired_iou(a, b), expected)
    torch.testing.assert_close(paired_iou(b, a), expected)  # symmetric
