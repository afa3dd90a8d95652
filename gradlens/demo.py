"""The whole pipeline as far as this version goes, on data and detectors that gradlens ships.

Writes a synthetic COCO dataset, runs the two small bundled detectors on it
(a CEDNet-style and a ConvNeXt-style RetinaNet, see
:mod:`gradlens.models.bundled`), scores both and selects the images where the
CEDNet-style one improves most, exactly as ``gradlens select`` does for real
checkpoints on COCO.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gradlens.data.coco import CocoPaths
from gradlens.data.synthetic import SyntheticConfig, make_synthetic_coco
from gradlens.models.bundled import bundled_detector_path
from gradlens.runner import DetectorRun
from gradlens.selection.run import SelectionResult, run_selection

DEMO_MODELS = ("cednet", "convnext")  # A, then the baseline B


@dataclass
class DemoResult:
    coco: CocoPaths
    detections: dict[str, Path]
    selection: SelectionResult


def run_demo(
    out_dir: str | os.PathLike = "gradlens-runs/demo",
    num_images: int = 60,
    top: int = 20,
    seed: int = 0,
    device: str = "cpu",
    progress: bool | None = None,
    workers: int = 2,
) -> DemoResult:
    out_dir = Path(out_dir)
    coco = make_synthetic_coco(out_dir / "coco", SyntheticConfig(num_images=num_images, seed=seed), progress=progress)
    a, b = (bundled_detector_path(name) for name in DEMO_MODELS)
    run = DetectorRun(device=device, workers=workers, batch_size=4, cache_dir=out_dir / "cache")
    result = run_selection(
        a, [b], coco=coco, workdir=out_dir / "run", top=top, device=device, progress=progress, detector_run=run,
    )  # fmt: skip
    detections = {name: Path(m["detections"]) for name, m in zip(DEMO_MODELS, result.manifest["models"])}
    return DemoResult(coco=coco, detections=detections, selection=result)
