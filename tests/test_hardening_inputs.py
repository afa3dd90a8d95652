"""Hostile inputs of issue 22 (helper D): figure text, Table A1 checkpoints' tensors and config text, ``profile``'s
options and EXIF orientations stored as other numbers. Each succeeds correctly or is refused in one sentence."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from gradlens.errors import CheckpointError
from gradlens.models.bundled import bundled_detector_path
from gradlens.models.formats.checkpoints import detector_from_object
from gradlens.models.formats.mmdet import to_mmdet
from gradlens.models.registry import build_detector
from tests.scripts import make_mmdet_checkpoints
from tests.test_cli import run
from tests.test_hostile import demo, one_sentence  # noqa: F401  (demo: the module's small work directory)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Checkpoint checks and figures are small tensor work: on a shared 2-core machine a second thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ---------------------------------------------------------------------------------------------
# Figure A1 and Figure A2: labels and file names are drawn as written, never as math text

NASTY_LABELS = [
    r"A $x^2$ \frac",
    r"cost $a_$ and $\frac$ 50$ ^_%",  # math text that does not parse
    r"already \$escaped\$ $ $$",
]


@pytest.mark.parametrize("label", NASTY_LABELS)
def test_figure_text_is_drawn_literally(label, tmp_path):
    import matplotlib
    from matplotlib import cbook

    from gradlens.figures import style
    from gradlens.figures.area_curve import plot_area_curve, plot_paired_difference
    from gradlens.figures.figure_a1 import Panel, draw_figure_a1

    shown = style.literal(label)
    assert not cbook.is_math_text(shown)  # matplotlib shows it as plain text: the label itself
    objects = pd.DataFrame({"gt_x": [2.0], "gt_y": [2.0], "gt_w": [8.0], "gt_h": [6.0], "matched": [False]})
    panel = Panel(label=label, objects=objects, quality=0.5, gradient=np.random.default_rng(0).random((24, 32)))
    with matplotlib.rc_context({"text.usetex": True}):  # a user's LaTeX setting is not used for these either
        a1 = draw_figure_a1(np.zeros((24, 32, 3), np.uint8), [panel, panel], title=f"image 7 ({label}.jpg)")
    assert style.save(a1, tmp_path / "a1", formats=("png",), dpi=40)[0].stat().st_size > 0
    assert a1.axes[0].get_title() == shown and a1._suptitle.get_text() == style.literal(f"image 7 ({label}.jpg)")
    table = pd.DataFrame({
        "label": [label, label, "b", "b"], "role": ["a", "a", "b", "b"], "threshold": [0.1, 1.0, 0.1, 1.0],
        "threshold_normalized": [0.1, 1.0, 0.1, 1.0], "area": [0.5, 0.1, 0.6, 0.2],
        "area_normalized": [0.8, 0.2, 1.0, 0.3], "num_images": [3, 3, 3, 3],
    })  # fmt: skip
    paired = pd.DataFrame({"quantity": "area", "versus": "b", "label": label, "versus_label": f"{label} b",
                           "threshold": [0.1, 1.0], "difference": [-0.1, -0.1], "low": [-0.2, -0.2], "high": [0.0, 0.0]})
    curves, difference = plot_area_curve(table, title=label), plot_paired_difference(paired, table)
    for k, fig in enumerate([curves, difference]):
        assert style.save(fig, tmp_path / f"a2_{k}", formats=("png",), dpi=40)[0].stat().st_size > 0
    assert [t.get_text() for t in curves.axes[0].get_legend().get_texts()] == [shown, "b"]
    assert curves.axes[0].get_title() == shown
    assert [t.get_text() for t in difference.axes[0].get_legend().get_texts()] == [style.literal(f"{label} − {label} b")]
    import matplotlib.pyplot as plt

    for f in (a1, curves, difference):
        plt.close(f)


@pytest.fixture(scope="module")
def labelled(demo, tmp_path_factory):  # noqa: F811
    """The demo work directory with models labelled in matplotlib's math syntax (labels are file names' stems)."""
    wd = tmp_path_factory.mktemp("labelled") / "run"
    shutil.copytree(demo, wd)
    manifest = json.loads((wd / "manifest.json").read_text())
    for model, label in zip(manifest["models"], [r"A $x^2$ \frac $a_$", r"B $\frac$ 5$"]):
        model["label"] = label
    (wd / "manifest.json").write_text(json.dumps(manifest))
    return wd


@pytest.mark.parametrize("command", ["figure", "area-curve"])
def test_figures_with_math_text_labels_are_written(command, labelled, capsys):
    image_id = pd.read_csv(labelled / "selection.csv")["image_id"].iloc[0]
    argv = [command, "--workdir", labelled, "--device", "cpu", "--workers", 0, "--no-progress"]
    argv += ["--image-id", image_id] if command == "figure" else ["--thresholds", 12]
    code, out, err = run([str(a) for a in argv], capsys)
    assert code == 0, err
    png = labelled / "figures" / f"figure_a1_{image_id}.png" if command == "figure" else labelled / "area_curve.png"
    assert png.stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# Table A1 checkpoints: malformed tensors and config text


@pytest.fixture(scope="module")
def hrnet_payload():
    """An mmdetection RetinaNet HRNet-W32 checkpoint (Table A1's first row) as unpickled, with a small test scale."""
    torch.manual_seed(0)
    state = to_mmdet(build_detector("retinanet_hrnet_w32", 80).state_dict())
    return {"meta": {"config": make_mmdet_checkpoints().config_text("hrnet_w32", (128, 192), 32), "CLASSES": None}, "state_dict": state}


def _with(payload: dict, change) -> dict:
    state = dict(payload["state_dict"])
    change(state)
    return {"meta": dict(payload["meta"]), "state_dict": state}


STEM, CLS = "backbone.conv1.weight", "bbox_head.retina_cls.weight"
TENSOR_CASES = {
    "1-d stem weight": (lambda s: s.update({STEM: s[STEM].reshape(-1)}), f"its {STEM} has shape (1728,), but a convolution's weight has 4 dimensions"),
    "integer tensor": (lambda s: s.update({STEM: s[STEM].long()}), f"{STEM} holds int64 values where a floating-point tensor belongs"),
    "boolean tensor": (lambda s: s.update({CLS: s[CLS] > 0}), f"{CLS} holds bool values where a floating-point tensor belongs"),
    "a number": (lambda s: s.update({STEM: 3}), f"{STEM} holds an int where a tensor belongs"),
    "a list": (lambda s: s.update({CLS: [0.5, 1.5]}), f"{CLS} holds a list where a tensor belongs"),
    "0-d classifier": (lambda s: s.update({CLS: torch.tensor(1.0)}), f"its {CLS} has shape (), but a convolution's weight"),
    "classes not x9": (lambda s: s.update({CLS: s[CLS][:-1]}), f"its {CLS} has 719 output channels, not 9 anchors per class"),
    "transposed stem": (lambda s: s.update({STEM: s[STEM].transpose(0, 1).contiguous()}),
                        "does not fit retinanet_hrnet_w32: 1 of another shape (e.g. backbone.body.conv1.weight (3, 64, 3, 3)"),
    "NaN weights": (lambda s: s.update({STEM: s[STEM] * float("nan")}), f"{STEM} holds NaN or infinite values"),
    "sparse tensor": (lambda s: s.update({STEM: s[STEM].to_sparse()}), f"{STEM} is a sparse_coo tensor"),
    "a key that is no name": (lambda s: s.update({7: torch.zeros(1)}), "its state dict has the key 7, which is not a parameter name"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_malformed_tensors_are_one_sentence_naming_the_key(case, hrnet_payload):
    change, expected = TENSOR_CASES[case]
    with pytest.raises(CheckpointError) as info:
        detector_from_object(_with(hrnet_payload, change), "hrnet.pth")
    message = str(info.value)
    assert message.startswith("hrnet.pth") and expected in message and "\n" not in message, message


def test_a_malformed_tensor_through_the_cli(hrnet_payload, tmp_path, capsys):
    """The same sentences from a file (150 MB, so one case): ``convert`` writes nothing."""
    path = tmp_path / "hrnet.pth"
    torch.save(_with(hrnet_payload, TENSOR_CASES["1-d stem weight"][0]), path)
    try:
        message = one_sentence(capsys, ["convert", path, tmp_path / "out.pth"])
    finally:
        path.unlink()
    assert message == f"gradlens: error: {path}: {TENSOR_CASES['1-d stem weight'][1]}."
    assert not (tmp_path / "out.pth").exists()


def _config(payload: dict, old: str, new: str) -> dict:
    text = payload["meta"]["config"]
    assert old in text
    return {"meta": {**payload["meta"], "config": text.replace(old, new)}, "state_dict": payload["state_dict"]}


SCALE, DIVISOR, MEAN = "img_scale=(128, 192)", "size_divisor=32", "mean=[123.675, 116.28, 103.53], std"
CONFIG_CASES = {
    "zero scale": (SCALE, "img_scale=(0, 192)", "img_scale=(0, 192); it must be two whole numbers of pixels from 1 to 8192"),
    "negative scale": (SCALE, "img_scale=(-128, 192)", "img_scale=(-128, 192); it must be two whole numbers"),
    "huge scale": (SCALE, "img_scale=(128, 100000)", "img_scale=(128, 100000); it must be two whole numbers of pixels from 1 to 8192"),
    "one side": (SCALE, "img_scale=(128,)", "img_scale=(128,); it must be two whole numbers"),
    "scale expression": (SCALE, "img_scale=(128*2, 192)", "img_scale=(128*2, 192), which is not a literal value"),
    "several scales": (SCALE, "img_scale=[(128, 192), (256, 384)]", "several test scales"),
    "divisor zero": (DIVISOR, "size_divisor=0", "size_divisor=0; it must be a whole number from 1 to 8192"),
    "divisor negative": (DIVISOR, "size_divisor=-32", "size_divisor=-32; it must be a whole number from 1 to 8192"),
    "divisor expression": (DIVISOR, "size_divisor=2**5", "size_divisor=2**5, which is not a literal value"),
    "mean expression": (MEAN, "mean=[123.675*1, 116.28, 103.53], std", "img_norm_cfg mean=[123.675*1, 116.28, 103.53], which is not a literal"),
    "mean comprehension": (MEAN, "mean=[x for x in range(3)], std", "img_norm_cfg mean=[x for x in range(3)], which is not a literal"),
    "two means": (MEAN, "mean=[123.675, 116.28], std", "img_norm_cfg mean=[123.675, 116.28]; it must be three finite numbers"),
    "zero std": ("std=[58.395, 57.12, 57.375], to_rgb=True)\n", "std=[0, 57.12, 57.375], to_rgb=True)\n",
                 "img_norm_cfg std=[0, 57.12, 57.375]; it must be three positive numbers"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_text_settings_are_refused_naming_the_setting(case, hrnet_payload):
    old, new, expected = CONFIG_CASES[case]
    with pytest.raises(CheckpointError) as info:
        detector_from_object(_config(hrnet_payload, old, new), "hrnet.pth")
    message = str(info.value)
    assert message.startswith("hrnet.pth: its config sets ") and expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("change, expected", [
    ({"min_size": 0}, "min_size is 0; it must be a whole number from 1 to 8192"),
    ({"size_divisor": -32}, "size_divisor is -32; it must be a whole number from 1 to 8192"),
    ({"std": [0.0, 0.2, 0.2]}, "std is (0.0, 0.2, 0.2); it must be three positive numbers"),
])  # fmt: skip
def test_gradlens_checkpoints_preprocessing_is_checked_alike(change, expected):
    payload = torch.load(bundled_detector_path("cednet"), weights_only=True)
    payload["preprocess"] = {**payload["preprocess"], **change}
    with pytest.raises(CheckpointError) as info:
        detector_from_object(payload, "own.pth")
    assert str(info.value) == f"own.pth is a gradlens checkpoint whose preprocessing setting {expected}."


def test_config_literals_are_read_and_code_in_config_text_never_runs(hrnet_payload, tmp_path, capsys):
    # a literal written otherwise (floats, a tuple) is read as the data it is
    payload = _config(_config(hrnet_payload, SCALE, "img_scale=(128.0, 192)"), MEAN, "mean=(123.675, 116.28, 103.53), std")
    detector = detector_from_object(payload, "hrnet.pth")
    p = detector.preprocess
    assert (p.min_size, p.max_size, p.size_divisor) == (128, 192, 32)
    assert p.mean == pytest.approx((0.485, 0.456, 0.406))
    # shell code in the config text: refused through the CLI, and never run
    marker = tmp_path / "code-ran"
    with pytest.raises(CheckpointError, match="which is not a literal value"):
        detector_from_object(_config(hrnet_payload, MEAN, f"mean=__import__('os').system('touch {marker}'), std"), "x.pth")
    path = tmp_path / "shell.pth"
    torch.save(_config(hrnet_payload, DIVISOR, f"size_divisor=__import__('os').system('touch {marker}')"), path)
    try:
        message = one_sentence(capsys, ["convert", path, tmp_path / "out.pth"])
    finally:
        path.unlink()
    assert message.startswith(f"gradlens: error: {path}: its config sets size_divisor=__import__('os').system(")
    assert message.endswith(", which is not a literal value; gradlens reads config text as data and never evaluates it.")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# profile: its options and its output file


@pytest.mark.parametrize("argv, expected", [
    (["--no-classifiers", "--no-detectors"], "Nothing to profile: --no-classifiers and --no-detectors"),
    (["--out", "{tmp}/profile.txt"], "has no known table suffix; name a .csv, .json or .parquet file"),
    (["--out", "{tmp}/profile"], "has no known table suffix"),
])  # fmt: skip
def test_profile_options_that_ask_for_nothing_are_one_sentence(argv, expected, tmp_path, capsys):
    message = one_sentence(capsys, ["profile", *(a.format(tmp=tmp_path) for a in argv)])
    assert expected in message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_profile_out_writes_the_format_its_suffix_names(suffix, tmp_path, capsys):
    out = tmp_path / f"profile{suffix}"
    code, stdout, err = run(["profile", "--no-detectors", "--model", "Swin-T", "--format", "json", "--out", str(out)], capsys)
    assert code == 0, err
    rows = json.loads(stdout)
    read = {".parquet": pd.read_parquet, ".csv": pd.read_csv, ".json": lambda p: pd.DataFrame(json.loads(p.read_text()))}
    table = read[suffix](out)
    assert table["model"].tolist() == ["Swin-T"] and table["params_M"].tolist() == [rows[0]["params_M"]]
    if suffix == ".parquet":
        assert out.read_bytes()[:4] == b"PAR1"


# ---------------------------------------------------------------------------------------------
# EXIF orientation stored as another kind of number: one reading for every step


def _exif(kind: str, value) -> bytes:
    """An EXIF block holding only the orientation tag, stored as ``kind`` (SHORT is the standard's)."""
    types = {"short": 3, "long": 4, "rational": 5, "float": 11, "double": 12}
    if kind in ("short", "long", "float"):
        inline = struct.pack("<H2x" if kind == "short" else "<I" if kind == "long" else "<f", value)
        entry, data = struct.pack("<HHI", 0x0112, types[kind], 1) + inline, b""
    else:
        data = struct.pack("<d", value) if kind == "double" else struct.pack("<II", *value)
        entry = struct.pack("<HHII", 0x0112, types[kind], 1, 8 + 2 + 12 + 4)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + struct.pack("<I", 0) + data


EXIF_CASES = {  # stored value -> the orientation every step reads
    "short 6": ("short", 6, 6),
    "double 6.0": ("double", 6.0, 6),
    "float 8.0": ("float", 8.0, 8),
    "rational 12/2": ("rational", (12, 2), 6),
    "double 3.0": ("double", 3.0, 3),
    "double 6.5": ("double", 6.5, 1),
    "rational 13/2": ("rational", (13, 2), 1),
    "rational 6/0": ("rational", (6, 0), 1),
    "double NaN": ("double", float("nan"), 1),
    "long 9": ("long", 9, 1),
    "short 0": ("short", 0, 1),
}


def _jpeg(path: Path, kind: str, value) -> Path:
    pixels = np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8)  # 64 wide, 40 high as stored
    Image.fromarray(pixels).save(path, exif=_exif(kind, value))
    return path


@pytest.mark.parametrize("case", EXIF_CASES)
def test_exif_orientation_is_read_one_way_everywhere(case, tmp_path):
    from gradlens.data.images import exif_orientation_of, image_size, read_image

    kind, value, orientation = EXIF_CASES[case]
    path = _jpeg(tmp_path / "x.jpg", kind, value)
    assert exif_orientation_of(path) == orientation
    turned = orientation in (5, 6, 7, 8)
    decoded = read_image(path, "apply")
    assert decoded.shape[:2] == image_size(path, "apply") == ((64, 40) if turned else (40, 64))
    assert read_image(path, "ignore").shape[:2] == image_size(path, "ignore") == (40, 64)
    upright = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    if orientation == 6:  # the same pixels as Pillow's own turn of an orientation-6 image
        assert np.array_equal(decoded, upright)


def test_score_and_gradients_decode_a_float_orientation_alike(tmp_path, capsys):
    kind, value, orientation = EXIF_CASES["double 6.0"]
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    _jpeg(root / "val2017" / "000000000001.jpg", kind, value)
    gt = {"images": [{"id": 1, "file_name": "000000000001.jpg", "width": 64, "height": 40}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5.0, 5.0, 20.0, 20.0], "area": 400.0, "iscrowd": 0}],
          "categories": [{"id": i, "name": f"c{i}"} for i in range(1, 11)]}  # fmt: skip
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(gt))
    common = ["--model", bundled_detector_path("cednet"), "--coco-root", root, "--exif-orientation", "apply",
              "--workers", 0, "--device", "cpu", "--no-progress"]
    code, out, err = run([str(a) for a in ["score", "--out", tmp_path / "s", "--class-agnostic", "--cache-dir",
                                           tmp_path / "cache", *common]], capsys)  # fmt: skip
    assert code == 0, err
    assert orientation == 6 and "images with a non-identity EXIF orientation tag: 1 of 1" in out
    detections = json.loads(Path(json.loads((tmp_path / "s" / "score.json").read_text())["source"]["detections"]).read_text())
    assert detections and all(d["bbox"][0] + d["bbox"][2] <= 40 + 1e-3 and d["bbox"][1] + d["bbox"][3] <= 64 + 1e-3
                              for d in detections)  # boxes on the turned image: 40 wide, 64 high
    code, out, err = run([str(a) for a in ["gradients", "--image-ids", 1, "--out", tmp_path / "maps", *common]], capsys)
    assert code == 0, err
    from gradlens.attribution.store import MapStore

    assert MapStore(tmp_path / "maps").read(1).shape == (64, 40)


# --------------------------------------------------------------------------- the extended catalogue (issue 22)


@pytest.mark.parametrize("case", ["twice", "text", "nan", "above_one"])
@pytest.mark.parametrize("command", ["area-curve", "faithfulness"])
def test_a_tampered_selection_is_one_sentence(case, command, demo, tmp_path, capsys):  # noqa: F811
    """An image listed twice would count twice in every mean; a quality that is no number in [0, 1] would be
    copied into the faithfulness table (selected images always have one)."""
    wd = tmp_path / "wd"
    shutil.copytree(demo, wd, symlinks=True, ignore=shutil.ignore_patterns("maps"))
    table = pd.read_parquet(wd / "selection.parquet")
    if case == "twice":
        table = pd.concat([table, table.iloc[:1]], ignore_index=True)
    else:
        if case == "text":  # a column of text, as a hand-edited table would have it
            table["quality_a"] = table["quality_a"].astype(str)
        table.loc[0, "quality_a"] = {"text": "abc", "nan": float("nan"), "above_one": 1.5}[case]
    table.to_parquet(wd / "selection.parquet")
    table.to_csv(wd / "selection.csv", index=False)
    before = sorted(p.name for p in wd.iterdir())
    line = one_sentence(capsys, [command, "--workdir", wd, "--device", "cpu", "--workers", 0, "--no-progress"])
    assert ("twice" in line) if case == "twice" else ("quality_a" in line and "not a number from 0 to 1" in line)
    assert sorted(p.name for p in wd.iterdir()) == before


def test_sixteen_bit_greyscale_is_read_by_its_high_byte_and_wider_pixels_refused(tmp_path):
    from gradlens.data.images import read_image
    from gradlens.errors import InputFileError

    values = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    decoded = read_image(tmp_path / "g16.png")
    assert decoded.shape == (48, 64, 3) and np.array_equal(decoded[..., 1], (values >> 8).astype(np.uint8))
    Image.fromarray(values.astype(np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(InputFileError, match="floating-point pixels"):
        read_image(tmp_path / "f.tiff")


@pytest.mark.parametrize("ids", ["", ",,", " "])
def test_image_ids_naming_no_image_are_one_sentence(ids, demo, tmp_path, capsys):  # noqa: F811
    line = one_sentence(capsys, ["gradients", "--model", bundled_detector_path("cednet"), "--coco-root",
                                 demo.parent / "coco", "--image-ids", ids, "--out", tmp_path / "g", "--device", "cpu",
                                 "--workers", 0, "--no-progress"])
    assert "names no image" in line and not (tmp_path / "g").exists()
