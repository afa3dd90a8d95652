"""What area-curve reads back is checked before use (issue 22): stored maps by their key and their values,
records by their types and by the files they list, the statistics options by what they can mean; and its
outputs are written as one unit, the figures first."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gradlens.attribution.store import MapStore
from gradlens.errors import GradlensError, InputFileError
from tests.test_cli import run
from tests.test_hostile import one_sentence

AREA_CURVE = ["--device", "cpu", "--workers", "0", "--thresholds", "30", "--bootstrap", "100", "--no-progress"]


@pytest.fixture(scope="module")
def curved(tmp_path_factory):
    """The demo work directory (12 images, the top 3 selected) after one area-curve run: every map stored."""
    from gradlens.cli.app import main
    from gradlens.demo import run_demo

    out = tmp_path_factory.mktemp("records")
    workdir = run_demo(out, num_images=12, top=3, device="cpu", progress=False, workers=0, gradients=False).selection.workdir
    try:
        main(["area-curve", "--workdir", str(workdir), *AREA_CURVE])
    except SystemExit as done:
        assert done.code in (0, None)
    return workdir


@pytest.fixture
def wd(curved, tmp_path):
    target = tmp_path / "wd"
    shutil.copytree(curved, target)
    return target


def _files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by its SHA-256: what 'nothing on disk changed' compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- stored maps ----------------------------------------------------------------------------------------


def _rewrite(path: Path, change) -> None:
    """Rewrite one member array (or drop it: ``change`` returns None) of a map file, the rest as it was."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    for name, value in change(dict(arrays)).items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, value in arrays.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    path.write_bytes(buffer.getvalue())


def _set_pixel(value):
    def change(a):
        scaled = a["scaled"].copy()
        scaled[0, 0] = value
        return {"scaled": scaled}
    return change


def _histogram(change_counts):
    def change(a):
        return {"hist_counts": change_counts(a["hist_counts"].copy())}
    return change


def _move_one_count(counts):  # as many pixels, one counted in the wrong bin
    counts[0] += 1
    counts[-1] -= 1
    return counts


# (what is done to the file, the words of problem(), the readers that see it without inflating more than they need)
TAMPERS = {
    "NaN value": (_set_pixel(np.nan), "NaN or infinite", {"read", "read_codes"}),
    "infinite value": (_set_pixel(np.inf), "NaN or infinite", {"read", "read_codes"}),
    "negative value": (_set_pixel(-0.5), "negative", {"read", "read_codes"}),
    "negative histogram count": (_histogram(lambda c: np.concatenate([c[:-1], [-c[-1]]])), "histogram", {"summary"}),
    "histogram not of the values": (_histogram(_move_one_count), "histogram", set()),
    "maximum not of the values": (lambda a: {"max": np.float64(a["max"] * (1 - 2**-20))}, "maximum", set()),
    "no store key": (lambda a: {"key": None}, "store key", {"read", "read_codes", "summary"}),
    "another store's key": (lambda a: {"key": np.array("0123456789abcdef")}, "other settings", {"read", "read_codes", "summary"}),
}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_damaged_stored_map_is_found_before_use_and_refused_where_read(tamper, dtype, tmp_path):
    change, words, readers = TAMPERS[tamper]
    store = MapStore(tmp_path / "s", {"k": 1}, map_dtype=dtype)
    rng = np.random.default_rng(0)
    m = (rng.lognormal(-12, 3, size=(30, 40)) * (rng.random((30, 40)) > 0.2)).astype(np.float32)
    store.write(7, m)
    store.write(8, m)
    assert store.problem(7, (30, 40)) is None
    _rewrite(store.path(7), change)
    assert words in store.problem(7, (30, 40))  # what compute_maps checks first: the map is computed again
    assert store.problem(8, (30, 40)) is None
    for reader in ("read", "read_codes", "summary"):
        if reader == "read_codes" and dtype != "float16":
            continue
        if reader in readers:  # no checkpoint to recompute from (the API on a store): one sentence naming the file
            with pytest.raises(InputFileError, match="delete it to have it computed again") as refused:
                getattr(store, reader)(7)
            assert str(store.path(7)) in str(refused.value) and "\n" not in str(refused.value)
        getattr(store, reader)(8)


@pytest.mark.parametrize("tamper", ["NaN value", "negative histogram count", "no store key"])
def test_damaged_maps_in_a_work_directory_are_computed_again(tamper, wd, capsys):
    reference = (wd / "area_curve.csv").read_bytes()
    victim = sorted(next((wd / "maps" / "a").iterdir()).glob("*.npz"))[0]
    _rewrite(victim, TAMPERS[tamper][0])
    code, out, err = run(["area-curve", "--workdir", str(wd), *AREA_CURVE], capsys)
    assert code == 0, err
    assert "(1 damaged or mismatched, computed again)" in out
    assert (wd / "area_curve.csv").read_bytes() == reference


@pytest.mark.parametrize("planted", ["image map without its key", "image map with its own store's key"])
def test_an_image_map_planted_where_an_object_map_belongs_is_refused(planted, wd):
    from gradlens.attribution.compute import map_store_key, stored_problems
    from gradlens.attribution.methods import AttributionConfig
    from gradlens.attribution.objects import object_entries
    from gradlens.attribution.workdir import selection_ids, workdir_ground_truth
    from gradlens.models.bundled import bundled_detector_path
    from gradlens.models.formats.checkpoints import load_detector
    from gradlens.selection.manifest import load_manifest

    gt = workdir_ground_truth(load_manifest(wd))
    detector = load_detector(bundled_detector_path("cednet"))
    image_store = MapStore(next((wd / "maps" / "a").iterdir()))
    image_id = next(i for i in selection_ids(wd) if any(e[0] == i for e in object_entries(detector, gt, [i]).values()))
    ann = next(a for a, (i, _) in object_entries(detector, gt, [image_id]).items() if i == image_id)
    objects = MapStore(wd / "objects", map_store_key(detector, "sha", gt, AttributionConfig(target="object")))
    shape = image_store.read(image_id).shape
    objects.write(ann, np.ones(shape, np.float32))  # a genuine object map of the right shape...
    assert stored_problems(objects, gt, {ann: image_id}) == {ann: None}
    shutil.copy(image_store.path(image_id), objects.path(ann))  # ...replaced by the image's map, same shape
    if planted == "image map without its key":
        _rewrite(objects.path(ann), lambda a: {"key": None})
    problem = stored_problems(objects, gt, {ann: image_id})[ann]
    assert problem in ("made with other settings", "without a store key (a map of unknown origin)")
    with pytest.raises(InputFileError, match=str(objects.path(ann)).replace("\\", "\\\\")):
        objects.read(ann)


# -- area-curve records -------------------------------------------------------------------------------


def _set(path: str, value):
    def change(record):
        *parents, last = path.split(".")
        target = record
        for key in parents:
            target = target[key]
        target[last] = value
        return record
    return change


RECORDS = {
    "a list for the record": (lambda r: [r], "not an area-curve record"),
    "a list for the settings": (_set("settings", [1, 2]), "settings"),
    "a string for a number": (_set("settings.bootstrap", "many"), "settings.bootstrap"),
    "a number as text": (_set("settings.thresholds", "30"), "settings.thresholds"),
    "a batch size of zero": (_set("settings.batch_size", 0), "settings.batch_size"),
    "a batch size of true": (_set("settings.batch_size", True), "settings.batch_size"),
    "a list for the attribution": (_set("settings.attribution", ["gradient"]), "settings.attribution"),
    "a number for the method": (_set("settings.attribution.method", 5), "settings.attribution.method"),
    "an unknown precision": (_set("settings.attribution.precision", "fp99"), "settings.attribution"),
    "a level outside (0, 1)": (_set("settings.confidence_level", 7), "settings.confidence_level"),
    "a table outside the work directory": (_set("outputs.metrics", "../../metrics.csv"), "outputs.metrics"),
    "a figure list that is text": (_set("outputs.figure", "area_curve.png"), "outputs.figure"),
    "an object for the models": (_set("models", {"role": "a"}), "models"),
    "a list in a summary row": (_set("summary", [{"mean": [1]}]), "summary[0].mean"),
    "a digest that is not one": (lambda r: {**r, "sha256": {**r["sha256"], "area_curve.csv": 12}}, "sha256.area_curve.csv"),
    # without its hashes the report would trust any table beside the record: refused, whoever dropped them
    "no hashes at all": (lambda r: {k: v for k, v in r.items() if k != "sha256"}, "sha256"),
    "a hash missing": (lambda r: {**r, "sha256": {k: v for k, v in r["sha256"].items() if k != "metrics.csv"}},
                       "metrics.csv"),
}


@pytest.mark.parametrize("case", list(RECORDS))
def test_a_record_of_wrong_types_is_one_sentence_naming_file_and_field(case, wd, capsys):
    change, field = RECORDS[case]
    path = wd / "area_curve.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    before = _files(wd)
    message = one_sentence(capsys, ["report", "--workdir", wd, "--device", "cpu", "--workers", 0, "--no-progress"])
    assert str(path) in message and field in message, message
    assert _files(wd) == before


# -- statistics options ---------------------------------------------------------------------------------


BOOTSTRAP = {
    "one resample": (["--bootstrap", "1"], "at least 40"),
    "too few for the level": (["--bootstrap", "100", "--level", "0.99"], "at least 200"),
    "more than memory allows": (["--bootstrap", str(10**9)], "GiB"),
    "a negative seed": (["--bootstrap-seed", "-1"], "--bootstrap-seed"),
    "a seed past int64": (["--bootstrap-seed", str(2**63)], "--bootstrap-seed"),
}


@pytest.mark.parametrize("case", list(BOOTSTRAP))
def test_bootstrap_options_are_bounded_by_what_they_can_mean(case, wd, capsys):
    options, words = BOOTSTRAP[case]
    before = _files(wd)
    message = one_sentence(capsys, ["area-curve", "--workdir", wd, *AREA_CURVE, *options])
    assert words in message, message
    assert _files(wd) == before  # refused before any map or table is touched


@pytest.mark.parametrize("call", ["bootstrap_mean", "paired_difference", "resample_counts"])
@pytest.mark.parametrize("case", ["one resample", "a negative seed", "more than memory allows", "a float count"])
def test_the_api_refuses_the_same_options(call, case):
    from gradlens.regions import statistics

    num, seed = {"one resample": (1, 0), "a negative seed": (100, -1), "more than memory allows": (10**9, 0),
                 "a float count": (100.0, 0)}[case]
    x = np.random.default_rng(0).random((20, 3))
    if call == "resample_counts" and case == "one resample":
        num = -1  # counts know no level: their floor is 0
    with pytest.raises(GradlensError) as refused:
        if call == "bootstrap_mean":
            statistics.bootstrap_mean(x, num=num, seed=seed)
        elif call == "paired_difference":
            statistics.paired_difference(x, x[::-1], num=num, seed=seed)
        else:
            statistics.resample_counts(20, num, seed)
    assert "\n" not in str(refused.value) and "--bootstrap" in str(refused.value)


def test_the_least_resamples_put_one_in_each_tail():
    from gradlens.regions.statistics import bootstrap_mean, min_resamples

    assert [min_resamples(level) for level in (0.5, 0.8, 0.9, 0.95, 0.99)] == [4, 10, 20, 40, 200]
    x = np.random.default_rng(3).normal(size=(30, 4))
    band = bootstrap_mean(x, num=min_resamples(0.9), seed=1, level=0.9)  # the floor itself is accepted
    assert np.all(band.low <= band.high)


# -- the outputs as one unit ------------------------------------------------------------------------------


def _report_refuses(wd, capsys) -> str:
    return one_sentence(capsys, ["report", "--workdir", wd, "--device", "cpu", "--workers", 0, "--no-progress"])


@pytest.mark.parametrize("how", ["killed while moving the new files in", "a table changed since", "a figure missing"])
def test_tables_that_do_not_match_their_record_are_refused(how, wd, capsys, monkeypatch):
    from gradlens.regions.record import load_area_curve_record

    if how == "killed while moving the new files in":
        moved, rename = [], os.replace

        def replace_then_die(src, dst, **kwargs):  # the run dies after 3 of its new files are in place
            if Path(dst).parent == wd:
                if len(moved) == 3:
                    raise OSError(28, "No space left on device")
                moved.append(dst)
            return rename(src, dst, **kwargs)

        monkeypatch.setattr(os, "replace", replace_then_die)
        code, out, err = run(["area-curve", "--workdir", str(wd), *AREA_CURVE[:4], "--thresholds", "20", "--no-progress"],
                             capsys)
        monkeypatch.undo()
        assert code == 1 and "No space left" in err and len(moved) == 3
        assert not list(wd.glob(".area_curve.*"))  # the staging folder is gone
    elif how == "a table changed since":
        (wd / "metrics_summary.parquet").write_bytes((wd / "metrics_summary.parquet").read_bytes() + b"\0")
    else:
        (wd / "area_curve.pdf").unlink()
    with pytest.raises(InputFileError, match="area-curve' again"):
        load_area_curve_record(wd, "area_curve")
    message = _report_refuses(wd, capsys)
    assert "area_curve.json" in message and "run 'gradlens area-curve' again" in message


@pytest.mark.parametrize("failure", [ValueError("Unknown symbol: \\$x"), GradlensError("The label cannot be drawn.")])
def test_a_figure_that_fails_leaves_the_previous_run_intact(failure, wd, monkeypatch):
    from gradlens.figures import area_curve as figure
    from gradlens.regions.record import load_area_curve_record
    from gradlens.regions.run import run_area_curve
    from gradlens.runner import DetectorRun

    before = _files(wd)

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(figure, "save_area_curve_figure", fail)
    with pytest.raises(type(failure)):
        run_area_curve(wd, thresholds=20, bootstrap=50, detector_run=DetectorRun.recorded(wd, device="cpu", workers=0),
                       progress=False)
    assert _files(wd) == before  # every table, figure and the record as the previous run left them
    assert not list(wd.glob(".area_curve.*"))
    assert load_area_curve_record(wd, "area_curve")["settings"]["thresholds"] == 30


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path):
    """SIGKILL leaves the staging folder behind; the next run of the same output on this machine removes it,
    and leaves alone a live run's, another machine's, another output's and any unrelated folder."""
    import os
    import socket
    import subprocess
    import sys

    from gradlens.regions.record import staging_folder

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    keep = [f".area_curve.{host}-{os.getpid()}.live.partial", f".area_curve.other.host-{dead_pid}.x1.partial",
            f".faithfulness.{host}-{dead_pid}.x2.partial", ".area_curve.partial", "area_curve.abc.partial"]
    gone = [f".area_curve.{host}-{dead_pid}.x3.partial", f".area_curve.{host}-{dead_pid}.x4.partial"]
    for name in keep + gone:
        (tmp_path / name).mkdir()
        (tmp_path / name / "area_curve.csv").write_text("half written")
    with staging_folder(tmp_path, "area_curve") as staged:
        assert staged.name.startswith(f".area_curve.{host}-{os.getpid()}.") and staged.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def _staged(tmp_path, files):
    staged = tmp_path / "staged"
    staged.mkdir(parents=True)
    for name in files:
        (staged / name).write_text(name)
    return staged


def test_outputs_never_replace_another_records_files_and_nothing_moves_on_refusal(tmp_path):
    """Caught before any rename: a file another record lists (another name's or another command's), or a folder
    where a file would go; the earlier outputs stay whole (the catalogue's --name clashes and half-moved runs)."""
    from gradlens.errors import OutputError
    from gradlens.regions.record import move_into_place

    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "other.csv").write_text("theirs")
    (workdir / "other.json").write_text(json.dumps({"command": "faithfulness", "outputs": {"table": "other.csv"},
                                                    "sha256": {"other.csv": "0" * 64}}))
    staged = _staged(tmp_path, ["mine.csv", "other.csv"])
    with pytest.raises(OutputError, match=r"would overwrite an output of .*other\.json") as info:
        move_into_place(staged, workdir, "mine")
    assert str(info.value).count(". ") == 0 and "\n" not in str(info.value)
    assert (workdir / "other.csv").read_text() == "theirs" and not (workdir / "mine.csv").exists()
    # its own record's files may be replaced (a rerun)
    digests = move_into_place(_staged(tmp_path / "again", ["other.csv"]), workdir, "other")
    assert set(digests) == {"other.csv"}

    (workdir / "mine_randomisation.csv").mkdir()
    staged = _staged(tmp_path / "third", ["mine.csv", "mine_randomisation.csv"])
    with pytest.raises(OutputError, match="something other than a file"):
        move_into_place(staged, workdir, "mine")
    assert not (workdir / "mine.csv").exists()


def test_manifest_labels_must_name_each_model_once_and_a_comes_first(wd):
    """Two models with one label would be drawn as one curve; no label breaks every table; B listed before A would
    swap the comparison (the catalogue's manifest cases)."""
    from gradlens.selection.manifest import load_manifest

    path = wd / "manifest.json"
    original = json.loads(path.read_text())
    try:
        for labels, message in ((["same", "same"], "both labelled"), (["", "b"], "has no label"), ([None, "b"], "has no label")):
            manifest = json.loads(json.dumps(original))
            for model, label in zip(manifest["models"], labels):
                model["label"] = label
            path.write_text(json.dumps(manifest))
            with pytest.raises(InputFileError, match=message) as info:
                load_manifest(wd)
            assert str(info.value).count(". ") == 0 and "\n" not in str(info.value)
        manifest = json.loads(json.dumps(original))
        manifest["models"].reverse()
        path.write_text(json.dumps(manifest))
        assert [m["role"] for m in load_manifest(wd)["models"]] == [m["role"] for m in original["models"]]
    finally:
        path.write_text(json.dumps(original))
