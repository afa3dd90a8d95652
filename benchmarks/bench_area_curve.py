"""Area curves: vectorised against a Python loop over thresholds, from memory and from the map store;
and the peak memory of ``gradlens area-curve`` as the number of images doubles.

1. Speed. 1,000 maps of 640x480 (heavy-tailed random magnitudes, like gradients) and 1,000
   thresholds. Naive: for every map, a Python loop over the thresholds, ``(m > t).mean()``.
   gradlens: ``area_curve`` (per map, one grid lookup per pixel + bincount). Then the same
   curve from a float16 map store (decompression included): on the read maps, from the
   maps' 16-bit codes (what ``gradlens area-curve`` does), and from the stored histograms
   alone. Curves are compared before the ratios are printed.
2. Memory. A work directory with ``--images`` selected synthetic images whose maps are
   already stored; ``gradlens area-curve --top N`` runs in a fresh process for N, 2N, 4N
   and its peak resident memory is reported.

    python benchmarks/bench_area_curve.py [--maps 1000] [--thresholds 1000] [--naive-maps 1000] [--images 800]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradlens.attribution.store import MapStore
from gradlens.regions.area import area_curve, area_curve_from_store, area_curve_from_summaries, threshold_grid


def random_map(seed: int, h: int = 480, w: int = 640) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.lognormal(-9.0, 1.5, size=(h, w)) * (rng.random((h, w)) > 0.02)).astype(np.float32)


def naive_curve(maps, thresholds):
    total = np.zeros(len(thresholds))
    for m in maps:
        for k, t in enumerate(thresholds):
            total[k] += float((m > np.float32(t)).mean())
    return total / len(maps)


def speed(args, tmp: Path):
    maps = [random_map(i) for i in range(args.maps)]
    grid = threshold_grid(max(float(m.max()) for m in maps), args.thresholds, "log", 4)
    print(f"speed: {len(maps)} maps of 640x480, {len(grid)} thresholds (log grid)")

    start = time.perf_counter()
    fast = area_curve(maps, grid)
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    slow = naive_curve(maps[: args.naive_maps], grid)
    t_naive = (time.perf_counter() - start) * len(maps) / args.naive_maps
    reference = area_curve(maps[: args.naive_maps], grid)
    assert np.allclose(reference, slow, atol=1e-12), "curves differ"

    store = MapStore(tmp / "store", {"bench": 1})
    start = time.perf_counter()
    for i, m in enumerate(maps):
        store.write(i, m)
    t_write = time.perf_counter() - start
    ids = list(range(len(maps)))
    del maps
    start = time.perf_counter()
    streamed = area_curve(store.maps(ids), grid)
    t_store = time.perf_counter() - start
    start = time.perf_counter()
    coded = area_curve_from_store(store, ids, grid)
    t_codes = time.perf_counter() - start
    assert np.allclose(coded, streamed, atol=1e-12), "store curves differ"
    start = time.perf_counter()
    approx = area_curve_from_summaries(store.summaries(ids), grid)
    t_summary = time.perf_counter() - start

    scale = "" if args.naive_maps == args.maps else f" (measured on {args.naive_maps} maps, scaled to {args.maps})"
    print(f"\n{'method':60s} {'seconds':>8s}  gradlens is")
    print(f"{'naive: Python loop over thresholds, (m > t).mean()' + scale:60s} {t_naive:8.2f}")
    print(f"{'gradlens area_curve, maps in memory':60s} {t_fast:8.2f}  {t_naive / t_fast:7.1f}x")
    print(f"{'gradlens area_curve on maps read from the float16 store':60s} {t_store:8.2f}  {t_naive / t_store:7.1f}x")
    print(f"{'gradlens area_curve_from_store (16-bit codes; area-curve uses it)':60s} {t_codes:8.2f}  {t_naive / t_codes:7.1f}x")
    print(f"{'gradlens area_curve_from_summaries (no map read)':60s} {t_summary:8.2f}  {t_naive / t_summary:7.1f}x")
    print(f"(writing the {len(ids)} maps to the store: {t_write:.1f} s, {sum(store.path(i).stat().st_size for i in ids) / 1e6:.0f} MB)")
    print(f"agreement: in-memory vs naive max |diff| {np.abs(reference - slow).max():.1e}; float16 store vs float32 "
          f"{np.abs(streamed - fast).max():.1e}; histograms vs exact {np.abs(approx - fast).max():.1e} (area fraction)")


def build_workdir(tmp: Path, images: int) -> Path:
    """A work directory after 'select' with ``images`` selected images and every map already stored."""
    from gradlens.attribution.workdir import workdir_maps
    from gradlens.data.coco import load_ground_truth
    from gradlens.data.detections import write_detections
    from gradlens.data.synthetic import SyntheticConfig, make_synthetic_coco, simulate_detections
    from gradlens.models.bundled import bundled_detector_path
    from gradlens.selection.run import run_selection

    coco = make_synthetic_coco(tmp / "coco", SyntheticConfig(num_images=images, seed=5, empty_fraction=0.0), progress=False)
    gt = load_ground_truth(coco)
    results = []
    for k, skill in enumerate((0.9, 0.6)):
        dets = simulate_detections(gt, skill=skill, seed=k)
        path = tmp / f"model{k}.json"
        write_detections(dets, path)
        results.append(path)
    workdir = tmp / "run"
    run_selection(results[0], [results[1]], coco=coco, workdir=workdir, top=images)
    checkpoints = {"a": bundled_detector_path("cednet"), "b": bundled_detector_path("convnext")}
    models, gt = workdir_maps(workdir, checkpoints=checkpoints, compute=False)
    ids = [int(i) for i in json_ids(workdir)]
    for m in models:
        for i in ids:
            info = gt.image_info(i)
            m.store.write(i, random_map(i, info["height"], info["width"]))
    return workdir


def json_ids(workdir: Path):
    from gradlens.fileio import read_table

    return read_table(workdir, "selection")["image_id"].tolist()


def memory(args, tmp: Path):
    workdir = build_workdir(tmp, args.images)
    n = len(json_ids(workdir))
    print(f"\nmemory: 'gradlens area-curve --top N' in a fresh process, maps already stored ({n} selected synthetic images)")
    print(f"{'images':>8s} {'peak RSS (MB)':>14s} {'seconds':>8s}")
    code = (
        "import resource, sys, time; from gradlens.cli.app import main; t = time.perf_counter();\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t)"
    )
    for top in (n // 4, n // 2, n):
        argv = ["area-curve", "--workdir", str(workdir), "--top", str(top), "--device", "cpu", "--no-progress",
                "--checkpoint", f"a={bundled_path('cednet')}", "--checkpoint", f"b={bundled_path('convnext')}"]
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
        rss, seconds = map(float, out.strip().splitlines()[-1].split())
        assert "0 computed" in out, out
        print(f"{top:8d} {rss:14.0f} {seconds:8.1f}")


def bundled_path(name):
    from gradlens.models.bundled import bundled_detector_path

    return bundled_detector_path(name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=1000)
    parser.add_argument("--thresholds", type=int, default=1000)
    parser.add_argument("--naive-maps", type=int, default=None, help="maps for the naive loop (default: all)")
    parser.add_argument("--images", type=int, default=800, help="selected images for the memory measurement")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    args.naive_maps = min(args.naive_maps or args.maps, args.maps)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        speed(args, Path(tmp))
        if not args.skip_memory:
            memory(args, Path(tmp))


if __name__ == "__main__":
    main()
