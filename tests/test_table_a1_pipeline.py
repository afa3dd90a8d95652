"""Every Table A1 backbone that gradlens added as a RetinaNet runs the whole pipeline from an mmdetection checkpoint.

For each architecture, ``scripts/make_mmdet_checkpoints.py`` writes a full-size RetinaNet in the official
mmdetection 2.x key layout (random weights that still detect) whose config asks for a small test scale;
``select`` recognises and runs it against the bundled ConvNeXt on three synthetic images, ``gradients``
writes its maps, and ``area-curve`` reuses them. The maps are checked against a plain autograd call on
the checkpoint loaded through the Python API.
"""

from __future__ import annotations

import json
from importlib import util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gradlens.data.synthetic import make_synthetic_coco
from gradlens.models.bundled import bundled_detector_path
from gradlens.models.checkpoints import load_detector
from gradlens.models.mmdet import coco80_categories
from tests.test_detector_cli import run

NEW_ARCHITECTURES = [
    "retinanet_hrnet_w32",
    *(f"retinanet_{family}_{size}" for family in ("focalnet", "msg", "revcol") for size in ("tiny", "small", "base")),
]
TEST_SCALE = (128, 192)


def _make_checkpoints():
    spec = util.spec_from_file_location("make_mmdet", Path(__file__).parents[1] / "scripts" / "make_mmdet_checkpoints.py")
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    """Three synthetic images whose annotation file lists COCO's 80 categories, as val2017's does."""
    paths = make_synthetic_coco(tmp_path_factory.mktemp("coco"), num_images=3, seed=11, progress=False)
    data = json.loads(paths.ann.read_text())
    have = {c["id"] for c in data["categories"]}
    data["categories"] += [c for c in coco80_categories() if c["id"] not in have]
    paths.ann.write_text(json.dumps(data))
    return paths


@pytest.mark.parametrize("arch", NEW_ARCHITECTURES)
def test_whole_pipeline_from_an_mmdet_checkpoint(arch, tiny_coco, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADLENS_CACHE_DIR", str(tmp_path / "cache"))
    name = arch.removeprefix("retinanet_")
    mmdet_path, _ = _make_checkpoints().make(name, tmp_path / "ckpt", test_scale=TEST_SCALE, size_divisor=32, native=False)
    raw = torch.load(mmdet_path, weights_only=True)
    assert all(k.split(".")[0] in {"backbone", "neck", "bbox_head"} for k in raw["state_dict"])

    root, wd = tiny_coco.ann.parent.parent, tmp_path / "wd"
    code, out, err = run(["select", "--a", mmdet_path, "--b", bundled_detector_path("convnext"), "--coco-root", root,
                          "--workdir", wd, "--top", 2, "--class-agnostic", "--workers", 0, "--device", "cpu",
                          "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    manifest = json.loads((wd / "manifest.json").read_text())
    assert manifest["models"][0]["kind"] == "checkpoint"
    detections = json.loads(Path(manifest["models"][0]["detections"]).read_text())
    assert len(detections) > 0  # the random full-size detector detects something on the synthetic images
    selection = pd.read_csv(wd / "selection.csv")
    assert len(selection) == 2

    maps = tmp_path / "maps"
    code, out, err = run(["gradients", "--model", mmdet_path, "--selection", wd / "selection.csv", "--top", 2,
                          "--out", maps, "--device", "cpu", "--workers", 0, "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    assert "2 maps computed, 0 reused" in out

    code, out, err = run(["area-curve", "--workdir", wd, "--checkpoint", f"a={mmdet_path}", "--thresholds", 20,
                          "--device", "cpu", "--workers", 0, "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(wd / "area_curve.csv")
    assert set(table["role"]) == {"a", "b"} and (table["num_images"] == 2).all()
    a_curve = table[table["role"] == "a"]["area"].to_numpy()
    assert a_curve[0] > 0 and np.all(np.diff(a_curve) <= 0)

    # A's stored map of the first selected image is |d loss / d pixel| (max over channels) of a plain autograd call
    import gradlens

    detector = load_detector(mmdet_path)
    assert detector.arch_name == arch and detector.checkpoint_format == "mmdetection"
    assert (detector.preprocess.min_size, detector.preprocess.max_size, detector.preprocess.size_divisor) == (128, 192, 32)
    models, gt = gradlens.workdir_maps(wd)
    image_id = int(selection["image_id"].iloc[0])
    stored = models[0].store.read(image_id)
    image = gradlens.to_tensor(gradlens.read_image(gt.image_path(image_id))).requires_grad_(True)
    target = gradlens.image_targets(gt, image_id, detector.categories)
    losses = detector.image_losses([image], [target.as_dict()])
    loss = losses["classification"][0] + losses["bbox_regression"][0]
    (grad,) = torch.autograd.grad(loss, image)
    expected = grad.abs().amax(dim=0).numpy()
    assert stored.shape == expected.shape and np.isfinite(stored).all() and stored.max() > 0
    assert np.abs(stored - expected).max() <= 2e-3 * expected.max()  # float16 store, float32 arithmetic
    mmdet_path.unlink()  # up to 600 MB each; pytest keeps the folders of passed tests otherwise
