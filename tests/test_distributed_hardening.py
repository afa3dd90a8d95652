"""torchrun hardening (issue 22): a rank that does not see rank 0's work or cache directory, or reads other image
bytes under the same names, is refused before any of its results is used; a killed peer is one sentence; a bad
GRADLENS_DIST_TIMEOUT_S is one sentence.

Each launch is real (2 processes on the CPU, gloo). A node without the shared file system is simulated on one
machine by a wrapper that changes what rank 1 sees before it runs gradlens: another working directory (relative
paths then name other folders), another folder mounted over the cache directory (a private mount namespace, where
the system allows one), or another copy of the dataset behind the same file names. "Two nodes" are two torchrun
launchers meeting through a c10d rendezvous, so the survivor of a killed rank is not stopped by its own launcher.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradlens import distributed
from gradlens.data.coco import load_ground_truth
from gradlens.data.synthetic import make_synthetic_coco
from gradlens.errors import GradlensError
from gradlens.inference import batch_costs, plan_batches
from gradlens.models.bundled import bundled_detector_path
from gradlens.models.formats.checkpoints import load_detector

A = str(bundled_detector_path("cednet"))
BATCH = ["--batch-size", "2"]

# What rank 1 sees, changed before gradlens starts (only in this test; the product reads no such variable).
WRAPPER = r'''
import builtins, ctypes, os, subprocess, sys
if os.environ["RANK"] == "1":
    if os.environ.get("TEST_RANK1_BIND"):  # another folder behind the same path: a node without the shared disk
        source, target = os.environ["TEST_RANK1_BIND"].split("=")
        if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) != 0:  # CLONE_NEWNS
            raise OSError(ctypes.get_errno(), "unshare")
        subprocess.run(["mount", "--make-rprivate", "/"], check=True)
        subprocess.run(["mount", "--bind", source, target], check=True)
    if os.environ.get("TEST_RANK1_CWD"):
        os.chdir(os.environ["TEST_RANK1_CWD"])
    if os.environ.get("TEST_RANK1_IMAGES"):  # other bytes under the same file names (every reader opens with open())
        seen, other = os.environ["TEST_RANK1_IMAGES"].split("=")
        real_open = builtins.open

        def other_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(seen + os.sep):
                file = other + os.fspath(file)[len(seen):]
            return real_open(file, *args, **kwargs)

        builtins.open = other_open
from gradlens.cli.app import main
sys.argv[0] = "gradlens"
main()
'''


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("hardening") / "coco", num_images=5, seed=7, progress=False)


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wrapper") / "other_node.py"
    path.write_text(WRAPPER)
    return path


def _env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADLENS_", "OMP_", "TEST_RANK1_"))}
    env.update({"GRADLENS_CACHE_DIR": str(tmp / "cache"), "PYTHONUNBUFFERED": "1", "GRADLENS_PARTIAL_SAVE_S": "0"})
    env.update(extra)
    return env


def _coco_args(coco) -> list[str]:
    return ["--ann", str(coco.ann), "--images", str(coco.images)]


def _ids(coco) -> list[str]:
    return ["--image-ids", ",".join(str(im["id"]) for im in json.loads(Path(coco.ann).read_text())["images"])]


def _program(wrapper: Path | None) -> list[str]:
    return [str(wrapper)] if wrapper is not None else ["-m", "gradlens"]


def torchrun(args, env, cwd, wrapper=None, extra=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *extra,
           *_program(wrapper), *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def two_nodes(args, env, cwd) -> tuple[int, int, str]:
    """Two launchers with one process each, as on two nodes: each stops only its own process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=hardening", "-m", "gradlens", *args]
    nodes = [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    return nodes[0].returncode, nodes[1].returncode, "".join(err for _, err in outputs)


# torch's C++ log of a store call that failed because the store's host is gone (rank 0's launcher, when rank 0 was
# killed on another node): a warning torch prints itself, in the launcher too, not an exception of a rank
STORE_LOG = re.compile(r"^(\[rank\d+\]:)?\[W\d{4} [^\]]*TCPStore\.cpp:\d+\] \[c10d\] .*\n"
                       r"(Exception raised from .*\n)?((frame #\d+|<omitting python frames>).*\n)*\n?", re.M)


# torchrun's launcher (its elastic agent) prints its own traceback when the rendezvous store's host is gone (the
# node of a killed rank 0); a rank's traceback would hold gradlens' frames or torch's process-group module
# (distributed_c10d.py), which this does not match
LAUNCHER = re.compile(r"torch/distributed/(run\.py|launcher/|elastic/)")


def one_sentence(stderr: str, pattern: str) -> str:
    """Exactly one ``gradlens: error:`` line, matching ``pattern``, and no traceback of a rank (torchrun's own
    report of a failed process, from its launcher, is all that may follow)."""
    stderr = STORE_LOG.sub("", stderr)
    said = [line for line in stderr.splitlines() if line.startswith("gradlens:")]
    assert len(said) == 1, stderr[-3000:]
    assert re.fullmatch(pattern, said[0]), said[0]
    frames = re.findall(r'File "([^"]+)"', stderr)
    assert all(f == "<frozen runpy>" or LAUNCHER.search(f) for f in frames), stderr[-3000:]
    assert "[rank" not in stderr and "gloo" not in stderr.lower() and "DistBackendError" not in stderr, stderr[-3000:]
    return said[0]


def _markers(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob(f"{distributed.MARKER}*")]


def _can_mount_privately() -> bool:
    probe = ("import ctypes, subprocess, sys\n"
             "if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) != 0: sys.exit(1)\n"
             "subprocess.run(['mount', '--make-rprivate', '/'], check=True, capture_output=True)\n")
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# -------------------------------------------------------------------------------------------------
# one shared file system for the work and cache directories


FOLDERS = {
    # the case: rank 1 has its own cache directory behind the same path (before, 'score' and 'select'
    # exited 0 with rank 1's half of the images never merged). Another disk is mounted there for rank 1 where the
    # system allows a private mount namespace, else rank 1 resolves a relative path in another working directory.
    "cache directory": "score",
    # rank 1 resolves a relative --out in another working directory
    "map store": "gradients",
}


@pytest.mark.parametrize("label", list(FOLDERS))
def test_a_rank_that_does_not_see_rank0s_folders_is_refused(label, coco, wrapper, tmp_path):
    command = FOLDERS[label]
    how = "mount" if label == "cache directory" and _can_mount_privately() else "cwd"
    elsewhere = tmp_path / "elsewhere"  # rank 1's view
    elsewhere.mkdir()
    env = _env(tmp_path)
    if how == "mount":
        (tmp_path / "cache").mkdir()
        env["TEST_RANK1_BIND"] = f"{elsewhere}={tmp_path / 'cache'}"
    else:
        env["TEST_RANK1_CWD"] = str(elsewhere)
        env["GRADLENS_CACHE_DIR"] = "cache"  # relative: rank 1 resolves it in its own working directory
    if command == "score":
        args = ["score", "--model", A, *_coco_args(coco), *BATCH, "--out", str(tmp_path / "s")]
    else:
        args = ["gradients", "--model", A, *_ids(coco), *_coco_args(coco), *BATCH, "--out", "g"]
    out = torchrun(args, env, cwd=tmp_path, wrapper=wrapper)
    assert out.returncode != 0
    folder = {"cache directory": str(tmp_path / "cache" / "detections") if how == "mount" else "cache/detections",
              "map store": "g"}[label]
    one_sentence(out.stderr, rf"gradlens: error: Rank 1 failed: it does not see the {label} {re.escape(folder)} that "
                             rf"rank 0 writes to \(rank 0's marker file is not there\): torchrun's ranks need the work and "
                             rf"cache directories on one shared file system, at the same paths\. Finished results are kept; "
                             rf"run the same command again to resume\.")
    # rank 1 computed nothing where rank 0 would never look, and rank 0 left no marker behind
    assert not [p for p in elsewhere.rglob("*") if p.is_file()]
    assert not _markers(tmp_path)


# -------------------------------------------------------------------------------------------------
# the same image bytes


def _share_of_rank1(coco) -> list[int]:
    """The images rank 1 decodes: the plan every rank computes (batches of one canvas, balanced by padded pixels)."""
    detector, gt = load_detector(A), load_ground_truth(coco)
    plan = plan_batches(detector, gt, gt.image_ids, 2)
    return [i for batch in distributed.assign(plan, batch_costs(detector, gt, plan), 2)[1] for i in batch]


@pytest.mark.parametrize("command", ["score", "gradients"])
def test_a_rank_that_reads_other_image_bytes_is_refused(command, coco, wrapper, tmp_path):
    shard = _share_of_rank1(coco)
    assert len(shard) >= 2
    gt = load_ground_truth(coco)
    altered = gt.image_path(shard[-1])  # the last file rank 1 decodes: every file is compared, not a sample
    other = tmp_path / "other_images"
    shutil.copytree(coco.images, other)
    pixels = np.asarray(Image.open(altered).convert("RGB")).copy()
    pixels[:8, :8] = 255 - pixels[:8, :8]  # a few pixels: the same name and size, other bytes
    Image.fromarray(pixels).save(other / altered.name, quality=95)
    env = _env(tmp_path, TEST_RANK1_IMAGES=f"{coco.images}={other}")
    if command == "score":
        args = ["score", "--model", A, *_coco_args(coco), *BATCH, "--out", str(tmp_path / "s")]
    else:
        args = ["gradients", "--model", A, *_ids(coco), *_coco_args(coco), *BATCH, "--out", str(tmp_path / "g")]
    out = torchrun(args, env, cwd=tmp_path, wrapper=wrapper)
    assert out.returncode != 0
    one_sentence(out.stderr, rf"gradlens: error: Rank 1 failed: it reads other bytes than rank 0 from the image file "
                             rf"{re.escape(str(altered))}: torchrun's ranks need the same dataset files, on one shared file "
                             rf"system at the same paths\. Finished results are kept; run the same command again to resume\.")
    # nothing of rank 1's share was computed from the other bytes
    if command == "score":
        assert not list((tmp_path / "cache").rglob("chunk-1-*"))
    else:
        assert not [i for i in shard if (tmp_path / "g" / f"{i}.npz").exists()]
    assert not _markers(tmp_path)


def test_ranks_in_other_working_directories_work_on_one_shared_disk(coco, wrapper, tmp_path):
    """The checks cost a correct launch nothing but time: rank 1 in another working directory, absolute paths."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = torchrun(["gradients", "--model", A, *_ids(coco), *_coco_args(coco), *BATCH, "--out", str(tmp_path / "g")],
                   _env(tmp_path, TEST_RANK1_CWD=str(elsewhere)), cwd=tmp_path, wrapper=wrapper)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((tmp_path / "g").glob("*.npz"))) == 5
    assert "gradlens: error" not in out.stderr
    assert not _markers(tmp_path)


# -------------------------------------------------------------------------------------------------
# a killed peer


KILLED = {
    # one node: torchrun stops the survivor with SIGTERM as soon as the killed rank is gone, unless the survivor
    # saw the closed connection first (a race; either way one sentence)
    "one node, rank 1 killed": ("one", "1:1", r"(Rank 0 was stopped by torchrun, which stops every rank when one of "
                                              r"them ends early \(killed, crashed or interrupted\)|Rank 0 lost contact with "
                                              r"rank 1 \(killed or crashed\))"),
    # two nodes: nobody stops the survivor; gloo sees the connection closed in the job's last collective
    "two nodes, rank 1 killed": ("two", "1:1", r"Rank 0 lost contact with rank 1 \(killed or crashed\)"),
    "two nodes, rank 0 killed": ("two", "0:1", r"Rank 1 lost contact with rank 0 \(killed or crashed\)"),
}


@pytest.mark.parametrize("case", list(KILLED))
def test_a_killed_peer_is_one_sentence(case, coco, tmp_path):
    nodes, fault, sentence = KILLED[case]
    env = _env(tmp_path, GRADLENS_FAULT=fault)
    args = ["score", "--model", A, *_coco_args(coco), *BATCH, "--out", str(tmp_path / "s")]
    if nodes == "one":
        out = torchrun(args, env, cwd=tmp_path)
        codes, stderr = (out.returncode,), out.stderr
    else:
        first, second, stderr = two_nodes(args, env, cwd=tmp_path)
        codes = (first, second)
    assert all(code != 0 for code in codes)
    one_sentence(stderr, rf"gradlens: error: {sentence}; finished results are kept; run the same command again to resume\.")
    assert list((tmp_path / "cache").rglob("chunk-*.json"))  # the finished batches are on disk for the next run


# -------------------------------------------------------------------------------------------------
# GRADLENS_DIST_TIMEOUT_S


@pytest.mark.parametrize("raw", ["0", "-5", "nan", "inf", "-inf", "1e400", "1e12", "abc", ""])
def test_the_timeout_must_be_a_positive_finite_number(raw, monkeypatch):
    monkeypatch.setenv("GRADLENS_DIST_TIMEOUT_S", raw)
    with pytest.raises(GradlensError, match=rf"^GRADLENS_DIST_TIMEOUT_S is {re.escape(repr(raw))}; set it to a number of "
                                            rf"seconds above 0 and at most 31536000 \(a year\), or unset it for the default 7200\.$"):
        distributed.timeout_seconds()


@pytest.mark.parametrize("raw, seconds", [(None, 7200.0), ("0.5", 0.5), ("86400", 86400.0)])
def test_a_good_timeout_is_used(raw, seconds, monkeypatch):
    if raw is None:
        monkeypatch.delenv("GRADLENS_DIST_TIMEOUT_S", raising=False)
    else:
        monkeypatch.setenv("GRADLENS_DIST_TIMEOUT_S", raw)
    assert distributed.timeout_seconds() == seconds
    assert distributed._timeout().total_seconds() == seconds


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_a_bad_timeout_under_torchrun_is_one_sentence_per_node(local_rank, tmp_path, monkeypatch, capsys):
    """Checked before joining the group, so torchrun's environment is all it takes; the processes of a node share one
    environment, so only the node's first one says it (every one exits 1)."""
    from gradlens.cli import app

    def leave(code):
        raise SystemExit(code)

    for name, value in {"GRADLENS_DIST_TIMEOUT_S": "0", "RANK": local_rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(app, "_leave", leave)  # a launched rank ends with os._exit
    with pytest.raises(SystemExit) as exit_:
        app.main(["score", "--detections", str(tmp_path / "r.json"), "--ann", str(tmp_path / "a.json"), "--out",
                  str(tmp_path / "s")])
    assert exit_.value.code == 1
    stderr = capsys.readouterr().err
    if local_rank == "0":
        one_sentence(stderr, r"gradlens: error: GRADLENS_DIST_TIMEOUT_S is '0'; set it to a number of seconds above "
                             r"0 and at most 31536000 \(a year\), or unset it for the default 7200\.")
    else:
        assert stderr == ""
    assert not (tmp_path / "s").exists()


# -------------------------------------------------------------------------------------------------
# the pieces, without a launch


def test_a_folder_without_rank0s_marker_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "MARKER_WAIT_S", 0.0)
    job = {"token": "ab" * 16, "shared": {"map store": str(tmp_path / "maps")}}
    (tmp_path / "maps").mkdir()
    with pytest.raises(GradlensError, match=r"^it does not see the map store .*maps that rank 0 writes to"):
        distributed.check_shared_folders(job)
    (tmp_path / "maps" / f"{distributed.MARKER}{job['token']}").write_text("another run's token")
    with pytest.raises(GradlensError, match="does not see the map store"):
        distributed.check_shared_folders(job)
    written = distributed._write_markers(job)  # rank 0's marker: now the folder is seen
    distributed.check_shared_folders(job)
    assert [p.read_text() for p in written] == [job["token"]]
    (tmp_path / "file").write_text("")  # a file where rank 0 must write a folder: one sentence naming the folder
    with pytest.raises(GradlensError, match=r"^cannot write into the cache directory .*file/detections: "):
        distributed._write_markers({"token": "cd" * 16, "shared": {"cache directory": str(tmp_path / "file" / "detections")}})


@pytest.mark.parametrize("error, said", [
    ("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1234", r"lost contact with rank 0 \(killed or crashed\)"),
    ("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1000ms for recv operation to complete",
     r"heard nothing from rank 0 for 7200 s \(GRADLENS_DIST_TIMEOUT_S\)"),
])
def test_a_failed_collective_is_one_sentence(error, said, monkeypatch):
    monkeypatch.delenv("GRADLENS_DIST_TIMEOUT_S", raising=False)
    message = str(distributed._lost_contact(1, RuntimeError(error), "rank 0"))
    assert re.fullmatch(rf"Rank 1 {said}; finished results are kept; run the same command again to resume\.", message)


def test_image_hashes_are_compared_file_by_file(tmp_path):
    first, second = tmp_path / "a.jpg", tmp_path / "b.jpg"
    first.write_bytes(b"one")
    second.write_bytes(b"two")
    same = {str(first): distributed.file_sha256(str(first)), str(second): distributed.file_sha256(str(second))}
    assert distributed._ImageCheck._compare(same) == ""
    assert distributed._ImageCheck._compare({**same, str(tmp_path / "gone.jpg"): None}) == ""  # unreadable there: decoding says so
    other = {**same, str(second): "0" * 64}
    assert distributed._ImageCheck._compare(other).startswith(f"it reads other bytes than rank 0 from the image file {second}:")
    missing = {str(tmp_path / "only_there.jpg"): "0" * 64}
    assert "which rank 0 cannot read" in distributed._ImageCheck._compare(missing)
