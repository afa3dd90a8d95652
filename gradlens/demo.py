"""The whole pipeline as far as this version goes, on data that gradlens makes itself.

Writes a synthetic COCO dataset, two COCO results files from simulated
detectors of different skill (stand-ins until the bundled detectors arrive),
scores both and selects the images where the sharper one improves most.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gradlens.data.coco import CocoPaths, load_ground_truth
from gradlens.data.detections import write_detections
from gradlens.data.synthetic import SyntheticConfig, make_synthetic_coco, simulate_detections
from gradlens.selection.run import SelectionResult, run_selection

DEMO_MODELS = {"sharp": 0.9, "sloppy": 0.45}  # label -> simulated skill


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
) -> DemoResult:
    out_dir = Path(out_dir)
    coco = make_synthetic_coco(out_dir / "coco", SyntheticConfig(num_images=num_images, seed=seed), progress=progress)
    gt = load_ground_truth(coco)
    detections = {}
    for i, (label, skill) in enumerate(DEMO_MODELS.items()):
        detections[label] = write_detections(
            simulate_detections(gt, skill=skill, seed=seed + 1 + i), out_dir / "detections" / f"{label}.json"
        )
    result = run_selection(
        detections["sharp"], [detections["sloppy"]], coco=coco, workdir=out_dir / "run", top=top,
        device=device, progress=progress,
    )  # fmt: skip
    return DemoResult(coco=coco, detections=detections, selection=result)
