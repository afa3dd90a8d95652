"""``gradlens faithfulness``: does each detector need the region its own map ranks first?

Plan (the selection, the models, the settings, checked before any long work) → load (every model's maps
of the selected images, computed or reused as ``area-curve`` does) → compute (each model on every
perturbed image, :mod:`~gradlens.faithfulness.compute`; with ``randomise``, the maps of its cascade of
re-initialised copies, :mod:`~gradlens.faithfulness.randomise`) → store (tables, figure, and the record
``<name>.json`` written last with the SHA-256 of every file, as ``area-curve`` writes its outputs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from gradlens._version import __version__
from gradlens.attribution.methods import AttributionConfig
from gradlens.attribution.workdir import ModelMaps, selection_ids, selection_table, workdir_maps
from gradlens.data.coco import CocoPaths
from gradlens.device import resolve_device
from gradlens.errors import GradlensError, InputFileError
from gradlens.faithfulness.compute import FaithfulnessConfig, compute_faithfulness
from gradlens.faithfulness.curves import (
    TABLE_COLUMNS,
    faithfulness_areas,
    faithfulness_curves,
    faithfulness_paired,
    faithfulness_sentences,
)
from gradlens.faithfulness.perturb import DEFAULT_FRACTIONS, FILLS
from gradlens.fileio import write_json, write_table
from gradlens.regions.record import (
    check_name_is_free,
    check_output_hashes,
    check_outputs,
    check_record_files,
    check_setting_fields,
    is_integer,
    is_number,
    move_into_place,
    read_record,
    staging_folder,
    statistics_rules,
)
from gradlens.regions.statistics import DEFAULT_BOOTSTRAP, DEFAULT_LEVEL, MAX_SEED, check_bootstrap, check_level
from gradlens.runner import DetectorRun
from gradlens.selection.improvement import quality_column
from gradlens.selection.manifest import load_manifest, save_manifest

RECORD_WHAT = "faithfulness record"
MAX_RANDOMISE_SEED = 2**63 - 1 - 64  # torch seeds are 64-bit; each re-initialised part adds one to the seed


@dataclass
class FaithfulnessResult:
    """What ``run_faithfulness`` computed and wrote (tables as DataFrames, paths of the files)."""

    table: pd.DataFrame  # one row per image, model, mode, order and q (curves.TABLE_COLUMNS)
    curves: pd.DataFrame
    areas: pd.DataFrame
    paired: pd.DataFrame
    sentences: list[str]
    q0_difference: dict[str, float]  # per role: largest |quality of the image rerun here - the quality select scored|
    outputs: dict[str, Path]
    models: list[ModelMaps]
    runs: dict = field(default_factory=dict)  # role -> FaithfulnessRun
    randomisation: pd.DataFrame | None = None
    randomisation_summary: pd.DataFrame | None = None
    flags: list[str] = field(default_factory=list)


def recorded_qualities(workdir: Path, roles: list[str], ids: list[int]) -> dict[str, np.ndarray]:
    """Each model's image quality as ``select`` scored it (the selection's ``quality_<role>`` columns)."""
    selection = selection_table(workdir).set_index("image_id")
    out = {}
    for role in roles:
        column = quality_column(role)
        if column not in selection:
            raise GradlensError(f"The selection in {workdir} has no {column} column; run 'gradlens select' again.")
        out[role] = selection.loc[ids, column].to_numpy(np.float64)
    return out


def run_faithfulness(
    workdir: str | os.PathLike,
    fill: str = "mean",
    fractions=DEFAULT_FRACTIONS,
    seed: int = 0,
    top: int | None = None,
    config: AttributionConfig | None = None,
    detector_run: DetectorRun | None = None,
    checkpoints: dict | None = None,
    coco: CocoPaths | None = None,
    map_dtype: str = "float16",
    bootstrap: int = DEFAULT_BOOTSTRAP,
    bootstrap_seed: int = 0,
    level: float = DEFAULT_LEVEL,
    randomise: bool = False,
    randomise_seed: int = 0,
    name: str = "faithfulness",
    progress: bool | None = None,
) -> FaithfulnessResult:
    """Deletion and insertion curves of every model of the work directory on its selected images, by its own
    maps and by a seeded random order, with bands, areas and paired comparisons; with ``randomise`` also the
    model-parameter randomisation check of its maps. Writes ``<name>.csv``/``.parquet`` (the rows),
    ``<name>_curves``, ``<name>_paired``, ``<name>.png``/``.pdf`` and the record ``<name>.json``."""
    from gradlens.figures.faithfulness import save_faithfulness_figure
    from gradlens.models.formats.checkpoints import load_detector

    workdir = Path(workdir)
    check_name_is_free(workdir, name, "faithfulness")
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1):
        raise GradlensError(f"--top must be a whole number of at least 1; got {top!r}.")
    if randomise and (isinstance(randomise_seed, bool) or not isinstance(randomise_seed, (int, np.integer))
                      or not 0 <= int(randomise_seed) <= MAX_RANDOMISE_SEED):
        raise GradlensError(f"--randomise-seed must be a whole number from 0 to {MAX_RANDOMISE_SEED}; got {randomise_seed!r}.")
    settings = FaithfulnessConfig(fill, tuple(fractions) if not isinstance(fractions, str) else fractions, seed).check()
    check_bootstrap(bootstrap, bootstrap_seed, check_level(level))
    ids = selection_ids(workdir, top)
    if not ids:
        raise GradlensError("The selection is empty, so there are no images to perturb.")
    check_bootstrap(bootstrap, bootstrap_seed, level, images=len(ids), columns=len(settings.fractions))
    config = config or AttributionConfig()
    if config.target != "total":
        raise GradlensError("Faithfulness ranks pixels by whole-image maps (--target total).")
    manifest = load_manifest(workdir)
    run = detector_run or DetectorRun.recorded(workdir)
    class_agnostic = bool((manifest.get("settings") or {}).get("class_agnostic", False))
    roles = [m["role"] for m in manifest["models"]]
    recorded = recorded_qualities(workdir, roles, ids)

    # load: every model's maps of the selection (computed or reused, as area-curve does)
    device = resolve_device(run.device)
    steps = {}
    if randomise:  # each model's cascade, known before any long work (a backbone it cannot split is refused now)
        from gradlens.attribution.workdir import model_checkpoints
        from gradlens.faithfulness.randomise import randomisation_steps

        for role, (path, _) in model_checkpoints(manifest, workdir, checkpoints, run.detectors).items():
            if not isinstance(path, Path):
                raise GradlensError(f"The randomisation check re-initialises a checkpoint's layers in a copy loaded from "
                                    f"its file, and model {role} is a detector object; run it without randomise.")
            try:
                steps[role] = [n for n, _ in randomisation_steps(load_detector(path, arch=run.arch, trust=run.trust))]
            except ValueError as exc:
                raise GradlensError(f"The randomisation check cannot split model {role}'s detector: {exc}") from None
    models, gt = workdir_maps(workdir, ids, config, run, checkpoints, coco, map_dtype, progress)

    # compute: each model on every perturbed image (resumable per image)
    frames, runs = [], {}
    for m in models:
        detector = (m.detector.to(device) if m.detector is not None  # a detector object (DetectorRun.detectors)
                    else load_detector(m.checkpoint, arch=run.arch, trust=run.trust, device=device))  # as score runs it
        runs[m.role] = compute_faithfulness(detector, m.sha256, gt, ids, m.store, workdir / "faithfulness" / m.role,
                                            settings, run.batch_size, run.precision, class_agnostic, progress,
                                            label=f"{m.role} ({m.label})")
        rows = []
        for rank, image_id in enumerate(ids, start=1):
            stored = runs[m.role].results.rows(image_id)
            if stored is None:
                raise InputFileError(f"The faithfulness results of image {image_id} in {runs[m.role].results.folder} "
                                     "changed while this run read them; run the command again.")
            rows += [{"image_id": image_id, "rank": rank, "role": m.role, "label": m.label, **r} for r in stored]
        frames.append(pd.DataFrame(rows))
        del detector
    table = pd.concat(frames, ignore_index=True).reindex(columns=TABLE_COLUMNS)
    # Deletion at q = 0 is the image itself, and its quality is the one select scored and ranked by. The
    # rerun in this step's batches (batch mates change float32 detections in their last bits) is kept as a
    # check: its largest difference is recorded, and a large one means the checkpoint did not make the
    # detections select scored (a results file from elsewhere).
    q0 = {}
    for m in models:
        at_zero = ((table["role"] == m.role) & (table["mode"] == "deletion") & (table["q"] == 0.0)).to_numpy()
        ranks = table.loc[at_zero, "rank"].to_numpy() - 1
        rerun = table.loc[at_zero, "quality"].to_numpy(np.float64)
        gap = np.abs(rerun - recorded[m.role][ranks])
        both_nan = np.isnan(rerun) & np.isnan(recorded[m.role][ranks])
        gap = np.where(both_nan, 0.0, np.where(np.isnan(gap), np.inf, gap))  # NaN on one side only: no agreement
        q0[m.role] = float(gap.max()) if len(gap) else float("nan")
        table.loc[at_zero, "quality"] = recorded[m.role][ranks]

    randomisation = summary_r = None
    flags: list[str] = []
    if randomise:
        randomisation, summary_r, flags = randomisation_check(workdir, models, gt, ids, config, run, randomise_seed,
                                                              map_dtype, progress, steps)

    # statistics
    curves = faithfulness_curves(table, bootstrap, bootstrap_seed, level)
    areas = faithfulness_areas(table, bootstrap, bootstrap_seed, level)
    paired = faithfulness_paired(table, bootstrap, bootstrap_seed, level)
    sentences = faithfulness_sentences(curves, paired)

    # store: one unit, the record last
    with staging_folder(workdir, name) as staged:
        figures = [workdir / p.name for p in save_faithfulness_figure(curves, staged / name)]
        write_table(table, staged, name)
        write_table(curves, staged, f"{name}_curves")
        write_table(areas, staged, f"{name}_areas")
        write_table(paired, staged, f"{name}_paired")
        extra = []
        if randomisation is not None:
            from gradlens.figures.faithfulness import save_randomisation_figure

            extra = [workdir / p.name for p in save_randomisation_figure(summary_r, staged / f"{name}_randomisation")]
            write_table(randomisation, staged, f"{name}_randomisation")
            write_table(summary_r, staged, f"{name}_randomisation_summary")
        hashes = move_into_place(staged, workdir, name)
    record = {
        "gradlens_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {**settings.to_dict(), "num_images": len(ids), "bootstrap": int(bootstrap),
                     "bootstrap_seed": int(bootstrap_seed), "confidence_level": float(level),
                     "batch_size": run.batch_size, "precision": run.precision, "class_agnostic": class_agnostic,
                     "attribution": config.to_dict(), "randomise": bool(randomise),
                     "randomise_seed": int(randomise_seed) if randomise else None},
        "models": [{"role": m.role, "label": m.label,
                    "checkpoint": str(m.checkpoint.resolve()) if m.checkpoint is not None else None,
                    "results": str(runs[m.role].results.folder.relative_to(workdir)),
                    "computed": runs[m.role].computed, "reused": runs[m.role].reused,
                    "q0_max_difference": q0[m.role]} for m in models],
        "sentences": sentences,
        "flags": flags,
        "command": "faithfulness",
        "outputs": {"table": f"{name}.csv", "curves": f"{name}_curves.csv", "areas": f"{name}_areas.csv",
                    "paired": f"{name}_paired.csv",
                    "figure": [p.name for p in figures + extra],
                    **({"randomisation": f"{name}_randomisation.csv",
                        "randomisation_summary": f"{name}_randomisation_summary.csv"} if randomise else {})},
        "sha256": hashes,
    }
    write_json(workdir / f"{name}.json", record)
    manifest = load_manifest(workdir)
    manifest.setdefault("outputs", {})[name] = f"{name}.json"
    save_manifest(workdir, manifest)
    outputs = {"table": workdir / f"{name}.csv", "curves": workdir / f"{name}_curves.csv",
               "areas": workdir / f"{name}_areas.csv",
               "paired": workdir / f"{name}_paired.csv", "meta": workdir / f"{name}.json",
               **{p.suffix[1:]: p for p in figures}}
    if randomise:
        outputs["randomisation"] = workdir / f"{name}_randomisation.csv"
        outputs["randomisation_summary"] = workdir / f"{name}_randomisation_summary.csv"
        outputs.update({f"randomisation_{p.suffix[1:]}": p for p in extra})
    return FaithfulnessResult(table, curves, areas, paired, sentences, q0, outputs, models, runs, randomisation, summary_r,
                              flags)


def randomisation_check(workdir: Path, models: list[ModelMaps], gt, ids: list[int], config: AttributionConfig,
                        run: DetectorRun, seed: int, map_dtype: str = "float16", progress: bool | None = None,
                        steps: dict[str, list[str]] | None = None):
    """The cascading model-parameter randomisation test of every model's maps: the maps of its copies
    re-initialised from the head down (:func:`~gradlens.faithfulness.randomise.randomise`), computed like any
    maps (batched, resumable, under torchrun) into their own stores, ``maps/<role>/randomised/<digest>``,
    compared with the trained model's by Spearman correlation and SSIM. Returns the table, its summary and
    the flag sentences."""
    from gradlens.attribution.compute import compute_maps, map_store_key
    from gradlens.attribution.store import MapStore, key_digest
    from gradlens.faithfulness.randomise import (
        RANDOMISATION_RULES,
        flagged,
        map_similarity,
        randomisation_steps,
        randomisation_summary,
        randomise,
        RANDOMISATION_COLUMNS,
    )
    from gradlens.models.formats.checkpoints import load_detector
    from gradlens.progress import track

    device = resolve_device(run.device)
    config = config.check(device)
    selected = selection_ids(workdir)
    rows = []
    for m in models:
        names = (steps or {}).get(m.role) or [
            name for name, _ in randomisation_steps(load_detector(m.checkpoint, arch=run.arch, trust=run.trust))]
        for k, step in enumerate(names, start=1):
            # drawn on the CPU whatever the device (generators differ between devices), before any change of
            # layout: the same weights on every device and every torchrun rank
            detector = load_detector(m.checkpoint, arch=run.arch, trust=run.trust, device="cpu")
            randomise(detector, k, seed)
            detector = detector.to(device)
            detector.randomisation = {"steps": k, "seed": int(seed), "rules": RANDOMISATION_RULES}
            if device.type == "cpu":
                detector.use_channels_last()  # as the trained model's maps are computed
            key = map_store_key(detector, m.sha256, gt, config, batch_size=run.batch_size)
            store = MapStore(workdir / "maps" / m.role / "randomised" / key_digest({**key, "map_dtype": map_dtype}), key,
                             map_dtype=map_dtype)
            compute_maps(detector, gt, ids, store, config, batch_size=run.batch_size, workers=run.workers,
                         progress=progress, label=f"{m.role} ({m.label}) with {'+'.join(names[:k])} randomised",
                         plan_ids=selected)
            del detector
            for image_id in track(ids, f"similarity {m.role}, step {k} of {len(names)}", progress):
                spearman, ssim = map_similarity(m.store.read(image_id), store.read(image_id))
                rows.append({"role": m.role, "label": m.label, "image_id": image_id, "step": step, "randomised": k,
                             "spearman": spearman, "ssim": ssim})
    table = pd.DataFrame(rows, columns=RANDOMISATION_COLUMNS)
    return table, randomisation_summary(table), flagged(table)


def load_faithfulness_record(workdir: str | os.PathLike, name: str = "faithfulness", missing_ok: bool = False) -> dict:
    """``<workdir>/<name>.json``, its fields type-checked and the files it lists checked by SHA-256; one sentence
    otherwise (a record is a file anyone can edit or send). ``missing_ok``: ``{}`` when there is none."""
    path, record = read_record(workdir, name, "faithfulness", RECORD_WHAT, missing_ok)
    if path is None:
        return {}

    def refuse(field: str, value, what: str):
        raise InputFileError(f"{path}: {field} is {str(value)[:60]!r}, not {what}; run 'gradlens faithfulness' again.")

    if not isinstance(record, dict):
        refuse("the record", record, "an object")
    for field in ("sentences", "flags"):
        value = record.get(field, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            refuse(field, value, "a list of sentences")
    if not isinstance(record.get("outputs"), dict):
        refuse("outputs", record.get("outputs"), "an object")
    settings = record.get("settings", {})
    if not isinstance(settings, dict):
        refuse("settings", settings, "an object")
    rules = {  # what the report prints from them: each a value this command writes
        "fill": (lambda v: v in FILLS, " or ".join(FILLS)),
        "fractions": (lambda v: isinstance(v, list) and len(v) > 0 and all(is_number(q) and 0 <= q <= 1 for q in v),
                      "a list of fractions in [0, 1]"),
        "seed": (lambda v: is_integer(v, 0, MAX_SEED), "an integer from 0 to 2**63 - 1"),
        "randomise": (lambda v: isinstance(v, bool), "true or false"),
        **statistics_rules(),
    }
    check_setting_fields(settings, rules, refuse)
    check_outputs(record["outputs"], refuse)
    check_output_hashes(record, refuse)  # every file the record names is covered (no faithfulness record predates them)
    check_record_files(record, Path(workdir), path, name, command="faithfulness")
    return record
