"""Hostile inputs through the real CLI: every one succeeds correctly or exits 1 with one sentence,
no code runs and no file outside the dataset is read without a flag on the command line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from gradlens.models.bundled import bundled_detector_path
from tests.test_cli import run


def one_sentence(capsys, argv) -> str:
    """Run the CLI; assert exit 1, no traceback and a single 'gradlens: error:' line; return that line."""
    code, out, err = run([str(a) for a in argv], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("gradlens: error: "), err
    assert "Traceback" not in err
    return lines[0]


class _TouchOnLoad:
    """A pickle whose unpickling creates a file: the side effect no command may trigger without the flag."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from gradlens.demo import run_demo

    out = tmp_path_factory.mktemp("hostile")
    result = run_demo(out, num_images=12, top=3, device="cpu", progress=False, workers=0, gradients=False)
    return result.selection.workdir


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    payload = torch.load(bundled_detector_path("cednet"), weights_only=True)
    payload["hook"] = _TouchOnLoad(marker)  # a real, loadable checkpoint plus one object that runs code
    torch.save(payload, path)
    return path, marker


def _coco_root(workdir: Path) -> str:
    return json.loads((workdir / "manifest.json").read_text())["dataset"]["images"].rsplit("/", 1)[0]


def _poisoned_workdir(workdir: Path, tmp_path: Path, checkpoint: Path) -> Path:
    """A work directory received from someone else: its manifest points at a code-running checkpoint,
    with the right hash, and claims it was trusted."""
    wd = tmp_path / "received"
    shutil.copytree(workdir, wd)
    manifest = json.loads((wd / "manifest.json").read_text())
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    for model in manifest["models"]:
        model["source"], model["sha256"], model["kind"] = str(checkpoint), digest, "checkpoint"
    manifest["settings"]["detector"]["trust_checkpoint"] = True
    (wd / "manifest.json").write_text(json.dumps(manifest))
    return wd


def test_a_code_running_pickle_runs_through_no_command(demo, evil, tmp_path, capsys):
    path, marker = evil
    root = _coco_root(demo)
    image_id = int(open(demo / "selection.csv").read().splitlines()[1].split(",")[1])
    received = _poisoned_workdir(demo, tmp_path, path)
    commands = [
        ["score", "--model", path, "--out", tmp_path / "s", "--coco-root", root, "--device", "cpu", "--workers", 0],
        ["select", "--a", path, "--b", bundled_detector_path("convnext"), "--coco-root", root, "--workdir", tmp_path / "w",
         "--device", "cpu", "--workers", 0],
        ["gradients", "--model", path, "--image-ids", image_id, "--out", tmp_path / "g", "--coco-root", root,
         "--device", "cpu", "--workers", 0],
        ["evaluate", "--model", path, "--coco-root", root, "--device", "cpu", "--workers", 0],
        ["convert", path, tmp_path / "converted.pth"],
        ["area-curve", "--workdir", received, "--device", "cpu", "--workers", 0],
        ["figure", "--workdir", received, "--image-id", image_id, "--device", "cpu", "--workers", 0],
    ]
    for argv in commands:
        message = one_sentence(capsys, argv + ["--no-progress"] if argv[0] != "convert" else argv)
        assert "needs arbitrary code" in message and "--trust-checkpoint" in message, (argv[0], message)
        assert not marker.exists(), f"{argv[0]} ran the checkpoint's code"
    # with the flag on the command line, the user's own decision, the file loads (and its code runs)
    code, out, err = run(["convert", str(path), str(tmp_path / "converted.pth"), "--trust-checkpoint"], capsys)
    assert code == 0, err
    assert marker.exists()


@pytest.fixture
def dataset(tmp_path, demo):
    """A copy of the demo dataset whose annotation file the test may poison."""
    root = Path(_coco_root(demo))
    copy = tmp_path / "coco"
    shutil.copytree(root, copy)
    return copy


def _poison(dataset: Path, change) -> Path:
    ann = dataset / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    change(data)
    ann.write_text(json.dumps(data))
    return ann


def _first_image_with_objects(data: dict) -> dict:
    with_objects = {a["image_id"] for a in data["annotations"] if not a.get("iscrowd")}
    return next(img for img in data["images"] if img["id"] in with_objects)


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_image_paths_stay_inside_the_image_folder(where, dataset, tmp_path, capsys):
    secret = tmp_path / "outside" / "secret.jpg"
    secret.parent.mkdir()
    state = {}

    def change(data):
        image = _first_image_with_objects(data)
        shutil.copy(dataset / "val2017" / image["file_name"], secret)  # a real image: only its place is wrong
        state["id"] = image["id"]
        if where == "parent":
            image["file_name"] = "../../outside/secret.jpg"
        elif where == "absolute":
            image["file_name"] = str(secret)
        else:
            os.symlink(secret, dataset / "val2017" / "link.jpg")
            image["file_name"] = "link.jpg"

    _poison(dataset, change)
    message = one_sentence(capsys, ["gradients", "--model", bundled_detector_path("cednet"), "--image-ids", state["id"],
                                    "--out", tmp_path / "g", "--coco-root", dataset, "--device", "cpu", "--workers", 0,
                                    "--no-progress"])
    assert f"Image {state['id']}" in message and "outside the image folder" in message
    assert not (tmp_path / "g").exists() or not list((tmp_path / "g").glob("*.npz"))


def test_a_symlink_inside_the_folder_is_fine(dataset, tmp_path, capsys):
    state = {}

    def change(data):
        image = _first_image_with_objects(data)
        os.symlink(dataset / "val2017" / image["file_name"], dataset / "val2017" / "alias.jpg")
        image["file_name"], state["id"] = "alias.jpg", image["id"]

    _poison(dataset, change)
    code, out, err = run(["gradients", "--model", str(bundled_detector_path("cednet")), "--image-ids", str(state["id"]),
                          "--out", str(tmp_path / "g"), "--coco-root", str(dataset), "--device", "cpu", "--workers", "0",
                          "--no-progress"], capsys)
    assert code == 0, err


ANNOTATION_CASES = {
    "height as a word": (lambda d: d["images"][0].update(height="tall"), "height 'tall' that is not a positive integer"),
    "zero width": (lambda d: d["images"][0].update(width=0), "width 0 that is not a positive integer"),
    "no file_name": (lambda d: d["images"][0].pop("file_name"), "has no file_name"),
    "empty file_name": (lambda d: d["images"][0].update(file_name=" "), "has no file_name"),
    "file_name a number": (lambda d: d["images"][0].update(file_name=7), "has no file_name"),
    "iscrowd as a string": (lambda d: d["annotations"][0].update(iscrowd="0"), "iscrowd '0' that is not 0 or 1"),
    "iscrowd 2": (lambda d: d["annotations"][0].update(iscrowd=2), "iscrowd 2 that is not 0 or 1"),
    "area as a string": (lambda d: d["annotations"][0].update(area="big"), "area 'big' that is not a number"),
}


@pytest.mark.parametrize("case", list(ANNOTATION_CASES))
@pytest.mark.parametrize("command", ["score", "gradients"])
def test_annotation_fields_are_checked_at_load(case, command, dataset, demo, tmp_path, capsys):
    change, expected = ANNOTATION_CASES[case]
    _poison(dataset, change)
    if command == "score":
        detections = json.loads((demo / "manifest.json").read_text())["models"][0]["detections"]
        argv = ["score", "--detections", detections, "--out", tmp_path / "s", "--coco-root", dataset]
    else:
        argv = ["gradients", "--model", bundled_detector_path("cednet"), "--image-ids", 1, "--out", tmp_path / "g",
                "--coco-root", dataset, "--device", "cpu", "--workers", 0, "--no-progress"]
    message = one_sentence(capsys, argv)
    assert expected in message, message
    assert not (tmp_path / "s").exists()


def test_gradients_reads_the_selection_file_it_was_given(demo, tmp_path, capsys):
    wd = tmp_path / "wd"
    shutil.copytree(demo, wd)
    lines = (wd / "selection.csv").read_text().splitlines()
    (wd / "selection.csv").write_text("\n".join([lines[0]] + lines[2:]) + "\n")  # the user drops the first image
    wanted = int(lines[2].split(",")[1])  # columns: rank, image_id, ...
    code, out, err = run(["gradients", "--model", str(bundled_detector_path("cednet")), "--selection", str(wd / "selection.csv"),
                          "--top", "1", "--out", str(tmp_path / "g"), "--device", "cpu", "--workers", "0", "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "g" / f"{wanted}.npz").is_file() and not (tmp_path / "g" / f"{int(lines[1].split(',')[1])}.npz").exists()


@pytest.mark.parametrize("value", ["abc", "1.5", ""])
def test_a_selection_with_a_bad_image_id_is_one_sentence(value, demo, tmp_path, capsys):
    wd = tmp_path / "wd"
    shutil.copytree(demo, wd)
    lines = (wd / "selection.csv").read_text().splitlines()
    rank, _, rest = lines[1].split(",", 2)
    lines[1] = ",".join([rank, value, rest])
    (wd / "selection.csv").write_text("\n".join(lines) + "\n")
    message = one_sentence(capsys, ["gradients", "--model", bundled_detector_path("cednet"), "--selection", wd / "selection.csv",
                                    "--out", tmp_path / "g", "--device", "cpu", "--workers", 0, "--no-progress"])
    assert "image_id" in message and "not an integer" in message


@pytest.mark.parametrize("tamper", ["wrong shape", "another store's map", "truncated"])
def test_unusable_stored_maps_are_computed_again(tamper, demo, tmp_path, capsys):
    import numpy as np

    from gradlens.attribution.store import MapStore

    wd = tmp_path / "wd"
    shutil.copytree(demo, wd)
    argv = ["area-curve", "--workdir", str(wd), "--device", "cpu", "--workers", "0", "--thresholds", "30", "--no-progress"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    reference = (wd / "area_curve.csv").read_bytes()
    store_a, store_b = (next((wd / "maps" / role).iterdir()) for role in ("a", "b"))
    victim = sorted(store_a.glob("*.npz"))[0]
    if tamper == "wrong shape":
        store = MapStore(store_a)  # its own key: a well-formed map, only of another size
        store.write(int(victim.stem), np.ones((7, 9), np.float32))
    elif tamper == "another store's map":
        shutil.copy(store_b / victim.name, victim)  # same image and shape, other detector
    else:
        victim.write_bytes(victim.read_bytes()[:100])
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "(1 damaged or mismatched, computed again)" in out
    assert (wd / "area_curve.csv").read_bytes() == reference


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny file whose PNG header claims ``width`` x ``height`` pixels (a decompression bomb's calling card)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_decompression_bombs_are_refused_in_one_sentence(workers, dataset, tmp_path, capsys):
    state = {}

    def change(data):
        image = _first_image_with_objects(data)
        _png_claiming(dataset / "val2017" / "bomb.png", 20000, 20000)
        image["file_name"], state["id"] = "bomb.png", image["id"]

    _poison(dataset, change)
    message = one_sentence(capsys, ["gradients", "--model", bundled_detector_path("cednet"), "--image-ids", state["id"],
                                    "--out", tmp_path / "g", "--coco-root", dataset, "--device", "cpu",
                                    "--workers", workers, "--no-progress"])
    assert "bomb.png" in message and "GRADLENS_MAX_IMAGE_PIXELS" in message


def test_the_pixel_limit_is_configurable(tmp_path, monkeypatch):
    from gradlens.data.images import read_image
    from gradlens.errors import InputFileError
    from PIL import Image

    path = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(path)
    assert read_image(path).shape == (30, 40, 3)
    monkeypatch.setenv("GRADLENS_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(InputFileError, match="40 x 30 pixels, more than the 1,000"):
        read_image(path)
    monkeypatch.setenv("GRADLENS_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(InputFileError, match="whole number"):
        read_image(path)


def test_write_failures_name_the_users_file(tmp_path, monkeypatch):
    from gradlens.errors import GradlensError
    from gradlens.fileio import write_json

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    target = tmp_path / "out" / "table.json"
    with pytest.raises(GradlensError) as info:
        write_json(target, {"a": 1})
    assert str(info.value) == f"Cannot write {target}: No space left on device."
    assert not list((tmp_path / "out").iterdir())  # no temporary file left behind


MANIFEST_CASES = {
    "no models": (lambda m: m.update(models=[]), "names no models"),
    "models not a list": (lambda m: m.update(models={"a": 1}), "names no models"),
    "a model without role": (lambda m: m["models"][1].pop("role"), "has no role"),
    "a numeric source": (lambda m: m["models"][0].update(source=5), "source that is not text"),
    "settings a string": (lambda m: m.update(settings="fast"), "'settings' that is not an object"),
    "images folder a number": (lambda m: m["dataset"].update(images=5), "dataset images in"),
    "annotations a list": (lambda m: m["dataset"].update(annotations=["x"]), "dataset annotations in"),
    "batch size a word": (lambda m: m["settings"]["detector"].update(batch_size="x"), "batch size"),
    "negative batch size": (lambda m: m["settings"]["detector"].update(batch_size=-3), "batch size"),
    "detector settings a string": (lambda m: m["settings"].update(detector="fast"), "detector settings"),
    "unknown precision": (lambda m: m["settings"]["detector"].update(precision="fp8"), "recorded precision"),
    "scores outside the work directory": (lambda m: m["models"][0].update(scores="../../../../etc"), "keeps its scores in"),
    "a role that is a path": (lambda m: m["models"][0].update(role="a/../../x"), "has the role"),
    "a role twice": (lambda m: m["models"][1].update(role="a"), "has the role 'a'"),
    "unknown EXIF setting": (lambda m: m["dataset"].update(exif_orientation="sideways"), "exif_orientation"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
@pytest.mark.parametrize("command", ["area-curve", "figure"])
def test_damaged_manifests_are_one_sentence(case, command, demo, tmp_path, capsys):
    wd = tmp_path / "wd"
    shutil.copytree(demo, wd)
    manifest = json.loads((wd / "manifest.json").read_text())
    change, expected = MANIFEST_CASES[case]
    change(manifest)
    (wd / "manifest.json").write_text(json.dumps(manifest))
    argv = [command, "--workdir", wd, "--device", "cpu", "--workers", 0, "--no-progress"]
    message = one_sentence(capsys, argv + (["--image-id", 1] if command == "figure" else []))
    assert expected in message, message


CHECKPOINT_CASES = {
    "fewer categories than classes": (lambda d: d.update(categories=d["categories"][:2]), "lists 2 categories for a detector with 5"),
    "string category ids": (lambda d: d.update(categories=[{"id": "x", "name": "a"}] * 5), "category id 'x'"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_damaged_checkpoints_are_one_sentence(case, dataset, tmp_path, capsys):
    payload = torch.load(bundled_detector_path("cednet"), weights_only=True)
    change, expected = CHECKPOINT_CASES[case]
    change(payload)
    torch.save(payload, tmp_path / "bad.pth")
    message = one_sentence(capsys, ["evaluate", "--model", tmp_path / "bad.pth", "--coco-root", dataset, "--device", "cpu",
                                    "--workers", 0, "--no-progress"])
    assert expected in message, message


def test_a_state_dict_of_another_architecture_is_one_sentence(dataset, tmp_path, capsys):
    from gradlens.models.formats.checkpoints import load_detector

    torch.save(load_detector(bundled_detector_path("cednet")).state_dict(), tmp_path / "sd.pth")
    for arch in ("retinanet_convnext_mini", "retinanet_swin_tiny", "retinanet_cednet_next_tiny", "torchvision_retinanet_resnet50_fpn"):
        message = one_sentence(capsys, ["evaluate", "--model", tmp_path / "sd.pth", "--arch", arch, "--coco-root", dataset,
                                        "--device", "cpu", "--workers", 0, "--no-progress"])
        assert "does not fit " + arch in message, message


OPTION_CASES = {
    "infinite noise": (["gradients", "--method", "smoothgrad", "--noise", "inf"], {}, "--noise must be a finite"),
    "a million samples": (["gradients", "--method", "smoothgrad", "--samples", "1000000"], {}, "at most 100,000"),
    "log decades beyond float": (["area-curve", "--scale", "log", "--log-decades", "1e308"], {}, "smallest float32"),
    "2**63 thresholds": (["area-curve", "--thresholds", str(2**63)], {}, None),  # a usage error: exit 2
    "thread count a word": (["area-curve"], {"GRADLENS_GRADIENT_THREADS": "abc"}, "GRADLENS_GRADIENT_THREADS is 'abc'"),
    "pixel limit a word": (["area-curve"], {"GRADLENS_MAX_IMAGE_PIXELS": "many"}, "GRADLENS_MAX_IMAGE_PIXELS is 'many'"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_settings_are_refused_before_work(case, demo, tmp_path, capsys, monkeypatch):
    argv, env, expected = OPTION_CASES[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    wd = tmp_path / "wd"
    shutil.copytree(demo, wd)
    image_id = open(demo / "selection.csv").read().splitlines()[1].split(",")[1]
    if argv[0] == "gradients":
        argv = argv + ["--model", str(bundled_detector_path("cednet")), "--image-ids", image_id, "--out", str(tmp_path / "g"),
                       "--coco-root", _coco_root(demo)]
    else:
        argv = argv + ["--workdir", str(wd)]
    argv += ["--device", "cpu", "--workers", "0", "--no-progress"]
    if expected is None:
        code, out, err = run(argv, capsys)
        assert code == 2 and "Traceback" not in err and "--thresholds" in err
        return
    assert expected in one_sentence(capsys, argv)
    assert not (tmp_path / "g").exists() or not list((tmp_path / "g").glob("*.npz"))
