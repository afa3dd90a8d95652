"""``--device auto|cpu|cuda``: GPU first, CPU always."""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future

# cuBLAS is deterministic only with a fixed workspace, which must be chosen before CUDA starts;
# the gradient engine asks for deterministic kernels so that maps are bit-identical run to run.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

from gradlens.errors import GradlensError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error, not a silent fallback."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        from gradlens import distributed

        if not torch.cuda.is_available():
            world = distributed.active()
            rank = f"Rank {world.rank}: " if world is not None else ""
            raise GradlensError(f"{rank}--device cuda was asked for, but PyTorch sees no CUDA device on this machine.")
        if name == "cuda" and distributed.active() is not None:
            return distributed.device_for_rank("cuda")  # one GPU per torchrun process: cuda:LOCAL_RANK
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise GradlensError(f"Unknown device '{device}'; use one of auto, cpu, cuda.")


def batch_threads(device: torch.device, batches: int, variable: str = "GRADLENS_GRADIENT_THREADS") -> int:
    """Batches computed at once on the CPU, each by one thread whose operators use one core.

    A small detector's operators parallelise poorly over two or more cores; a
    batch per core is faster (measured in ``benchmarks/``). One per core by
    default, the environment ``variable`` overriding it; decided by the whole
    plan, so a resumed run computes each batch exactly as an uninterrupted one.
    """
    if device.type != "cpu" or batches < 2:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    raw = os.environ.get(variable, str(cores))
    try:
        wanted = int(raw)
    except ValueError:
        wanted = 0
    if wanted < 1:
        raise GradlensError(f"{variable} is {raw!r}; set it to a whole number of threads, at least 1 (or unset it).")
    return min(wanted, batches)


@contextlib.contextmanager
def single_threaded_ops(enabled: bool):
    """PyTorch's intra-op threads set to 1 for the block (restored after): each batch thread keeps to one core."""
    saved = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class Inline:
    """The executor interface, running each task at once in the calling thread."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, as a thread pool would
            future.set_exception(exc)
        return future
