"""The command line: help everywhere, real outputs, and one-sentence errors with non-zero exits."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from gradlens.cli.app import main
from gradlens.data.detections import write_detections
from gradlens.data.synthetic import simulate_detections

from .conftest import det

COMMANDS = ["score", "select", "synthetic", "demo"]


def run(argv, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_python_dash_m_and_version():
    proc = subprocess.run([sys.executable, "-m", "gradlens", "--version"], capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("gradlens ")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(capsys, command):
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0 and "Usage: gradlens " + command in out


def test_top_level_help_lists_commands(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and all(c in out for c in COMMANDS)


@pytest.fixture
def results(tmp_path, synthetic_gt):
    return write_detections(simulate_detections(synthetic_gt, skill=0.7, seed=4), tmp_path / "res.json")


def test_score_writes_tables(capsys, tmp_path, synthetic_coco, results, monkeypatch):
    monkeypatch.setenv("GRADLENS_COCO_ROOT", str(synthetic_coco.ann.parent.parent))  # the variable is honoured
    code, out, err = run(["score", "--detections", str(results), "--out", str(tmp_path / "s"), "--device", "cpu"], capsys)
    assert code == 0, err
    objects = pd.read_csv(tmp_path / "s/objects.csv")
    images = pd.read_csv(tmp_path / "s/images.csv")
    assert {"image_id", "ann_id", "category_id", "iou", "confidence", "quality"} <= set(objects.columns)
    assert {"image_id", "num_objects", "quality"} <= set(images.columns)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "s/images.parquet"), images, check_dtype=False)
    virtual = objects[~objects["matched"]]
    assert len(virtual) and (virtual[["iou", "confidence", "quality"]] == 0).all().all()
    meta = json.loads((tmp_path / "s/score.json").read_text())
    assert meta["summary"]["num_objects"] == len(objects)
    assert "images scored" in out and "crowd regions ignored" in out and "virtual match" in out


def test_score_counts_images_with_an_exif_orientation(capsys, tmp_path, synthetic_coco, synthetic_gt, results):
    import shutil

    from PIL import Image

    images = tmp_path / "images"
    shutil.copytree(synthetic_coco.images, images)
    first = synthetic_gt.image_path(int(synthetic_gt.image_ids[0])).name
    with Image.open(images / first) as img:
        exif = Image.Exif()
        exif[0x0112] = 8
        img.convert("RGB").save(images / first, exif=exif)
    argv = ["score", "--detections", str(results), "--out", str(tmp_path / "s"), "--ann", str(synthetic_coco.ann),
            "--images", str(images)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    total = len(synthetic_gt.image_ids)
    assert f"images with a non-identity EXIF orientation tag: 1 of {total} (decoded with --exif-orientation ignore)" in out


def test_select_with_two_baselines(capsys, tmp_path, synthetic_coco, synthetic_gt):
    paths = [
        write_detections(simulate_detections(synthetic_gt, skill=s, seed=i), tmp_path / f"m{i}.json")
        for i, s in enumerate([0.9, 0.5, 0.3])
    ]
    argv = ["select", "--a", str(paths[0]), "--b", str(paths[1]), "--b", str(paths[2]), "--top", "7"]
    argv += ["--workdir", str(tmp_path / "w"), "--ann", str(synthetic_coco.ann)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    sel = pd.read_csv(tmp_path / "w/selection.csv")
    assert len(sel) == 7 and {"quality_a", "quality_b1", "quality_b2", "improvement"} <= set(sel.columns)
    assert (sel["improvement"] == sel[["quality_a"]].values[:, 0] - sel[["quality_b1", "quality_b2"]].max(axis=1)).all()
    assert "Selected 7 of" in out


def error_of(capsys, argv):
    code, out, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    return code, lines


@pytest.mark.parametrize(
    "case, records, expected",
    [
        ("empty", [], "contains no detections"),
        ("foreign image", [det(123456789, 1, [0, 0, 5, 5], 0.5)], "image id is not in the annotation file"),
        ("negative box", None, "negative box width or height"),
        ("bad score", None, "score outside [0, 1]"),
    ],
)
def test_bad_results_exit_nonzero_with_one_sentence(capsys, tmp_path, synthetic_coco, synthetic_gt, case, records, expected):
    image_id = int(synthetic_gt.image_ids[0])
    if case == "negative box":
        records = [det(image_id, 1, [0, 0, -1, 5], 0.5)]
    if case == "bad score":
        records = [det(image_id, 1, [0, 0, 5, 5], 2.0)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records))
    code, lines = error_of(capsys, ["score", "--detections", str(path), "--out", str(tmp_path / "o"), "--ann", str(synthetic_coco.ann)])
    assert code == 1 and len(lines) == 1 and lines[0].startswith("gradlens: error: ") and expected in lines[0]
    assert not (tmp_path / "o").exists()


def test_missing_and_malformed_files(capsys, tmp_path, synthetic_coco, results):
    code, lines = error_of(capsys, ["score", "--detections", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")])
    assert code == 1 and len(lines) == 1 and "does not exist" in lines[0]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 1,')
    code, lines = error_of(capsys, ["score", "--detections", str(bad), "--out", str(tmp_path / "o"), "--ann", str(synthetic_coco.ann)])
    assert code == 1 and len(lines) == 1 and "not valid JSON" in lines[0]
    code, lines = error_of(capsys, ["score", "--detections", str(results), "--out", str(tmp_path / "o"), "--coco-root", str(tmp_path / "nowhere")])
    assert code == 1 and len(lines) == 1 and "annotation file" in lines[0] and "does not exist" in lines[0]
    code, lines = error_of(capsys, ["score", "--out", str(tmp_path / "o")])
    assert code == 1 and "exactly one of --detections" in lines[0]


def test_drop_invalid_reports_counts(capsys, tmp_path, synthetic_coco, synthetic_gt):
    image_id = int(synthetic_gt.image_ids[0])
    records = [det(image_id, 1, [0, 0, 5, 5], 0.5), det(image_id, 1, [0, 0, -2, 5], 0.5), det(image_id, 1, [0, 0, 5, 5], 7.0)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records))
    argv = ["score", "--detections", str(path), "--out", str(tmp_path / "o"), "--ann", str(synthetic_coco.ann), "--drop-invalid"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "dropped: negative box width or height: 1" in out and "dropped: score outside [0, 1]: 1" in out


def test_usage_errors_exit_nonzero(capsys):
    code, _, err = run(["select", "--a", "x.json"], capsys)
    assert code == 2 and "--b" in err
    code, _, err = run(["score", "--out", "o", "--detections", "r.json", "--device", "tpu"], capsys)
    assert code == 2


def test_demo_runs_end_to_end(capsys, tmp_path):
    code, out, err = run(["demo", "--out", str(tmp_path / "demo"), "--num-images", "12", "--top", "4", "--device", "cpu"], capsys)
    assert code == 0, err
    assert (tmp_path / "demo/run/selection.csv").is_file() and (tmp_path / "demo/run/manifest.json").is_file()
    selection = pd.read_csv(tmp_path / "demo/run/selection.csv")
    assert len(selection) == 4
    assert (selection["improvement"] > 0).all()  # the bundled A really beats B: its best images are improvements
    assert "selection:" in out and (tmp_path / "demo/run/report/index.html").is_file() and "report:" in out
    assert "verdict:" in out and "deletion:" in out and (tmp_path / "demo/run/faithfulness.png").is_file()
    assert (tmp_path / "demo/run/faithfulness_randomisation.csv").is_file()


def test_unwritable_output_is_one_sentence(capsys, tmp_path, synthetic_coco, results):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["score", "--detections", str(results), "--out", str(blocker / "sub"), "--ann", str(synthetic_coco.ann)]
    code, lines = error_of(capsys, argv)
    assert code == 1 and len(lines) == 1 and "Cannot write " in lines[0] and str(blocker) in lines[0]


def test_select_with_swapped_score_directories_of_the_workdir(capsys, tmp_path, synthetic_coco, synthetic_gt):
    paths = [write_detections(simulate_detections(synthetic_gt, skill=s, seed=i), tmp_path / f"m{i}.json") for i, s in enumerate([0.9, 0.4])]
    ws = tmp_path / "ws"
    common = ["--workdir", str(ws), "--ann", str(synthetic_coco.ann), "--top", "1000"]
    assert run(["select", "--a", str(paths[0]), "--b", str(paths[1])] + common, capsys)[0] == 0
    before = pd.read_csv(ws / "selection.csv").set_index("image_id")["improvement"]
    code, _, err = run(["select", "--a", str(ws / "scores/b"), "--b", str(ws / "scores/a")] + common, capsys)
    assert code == 0, err
    after = pd.read_csv(ws / "selection.csv").set_index("image_id")["improvement"]
    assert (before != 0).any()
    pd.testing.assert_series_equal(after.loc[before.index], -before)


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"image_id": 2**63}, "Entry 0 of"),
        ({"image_id": 1e20}, "image_id 1e+20 beyond the 64-bit integer range"),
        ({"category_id": 2**64 + 5}, "category_id 18446744073709551621 beyond"),
        ({"bbox": [0, 0, "5", 5]}, "not four numbers"),
    ],
)
def test_unusable_values_in_results_are_one_sentence(capsys, tmp_path, synthetic_coco, record, expected):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([det(1, 1, [0, 0, 5, 5], 0.5) | record]))
    argv = ["score", "--detections", str(path), "--out", str(tmp_path / "o"), "--ann", str(synthetic_coco.ann), "--drop-invalid"]
    code, lines = error_of(capsys, argv)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("gradlens: error: ") and expected in lines[0]


def test_damaged_score_directory_and_foreign_annotations_are_one_sentence(capsys, tmp_path, synthetic_coco, results, gt_file, monkeypatch):
    ws = tmp_path / "ws"
    assert run(["select", "--a", str(results), "--b", str(results), "--workdir", str(ws), "--ann", str(synthetic_coco.ann)], capsys)[0] == 0
    dirs = ["--a", str(ws / "scores/a"), "--b", str(ws / "scores/b"), "--workdir", str(tmp_path / "w2")]
    # Named annotation file differs from the one the score directories record: refused.
    code, lines = error_of(capsys, ["select", *dirs, "--ann", str(gt_file([1], []))])
    assert code == 1 and len(lines) == 1 and "scored against another annotation file" in lines[0]
    # Nothing named (no flag, no variable, no ./data/coco): the recorded hash is used.
    monkeypatch.delenv("GRADLENS_COCO_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["select", *dirs], capsys)
    assert code == 0, err
    (ws / "scores/b/score.json").write_text("[]")
    code, lines = error_of(capsys, ["select", *dirs])
    assert code == 1 and len(lines) == 1 and f"The score directory {ws / 'scores/b'} is damaged" in lines[0]


def test_synthetic_refuses_a_foreign_dataset(capsys, tmp_path):
    (tmp_path / "coco/annotations").mkdir(parents=True)
    (tmp_path / "coco/annotations/instances_val2017.json").write_text('{"images": []}')
    code, lines = error_of(capsys, ["synthetic", str(tmp_path / "coco"), "--num-images", "3"])
    assert code == 1 and len(lines) == 1 and "is not a gradlens synthetic dataset" in lines[0]


def test_ctrl_c_is_one_sentence_and_exit_130(capsys, monkeypatch):
    """typer turns Ctrl-C into a silent exit 130; gradlens says what happened (partial results stay on disk)."""
    import gradlens.models.registry as registry

    class Interrupting(dict):
        def items(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(registry, "ARCHITECTURES", Interrupting(registry.ARCHITECTURES))
    code, _, err = run(["models"], capsys)
    assert code == 130
    assert err.strip().splitlines()[-1].startswith("gradlens: error: interrupted; finished results are kept on disk")
