"""Scaling under torchrun: the same select + area-curve with 1 and with N processes, in one run.

Each configuration runs the real commands in fresh processes on a synthetic
dataset (bundled detectors by default), with its own cache and work
directory, and the script checks that both wrote byte-identical
``selection.csv`` and ``area_curve.csv`` before it prints the ratio.

    python benchmarks/bench_torchrun.py [--images 120] [--top 40] [--procs 2] [--device cpu|cuda]

On a CPU the processes share the same cores, so expect about 1x there (each
rank's batches already use every core); on a machine with N GPUs use
``--device cuda --procs N`` (one GPU per process).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gradlens.data.synthetic import make_synthetic_coco
from gradlens.models.bundled import bundled_detector_path


def run(args: list[str], procs: int, env: dict) -> float:
    if procs == 1:
        cmd = [sys.executable, "-m", "gradlens", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "gradlens", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    a, b = str(bundled_detector_path("cednet")), str(bundled_detector_path("convnext"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        coco = make_synthetic_coco(tmp / "coco", num_images=args.images, seed=21, progress=False)
        data = ["--ann", str(coco.ann), "--images", str(coco.images)]
        print(f"input: {args.images} synthetic images, top {args.top}, bundled CEDNet vs ConvNeXt; device {args.device}")
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
              + (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
        rows = {}
        for procs in (1, args.procs):
            env = {**os.environ, "GRADLENS_CACHE_DIR": str(tmp / f"cache{procs}")}
            work = tmp / f"w{procs}"
            select = run(["select", "--a", a, "--b", b, *data, "--workdir", str(work), "--top", str(args.top),
                          "--device", args.device], procs, env)
            curve = run(["area-curve", "--workdir", str(work), "--device", args.device], procs, env)
            rows[procs] = (select, curve)
        for name in ("selection.csv", "area_curve.csv"):
            same = (tmp / "w1" / name).read_bytes() == (tmp / f"w{args.procs}" / name).read_bytes()
            print(f"{name}: {'byte-identical' if same else 'DIFFERENT'} with 1 and {args.procs} processes")
        print(f"\n{'processes':>9s} {'select s':>9s} {'area-curve s':>13s} {'total s':>8s} {'speed-up':>9s}")
        base = sum(rows[1])
        for procs, (select, curve) in rows.items():
            print(f"{procs:9d} {select:9.1f} {curve:13.1f} {select + curve:8.1f} {base / (select + curve):8.2f}x")
        print("(wall time of whole commands: process start, model loading and rendezvous included)")


if __name__ == "__main__":
    main()
