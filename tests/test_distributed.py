"""torchrun on the CPU (gloo): two processes write what one writes, survive a killed rank, refuse bad launches."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlens import distributed
from gradlens.data.synthetic import make_synthetic_coco
from gradlens.errors import GradlensError
from gradlens.models.bundled import bundled_detector_path

A, B = str(bundled_detector_path("cednet")), str(bundled_detector_path("convnext"))
TABLES = ["selection.csv", "selection.parquet", "scores/a/images.csv", "scores/a/objects.parquet", "scores/b/images.parquet",
          "scores/a/detections.json", "scores/b/detections.json"]


def test_shards_are_balanced_deterministic_and_cover_every_batch():
    batches = [[i] for i in range(11)]
    costs = [5.0, 1.0, 1.0, 3.0, 3.0, 2.0, 2.0, 8.0, 1.0, 1.0, 1.0]
    shards = distributed.assign(batches, costs, 3)
    assert shards == distributed.assign(batches, costs, 3)
    assert sorted(b[0] for s in shards for b in s) == list(range(11))
    loads = [sum(costs[b[0]] for b in s) for s in shards]
    assert max(loads) - min(loads) <= max(costs[1:])  # greedy largest-first: within one batch of even
    assert all([b[0] for b in s] == sorted(b[0] for b in s) for s in shards)  # plan order kept on each rank


def test_a_cuda_rank_without_a_gpu_is_one_sentence(monkeypatch):
    monkeypatch.setattr(distributed, "_session", distributed.World(rank=3, size=4, local_rank=3))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(GradlensError, match=r"Rank 3 \(LOCAL_RANK 3\) has no GPU: this node shows 2 CUDA device"):
        distributed.device_for_rank("cuda")
    assert distributed.device_for_rank("cpu") == torch.device("cpu")


def test_without_torchrun_nothing_changes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.launched_world() is None
    with distributed.session() as world:
        assert world is None and distributed.active() is None


# -------------------------------------------------------------------------------------------------
# real torchrun launches


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("dist") / "coco", num_images=20, seed=5, progress=False)


# per-object maps in groups of two image copies (plain gradients would group by image: fewer, uneven groups)
OBJECT_MAPS = ["--target", "object", "--method", "input_x_gradient", "--top", "6", "--batch-size", "2"]


def _coco_args(paths):
    return ["--ann", str(paths.ann), "--images", str(paths.images)]


def _env(tmp, cache, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADLENS_", "OMP_"))}
    env.update({"GRADLENS_CACHE_DIR": str(tmp / cache), "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def gradlens(args, env, ranks=1, check=True):
    if ranks == 1:
        cmd = [sys.executable, "-m", "gradlens", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "gradlens", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}")
    return done


def _select(coco, work, env, ranks=1, check=True):
    return gradlens(["select", "--a", A, "--b", B, *_coco_args(coco), "--workdir", str(work), "--top", "8"], env, ranks, check)


def _same_maps(left: Path, right: Path) -> int:
    count = 0
    for f in sorted(left.rglob("*.npz")):
        x, y = np.load(f), np.load(right / f.relative_to(left))
        assert sorted(x.files) == sorted(y.files)
        assert all(np.array_equal(x[k], y[k]) for k in x.files), f
        count += 1
    return count


def _detections_files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "detections").glob("*[0-9a-f].json"))}


@pytest.fixture(scope="module")
def single(coco, tmp_path_factory):
    """The one-process reference: select, area-curve and gradients of the selection."""
    tmp = tmp_path_factory.mktemp("single")
    env = _env(tmp, "cache")
    _select(coco, tmp / "w", env)
    gradlens(["area-curve", "--workdir", str(tmp / "w")], env)
    gradlens(["gradients", "--model", A, "--selection", str(tmp / "w" / "selection.csv"), "--out", str(tmp / "g")], env)
    gradlens(["gradients", "--model", A, "--selection", str(tmp / "w" / "selection.csv"), *OBJECT_MAPS,
              "--out", str(tmp / "o")], env)
    return tmp


def test_two_processes_write_byte_identical_outputs(coco, single, tmp_path):
    env = _env(tmp_path, "cache")
    out = _select(coco, tmp_path / "w", env, ranks=2)
    assert "Selected 8 of" in out.stdout
    curve = gradlens(["area-curve", "--workdir", str(tmp_path / "w")], env, ranks=2)
    assert "maps 8 computed" in curve.stdout
    gradlens(["gradients", "--model", A, "--selection", str(tmp_path / "w" / "selection.csv"), "--out", str(tmp_path / "g")],
             env, ranks=2)
    for name in TABLES + ["area_curve.csv"]:
        assert (single / "w" / name).read_bytes() == (tmp_path / "w" / name).read_bytes(), name
    assert _detections_files(single / "cache") == _detections_files(tmp_path / "cache")
    assert _same_maps(single / "w" / "maps", tmp_path / "w" / "maps") == 16
    assert _same_maps(single / "g", tmp_path / "g") == 8


def test_two_processes_share_the_object_maps(coco, single, tmp_path):
    env = _env(tmp_path, "cache")
    args = ["gradients", "--model", A, "--selection", str(single / "w" / "selection.csv"), *OBJECT_MAPS,
            "--out", str(tmp_path / "o")]
    objects = len(list((single / "o").glob("*.npz")))
    assert objects >= 12  # groups of 2 objects: each rank has several of them
    out = gradlens(args, {**env, "GRADLENS_FAULT": "1:1"}, ranks=2, check=False)  # rank 1 dies after its first group
    assert out.returncode != 0
    kept = len(list((tmp_path / "o").glob("*.npz")))
    assert 2 <= kept < objects  # rank 1's first group is on disk, its others are not
    again = gradlens(args, env, ranks=2)
    assert f"{objects - kept} object maps computed, {kept} reused" in again.stdout
    assert _same_maps(single / "o", tmp_path / "o") == objects


def test_a_killed_rank_loses_only_its_unsaved_batches(coco, single, tmp_path):
    env = _env(tmp_path, "cache", GRADLENS_PARTIAL_SAVE_S="0")
    killed = _select(coco, tmp_path / "w", {**env, "GRADLENS_FAULT": "1:2"}, ranks=2, check=False)
    assert killed.returncode != 0
    saved = set()
    for chunk in (tmp_path / "cache" / "detections").glob("*.partial/chunk-*.json"):
        saved |= set(json.loads(chunk.read_text())["results"])
    assert 4 <= len(saved) < 20  # both ranks' finished batches are on disk, not all images
    again = _select(coco, tmp_path / "w", env, ranks=2)
    assert f"images run through the detector: {20 - len(saved)} (the other {len(saved)}" in again.stdout
    for name in TABLES:
        assert (single / "w" / name).read_bytes() == (tmp_path / "w" / name).read_bytes(), name
    assert _detections_files(single / "cache") == _detections_files(tmp_path / "cache")
    assert not list((tmp_path / "cache" / "detections").glob("*.partial"))

    # the same for gradient maps: the killed run's maps stay, the rerun computes only the others
    cut = gradlens(["area-curve", "--workdir", str(tmp_path / "w")], {**env, "GRADLENS_FAULT": "1:1"}, ranks=2, check=False)
    assert cut.returncode != 0
    kept = len(list((tmp_path / "w" / "maps").rglob("*.npz")))
    assert 0 < kept < 16
    curve = gradlens(["area-curve", "--workdir", str(tmp_path / "w")], env, ranks=2)
    reused = [int(line.split(" computed, ")[1].split(" reused")[0]) for line in curve.stdout.splitlines() if " computed, " in line]
    assert sum(reused) == kept
    assert (single / "w" / "area_curve.csv").read_bytes() == (tmp_path / "w" / "area_curve.csv").read_bytes()
    assert _same_maps(single / "w" / "maps", tmp_path / "w" / "maps") == 16


def test_more_processes_than_images_is_one_sentence(coco, tmp_path):
    first = json.loads(Path(coco.ann).read_text())["images"][0]["id"]
    out = gradlens(["gradients", "--model", A, "--image-ids", str(first), *_coco_args(coco), "--out", str(tmp_path / "g")],
                   _env(tmp_path, "cache"), ranks=2, check=False)
    assert out.returncode != 0
    assert "gradlens: error: torchrun started 2 processes, but this step has only 1 image(s)" in out.stderr


def test_ranks_that_see_other_inputs_are_refused(coco, tmp_path):
    # rank 1 sees another checkpoint behind the same path, as a node without the shared filesystem would
    wrapper = tmp_path / "other_node.py"
    wrapper.write_text(
        "import os, sys\n"
        "import gradlens.inference as inference\n"
        "if os.environ['RANK'] == '1':\n"
        "    inference.sha256_file = lambda path: '0' * 64\n"
        "from gradlens.cli.app import main\n"
        "sys.argv[0] = 'gradlens'\n"
        "main()\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(wrapper),
           "score", "--model", A, *_coco_args(coco), "--out", str(tmp_path / "s")]
    out = subprocess.run(cmd, env=_env(tmp_path, "cache"), capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert ("gradlens: error: Rank 1 failed: it sees other inputs than rank 0 for detections: checkpoint_sha256 differs "
            "(is the work directory on a filesystem every node shares?)") in out.stderr


def test_two_processes_share_the_faithfulness_step(single, tmp_path):
    """Images are the unit of work: each computed whole by one rank, so the merged table is byte-identical; a
    rank killed after its first image leaves that image on disk, and the rerun computes only the others."""
    args = ["--fractions", "0,0.05,0.5", "--bootstrap", "100", "--randomise"]
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(single / "w", one, symlinks=True)
    shutil.copytree(single / "w", two, symlinks=True)
    env = _env(tmp_path, "cache")
    gradlens(["faithfulness", "--workdir", str(one), *args], env)
    killed = gradlens(["faithfulness", "--workdir", str(two), *args], {**env, "GRADLENS_FAULT": "1:1"}, ranks=2,
                      check=False)
    assert killed.returncode != 0
    kept = [p for p in (two / "faithfulness").rglob("*.json") if p.name != "store.json"]
    assert 1 <= len(kept) < 8
    again = gradlens(["faithfulness", "--workdir", str(two), *args], env, ranks=2)
    assert f"{8 - len(kept)} images computed, {len(kept)} reused" in again.stdout
    for name in ("faithfulness.csv", "faithfulness_curves.csv", "faithfulness_paired.csv", "faithfulness_randomisation.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert _same_maps(one / "maps", two / "maps") > 16  # the randomised copies' maps too
