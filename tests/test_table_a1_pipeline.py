"""Every Table A1 backbone that gradlens added as a RetinaNet runs the whole pipeline from an mmdetection checkpoint.

For each architecture, ``scripts/make_mmdet_checkpoints.py`` writes a full-size RetinaNet in the official
mmdetection 2.x key layout (random weights that still detect) whose config asks for a small test scale;
``select`` recognises and runs it against the bundled ConvNeXt on three synthetic images, ``gradients``
writes its maps, and ``area-curve`` reuses them. The maps are checked against a plain autograd call on
the checkpoint loaded through the Python API.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gradlens.data.synthetic import make_synthetic_coco
from gradlens.models.bundled import bundled_detector_path
from gradlens.models.formats.checkpoints import load_detector
from gradlens.models.formats.mmdet import coco80_categories
from tests.scripts import make_mmdet_checkpoints
from tests.test_detector_cli import run

NEW_ARCHITECTURES = [
    "retinanet_hrnet_w32",
    *(f"retinanet_{family}_{size}" for family in ("focalnet", "msg", "revcol") for size in ("tiny", "small", "base")),
    # the fork's other RetinaNets (issue 25): its CEDNetWrapper over ResNet bottlenecks, Swin and CSwin, and CSWin-T
    "retinanet_ced_resnet_50", "retinanet_ced_swin_tiny", "retinanet_ced_cswin_tiny", "retinanet_cswin_tiny",
]
TEST_SCALE = (128, 192)


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
    mmdet_path, _ = make_mmdet_checkpoints().make(name, tmp_path / "ckpt", test_scale=TEST_SCALE, size_divisor=32, native=False)
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
    stored = models[0].store.read(image_id).astype(np.float64)
    pixels = gradlens.to_tensor(gradlens.read_image(gt.image_path(image_id)))
    target = gradlens.image_targets(gt, image_id, detector.categories)
    exact = plain_map(load_detector(mmdet_path).double(), pixels.double(), target)
    paths = float32_paths(mmdet_path, pixels, target)
    assert stored.shape == exact.shape and np.isfinite(stored).all() and stored.max() > 0
    for path in paths:  # each float32 path is the float64 gradient up to float32 round-off and its ReLU flips
        assert relative_l2(path, exact) <= 2e-2, relative_l2(path, exact)
    assert relative_l2(stored, exact) <= 2e-2
    assert stored_map_matches(stored, paths)
    mmdet_path.unlink()  # up to 600 MB each; pytest keeps the folders of passed tests otherwise


def plain_map(detector, pixels: torch.Tensor, target, channels_last: bool = False, threads: int | None = None) -> np.ndarray:
    """|d loss / d pixel|, max over channels, of one autograd call (float64 where the detector is)."""
    if channels_last:
        detector.use_channels_last()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads or saved)
    try:
        image = pixels.clone().requires_grad_(True)
        losses = detector.image_losses([image], [target.as_dict()])
        (grad,) = torch.autograd.grad(losses["classification"][0] + losses["bbox_regression"][0], image)
    finally:
        torch.set_num_threads(saved)
    return grad.abs().amax(dim=0).double().numpy()


def float32_paths(mmdet_path, pixels: torch.Tensor, target) -> list[np.ndarray]:
    """The map along the float32 arithmetic paths gradlens takes: contiguous on every core (the Python API)
    and channels-last on one core per batch (the CLI on a CPU, several batches at once).

    Most pixels differ from the float64 map by ~1e-6 of the maximum. But where a ReLU's input lies within
    float32 round-off of zero, one path opens the unit and another closes it, and the gradient changes by a
    finite amount over that unit's receptive field, which for the coarse levels is the whole image
    (measured on an AMD EPYC: up to 0.4 % of the maximum for MSG-S, 0.09 % at the 90th percentile of a
    random HRNet-W32). Which units flip depends on the CPU's order of additions, so the stored map is
    compared pixel by pixel with the plain call that takes the pipeline's own path, on the machine that
    runs the test, and every path with float64 as a whole."""
    return [plain_map(load_detector(mmdet_path), pixels, target, channels_last, threads)
            for channels_last, threads in ((False, None), (True, 1))]


def relative_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def stored_map_matches(stored: np.ndarray, paths: list[np.ndarray]) -> bool:
    """Pixel by pixel, the stored map equals one float32 path up to the float16 store's rounding (values / max
    to 11 significant bits: 2**-11 relative, 2**-25 of the max below float16's normal range) and float32
    round-off between two arrangements of the same kernels (1e-5 of the max; measured <= 3e-6)."""
    misses = []
    for path in paths:
        peak = path.max()
        allowed = 2.0**-11 * np.abs(path) + 2.0**-25 * peak + 1e-5 * peak
        misses.append(int(np.sum(np.abs(stored - path) > allowed)))
    return min(misses) == 0
