"""The cost of scale against focus in ``area-curve``: what the new per-image measures add to the area
curves on stored maps, and how much faster they are than the direct way.

Two "models" of ``--maps`` stored float16 maps of 640x480 each (heavy-tailed magnitudes, like gradient
maps; B is A at about twice the scale with its own noise), ``--thresholds`` thresholds, 5 boxes per image.

1. ``image_curves`` as ``area-curve`` calls it, without and with the decomposition grid: the extra is
   the concentration measures (Gini, effective area, mass-area, both log-grid areas) from the code
   histogram the curves already build (each map's recorded loss comes from the summaries area-curve has
   already read for its grid). Then the statistics
   (``scale_focus``: the decomposition with 1,000 bootstrap resamples) once.
2. Naive: every measure straight from its definition on the float32 map read back (a sort per map),
   measured on ``--naive-maps`` maps and scaled. The two are compared before the ratios are printed.
3. The whole ``area-curve`` on stored maps: the demo's two detectors on ``--demo-images`` selected of
   three times as many synthetic images of COCO's size (sides 480-640; maps computed once first), with a timer around each new piece
   (the decomposition plan, the per-image measures, the statistics, the three tables and Figure A2's
   companion): what they add to the rest of the command, which is what the user waits for.

    python benchmarks/bench_scale_focus.py [--maps 300] [--thresholds 200] [--naive-maps 50] [--demo-images 100]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradlens.attribution.store import MapStore
from gradlens.regions.comparison import scale_focus
from gradlens.regions.decomposition import LogGrid
from gradlens.regions.per_image import image_curves
from gradlens.regions.area import threshold_grid


@dataclass
class Model:
    role: str
    label: str
    store: MapStore


@dataclass
class Boxes:  # the two fields image_boxes reads from a GroundTruth
    boxes: np.ndarray
    obj_image_id: np.ndarray


def random_map(rng, scale: float, h: int = 480, w: int = 640) -> np.ndarray:
    return (scale * rng.lognormal(-9.0, 1.5, size=(h, w)) * (rng.random((h, w)) > 0.02)).astype(np.float32)


def naive_measures(m: np.ndarray, low: float, width: float) -> dict:
    """Each measure from its definition: sort the pixels, sum in order."""
    x = np.sort(m.astype(np.float64).reshape(-1))
    n, total = x.size, x.sum()
    gini = float(np.sum((2 * np.arange(1, n + 1) - n - 1) * x) / (n * total))
    q = x[x > 0] / total
    effective = float(np.exp(-np.sum(q * np.log(q))) / n)
    cumulative = np.cumsum(x[::-1])
    mass_50 = (np.searchsorted(cumulative, 0.5 * total) + 1) / n
    with np.errstate(divide="ignore"):
        auc = float(np.clip(np.log(x) - low, 0, width).mean() / width)
    return {"gini": gini, "effective_area": effective, "mass_area_50": mass_50, "log_auc": auc}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=300)
    parser.add_argument("--thresholds", type=int, default=200)
    parser.add_argument("--naive-maps", type=int, default=50)
    parser.add_argument("--demo-images", type=int, default=100, help="selected images of the end-to-end run (0: skip)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or '?'}, torch threads {torch.get_num_threads()}")
    rng = np.random.default_rng(0)
    ids = list(range(args.maps))
    boxes = Boxes(np.tile(np.array([[40.0, 30.0, 240.0, 200.0]]), (5 * args.maps, 1)), np.repeat(ids, 5))
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        for role, scale in (("a", 1.0), ("b", 2.0)):
            store = MapStore(Path(tmp) / role, {"bench": role})
            for i in ids:
                store.write(i, random_map(rng, scale), loss=float(scale))
            models.append(Model(role, role.upper(), store))
        grid = threshold_grid(float(max(models[1].store.summary(i).max for i in ids)) * 0.5, args.thresholds, "log", 4)
        log_grid = LogGrid.ending_at(float(grid[-1]), 4)
        references = np.full(len(ids), np.log(1.5e-4))
        # area-curve reads every map's summary once before the curves (the grid); the losses come from there
        losses = {m.role: np.array([s.loss for s in m.store.summaries(ids)]) for m in models}
        print(f"{args.maps} maps of 640x480 per model, 2 models, {args.thresholds} thresholds (log grid)\n")

        def timed(fn, repeats=3):
            best = np.inf
            for _ in range(repeats):
                start = time.perf_counter()
                out = fn()
                best = min(best, time.perf_counter() - start)
            return best, out

        t_plain, _ = timed(lambda: [image_curves(m, ids, grid, "log", boxes, progress=False) for m in models])
        t_with, curves = timed(lambda: [image_curves(m, ids, grid, "log", boxes, progress=False, log_grid=log_grid,
                                                     log_references=references, losses=losses[m.role])
                                        for m in models])
        t_stats, split = timed(lambda: scale_focus(curves, log_grid.width, 1000, 0, 0.95))

        k = min(args.naive_maps, args.maps)
        start = time.perf_counter()
        naive = [naive_measures(m.store.read(i), log_grid.log_low, log_grid.width) for m in models for i in ids[:k]]
        t_naive = (time.perf_counter() - start) * args.maps / k
        mine = split.concentration.groupby("role", sort=False).head(k)
        for column in ("gini", "effective_area", "log_auc"):
            assert np.allclose(mine[column].to_numpy(), [r[column] for r in naive], rtol=1e-9, atol=1e-12), column
        assert np.allclose(mine["mass_area_50"].to_numpy(), [r["mass_area_50"] for r in naive], atol=2.0 / (480 * 640))

        extra = t_with - t_plain
        print(f"{'step':66s} {'seconds':>8s}")
        print(f"{'area curves + box metrics (image_curves, no decomposition)':66s} {t_plain:8.2f}")
        print(f"{'the same with scale, concentration and log-grid areas':66s} {t_with:8.2f}")
        print(f"{'  extra for the new measures':66s} {extra:8.2f}   {extra / t_plain:+.1%} of the area curves")
        print(f"{'decomposition statistics (1,000 resamples, one baseline)':66s} {t_stats:8.2f}   "
              f"{t_stats / t_plain:+.1%}")
        print(f"{'naive: every measure from its definition (sort per map)':66s} {t_naive:8.2f}   "
              f"gradlens' extra is {t_naive / max(extra, 1e-9):.1f}x faster")
        print(f"\nnew measures agree with the direct definitions (Gini, effective area, log AUC to 1e-9; mass-area "
              f"within 2 pixels) on {k} maps per model")
    if args.demo_images > 0:
        end_to_end(args.demo_images)


def end_to_end(selected: int, repeats: int = 3) -> None:
    """``run_area_curve`` on a demo work directory's stored maps, with the new pieces timed inside it."""
    import gradlens.figures.scale_focus as companion
    import gradlens.regions.per_image as per_image
    import gradlens.regions.run as run
    from gradlens.data.synthetic import SyntheticConfig, make_synthetic_coco
    from gradlens.demo import DEMO_MODELS
    from gradlens.models.bundled import bundled_detector_path
    from gradlens.runner import DetectorRun
    from gradlens.selection.run import run_selection

    spent = {"total": 0.0}
    pieces: dict[str, float] = {}

    def timer(module, name, only=None):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if only is None or only(*args):
                    spent["total"] += time.perf_counter() - start
                    pieces[name] = pieces.get(name, 0.0) + time.perf_counter() - start
        setattr(module, name, wrapped)

    with tempfile.TemporaryDirectory() as tmp:
        # the demo's detectors and world of shapes, on COCO-sized images (sides 480-640)
        coco = make_synthetic_coco(Path(tmp) / "coco", SyntheticConfig(num_images=3 * selected, min_side=480,
                                                                       max_side=640), progress=False)
        runner = DetectorRun(device="cpu", workers=2, batch_size=4, cache_dir=Path(tmp) / "cache")
        a, b = (bundled_detector_path(name) for name in DEMO_MODELS)
        workdir = run_selection(a, [b], coco=coco, workdir=Path(tmp) / "run", top=selected, device="cpu",
                                progress=False, detector_run=runner).workdir
        run.run_area_curve(workdir, progress=False)  # computes and stores the maps
        timer(run, "decomposition_plan")
        timer(per_image, "image_measures")
        timer(run, "scale_focus")
        timer(companion, "save_mass_area_figure")
        timer(run, "write_table", only=lambda table, folder, name: name.endswith(("_concentration", "_mass_area",
                                                                                   "_decomposition")))
        best_total, best_new = np.inf, np.inf
        for _ in range(repeats):
            spent["total"] = 0.0
            pieces.clear()
            start = time.perf_counter()
            result = run.run_area_curve(workdir, progress=False)
            total = time.perf_counter() - start
            if total < best_total:
                best_total, best_new, best_pieces = total, spent["total"], dict(pieces)
        rest = best_total - best_new
        print(f"\narea-curve on stored maps, demo detectors, {selected} selected images of COCO size, 2 models "
              f"(best of {repeats})")
        print(f"{'the whole command':66s} {best_total:8.2f}")
        print(f"{'  of which the new pieces (plan, measures, statistics, tables, companion)':66s} {best_new:8.2f}   "
              f"{best_new / rest:+.1%} of the rest")
        for piece, seconds in best_pieces.items():
            print(f"{'    ' + piece:66s} {seconds:8.3f}")
        print(f"verdict: {result.verdicts[0] if result.verdicts else '-'}")


if __name__ == "__main__":
    main()
