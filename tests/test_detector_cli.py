"""The detector commands end to end: score --model, select with checkpoints, evaluate, profile, convert, models."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
import torch

from gradlens.cli.app import main
from gradlens.models.formats.checkpoints import save_detector
from gradlens.profile import EXPLAINING, NOT_REPRODUCED, TABLE_A1, count, note_of, profile_classifier
from tests.test_inference import random_detector


def run(argv, capsys):
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    a = save_detector(random_detector("retinanet_cednet_mini", seed=1), folder / "cednet.pth")
    b = save_detector(random_detector("retinanet_convnext_mini", seed=2), folder / "convnext.pth")
    return a, b


def test_select_runs_checkpoints_and_reuses_their_detections(synthetic_coco, checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADLENS_CACHE_DIR", str(tmp_path / "cache"))
    a, b = checkpoints
    root = synthetic_coco.ann.parent.parent
    argv = ["select", "--a", a, "--b", b, "--coco-root", root, "--workdir", tmp_path / "ws", "--top", 5, "--workers", 0, "--no-progress"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "ws" / "manifest.json").read_text())
    assert [m["kind"] for m in manifest["models"]] == ["checkpoint", "checkpoint"]
    assert all(m["detections"] and m["detections"].endswith(".json") for m in manifest["models"])
    assert (tmp_path / "ws" / "scores" / "a" / "detections.json").exists()
    selection = pd.read_csv(tmp_path / "ws" / "selection.csv")
    assert len(selection) == 5
    cached = sorted((tmp_path / "cache" / "detections").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    # second run: the same cache files, untouched
    code, out, err = run(argv[:-3] + ["--workers", 0, "--no-progress"], capsys)
    assert code == 0, err
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert pd.read_csv(tmp_path / "ws" / "selection.csv").equals(selection)


def test_score_model_and_evaluate(synthetic_coco, checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADLENS_CACHE_DIR", str(tmp_path / "cache"))
    root = synthetic_coco.ann.parent.parent
    code, out, err = run(["score", "--model", checkpoints[0], "--coco-root", root, "--out", tmp_path / "s", "--workers", 0], capsys)
    assert code == 0, err
    assert (tmp_path / "s" / "images.csv").exists() and (tmp_path / "s" / "detections.json").exists()
    code, out, err = run(["evaluate", "--model", checkpoints[0], "--coco-root", root, "--format", "json", "--workers", 0], capsys)
    assert code == 0, err
    stats = json.loads(out)
    assert set(stats) >= {"AP", "AP50", "AR_100"} and 0 <= stats["AP"] <= 1
    # the same numbers from the cached results file
    results = tmp_path / "s" / "detections.json"
    code, out2, err = run(["evaluate", "--detections", results, "--coco-root", root, "--format", "json"], capsys)
    assert code == 0 and json.loads(out2) == stats


def test_detector_errors_are_one_sentence(synthetic_coco, checkpoints, tmp_path, capsys):
    root = synthetic_coco.ann.parent.parent
    bad = tmp_path / "cut.pth"
    bad.write_bytes(checkpoints[0].read_bytes()[:1000])
    for argv, message in [
        (["score", "--model", bad, "--coco-root", root, "--out", tmp_path / "x"], "damaged or truncated"),
        (["score", "--model", synthetic_coco.ann, "--coco-root", root, "--out", tmp_path / "x"], "--model expects a detector checkpoint"),
        (["evaluate", "--coco-root", root], "exactly one of"),
        (["score", "--model", checkpoints[0], "--coco-root", root, "--out", tmp_path / "x", "--precision", "fp16"], "needs a CUDA device"),
        (["profile", "--model", "ResNet-1000"], "Unknown model"),
        (["convert", bad, tmp_path / "y.pth"], "damaged or truncated"),
    ]:
        code, out, err = run(argv, capsys)
        assert code == 1, (argv, err)
        assert err.startswith("gradlens: error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_convert_and_models(checkpoints, tmp_path, capsys):
    sd = tmp_path / "plain.pth"
    torch.save(torch.load(checkpoints[0], weights_only=True)["state_dict"], sd)
    code, out, err = run(["convert", sd, tmp_path / "native.pth", "--arch", "retinanet_cednet_mini"], capsys)
    assert code == 0, err and "torchvision" in out
    assert torch.load(tmp_path / "native.pth", weights_only=True)["arch"] == "retinanet_cednet_mini"
    code, out, err = run(["models"], capsys)
    assert "retinanet_cednet_next_tiny" in out and "retinanet_swin_base" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}
    assert rows["retinanet_cednet_next_tiny"] == "mmdetection" and rows["torchvision_retinanet_resnet50_fpn"] == "torchvision"


def test_profile_reproduces_table_a1_for_cednet_next_tiny(capsys):
    result = profile_classifier("CEDNet-NeXt-T")
    assert round(result.params / 1e6) == 34 and round(result.macs / 1e9, 1) == 5.7
    code, out, err = run(["profile", "--model", "CEDNet-NeXt-T", "--format", "csv"], capsys)
    assert code == 0, err
    row = pd.read_csv(io.StringIO(out)).iloc[0]
    assert row["model"] == "CEDNet-NeXt-T" and (row["paper_params_M"], row["paper_flops_G"]) == (34, 5.7)
    assert row["reproduced"] and pd.isna(row["note"])


def test_flop_counter_counts_multiply_accumulates_and_used_parameters():
    layer = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(4, 4))
    x = torch.zeros(1, 3, 4, 4)
    params, macs = count(layer, lambda: layer[0](x))  # the Linear is never run
    assert params == 8 * 3 * 9 + 8
    assert macs == 8 * 3 * 9 * 16


@pytest.mark.parametrize("name", list(TABLE_A1))
def test_every_table_a1_row_is_reproduced_or_explained(name):
    """All 22 classifiers (Table A1's 21 rows and gradlens' default CEDNet-NeXt-T), counted on the meta device."""
    result = profile_classifier(name)
    assert result.reproduces_paper == (name not in NOT_REPRODUCED), result.row()
    assert result.row()["note"] == note_of(name) and (name not in NOT_REPRODUCED or note_of(name) == NOT_REPRODUCED[name])


def test_the_hrnet_row_is_hrnet_w30s_size():
    """Table A1's HRNet-w32 figures are HRNet-W30-C's, in the official counter's units of 2**30 multiply-adds."""
    assert len(TABLE_A1) == 22 and set(NOT_REPRODUCED) <= set(TABLE_A1) and "HRNet-W30" in EXPLAINING
    w30 = profile_classifier("HRNet-W30")
    assert round(w30.params / 1e6) == 38
    assert abs(w30.macs / 2**30 - 7.55) < 0.005  # the official README prints 7.55, the table 7.6


def test_meta_device_counts_equal_a_real_forward():
    for name in ("ConvNeXt-T", "RevCol-T"):
        meta, cpu = profile_classifier(name), profile_classifier(name, device="cpu")
        assert (meta.params, meta.macs) == (cpu.params, cpu.macs)
