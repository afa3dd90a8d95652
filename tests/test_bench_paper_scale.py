"""benchmarks/bench_paper_scale.py at a tiny scale: the whole analysis runs, and what it reports is real.

One run of the script's ``main`` (10 images of 64 px, the three full-size
detectors at test scale 80 x 133, top 4, naive loops on 2 images, CPU; about
25 s on 2 cores) is checked for the work directory it leaves, every stage's
numbers, the agreement with the naive loops, and its FLOP counts against a
count made by hand from the layers.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gradlens.models.registry import build_detector

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_paper_scale.py"
ARGS = ["--scale", "0.002", "--top", "4", "--naive-images", "2", "--device", "cpu", "--batch-size", "2"]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_paper_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_script()


def test_tiny_run_end_to_end(bench, tmp_path):
    """One run, every check (one test function, so parallel test workers never run the benchmark twice)."""
    report = bench.main([*ARGS, "--keep", str(tmp_path / "keep"), "--json", str(tmp_path / "report.json")])
    run = (report, tmp_path)
    check_work_directory(run, bench)
    check_stages(run)
    check_agreement(run)
    check_flops(run, bench)


def check_work_directory(run, bench):
    """selection.csv and area_curve.csv as select and area-curve write them, and every map in its store."""
    report, root = run
    workdir = Path(report["workdir"])
    assert workdir == root / "keep" / "run"
    annotations = json.loads((root / "keep" / "coco" / "annotations" / "instances_val2017.json").read_text())
    with_objects = {a["image_id"] for a in annotations["annotations"] if not a["iscrowd"]}
    selection = pd.read_csv(workdir / "selection.csv")
    assert len(selection) == min(4, len(with_objects)) == report["selected"]
    assert set(selection["image_id"]) <= with_objects
    assert {"quality_a", "quality_b1", "quality_b2", "improvement", "closest_b"} <= set(selection.columns)
    assert selection["improvement"].is_monotonic_decreasing

    curve = pd.read_csv(workdir / "area_curve.csv")
    assert sorted(curve["role"].unique()) == ["a", "b1", "b2"]
    assert set(curve["label"]) == {label for _, label, _ in bench.MODELS}
    assert (curve.groupby("role").size() == 200).all()  # area-curve's default grid, one curve per model
    assert (curve["num_images"] == len(selection)).all()
    assert curve["area"].between(0, 1).all() and curve.groupby("role")["area"].max().gt(0).all()
    assert (workdir / "area_curve.png").stat().st_size > 0
    for role in ("a", "b1", "b2"):  # every selected image has its map, in the store area-curve reads
        stores = list((workdir / "maps" / role).iterdir())
        assert len(stores) == 1 and len(list(stores[0].glob("*.npz"))) == len(selection)


def check_stages(run):
    """Every stage: positive times and rates; FLOPs, naive rates and ratios where measured; the JSON as returned."""
    report, root = run
    assert json.loads((root / "report.json").read_text()) == json.loads(json.dumps(report))
    stages = Counter(r["stage"] for r in report["stages"])
    assert stages == {"inference": 3, "select": 1, "gradients": 3, "area-curve": 1, "  curves": 1}
    for row in report["stages"]:
        assert row["seconds"] > 0 and row["images_per_s"] > 0, row
        if row["stage"] in ("inference", "gradients"):
            assert row["gflop_per_image"] > 1 and row["tflops"] > 0, row  # full-size networks: gigaflops even at 128 px
            assert row["naive_images"] == 2 and row["naive_images_per_s"] > 0 and row["ratio"] > 0, row
            assert row["peak_fraction"] is None  # no peak is claimed for a CPU
        expected = {"inference": 10, "select": 10}.get(row["stage"], report["selected"])
        assert row["images"] == expected, row
    assert all(r["detections_per_image"] > 0 for r in report["stages"] if r["stage"] == "inference")
    assert report["total_seconds"] == pytest.approx(sum(r["seconds"] for r in report["stages"] if r["in_total"]))
    for label, calibration in report["calibration"].items():  # calibrated: a few percent of the anchors fire
        assert calibration["anchors_above_threshold"] == pytest.approx(0.02, abs=0.005), label
        assert calibration["detections"] > 0, label


def check_agreement(run):
    """gradlens and the naive loops give the same detections, maps and curves."""
    agreement = run[0]["agreement"]
    for what, value in agreement.items():
        if what.startswith("inference"):
            assert value == "2/2", what
        elif what.startswith("gradients"):
            worst, l2 = (float(v) for v in value.split(","))
            assert l2 < 1e-2 and worst < 5e-2, what  # float16 storage; a ReLU flipped by the last bits moves one spot
        else:
            assert float(value) < 1e-9, what


def _hand_count(model: nn.Module, run) -> int:
    """FLOPs (2 per multiply-add) of every convolution, linear layer and window attention, from their shapes."""
    total = 0

    def conv(m, inputs, out):
        nonlocal total
        total += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inputs, out):
        nonlocal total
        total += 2 * out.numel() * m.in_features

    def attention(m, inputs, out):  # q @ k^T and attn @ v: 2 x windows x n^2 x c multiply-adds
        nonlocal total
        windows, n, c = inputs[0].shape
        total += 2 * 2 * windows * n * n * c

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif type(m).__name__ == "WindowAttention":
            hooks.append(m.register_forward_hook(attention))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return total


def _network_flops(arch: str, height: int, width: int) -> int:
    """The hand count of backbone + head on one canvas: from shapes alone on the meta device (no arithmetic),
    on the CPU if a layer wants real values."""
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                detector = build_detector(arch, 80)
                x = torch.zeros(1, 3, height, width)
                return _hand_count(detector, lambda: detector.head(detector.backbone(x)))
        except (NotImplementedError, RuntimeError):
            if device == "cpu":
                raise
    raise AssertionError("unreachable")


def check_flops(run, bench):
    """FlopCounterMode's counts against a count by hand from the layers' shapes."""
    report = run[0]
    for _, label, arch in bench.MODELS:
        flops = report["flops"][label]
        height, width = flops["canvas"]
        by_hand = _network_flops(arch, height, width)
        # FlopCounterMode counted detect_images (resize, network, post-processing): the network is all of it
        assert flops["inference_per_image"] == pytest.approx(by_hand, rel=0.01), label
        # frozen parameters: the backward computes input gradients only, about as much as the forward again
        # (weight gradients would make it 3x)
        assert flops["gradient_canvas"] == flops["canvas"]
        assert 1.9 <= flops["gradient_per_image"] / flops["inference_per_image"] <= 2.5, label


def test_coco_shaped_sizes_and_objects(bench):
    rng = np.random.default_rng(0)
    sizes = [bench._image_size(rng, 1.0) for _ in range(4000)]
    assert np.mean([max(s) == 640 for s in sizes]) == pytest.approx(0.98, abs=0.01)
    assert np.mean([h > w for h, w in sizes]) == pytest.approx(0.25, abs=0.03)
    landscape_short = Counter(h for h, w in sizes if w == 640 and h < w)
    assert landscape_short.most_common(2)[0][0] == 480 and landscape_short.most_common(2)[1][0] == 427
    objects = [bench._objects(rng, 480, 640, 1.0, list(range(1, 81))) for _ in range(2000)]
    assert np.mean([len(o) for o in objects]) == pytest.approx(7.3 * 0.99, rel=0.05)
    sides = np.sqrt([a["bbox"][2] * a["bbox"][3] for o in objects for a in o])
    assert 0.3 < np.mean(sides < 32) < 0.5 and 0.15 < np.mean(sides > 96) < 0.45  # COCO: 41 % small, 24 % large
    assert bench.workload(1.0) == {"images": 5000, "image_factor": 1.0, "test_scale": (800, 1333), "top": 1000}
    assert bench.workload(0.002)["test_scale"] == (80, 133)  # the image side stops at 64 px; the test scale follows it
