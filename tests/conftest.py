"""Shared fixtures: hand-made COCO files and one small synthetic dataset per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from gradlens.data.coco import load_ground_truth
from gradlens.data.synthetic import make_synthetic_coco

if os.environ.get("PYTEST_XDIST_WORKER"):
    # 'make test' runs one worker per core: a second OpenMP thread per worker only oversubscribes the
    # cores, and small tensor ops then wait on each other (measured: 10-30x slower gradient tests).
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # notebook kernels and subprocesses too

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 5, "name": "bird"}]


def make_gt_dict(images, annotations, categories=CATS) -> dict:
    """``images``: list of ids or dicts; ``annotations``: (image_id, category_id, [x, y, w, h], iscrowd) tuples."""
    imgs = [i if isinstance(i, dict) else {"id": i, "file_name": f"{i:012d}.jpg", "width": 100, "height": 80} for i in images]
    anns = [
        {"id": k + 1, "image_id": im, "category_id": c, "bbox": list(map(float, b)), "area": float(b[2] * b[3]) if len(b) == 4 else 0.0, "iscrowd": crowd}
        for k, (im, c, b, crowd) in enumerate(annotations)
    ]
    return {"images": imgs, "annotations": anns, "categories": categories}


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def det(image_id, category_id, bbox, score) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": list(map(float, bbox)), "score": float(score)}


@pytest.fixture
def gt_file(tmp_path):
    """A writer of hand-made annotation files."""

    def write(images, annotations, categories=CATS, name="instances_val2017.json"):
        return write_json(tmp_path / "annotations" / name, make_gt_dict(images, annotations, categories))

    return write


@pytest.fixture
def results_file(tmp_path):
    """A writer of detection results files (any JSON, so broken ones too)."""
    counter = iter(range(10**6))

    def write(records, name=None):
        return write_json(tmp_path / (name or f"results{next(counter)}.json"), records)

    return write


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_coco(root, num_images=24, seed=3, progress=False)


@pytest.fixture(scope="session")
def synthetic_gt(synthetic_coco):
    return load_ground_truth(synthetic_coco)
