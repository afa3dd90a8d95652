"""``gradlens faithfulness``'s engine against the naive loop: deletion and insertion curves of the demo's two
detectors on the same selected images, in one run.

Setup (not timed): a synthetic COCO of ``2 × --images`` images (the demo's sizes, sides 128-320 px, or COCO's,
480-640, with ``--coco-size``), ``select`` with the demo's two bundled detectors (cednet as A, convnext as B)
keeping the top ``--images``, and each model's gradient maps of them (``workdir_maps``, as ``faithfulness``
computes them). Then, for every selected image and model, the 32 rows (deletion and insertion × the model's
own map order and a seeded random order × q on the default grid 0, 0.005, ..., 0.5):

1. gradlens: ``compute_faithfulness`` for each model into a fresh result folder (what ``gradlens faithfulness``
   runs): the 30 distinct perturbed images of an image (q = 0 is shared by both orders) in batches of
   ``--batch-size`` of that image, detections and total loss from one forward pass (``detect_with_losses``), an
   image per core with single-threaded operators, one vectorised scoring of the image's 30 detection sets
   (``variant_qualities``), rows written to the result store.
2. Naive, as a user of the public API would write it: for every image, model and row, build that one perturbed
   image, call ``detector.detect([x])`` and ``detector.image_losses([x], [target])`` (two forwards), turn the
   detections into COCO records (``detection_records``) and score them with ``quality_scores(records, gt)``,
   taking the image's row (``--naive-scoring variant`` uses ``variant_qualities`` on the one set instead).
   One image and one q at a time, default torch threads; measured on ``--naive-images`` images and scaled by
   the detector's input canvas (the resized, padded image: what a forward costs).
3. The ladder (unless ``--no-ladder``), once on the naive loop's images: each source of the speed-up added
   one at a time (one forward per row; q = 0 shared and one scoring per image; batches; a thread per core).

The two must give the same rows (quality within 1e-5 absolute, loss within 1e-5 relative, the same number of
detections) before any ratio is printed. Rounds are interleaved (engine, then naive) and medians reported: a
2-core machine drifts by 20 %.

    python benchmarks/bench_faithfulness.py [--images 10] [--naive-images 4] [--repeat 2] [--coco-size] [--no-ladder]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradlens.attribution.targets import image_targets
from gradlens.attribution.workdir import model_checkpoints, selection_ids, workdir_maps
from gradlens.data.images import read_image
from gradlens.faithfulness.compute import FaithfulnessConfig, compute_faithfulness, expected_rows, image_variants
from gradlens.faithfulness.perturb import fill_image, map_order, perturbed, random_order, ranks
from gradlens.inference import detection_records
from gradlens.models.preprocessing.transform import padded_size
from gradlens.scoring.quality import quality_scores, variant_qualities

QUALITY_ATOL = 1e-5  # quality = IoU × confidence in [0, 1] from float32 boxes and scores
LOSS_RTOL = 1e-5  # the total loss, a float32 sum over every anchor
THREADS_VARIABLE = "GRADLENS_FAITHFULNESS_THREADS"


def naive_rows(detector, gt, image_id: int, store, config: FaithfulnessConfig, class_agnostic: bool, scoring: str,
               spent: dict, one_forward: bool = False) -> list[dict]:
    """Every row of one image for one model, one perturbed image at a time, two forwards each (``one_forward``:
    detections and loss from one ``detect_with_losses`` call, the ladder's first step)."""
    start = time.perf_counter()
    image = torch.from_numpy(read_image(gt.image_path(image_id), gt.exif_orientation)).permute(2, 0, 1).contiguous()
    h, w = image.shape[-2:]
    order = {"map": ranks(map_order(store.read(image_id))), "random": ranks(random_order(h * w, config.seed, image_id))}
    filled = fill_image(image, config.fill, detector.preprocess.mean, config.seed, image_id)
    target = image_targets(gt, image_id, detector.categories).as_dict()
    label_to_id = [c["id"] for c in detector.categories]
    spent["prepare"] += time.perf_counter() - start
    rows = []
    for mode, order_name, q in expected_rows(config):
        start = time.perf_counter()
        x = perturbed(image, filled, order[order_name], q, mode).float().div_(255.0)
        with torch.no_grad():
            if one_forward:
                outs, loss = detector.detect_with_losses([x], [target])
                out = outs[0]
            else:
                out = detector.detect([x])[0]
                loss = detector.image_losses([x], [target])
        total = float(loss["classification"].double() + loss["bbox_regression"].double())
        records = detection_records(image_id, out, label_to_id)
        middle = time.perf_counter()
        if scoring == "quality_scores":
            _, images = quality_scores(records, gt, class_agnostic)
            mine = images.loc[images["image_id"] == image_id, "quality"]
            quality = float(mine.iloc[0]) if len(mine) else math.nan
        else:
            quality = float(variant_qualities(gt, [image_id], [records], class_agnostic)[0])
        end = time.perf_counter()
        spent["forwards"] += middle - start
        spent["scoring"] += end - middle
        rows.append({"mode": mode, "order": order_name, "q": q, "quality": quality, "loss": total,
                     "detections": len(records)})
    return rows


def compare(engine: dict, naive: dict) -> tuple[float, float, int]:
    """Largest |quality difference|, largest relative loss difference and detection counts that differ."""
    dq, dl, counts = 0.0, 0.0, 0
    for key, rows in naive.items():
        for mine, theirs in zip(engine[key], rows):
            assert (mine["mode"], mine["order"], mine["q"]) == (theirs["mode"], theirs["order"], theirs["q"])
            if math.isnan(mine["quality"]) or math.isnan(theirs["quality"]):
                assert math.isnan(mine["quality"]) and math.isnan(theirs["quality"]), (key, mine, theirs)
            else:
                dq = max(dq, abs(mine["quality"] - theirs["quality"]))
            dl = max(dl, abs(mine["loss"] - theirs["loss"]) / max(abs(theirs["loss"]), 1e-12))
            counts += mine["detections"] != theirs["detections"]
    return dq, dl, counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10, help="selected images (each through both models)")
    parser.add_argument("--naive-images", type=int, default=4, help="images of the naive loop (its time is scaled)")
    parser.add_argument("--batch-size", type=int, default=4, help="the engine's batch (select's default, recorded)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds (engine then naive); medians reported")
    parser.add_argument("--coco-size", action="store_true", help="images of COCO's size (sides 480-640)")
    parser.add_argument("--naive-scoring", choices=["quality_scores", "variant"], default="quality_scores")
    parser.add_argument("--no-ladder", dest="ladder", action="store_false",
                        help="skip the ladder (each source of the speed-up alone, on the naive images)")
    args = parser.parse_args(argv)

    from gradlens.data.synthetic import SyntheticConfig, make_synthetic_coco
    from gradlens.demo import DEMO_MODELS
    from gradlens.fileio import sha256_file
    from gradlens.models.bundled import bundled_detector_path
    from gradlens.models.formats.checkpoints import load_detector
    from gradlens.runner import DetectorRun
    from gradlens.selection.manifest import load_manifest
    from gradlens.selection.run import run_selection

    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.machine()}, {cpu}, {cores} cores, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, device cpu")
    config = FaithfulnessConfig().check()
    variants, rows_per_image = len(image_variants(config)), len(expected_rows(config))
    sides = (480, 640) if args.coco_size else (128, 320)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        coco = make_synthetic_coco(tmp / "coco", SyntheticConfig(num_images=2 * args.images, seed=0, min_side=sides[0],
                                                                 max_side=sides[1]), progress=False)
        runner = DetectorRun(device="cpu", workers=2, batch_size=args.batch_size, cache_dir=tmp / "cache")
        a, b = (bundled_detector_path(name) for name in DEMO_MODELS)
        workdir = run_selection(a, [b], coco=coco, workdir=tmp / "run", top=args.images, device="cpu",
                                progress=False, detector_run=runner).workdir
        models, gt = workdir_maps(workdir, None, progress=False)  # the maps ranking the pixels, as faithfulness makes them
        manifest = load_manifest(workdir)
        class_agnostic = bool((manifest.get("settings") or {}).get("class_agnostic", False))
        digests = {role: digest for role, (_, digest) in model_checkpoints(manifest, workdir).items()}
        ids = selection_ids(workdir)
        naive_ids = ids[:max(1, min(args.naive_images, len(ids)))]
        detectors = {m.role: load_detector(m.checkpoint, device="cpu") for m in models}  # as faithfulness loads them
        assert all(sha256_file(m.checkpoint) == digests[m.role] for m in models)
        pixels = [gt.image_info(i)["height"] * gt.image_info(i)["width"] for i in ids]
        print(f"{len(ids)} selected images ({sides[0]}-{sides[1]} px sides, mean {np.mean(pixels) / 1e3:.0f} kpixels) × "
              f"{len(models)} models ({', '.join(m.label for m in models)}) × {variants} perturbations "
              f"({rows_per_image} rows); engine batch {args.batch_size}; naive on {len(naive_ids)} images, scaled\n")

        # warm-up: allocator, kernels, lazy imports, on both paths
        for m in models:
            compute_faithfulness(detectors[m.role], digests[m.role], gt, ids[:1], m.store, tmp / "warm" / m.role, config,
                                 args.batch_size, "fp32", class_agnostic, progress=False)
            naive_rows(detectors[m.role], gt, ids[0], m.store, config, class_agnostic, args.naive_scoring,
                       {"prepare": 0.0, "forwards": 0.0, "scoring": 0.0})

        # the naive loop's time is scaled by the detector's input canvas (the padded resized image, the engine's own
        # cost measure), not by the image count: the first images of the selection need not have the mean shape
        canvas = {i: float(np.prod(padded_size(gt.image_info(i)["height"], gt.image_info(i)["width"],
                                                detectors[models[0].role].preprocess))) for i in ids}
        scale = sum(canvas.values()) / sum(canvas[i] for i in naive_ids)

        def engine_run(folder: Path, image_ids, batch_size: int = args.batch_size, threads: str | None = None):
            saved = os.environ.get(THREADS_VARIABLE)
            if threads is not None:
                os.environ[THREADS_VARIABLE] = threads
            try:
                start = time.perf_counter()
                runs = {m.role: compute_faithfulness(detectors[m.role], digests[m.role], gt, image_ids, m.store,
                                                     folder / m.role, config, batch_size, "fp32", class_agnostic,
                                                     progress=False) for m in models}
                seconds = time.perf_counter() - start
            finally:
                if threads is not None:
                    if saved is None:
                        os.environ.pop(THREADS_VARIABLE, None)
                    else:
                        os.environ[THREADS_VARIABLE] = saved
            assert all(run.computed == len(image_ids) for run in runs.values())
            return seconds, {(role, i): run.results.rows(i) for role, run in runs.items() for i in image_ids}

        def naive_run(image_ids, one_forward: bool = False):
            spent = {"prepare": 0.0, "forwards": 0.0, "scoring": 0.0}
            start = time.perf_counter()
            rows = {(m.role, i): naive_rows(detectors[m.role], gt, i, m.store, config, class_agnostic,
                                            args.naive_scoring, spent, one_forward) for m in models for i in image_ids}
            return time.perf_counter() - start, rows, spent

        engine_s, naive_s, spent_rounds = [], [], []
        for r in range(max(1, args.repeat)):  # interleaved, so a drift of the machine hits both alike
            seconds, engine = engine_run(tmp / f"engine{r}", ids)
            engine_s.append(seconds)
            seconds, naive, spent = naive_run(naive_ids)
            naive_s.append(seconds * scale)
            spent_rounds.append(spent)

        dq, dl, counts = compare(engine, naive)
        checked = len(naive) * rows_per_image
        print(f"agreement on {checked} rows ({len(naive_ids)} images × {len(models)} models × {rows_per_image}): "
              f"max |quality diff| {dq:.1e} (tolerance {QUALITY_ATOL:.0e}), max relative loss diff {dl:.1e} "
              f"(tolerance {LOSS_RTOL:.0e}), detection counts that differ: {counts}")
        if dq > QUALITY_ATOL or dl > LOSS_RTOL or counts:
            raise SystemExit("The engine and the naive loop disagree beyond float32 tolerance: no ratio reported.")

        t_engine, t_naive = float(np.median(engine_s)), float(np.median(naive_s))
        spent = {k: float(np.median([s[k] for s in spent_rounds])) * scale for k in spent_rounds[0]}
        n, pairs = len(ids), len(ids) * len(models)
        print(f"\n{'path':58s} {'seconds':>8s} {'images/s':>9s} {'fwd/img·model':>14s}")
        print(f"{'gradlens compute_faithfulness (both models)':58s} {t_engine:8.2f} {n / t_engine:9.2f} {variants:14d}")
        print(f"{'naive loop (detect + image_losses per row), scaled':58s} {t_naive:8.2f} {n / t_naive:9.2f} "
              f"{2 * rows_per_image:14d}")
        print(f"{'  of which: read image, map order, fill, target':58s} {spent['prepare']:8.2f}")
        print(f"{'  of which: perturb + two forwards + records':58s} {spent['forwards']:8.2f}")
        print(f"{'  of which: scoring (' + args.naive_scoring + ')':58s} {spent['scoring']:8.2f}")
        print(f"\nratio: gradlens is {t_naive / t_engine:.2f}x faster (target 1.5x); per round "
              f"{', '.join(f'{b / a:.2f}x' for a, b in zip(engine_s, naive_s))}")
        print(f"forwards per image and model: {variants} against {2 * rows_per_image} "
              f"({2 * rows_per_image / variants:.2f}x fewer); perturbed images per second: "
              f"{pairs * variants / t_engine:.1f} against {pairs * rows_per_image / t_naive:.1f} rows "
              f"({pairs * 2 * rows_per_image / t_naive:.1f} forwards)")
        print(f"rounds: engine {', '.join(f'{s:.2f}' for s in engine_s)} s; naive (scaled by canvas area, "
              f"x{scale:.2f}) {', '.join(f'{s:.2f}' for s in naive_s)} s")

        if args.ladder:  # where the speed comes from: one step at a time, on the naive loop's images, one pass each
            steps = []
            seconds, rows, _ = naive_run(naive_ids)
            steps.append(("naive: detect + image_losses, 32 rows x 2 forwards", seconds, rows, 2 * rows_per_image))
            seconds, rows, _ = naive_run(naive_ids, one_forward=True)
            steps.append(("+ one forward per row (detect_with_losses)", seconds, rows, rows_per_image))
            seconds, rows = engine_run(tmp / "ladder_b1", naive_ids, batch_size=1, threads="1")
            steps.append(("+ q = 0 shared, one scoring per image (engine, batch 1, 1 thread)", seconds, rows, variants))
            seconds, rows = engine_run(tmp / "ladder_b4", naive_ids, threads="1")
            steps.append((f"+ batches of {args.batch_size} variants (engine, 1 thread)", seconds, rows, variants))
            seconds, rows = engine_run(tmp / "ladder", naive_ids)
            steps.append(("+ an image per core, single-threaded ops (the engine)", seconds, rows, variants))
            print(f"\nladder on the {len(naive_ids)} naive images, one pass each (not scaled)")
            print(f"{'step':68s} {'seconds':>8s} {'vs naive':>8s} {'fwd/img·model':>14s}")
            worst_q = worst_l = 0.0
            for label, seconds, rows, forwards in steps:
                dq, dl, counts = compare(rows, naive)
                worst_q, worst_l = max(worst_q, dq), max(worst_l, dl)
                assert dq <= QUALITY_ATOL and dl <= LOSS_RTOL and not counts, label
                print(f"{label:68s} {seconds:8.2f} {steps[0][1] / seconds:7.2f}x {forwards:14d}")
            print(f"every step gives the naive rows: max |quality diff| {worst_q:.1e}, max relative loss diff {worst_l:.1e}")

if __name__ == "__main__":
    main()
