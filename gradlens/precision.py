"""Numerical precision of a detector's forward (and backward) pass: the settings, ``auto``, and the scope that
applies one (TF32 switches, autocast) and restores the global flags afterwards."""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["fp32", "tf32", "bf16", "fp16"]
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
# ``--precision auto`` on a GPU: the fastest setting whose area curve stays within AUTO_CURVE_TOLERANCE (area
# fraction) of the exact one (benchmarks/bench_precision.py; benchmarks/README.md). On the CPU auto is fp32.
GPU_DEFAULT_PRECISION = "tf32"
AUTO_CURVE_TOLERANCE = 0.005


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """Half-precision network outputs (under autocast) in float32 for the losses and post-processing, as
    mmdetection's ``force_fp32`` gives them; others (float32, float64) as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def resolve_precision(precision: str, device) -> str:
    """``auto``: :data:`GPU_DEFAULT_PRECISION` on CUDA, fp32 on the CPU; any other value unchanged."""
    if precision != "auto":
        return precision
    from gradlens.device import resolve_device

    return GPU_DEFAULT_PRECISION if resolve_device(device).type == "cuda" else "fp32"


class PrecisionScope:
    """TF32 switches and autocast for the chosen precision; restores global flags afterwards."""

    def __init__(self, precision: Precision, device: torch.device):
        self.precision, self.device = precision, device
        self._saved = None
        self._autocast = None

    def __enter__(self):
        if self.device.type == "cuda":
            self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            tf32 = self.precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            self._autocast = torch.autocast(self.device.type, dtype=dtype)
            self._autocast.__enter__()
        return self

    def __exit__(self, *exc):
        if self._autocast is not None:
            self._autocast.__exit__(*exc)
        if self._saved is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved
        return False
