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
through rank 0; the hash checks turn a missing shared filesystem into one
sentence instead of wrong results.

Control messages use a gloo group on the CPU (``cpu:gloo,cuda:nccl`` when
CUDA is present); failures and progress go through torchrun's key-value
store, so one failing rank stops the others after their current batch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
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


def _timeout() -> timedelta:
    raw = os.environ.get("GRADLENS_DIST_TIMEOUT_S", "7200")
    try:
        return timedelta(seconds=float(raw))
    except ValueError:
        raise GradlensError(f"GRADLENS_DIST_TIMEOUT_S is {raw!r}; set it to a number of seconds.") from None


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


def _terminated(signum, frame):
    raise SystemExit(143)


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
            "device": next(detector.parameters()).device.type}


def detector_from_spec(spec: dict):
    from gradlens.models.checkpoints import load_detector
    from gradlens.models.transform import PreprocessConfig

    detector = load_detector(spec["checkpoint"], arch=spec["arch"], trust=spec["trust"], device=device_for_rank(spec["device"]),
                             categories=spec["categories"])
    detector.preprocess = PreprocessConfig.from_dict(spec["preprocess"])
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


class Status:
    """One job's shared state: which rank failed (and why), and how much is done over all ranks (batches, or
    the maps a per-object step counts)."""

    def __init__(self, job_id: int):
        import torch.distributed as dist

        self.store = dist.distributed_c10d._get_default_store()
        self.prefix = f"gradlens/job{job_id}"
        self.batches_done = 0  # by this rank

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def fail(self, rank: int, message: str) -> None:
        if not self.store.check([self._key("failed")]):
            self.store.set(self._key("failed"), f"Rank {rank} failed: {message}")

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

    def finished(self) -> int:
        return int(self.store.add(self._key("finished"), 1))

    def finished_ranks(self) -> int:
        return int(self.store.add(self._key("finished"), 0))


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
# rank 0: send a job, compute its own share, wait for the others


def _control_broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_job(kind: str, job: dict, batches: list[list[int]], costs: list[float], images: int, own: Callable,
            bar=None, unit: str = "image") -> int:
    """On rank 0: every rank computes its share of ``batches`` for ``job``; returns what all computed (images, maps).

    ``own(batches, status)`` computes rank 0's share. ``images`` is the number
    of images (or other ``unit``s) of the whole step (a world larger than that is refused). The
    progress ``bar`` (rank 0's, over all batches) follows every rank.
    """
    import torch.distributed as dist

    world = active()
    if images < world.size:
        raise GradlensError(f"torchrun started {world.size} processes, but this step has only {images} {unit}(s); "
                            f"start at most {images} (--nproc-per-node × --nnodes).")
    _job_counter[0] += 1
    job = {**job, "kind": kind, "id": _job_counter[0], "shards": assign(batches, costs, world.size)}
    _control_broadcast(job)
    status = Status(job["id"])
    own_error: BaseException | None = None
    computed = 0
    shown = 0
    try:
        computed = own(job["shards"][0], status)
    except Stopped:
        pass
    except (SystemExit, KeyboardInterrupt) as exc:  # stopped from outside: no waiting for the others
        status.fail(0, _message(exc))
        raise
    except BaseException as exc:  # noqa: BLE001 - reported after the other ranks have stopped
        own_error = exc
        status.fail(0, _message(exc))
    # wait for the others, moving the bar with their progress
    while status.finished_ranks() < world.size - 1:
        if bar is not None:
            done = status.progress(0)
            bar.update(done - shown)
            shown = done
        time.sleep(POLL_S)
    if bar is not None:
        bar.update(status.progress(0) - shown)
    replies = [None] * world.size
    dist.gather_object({"rank": 0}, replies, dst=0)
    if own_error is not None:
        raise own_error
    failure = status.failure()
    if failure is not None:
        raise GradlensError(failure.rstrip(".") + ". Finished results are kept; run the same command again to resume.")
    return computed + sum(int(r.get("computed", 0)) for r in replies[1:])


def release(code: int = 0) -> None:
    """On rank 0, at the end of the command: tell the other ranks to exit (with rank 0's exit code)."""
    if active() is not None and active().main:
        _control_broadcast({"kind": "exit", "code": int(code or 0)})


def serve(world: World) -> int:
    """On ranks > 0: run the jobs rank 0 sends until it says exit; returns the exit code."""
    import torch.distributed as dist

    import gradlens.attribution.compute  # noqa: F401  (registers the job handlers)
    import gradlens.attribution.objects  # noqa: F401
    import gradlens.inference  # noqa: F401

    while True:
        job = _control_broadcast(None)
        if job["kind"] == "exit":
            return job["code"]
        status = Status(job["id"])
        reply = {"rank": world.rank, "computed": 0}
        try:
            reply["computed"] = _HANDLERS[job["kind"]](job, job["shards"][world.rank], status)
        except Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - sent to rank 0, which reports it for every rank
            status.fail(world.rank, _message(exc))
            reply["error"] = _message(exc)
        status.finished()
        dist.gather_object(reply, None, dst=0)


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
