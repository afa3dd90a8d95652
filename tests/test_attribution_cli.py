"""gradients, area-curve and figure end to end on the bundled detectors; their errors; the figures' pixels."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gradlens.demo import run_demo
from gradlens.figures import style
from tests.test_detector_cli import run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A work directory after 'select' with the two bundled detectors (no maps yet)."""
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out, num_images=16, top=5, device="cpu", progress=False, workers=0, gradients=False)
    return result.selection.workdir


def test_area_curve_needs_no_arguments_and_reuses_maps(workdir, capsys, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    code, out, err = run(["area-curve", "--workdir", wd, "--device", "cpu", "--workers", 0, "--thresholds", 50, "--no-progress"], capsys)
    assert code == 0, err
    assert "5 computed, 0 reused" in out
    table = pd.read_csv(wd / "area_curve.csv")
    assert list(table.columns) == ["role", "label", "threshold_index", "threshold", "threshold_normalized", "area", "area_normalized",
                                   "num_images", "area_low", "area_high", "area_inside", "area_outside", "area_low_normalized",
                                   "area_high_normalized"]
    assert set(table["role"]) == {"a", "b"} and len(table) == 100 and (table["num_images"] == 5).all()
    for _, rows in table.groupby("role"):
        assert np.all(np.diff(rows["area"].to_numpy()) <= 0)
        assert rows["threshold"].is_monotonic_increasing
    assert table["area_normalized"].max() == pytest.approx(1.0) and table["threshold_normalized"].max() == pytest.approx(1.0)
    meta = json.loads((wd / "area_curve.json").read_text())
    assert meta["settings"]["scale"] == "log" and meta["settings"]["num_images"] == 5
    assert json.loads((wd / "manifest.json").read_text())["outputs"]["area_curve"] == "area_curve.json"
    _check_metrics_against_the_maps(wd, table, meta)
    first = (wd / "area_curve.csv").read_bytes(), (wd / "area_curve.png").read_bytes(), (wd / "area_curve.pdf").read_bytes()

    code, out, err = run(["area-curve", "--workdir", wd, "--device", "cpu", "--workers", 0, "--thresholds", 50, "--no-progress"], capsys)
    assert code == 0 and "0 computed, 5 reused" in out
    assert ((wd / "area_curve.csv").read_bytes(), (wd / "area_curve.png").read_bytes(), (wd / "area_curve.pdf").read_bytes()) == first

    code, out, err = run(["area-curve", "--workdir", wd, "--device", "cpu", "--workers", 0, "--thresholds", 50,
                          "--from-summaries", "--scale", "linear", "--no-progress"], capsys)  # fmt: skip
    assert code == 0 and "0 computed" in out
    png = np.asarray(Image.open(wd / "area_curve.png").convert("RGB")).astype(int)
    for colour in style.CURVE_COLOURS[:2]:  # both curves are drawn in their colours
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(png - rgb).sum(axis=2) < 30).sum() > 50


def _check_metrics_against_the_maps(wd, table, meta):
    """metrics.csv, the bands and the paired table recomputed from the stored maps and the annotation file."""
    from pycocotools.coco import COCO
    from scipy import stats

    from gradlens.attribution.store import MapStore
    from gradlens.regions.localisation import box_energy, inside_outside_areas, pointing_game

    metrics = pd.read_csv(wd / "metrics.csv")
    per_image = pd.read_parquet(wd / "area_curve_per_image.parquet")
    coco = COCO(json.loads((wd / "manifest.json").read_text())["dataset"]["annotations"])
    grid = table[table["role"] == "a"]["threshold"].to_numpy()
    for model in meta["models"]:
        store = MapStore(wd / model["maps"])
        rows = metrics[metrics["role"] == model["role"]]
        assert len(rows) == 5 and rows["rank"].tolist() == [1, 2, 3, 4, 5]
        for _, row in rows.iterrows():
            m = store.read(int(row["image_id"]))
            boxes = [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
                     for a in coco.imgToAnns[int(row["image_id"])] if not a.get("iscrowd", 0)]
            assert row["num_boxes"] == len(boxes)
            assert row["box_energy"] == pytest.approx(box_energy(m, boxes), rel=1e-9)
            assert row["pointing_game"] == float(pointing_game(m, boxes))
            inside, outside = inside_outside_areas(m, boxes, grid)
            curve = per_image[(per_image["role"] == model["role"]) & (per_image["image_id"] == row["image_id"])]
            assert np.allclose(curve["area_inside"], inside, rtol=0, atol=1e-12)
            assert np.allclose(curve["area"], inside + outside, rtol=0, atol=1e-12)
        mine = table[table["role"] == model["role"]]
        assert np.all(mine["area_low"] <= mine["area"] + 1e-12) and np.all(mine["area"] <= mine["area_high"] + 1e-12)
        assert np.allclose(mine["area_inside"] + mine["area_outside"], mine["area"], atol=1e-12)
    paired = pd.read_csv(wd / "area_curve_paired.csv")
    area_rows = paired[paired["quantity"] == "area"]
    assert len(area_rows) == len(grid) and set(paired["versus"]) == {"b"}
    a = per_image[per_image["role"] == "a"].pivot(index="image_id", columns="threshold_index", values="area")
    b = per_image[per_image["role"] == "b"].pivot(index="image_id", columns="threshold_index", values="area")
    for k in (0, len(grid) // 2):
        d = (a[k] - b[k]).to_numpy()
        assert area_rows["difference"].iloc[k] == pytest.approx(d.mean())
        assert area_rows["p_value"].iloc[k] == pytest.approx(stats.wilcoxon(d).pvalue)
    energy = paired[paired["quantity"] == "box_energy"].iloc[0]
    d = (metrics[metrics["role"] == "a"]["box_energy"].to_numpy() - metrics[metrics["role"] == "b"]["box_energy"].to_numpy())
    assert energy["difference"] == pytest.approx(d.mean()) and energy["p_value"] == pytest.approx(stats.wilcoxon(d).pvalue)


def test_figure_draws_boxes_in_the_paper_colours(workdir, capsys, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    image_id = int(pd.read_csv(wd / "selection.csv")["image_id"].iloc[0])
    code, out, err = run(["figure", "--workdir", wd, "--image-id", image_id, "--device", "cpu", "--workers", 0, "--no-progress"], capsys)
    assert code == 0, err
    png_path = wd / "figures" / f"figure_a1_{image_id}.png"
    assert png_path.is_file() and png_path.with_suffix(".pdf").is_file()
    png = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
    for colour in (style.GT_COLOUR, style.DET_COLOUR):
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(png - rgb).sum(axis=2) < 40).sum() > 100, colour
    # the maps it computed are the area curve's maps: a gallery reuses them
    code, out, err = run(["figure", "--workdir", wd, "--top", 3, "--device", "cpu", "--workers", 0, "--no-progress"], capsys)
    assert code == 0, err
    assert (wd / "figures" / "figure_a1_gallery.pdf").is_file()
    assert len(list((wd / "figures").glob("figure_a1_*.png"))) == 3


def test_gradients_command_writes_a_resumable_store(workdir, capsys, tmp_path):
    from gradlens.models.bundled import bundled_detector_path

    out_dir = tmp_path / "maps"

    def argv(top):
        return ["gradients", "--model", bundled_detector_path("convnext"), "--selection", workdir / "selection.csv",
                "--top", top, "--out", out_dir, "--device", "cpu", "--workers", 0, "--no-progress"]  # fmt: skip

    code, out, err = run(argv(3), capsys)
    assert code == 0, err
    assert "3 maps computed, 0 reused" in out and len(list(out_dir.glob("*.npz"))) == 3
    code, out, err = run(argv(4), capsys)
    assert code == 0 and "1 maps computed, 3 reused" in out
    code, out, err = run(argv(4) + ["--method", "smoothgrad", "--samples", 2], capsys)
    assert code == 1 and "other settings" in err and "--overwrite" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["area-curve", "--workdir", "{empty}"], "has no manifest.json; run 'gradlens select' first"),
        (["area-curve", "--workdir", "{wd}", "--checkpoint", "b"], "expects ROLE=PATH"),
        (["area-curve", "--workdir", "{wd}", "--checkpoint", "c=x.pth"], "names role 'c'"),
        (["area-curve", "--workdir", "{wd}", "--checkpoint", "b=missing.pth"], "does not exist"),
        (["area-curve", "--workdir", "{wd}", "--t-max-percentile", "0"], "must be in (0, 100]"),

        (["area-curve", "--workdir", "{wd}", "--precision", "fp16", "--device", "cpu"], "needs a CUDA device"),
        (["figure", "--workdir", "{wd}", "--image-id", "1", "--top", "2"], "one of --image-id, --top or --object"),
        (["figure", "--workdir", "{wd}", "--image-id", "x1"], "must be integers"),
        (["gradients", "--model", "{ckpt}", "--out", "{tmp}/m"], "exactly one of --selection"),
        (["gradients", "--model", "{ckpt}", "--out", "{tmp}/m", "--selection", "{wd}/manifest.json"], "not a selection table"),
    ],
)
def test_user_mistakes_are_one_sentence(argv, message, workdir, capsys, tmp_path):
    from gradlens.models.bundled import bundled_detector_path

    fill = {"{empty}": str(tmp_path / "empty"), "{wd}": str(workdir), "{tmp}": str(tmp_path), "{ckpt}": str(bundled_detector_path("cednet"))}
    args = []
    for a in argv:
        for k, v in fill.items():
            a = a.replace(k, v)
        args.append(a)
    code, out, err = run(args + ["--no-progress"], capsys)
    assert code == 1, (out, err)
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_choices_are_usage_errors(workdir, capsys):
    code, out, err = run(["area-curve", "--workdir", workdir, "--scale", "cubic"], capsys)
    assert code == 2 and "cubic" in err
    code, out, err = run(["figure", "--workdir", workdir, "--map-scale", "loud"], capsys)
    assert code == 2 and "loud" in err


def test_results_file_models_need_a_checkpoint(workdir, capsys, tmp_path):
    """A model given to select as detections has no network: area-curve says so, and --checkpoint fixes it."""
    from gradlens.models.bundled import bundled_detector_path

    manifest = json.loads((workdir / "manifest.json").read_text())
    detections = [m["detections"] for m in manifest["models"]]
    root = manifest["dataset"]["images"].rsplit("/", 1)[0]
    wd = tmp_path / "wd"
    code, out, err = run(["select", "--a", detections[0], "--b", detections[1], "--coco-root", root, "--workdir", wd,
                          "--top", 2, "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    code, out, err = run(["area-curve", "--workdir", wd, "--device", "cpu", "--workers", 0, "--no-progress"], capsys)
    assert code == 1 and "--checkpoint a=PATH" in err
    code, out, err = run(["area-curve", "--workdir", wd, "--device", "cpu", "--workers", 0, "--thresholds", 20, "--no-progress",
                          "--checkpoint", f"a={bundled_detector_path('cednet')}", "--checkpoint", f"b={bundled_detector_path('convnext')}"], capsys)  # fmt: skip
    assert code == 0, err
    assert (wd / "area_curve.png").is_file()


def test_figure_and_area_curve_share_batch_mates(workdir, capsys, tmp_path):
    """A map drawn first by 'figure --image-id' is the very map 'area-curve' would compute (planned over the selection)."""
    from gradlens.attribution.workdir import workdir_maps

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(workdir, one)
    shutil.copytree(workdir, two)
    image_id = int(pd.read_csv(one / "selection.csv")["image_id"].iloc[-1])
    assert run(["figure", "--workdir", one, "--image-id", image_id, "--device", "cpu", "--workers", 0, "--no-progress"], capsys)[0] == 0
    assert run(["area-curve", "--workdir", one, "--device", "cpu", "--workers", 0, "--no-progress"], capsys)[0] == 0
    assert run(["area-curve", "--workdir", two, "--device", "cpu", "--workers", 0, "--no-progress"], capsys)[0] == 0
    assert (one / "area_curve.csv").read_bytes() == (two / "area_curve.csv").read_bytes()
    models_one, _ = workdir_maps(one, compute=False)
    models_two, _ = workdir_maps(two, compute=False)
    assert np.array_equal(models_one[0].store.read(image_id), models_two[0].store.read(image_id))


def test_missing_image_is_one_sentence_with_decoding_workers(workdir, capsys, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    manifest = json.loads((wd / "manifest.json").read_text())
    images = tmp_path / "images"
    shutil.copytree(manifest["dataset"]["images"], images)
    manifest["dataset"]["images"] = str(images)
    (wd / "manifest.json").write_text(json.dumps(manifest))
    image_id = int(pd.read_csv(wd / "selection.csv")["image_id"].iloc[0])
    (images / f"{image_id:012d}.jpg").unlink()
    code, out, err = run(["gradients", "--model", manifest["models"][0]["source"], "--selection", wd / "selection.csv",
                          "--out", tmp_path / "maps", "--device", "cpu", "--workers", 1, "--no-progress"], capsys)  # fmt: skip
    assert code == 1 and "does not exist" in err and err.count("\n") == 1, err


def test_detection_results_are_not_checkpoints(workdir, capsys, tmp_path):
    manifest = json.loads((workdir / "manifest.json").read_text())
    code, out, err = run(["gradients", "--model", manifest["models"][0]["detections"], "--image-ids", "1",
                          "--out", tmp_path / "m", "--no-progress"], capsys)  # fmt: skip
    assert code == 1 and "is a detection results file" in err


def test_figure_of_one_objects_own_map(workdir, capsys, tmp_path):
    from pycocotools.coco import COCO

    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    coco = COCO(json.loads((wd / "manifest.json").read_text())["dataset"]["annotations"])
    image_id = int(pd.read_csv(wd / "selection.csv")["image_id"].iloc[0])
    ann = next(a["id"] for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1)
    code, out, err = run(["figure", "--workdir", wd, "--object", ann, "--device", "cpu", "--workers", 0, "--no-progress"], capsys)
    assert code == 0, err
    assert (wd / "figures" / f"figure_a1_object_{ann}.png").is_file()
    object_stores = [p.parent for p in (wd / "maps").glob("*/*/store.json")
                     if json.loads(p.read_text())["key"]["attribution"].get("target") == "object"]
    assert len(object_stores) == 2 and all((s / f"{ann}.npz").is_file() for s in object_stores)
    crowd = [a["id"] for a in coco.anns.values() if a.get("iscrowd", 0)]
    if crowd:
        code, out, err = run(["figure", "--workdir", wd, "--object", crowd[0], "--device", "cpu", "--no-progress"], capsys)
        assert code == 1 and "crowd region" in err
    code, out, err = run(["figure", "--workdir", wd, "--object", ann, "--top", 2, "--device", "cpu", "--no-progress"], capsys)
    assert code != 0 and "one of --image-id, --top or --object" in err
