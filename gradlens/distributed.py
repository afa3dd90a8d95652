"""Scale-out under ``torchrun``: rank 0 runs the command, every other rank computes its share of the batches.

``torchrun --nproc-per-node N -m gradlens select ...`` starts N copies of the
command. Rank 0 runs it exactly as a single process would; the other ranks
never run command logic. Whenever rank 0 reaches a long step (inference over
a dataset, gradient maps of a selection) it plans the batches as a single
process would (the plan is fixed by the whole image list, each batch holds
images of one padded canvas), splits them across the ranks balanced by their
padded pixels, and sends every rank a *job*: what to load (checkpoint path,
its hash, the annotation file, the settings) and which batches to compute.
Each rank loads those inputs itself and checks that it sees the same files
(same hashes, same settings) before computing; results go to the shared work
and cache directories (detections as chunk files, maps as one file per
image), then rank 0 merges them into exactly the files a single process
writes. Every batch is computed whole, by one rank, with the arithmetic a
single process uses, so the outputs are byte-identical to a one-process run.

Assumption: every rank sees the work and cache directories and the dataset
at the same paths (one machine, or a shared filesystem across nodes). Maps
are megabytes each and are written where they are computed rather than sent
through rank 0. Before a rank computes anything of a job it checks that
assumption: rank 0 writes a marker file holding a random token into every
folder the job's results go to (the cache directory, the map store), and
each rank must read that token there; each rank hashes the image files its
share decodes and rank 0 compares them with its own hashes of the same files
(all of them: SHA-256 costs ~0.1 ms per COCO-sized JPEG, a few per cent of
decoding it and far less than the network pass). A missing shared
filesystem is one sentence naming the rank and the folder or file, never a
run that merges half of the results.

Control messages use a gloo group on the CPU (``cpu:gloo,cuda:nccl`` when
CUDA is present); failures and progress go through torchrun's key-value
store, so one failing rank stops the others after their current batch. A
rank that loses its peers (killed, crashed: gloo reports the closed
connection) or is stopped by torchrun says so in one sentence; what was
finished stays on disk for the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch

from gradlens.errors import GradlensError

_HANDLERS: dict[str, Callable] = {}
_session: "World | None" = None
_job_counter = [0]
POLL_S = 0.2


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_world() -> World | None:
    """The world torchrun describes in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or None."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise GradlensError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']!r}; start several processes with torchrun.") from None
    if size <= 1 or "RANK" not in os.environ:
        return None
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def active() -> World | None:
    """The world of the running torchrun session, or None in a single process."""
    return _session


MAX_TIMEOUT_S = 365 * 24 * 3600.0


def timeout_seconds() -> float:
    """``GRADLENS_DIST_TIMEOUT_S`` (default 7200): how long a rank waits for another; a positive, finite number
    of seconds up to a year, else one sentence."""
    raw = os.environ.get("GRADLENS_DIST_TIMEOUT_S", "7200")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_TIMEOUT_S):  # NaN, inf, zero and negative values all fail this
        raise GradlensError(f"GRADLENS_DIST_TIMEOUT_S is {raw!r}; set it to a number of seconds above 0 and at most "
                            f"{MAX_TIMEOUT_S:.0f} (a year), or unset it for the default 7200.")
    return value


def _timeout() -> timedelta:
    return timedelta(seconds=timeout_seconds())


def check_environment() -> None:
    """Under torchrun, the settings every rank reads before joining the group, each bad one as one sentence."""
    if launched_world() is not None:
        timeout_seconds()


@contextlib.contextmanager
def session() -> Iterator[World | None]:
    """Join torchrun's process group for the block (nothing happens in a single process)."""
    global _session
    world = launched_world()
    if world is None:
        yield None
        return
    import torch.distributed as dist

    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=_timeout())
    # torchrun stops the other ranks with SIGTERM when one dies: unwind (and save what is finished) as on Ctrl-C
    previous = signal.signal(signal.SIGTERM, _terminated)
    _session = world
    try:
        yield world
    finally:
        # The group is not destroyed: the process ends right after, and tearing gloo down while a peer
        # is closing its side aborted a process now and then (1 launch in 8, "terminate called without
        # an active exception"); after a failure a peer may be gone and destroying would wait for it.
        _session = None
        signal.signal(signal.SIGTERM, previous)


STOPPED = 143  # the exit code of a rank stopped by SIGTERM (torchrun stops every rank when one ends early)


def _terminated(signum, frame):
    raise SystemExit(STOPPED)


def stopped_sentence(rank: int) -> str:
    """What a rank says when torchrun stopped it."""
    return (f"Rank {rank} was stopped by torchrun, which stops every rank when one of them ends early (killed, "
            f"crashed or interrupted); finished results are kept; run the same command again to resume.")


def _lost_contact(rank: int, exc: BaseException, peers: str) -> GradlensError:
    """A failed collective as one sentence: a peer gone (gloo sees the connection closed) or silent too long."""
    text = str(exc).lower()
    if "timed out" in text or "timeout" in text:
        return GradlensError(f"Rank {rank} heard nothing from {peers} for {timeout_seconds():g} s "
                             f"(GRADLENS_DIST_TIMEOUT_S); finished results are kept; run the same command again to resume.")
    return GradlensError(f"Rank {rank} lost contact with {peers} (killed or crashed); finished results are kept; "
                         f"run the same command again to resume.")


def device_for_rank(device_type: str) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for CUDA (one GPU per process), else the CPU."""
    world = active()
    if device_type != "cuda" or world is None:
        return torch.device(device_type)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world.local_rank >= count:
        raise GradlensError(f"Rank {world.rank} (LOCAL_RANK {world.local_rank}) has no GPU: this node shows {count} CUDA "
                            f"device(s); start at most {count} processes per node (--nproc-per-node) or use --device cpu.")
    return torch.device("cuda", world.local_rank)


def handler(kind: str):
    """Register the function a rank runs for jobs of ``kind``: ``fn(job, batches, status) -> images computed``."""

    def register(fn):
        _HANDLERS[kind] = fn
        return fn

    return register


# -------------------------------------------------------------------------------------------------
# what a job names: a detector and a dataset, loaded again by each rank


def detector_spec(detector) -> dict:
    """How another rank loads this very detector: its checkpoint file and load options, and what was changed."""
    path = getattr(detector, "checkpoint_path", None)
    if path is None:
        raise GradlensError("Under torchrun a detector must come from a checkpoint file (load_detector), so that "
                            "every rank can load it.")
    options = getattr(detector, "load_options", {})
    return {"checkpoint": str(os.path.abspath(path)), "arch": options.get("arch"), "trust": options.get("trust", False),
            "preprocess": detector.preprocess.to_dict(), "categories": detector.categories,
            "channels_last": bool(getattr(detector, "channels_last", False)),
            "randomisation": getattr(detector, "randomisation", None),
            "device": next(detector.parameters()).device.type}


def detector_from_spec(spec: dict):
    from gradlens.models.formats.checkpoints import load_detector
    from gradlens.models.preprocessing.transform import PreprocessConfig

    randomisation = spec.get("randomisation")
    device = device_for_rank(spec["device"])
    detector = load_detector(spec["checkpoint"], arch=spec["arch"], trust=spec["trust"],
                             device="cpu" if randomisation else device, categories=spec["categories"])
    detector.preprocess = PreprocessConfig.from_dict(spec["preprocess"])
    if randomisation:  # the same re-initialised copy as rank 0's: drawn on the CPU, before any change of layout
        from gradlens.faithfulness.randomise import randomise

        randomise(detector, int(randomisation["steps"]), int(randomisation["seed"]))
        detector = detector.to(device)
        detector.randomisation = dict(randomisation)
    if spec["channels_last"]:
        detector.use_channels_last()
    return detector


def ground_truth_spec(gt) -> dict:
    return {"ann": str(os.path.abspath(gt.path)), "images": str(gt.images_dir) if gt.images_dir else None,
            "exif_orientation": gt.exif_orientation}


def ground_truth_from_spec(spec: dict):
    from gradlens.data.coco import load_ground_truth

    gt = load_ground_truth(spec["ann"], spec["images"])
    gt.exif_orientation = spec["exif_orientation"]
    return gt


def check_same_inputs(mine: dict, rank0: dict, what: str) -> None:
    """This rank's view of a step's inputs (hashes, paths, settings) must be rank 0's, or one sentence says which differs."""
    if mine == rank0:
        return
    field = next((k for k in sorted(set(mine) | set(rank0)) if mine.get(k) != rank0.get(k)), "?")
    hint = (" (is the work directory on a filesystem every node shares?)"
            if field.endswith("sha256") or field == "images" else "")
    raise GradlensError(f"it sees other inputs than rank 0 for {what}: {field} differs{hint}")


# -------------------------------------------------------------------------------------------------
# the shard plan


def assign(batches: list[list[int]], costs: list[float], ranks: int) -> list[list[list[int]]]:
    """Batches per rank, balanced by cost (largest first to the least-loaded rank, ties to the lower rank),
    each rank's batches in plan order. Deterministic: every rank computes the same assignment."""
    load = [0.0] * ranks
    owner = [0] * len(batches)
    for k in sorted(range(len(batches)), key=lambda k: (-costs[k], k)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[k] = r
        load[r] += costs[k]
    return [[batches[k] for k in range(len(batches)) if owner[k] == r] for r in range(ranks)]


# -------------------------------------------------------------------------------------------------
# status through the key-value store


class StoreLost(RuntimeError):
    """torchrun's key-value store stopped answering earlier in this job (its host, rank 0's launcher, is gone)."""


class _GuardedStore:
    """torchrun's store, given up after its first failure: every later call fails at once, without another
    attempt (each failed attempt also makes torch log a C++ stack to stderr)."""

    def __init__(self, store):
        self._store, self.lost = store, False

    def __getattr__(self, name: str):
        method = getattr(self._store, name)

        def call(*args, **kwargs):
            if self.lost:
                raise StoreLost("torchrun's store is gone")
            try:
                return method(*args, **kwargs)
            except RuntimeError:
                self.lost = True
                raise

        return call


class Status:
    """One job's shared state: which rank failed (and why), and how much is done over all ranks (batches, or
    the maps a per-object step counts)."""

    def __init__(self, job_id: int):
        import torch.distributed as dist

        self.store = _GuardedStore(dist.distributed_c10d._get_default_store())
        self.prefix = f"gradlens/job{job_id}"
        self.batches_done = 0  # by this rank

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def fail(self, rank: int, message: str) -> None:
        if not self.store.check([self._key("failed")]):
            self.store.set(self._key("failed"), f"Rank {rank} failed: {message}")

    def try_fail(self, rank: int, message: str) -> None:
        """:meth:`fail` where the store may be gone with a peer: the rank reports its own failure anyway."""
        try:
            self.fail(rank, message)
        except RuntimeError:  # torch.distributed.DistError and gloo's errors derive from it
            pass

    def failure(self) -> str | None:
        if self.store.check([self._key("failed")]):
            return self.store.get(self._key("failed")).decode()
        return None

    def stop_if_failed(self) -> None:
        """Raise :class:`Stopped` when another rank has failed (called between batches)."""
        if self.failure() is not None:
            raise Stopped()

    def progress(self, batches: int = 1) -> int:
        return int(self.store.add(self._key("progress"), batches))

    def batch_done(self, items: int = 1) -> None:
        """One more batch finished on this rank: ``items`` more on rank 0's bar, one more batch for ``GRADLENS_FAULT``."""
        self.progress(items)
        self.batches_done += 1
        fault_injection(self.batches_done)

    def finished(self, rank: int) -> None:
        """This rank's share is over (computed, stopped or failed): it goes on to the job's last collective."""
        self.store.set(self._key(f"finished/{rank}"), "1")

    def unfinished(self, ranks: int) -> list[int]:
        """The ranks > 0 that have not said :meth:`finished` (on rank 0, after a peer was lost: the lost ones)."""
        return [r for r in range(1, ranks) if not self.store.check([self._key(f"finished/{r}")])]


class Stopped(Exception):
    """Another rank failed: this rank stops after its current batch (its finished results are kept)."""


def _message(exc: BaseException) -> str:
    if isinstance(exc, GradlensError):
        return str(exc)
    if isinstance(exc, SystemExit):
        return f"it was stopped (exit code {exc.code})"
    if isinstance(exc, KeyboardInterrupt):
        return "it was interrupted"
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


# -------------------------------------------------------------------------------------------------
# one shared file system: marker files in the result folders, hashes of the image files


MARKER = ".gradlens-rank0-"  # + the job's token: a marker file rank 0 writes into each folder of a job's results
MARKER_WAIT_S = 2.0  # how long a rank looks again for a marker it does not see (a network filesystem's caches)


def _write_markers(job: dict) -> list[Path]:
    """On rank 0: a marker file holding ``job['token']`` in each folder of ``job['shared']``."""
    written = []
    try:
        for label, folder in job.get("shared", {}).items():
            path = Path(folder) / f"{MARKER}{job['token']}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(job["token"])
            written.append(path)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise GradlensError(f"cannot write into the {label} {folder}: {exc.strerror or exc}.") from None
    return written


def check_shared_folders(job: dict) -> None:
    """On a rank > 0: every folder the job's results go to must hold rank 0's marker with the job's token
    (else this rank would write where rank 0 never looks, or read what rank 0 never wrote)."""
    for label, folder in job.get("shared", {}).items():
        path = Path(folder) / f"{MARKER}{job['token']}"
        deadline = time.monotonic() + MARKER_WAIT_S
        while True:
            try:
                if path.read_text() == job["token"]:
                    break
            except (OSError, UnicodeDecodeError):
                pass
            if time.monotonic() > deadline:
                raise GradlensError(f"it does not see the {label} {folder} that rank 0 writes to (rank 0's marker file "
                                    f"is not there): torchrun's ranks need the work and cache directories on one shared "
                                    f"file system, at the same paths")
            time.sleep(0.1)


_HASHES: dict[tuple, str] = {}  # (path, size, mtime, inode, device) -> SHA-256: each file is hashed once per process


def file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if key not in _HASHES:
        with open(path, "rb") as handle:
            _HASHES[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _HASHES[key]


def _hashes(paths: list[str]) -> dict[str, str | None]:
    """SHA-256 of each file (None where it cannot be read), several files at once: hashlib and file reads release
    the GIL, and a network file system serves parallel reads faster."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path: str) -> str | None:
        try:
            return file_sha256(path)
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="gradlens-hash") as pool:
        return dict(zip(paths, pool.map(one, paths)))


def check_same_images(status: "Status", paths) -> None:
    """On a rank > 0, before computing its share: the image files it will decode must hold the bytes rank 0
    reads under the same names. This rank sends the SHA-256 of every one (each file once) through the store;
    rank 0's :class:`_ImageCheck` hashes the same files and answers; a difference is one sentence naming a file.
    Every file is compared, not a sample: one damaged or replaced file is found too, and hashing costs ~0.1 ms
    per COCO-sized JPEG (a few per cent of decoding it, far less than the network pass)."""
    world = active()
    mine = _hashes(list(dict.fromkeys(map(str, paths))))  # None: unreadable here, decoding it says so in one sentence
    status.store.set(status._key(f"images/{world.rank}"), json.dumps(mine))
    answer = status._key(f"images/{world.rank}/verdict")
    deadline = time.monotonic() + timeout_seconds()
    while not status.store.check([answer]):
        status.stop_if_failed()
        if time.monotonic() > deadline:
            raise GradlensError(f"rank 0 did not compare the image files within {timeout_seconds():g} s "
                                f"(GRADLENS_DIST_TIMEOUT_S)")
        time.sleep(0.05)
    verdict = status.store.get(answer).decode()
    if verdict:
        raise GradlensError(verdict)


class _ImageCheck(threading.Thread):
    """On rank 0, while it computes its own share: answers every rank's :func:`check_same_images` with its own
    hashes of the same files (only non-blocking store calls: the store client is shared with the main thread)."""

    def __init__(self, status: "Status", ranks: int):
        super().__init__(name="gradlens-image-check", daemon=True)
        self.status, self.pending = status, set(range(1, ranks))
        self.done = threading.Event()

    def run(self) -> None:
        store, key = self.status.store, self.status._key
        try:
            while self.pending and not self.done.wait(0.05):
                for rank in sorted(self.pending):
                    if store.check([key(f"images/{rank}")]):
                        theirs = json.loads(store.get(key(f"images/{rank}")).decode())
                        store.set(key(f"images/{rank}/verdict"), self._compare(theirs))
                        self.pending.discard(rank)
        except Exception as exc:  # noqa: BLE001 - a waiting rank gets the reason instead of waiting for the timeout
            for rank in self.pending:
                with contextlib.suppress(Exception):
                    store.set(key(f"images/{rank}/verdict"), f"rank 0 could not compare the image files: {_message(exc)}")

    @staticmethod
    def _compare(theirs: dict[str, str | None]) -> str:
        ours = _hashes([path for path, digest in theirs.items() if digest is not None])
        for path, mine in ours.items():
            if mine is None:
                return (f"it reads the image file {path}, which rank 0 cannot read: torchrun's ranks need the dataset "
                        f"on one shared file system, at the same paths")
            if mine != theirs[path]:
                return (f"it reads other bytes than rank 0 from the image file {path}: torchrun's ranks need the same "
                        f"dataset files, on one shared file system at the same paths")
        return ""

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


# -------------------------------------------------------------------------------------------------
# rank 0: send a job, compute its own share, wait for the others


def _control_broadcast(obj):
    """Rank 0's message to every rank (a job, or exit); a lost peer is one sentence."""
    import torch.distributed as dist

    box = [obj]
    world = active()
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as exc:  # gloo: the connection is closed (peer killed) or timed out
        raise _lost_contact(world.rank, exc, "rank 0" if not world.main else "another rank") from None
    return box[0]


def _sum_over_ranks(value: int, wait: Callable[[], None] | None = None) -> int:
    """The job's last collective: the sum of every rank's ``value``. ``wait()`` runs while it is pending
    (rank 0 moves its bar); a peer that is gone makes it fail (gloo sees the closed connection)."""
    import torch.distributed as dist

    box = torch.tensor([int(value)], dtype=torch.int64)  # a CPU tensor: gloo, also beside NCCL
    work = dist.all_reduce(box, async_op=True)
    if wait is not None:
        while not work.is_completed():
            wait()
            time.sleep(POLL_S)
    work.wait()
    return int(box.item())


def run_job(kind: str, job: dict, batches: list[list[int]], costs: list[float], images: int, own: Callable,
            bar=None, unit: str = "image") -> int:
    """On rank 0: every rank computes its share of ``batches`` for ``job``; returns what all computed (images, maps).

    ``own(batches, status)`` computes rank 0's share. ``images`` is the number
    of images (or other ``unit``s) of the whole step (a world larger than that is refused). The
    progress ``bar`` (rank 0's, over all batches) follows every rank. ``job['shared']`` (label -> folder)
    names the folders the ranks write results to: each rank checks that it sees them as rank 0 does.
    """
    world = active()
    if images < world.size:
        raise GradlensError(f"torchrun started {world.size} processes, but this step has only {images} {unit}(s); "
                            f"start at most {images} (--nproc-per-node × --nnodes).")
    _job_counter[0] += 1
    job = {**job, "kind": kind, "id": _job_counter[0], "shards": assign(batches, costs, world.size),
           "token": secrets.token_hex(16)}
    markers = _write_markers(job)
    status = Status(job["id"])
    checker = _ImageCheck(status, world.size)
    try:
        _control_broadcast(job)
        checker.start()
        return _run_own_and_wait(job, status, own, bar)
    finally:
        if checker.is_alive():
            checker.stop()
        for path in markers:
            path.unlink(missing_ok=True)


def _run_own_and_wait(job: dict, status: Status, own: Callable, bar) -> int:
    world = active()
    own_error: BaseException | None = None
    computed = 0
    try:
        computed = own(job["shards"][0], status)
    except Stopped:
        pass
    except (SystemExit, KeyboardInterrupt) as exc:  # stopped from outside: no waiting for the others
        status.try_fail(0, _message(exc))
        raise
    except BaseException as exc:  # noqa: BLE001 - reported after the other ranks have stopped
        own_error = exc
        status.try_fail(0, _message(exc))
    shown = [0]

    def follow() -> None:  # the bar moves with every rank's progress while rank 0 waits for them
        if bar is not None:
            done = status.progress(0)
            bar.update(done - shown[0])
            shown[0] = done

    try:
        total = _sum_over_ranks(computed, follow)
    except RuntimeError as exc:  # a rank is gone: rank 0's own failure, what the rank said before, or which ranks
        if own_error is not None:  # never finished their share
            raise own_error from None
        try:
            failure, lost = status.failure(), status.unfinished(world.size)
        except RuntimeError:  # the store went with the peer
            failure, lost = None, []
        if failure is not None:
            raise GradlensError(failure.rstrip(".") + ". Finished results are kept; run the same command again to resume.") from None
        raise _lost_contact(0, exc, f"rank {', '.join(map(str, lost))}" if lost else "another rank") from None
    follow()
    if own_error is not None:
        raise own_error
    failure = status.failure()
    if failure is not None:
        raise GradlensError(failure.rstrip(".") + ". Finished results are kept; run the same command again to resume.")
    return total


def release(code: int = 0) -> None:
    """On rank 0, at the end of the command: tell the other ranks to exit (with rank 0's exit code). A rank
    that is already gone changes nothing: the command's result stands, and its failure was said already."""
    if active() is not None and active().main:
        with contextlib.suppress(GradlensError):
            _control_broadcast({"kind": "exit", "code": int(code or 0)})


def serve(world: World) -> int:
    """On ranks > 0: run the jobs rank 0 sends until it says exit; returns the exit code.

    A rank stopped from outside (SIGTERM from torchrun, Ctrl-C) leaves at once, without waiting for the
    others (``SystemExit``/``KeyboardInterrupt`` propagate); a lost rank 0 is a :class:`GradlensError`.
    """
    import gradlens.attribution.compute  # noqa: F401  (registers the job handlers)
    import gradlens.attribution.objects  # noqa: F401
    import gradlens.faithfulness.compute  # noqa: F401
    import gradlens.inference  # noqa: F401

    while True:
        job = _control_broadcast(None)
        if job["kind"] == "exit":
            return job["code"]
        status = Status(job["id"])
        computed = 0
        try:
            check_shared_folders(job)
            computed = _HANDLERS[job["kind"]](job, job["shards"][world.rank], status)
        except Stopped:
            pass
        except (SystemExit, KeyboardInterrupt) as exc:
            status.try_fail(world.rank, _message(exc))
            raise
        except BaseException as exc:  # noqa: BLE001 - sent to rank 0, which reports it for every rank
            status.try_fail(world.rank, _message(exc))
        try:
            status.finished(world.rank)
            _sum_over_ranks(computed)
        except RuntimeError as exc:  # the store or the connection to rank 0 is gone
            raise _lost_contact(world.rank, exc, "rank 0") from None


def fault_injection(batches_done: int) -> None:
    """Testing aid: ``GRADLENS_FAULT=RANK:BATCHES`` makes that rank die hard (``os._exit``, as on SIGKILL)
    after that many batches of a job, so tests can check what a killed rank leaves behind."""
    raw = os.environ.get("GRADLENS_FAULT")
    if not raw:
        return
    rank, _, after = raw.partition(":")
    world = active()
    if world is not None and int(rank) == world.rank and batches_done >= int(after or 1):
        os._exit(137)
