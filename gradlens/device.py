"""``--device auto|cpu|cuda``: GPU first, CPU always."""

from __future__ import annotations

import os

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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GradlensError("--device cuda was asked for, but PyTorch sees no CUDA device on this machine.")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise GradlensError(f"Unknown device '{device}'; use one of auto, cpu, cuda.")
