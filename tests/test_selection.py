"""Improvement, ranking and the work directory that ``select`` leaves behind."""

import json
import os
import shutil
import stat

import numpy as np
import pandas as pd
import pytest

from gradlens.data.detections import write_detections
from gradlens.data.synthetic import simulate_detections
from gradlens.data.coco import CocoPaths
from gradlens.errors import GradlensError, InputFileError
from gradlens.fileio import sha256_file
from gradlens.scoring import sources
from gradlens.selection import load_manifest, run_selection, select_images


def table(qualities: dict) -> pd.DataFrame:
    return pd.DataFrame({"image_id": list(qualities), "quality": list(qualities.values())})


def test_rank_by_improvement_ties_to_smaller_id():
    a = table({5: 0.9, 3: 0.5, 8: 0.5, 1: 0.2})
    b = table({5: 0.5, 3: 0.0, 8: 0.0, 1: 0.3})
    sel = select_images(a, b, top=None)
    assert sel["image_id"].tolist() == [3, 8, 5, 1]  # 3 and 8 tie at 0.5: smaller id first
    assert sel["rank"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(sel["improvement"], [0.5, 0.5, 0.4, -0.1])
    assert list(sel.columns) == ["rank", "image_id", "quality_a", "quality_b", "improvement"]


def test_minimum_over_several_baselines():
    a = table({1: 0.9, 2: 0.8, 3: 0.7})
    b1 = table({1: 0.1, 2: 0.7, 3: 0.0})
    b2 = table({1: 0.6, 2: 0.0, 3: 0.1})
    sel = select_images(a, [b1, b2], top=2)
    assert sel["image_id"].tolist() == [3, 1]
    np.testing.assert_allclose(sel["improvement"], [0.6, 0.3])
    assert sel["closest_b"].tolist() == ["b2", "b2"]
    assert {"quality_b1", "quality_b2", "improvement_b1", "improvement_b2"} <= set(sel.columns)


def test_only_images_scored_for_every_model_are_ranked():
    sel = select_images(table({1: 0.5, 2: 0.5}), table({2: 0.1, 3: 0.0}), top=10)
    assert sel["image_id"].tolist() == [2]


def test_bad_arguments():
    with pytest.raises(GradlensError, match="at least 1"):
        select_images(table({1: 0.1}), table({1: 0.0}), top=0)
    with pytest.raises(GradlensError, match="duplicate image ids"):
        select_images(table({1: 0.1}), pd.DataFrame({"image_id": [1, 1], "quality": [0, 0]}))


@pytest.fixture
def two_models(tmp_path, synthetic_gt):
    a = write_detections(simulate_detections(synthetic_gt, skill=0.9, seed=1), tmp_path / "det" / "good.json")
    b = write_detections(simulate_detections(synthetic_gt, skill=0.4, seed=2), tmp_path / "det" / "poor.json")
    return a, b


def test_run_selection_writes_the_work_directory(tmp_path, synthetic_coco, synthetic_gt, two_models):
    a, b = two_models
    work = tmp_path / "work"
    result = run_selection(a, [b], coco=synthetic_coco, workdir=work, top=5)
    sel = pd.read_csv(work / "selection.csv")
    assert len(sel) == 5 and list(sel.columns[:5]) == ["rank", "image_id", "quality_a", "quality_b", "improvement"]
    pd.testing.assert_frame_equal(pd.read_parquet(work / "selection.parquet"), result.selection.reset_index(drop=True))
    for role in ("a", "b"):
        for name in ("objects.csv", "images.csv", "objects.parquet", "images.parquet", "score.json"):
            assert (work / "scores" / role / name).is_file()
    manifest = load_manifest(work)
    assert manifest["models"][0]["sha256"] == sha256_file(a) and manifest["models"][1]["label"] == "poor"
    assert manifest["dataset"]["annotations_sha256"] == sha256_file(synthetic_coco.ann)
    assert manifest["settings"]["top"] == 5 and manifest["gradlens_version"]
    assert manifest["counts"]["images_compared"] == int((pd.read_csv(work / "scores/a/images.csv")).shape[0])

    # Selection from the written score directories equals the one from results files.
    again = run_selection(work / "scores" / "a", [work / "scores" / "b"], coco=None, workdir=tmp_path / "w2", top=5)
    pd.testing.assert_frame_equal(again.selection, result.selection)
    assert again.manifest["models"][0]["kind"] == "scores"


def test_second_run_reuses_cached_scores(tmp_path, synthetic_coco, two_models, monkeypatch):
    a, b = two_models
    first = run_selection(a, [b], coco=synthetic_coco, workdir=tmp_path / "work", top=5)

    def fail(*args, **kwargs):
        raise AssertionError("scores were recomputed")

    monkeypatch.setattr(sources, "quality_scores", fail)
    second = run_selection(a, [b], coco=synthetic_coco, workdir=tmp_path / "work", top=5)
    pd.testing.assert_frame_equal(first.selection, second.selection)
    with pytest.raises(AssertionError, match="recomputed"):  # a changed setting invalidates the cache
        run_selection(a, [b], coco=synthetic_coco, workdir=tmp_path / "work", top=5, class_agnostic=True)


def test_score_dirs_from_different_annotations_are_refused(tmp_path, synthetic_coco, two_models, gt_file):
    a, b = two_models
    run_selection(a, [b], coco=synthetic_coco, workdir=tmp_path / "work", top=5)
    meta_path = tmp_path / "work/scores/b/score.json"
    meta = json.loads(meta_path.read_text())
    meta["annotations"]["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(GradlensError, match="different annotation files"):
        run_selection(tmp_path / "work/scores/a", [tmp_path / "work/scores/b"], workdir=tmp_path / "w2")


def test_class_agnostic_mismatch_is_refused(tmp_path, synthetic_coco, two_models):
    a, b = two_models
    run_selection(a, [b], coco=synthetic_coco, workdir=tmp_path / "work", class_agnostic=True)
    with pytest.raises(GradlensError, match="scored class-agnostic"):
        run_selection(tmp_path / "work/scores/a", [b], coco=synthetic_coco, workdir=tmp_path / "w2")


def test_sources_that_cannot_be_used(tmp_path, synthetic_coco, two_models):
    a, _ = two_models
    (tmp_path / "model.pth").write_bytes(b"\x80\x02")
    with pytest.raises(GradlensError, match="checkpoint"):
        run_selection(a, [tmp_path / "model.pth"], coco=synthetic_coco, workdir=tmp_path / "w")
    with pytest.raises(GradlensError, match="does not exist"):
        run_selection(a, [tmp_path / "missing.json"], coco=synthetic_coco, workdir=tmp_path / "w")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(GradlensError, match="not a score directory"):
        run_selection(a, [tmp_path / "empty_dir"], coco=synthetic_coco, workdir=tmp_path / "w")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(GradlensError, match="Cannot tell what"):
        run_selection(a, [tmp_path / "notes.txt"], coco=synthetic_coco, workdir=tmp_path / "w")
    with pytest.raises(GradlensError, match="at least one baseline"):
        run_selection(a, [], coco=synthetic_coco, workdir=tmp_path / "w")


def test_manifest_missing(tmp_path):
    with pytest.raises(GradlensError, match="run 'gradlens select' first"):
        load_manifest(tmp_path)


def test_damaged_cache_is_recomputed(tmp_path, synthetic_coco, two_models):
    a, b = two_models
    first = run_selection(a, [b], coco=synthetic_coco, workdir=tmp_path / "work", top=5)
    for name in ("images.parquet", "images.csv"):
        (tmp_path / "work/scores/b" / name).unlink()
    (tmp_path / "work/scores/a/score.json").write_text("{not json")
    second = run_selection(a, [b], coco=synthetic_coco, workdir=tmp_path / "work", top=5)
    pd.testing.assert_frame_equal(first.selection, second.selection)
    assert (tmp_path / "work/scores/b/images.parquet").is_file()


def test_swapped_roles_from_the_workdirs_own_scores(tmp_path, synthetic_coco, two_models):
    """``--a work/scores/b --b work/scores/a --workdir work``: both inputs are read before either is overwritten."""
    a, b = two_models
    work = tmp_path / "work"
    first = run_selection(a, [b], coco=synthetic_coco, workdir=work, top=10**6)
    images = {role: pd.read_parquet(work / "scores" / role / "images.parquet") for role in ("a", "b")}
    swapped = run_selection(work / "scores/b", [work / "scores/a"], coco=synthetic_coco, workdir=work, top=10**6)
    before = first.selection.set_index("image_id")["improvement"]
    after = swapped.selection.set_index("image_id")["improvement"]
    assert len(before) and sorted(before.index) == sorted(after.index) and (before != 0).any()
    np.testing.assert_array_equal(after.loc[before.index].to_numpy(), -before.to_numpy())
    # The work directory now holds each model under its new role.
    pd.testing.assert_frame_equal(pd.read_parquet(work / "scores/a/images.parquet"), images["b"])
    pd.testing.assert_frame_equal(pd.read_parquet(work / "scores/b/images.parquet"), images["a"])


def _damage(directory, how):
    meta_path = directory / "score.json"
    meta = json.loads(meta_path.read_text())
    if how == "meta is a list":
        meta_path.write_text("[1, 2]")
    elif how == "meta lacks summary":
        del meta["summary"]
        meta_path.write_text(json.dumps(meta))
    elif how == "meta lacks a count":
        del meta["summary"]["num_objects"]
        meta_path.write_text(json.dumps(meta))
    elif how == "meta lacks the annotation hash":
        meta["annotations"] = {}
        meta_path.write_text(json.dumps(meta))
    elif how in ("quality is text", "quality is missing", "image id is text"):
        images = pd.read_parquet(directory / "images.parquet")
        (directory / "images.parquet").unlink()
        column = "image_id" if how == "image id is text" else "quality"
        images[column] = images[column].astype(object)
        images.loc[0, column] = "abc" if how != "quality is missing" else None
        images.to_csv(directory / "images.csv", index=False)


DAMAGE = [
    "meta is a list", "meta lacks summary", "meta lacks a count", "meta lacks the annotation hash",
    "quality is text", "quality is missing", "image id is text",
]  # fmt: skip


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_score_directory_is_one_sentence(tmp_path, synthetic_coco, two_models, how):
    a, b = two_models
    run_selection(a, [b], coco=synthetic_coco, workdir=tmp_path / "work", top=5)
    damaged = tmp_path / "work/scores/b"
    _damage(damaged, how)
    with pytest.raises(InputFileError, match="The score directory .* is damaged") as info:
        run_selection(tmp_path / "work/scores/a", [damaged], workdir=tmp_path / "w2")
    assert str(damaged) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "w2").exists()  # nothing written before every input was read


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_cache_in_the_workdir_is_recomputed(tmp_path, synthetic_coco, two_models, how):
    a, b = two_models
    first = run_selection(a, [b], coco=synthetic_coco, workdir=tmp_path / "work", top=5)
    _damage(tmp_path / "work/scores/b", how)
    second = run_selection(a, [b], coco=synthetic_coco, workdir=tmp_path / "work", top=5)
    pd.testing.assert_frame_equal(first.selection, second.selection)
    assert load_scores_ok(tmp_path / "work/scores/b")


def load_scores_ok(directory):
    from gradlens.scoring.store import read_scores

    return read_scores(directory)[0].images["quality"].notna().all()


def test_named_annotation_file_must_match_score_directories(tmp_path, synthetic_coco, two_models, gt_file):
    a, b = two_models
    run_selection(a, [b], coco=synthetic_coco, workdir=tmp_path / "work", top=5)
    dirs = [tmp_path / "work/scores/a", [tmp_path / "work/scores/b"]]
    other = CocoPaths(ann=gt_file([1], []), images=tmp_path)
    with pytest.raises(GradlensError, match="scored against another annotation file than"):
        run_selection(*dirs, coco=other, workdir=tmp_path / "w2")
    assert not (tmp_path / "w2").exists()
    # The same file is fine; with nothing named the recorded hash is trusted, even if ./data/coco differs.
    assert len(run_selection(*dirs, coco=synthetic_coco, workdir=tmp_path / "w2", top=5).selection) == 5
    unnamed = CocoPaths(ann=other.ann, images=tmp_path, given=False)
    assert len(run_selection(*dirs, coco=unnamed, workdir=tmp_path / "w3", top=5).selection) == 5


def test_stale_score_directories_are_removed(tmp_path, synthetic_coco, synthetic_gt, two_models):
    a, b = two_models
    work = tmp_path / "work"
    extra = [write_detections(simulate_detections(synthetic_gt, skill=s, seed=7), tmp_path / f"m{s}.json") for s in (0.3, 0.5)]
    run_selection(a, [b, *extra], coco=synthetic_coco, workdir=work, top=5)
    assert sorted(p.name for p in (work / "scores").iterdir()) == ["a", "b1", "b2", "b3"]
    (work / "scores/b2/notes.txt").write_text("mine")  # not gradlens' to delete
    (work / "scores/other").mkdir()
    shutil.copytree(work / "scores/a", work / "scores/mine")  # a user's own score directory: not recorded, kept
    result = run_selection(a, [b], coco=synthetic_coco, workdir=work, top=5)
    assert sorted(p.name for p in (work / "scores").iterdir()) == ["a", "b", "b2", "mine", "other"]
    assert sorted(p.name for p in result.removed) == ["b1", "b2", "b3"]
    assert (work / "scores/mine/score.json").is_file()
    assert [p.name for p in (work / "scores/b2").iterdir()] == ["notes.txt"]
    # A stale folder that is an input of this run is kept.
    run_selection(a, [b, *extra], coco=synthetic_coco, workdir=work, top=5)
    run_selection(work / "scores/b3", [b], coco=synthetic_coco, workdir=work, top=5)
    assert (work / "scores/b3/score.json").is_file() and not (work / "scores/b1").exists()


def test_outputs_get_the_usual_permissions(tmp_path, synthetic_coco, two_models):
    a, b = two_models
    old = os.umask(0o027)
    try:
        run_selection(a, [b], coco=synthetic_coco, workdir=tmp_path / "work", top=5)
    finally:
        os.umask(old)
    for path in [tmp_path / "work/selection.csv", tmp_path / "work/manifest.json", tmp_path / "work/scores/a/objects.parquet"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_score_directory_without_objects_reads_back_from_csv(tmp_path, gt_file, results_file):
    from gradlens.data.coco import load_ground_truth
    from gradlens.scoring.store import read_scores

    from .conftest import det

    gt = load_ground_truth(gt_file([1, 2], []))
    source = sources.identify_source(results_file([det(1, 1, [0, 0, 4, 4], 0.5)]))
    sources.score_source(source, lambda: gt, out_dir=tmp_path / "s")
    for name in ("objects.parquet", "images.parquet"):
        (tmp_path / "s" / name).unlink()
    scores, _ = read_scores(tmp_path / "s")
    assert scores.images.empty and scores.objects.empty
