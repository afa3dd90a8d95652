"""The whole pipeline on data and detectors that gradlens ships, in a few CPU minutes.

Writes a synthetic COCO dataset, runs the two small bundled detectors on it
(a CEDNet-style and a ConvNeXt-style RetinaNet, see
:mod:`gradlens.models.bundled`), scores both and selects the images where the
CEDNet-style one improves most, then computes both detectors' input-gradient
maps of the selected images, their area curves (Figure A2), the faithfulness
checks (deletion, insertion, randomisation), a Figure A1 gallery and the
report — exactly the commands a user runs on real checkpoints and COCO.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gradlens.data.coco import CocoPaths
from gradlens.data.synthetic import SyntheticConfig, make_synthetic_coco
from gradlens.models.bundled import bundled_detector_path
from gradlens.runner import DetectorRun
from gradlens.selection.run import SelectionResult, run_selection

if TYPE_CHECKING:
    from gradlens.faithfulness.run import FaithfulnessResult
    from gradlens.regions.run import AreaCurveResult

DEMO_MODELS = ("cednet", "convnext")  # A, then the baseline B


@dataclass
class DemoResult:
    coco: CocoPaths
    detections: dict[str, Path]
    selection: SelectionResult
    area_curve: "AreaCurveResult | None" = None
    faithfulness: "FaithfulnessResult | None" = None
    figures: list[Path] | None = None
    report: Path | None = None


def run_demo(
    out_dir: str | os.PathLike = "gradlens-runs/demo",
    num_images: int = 60,
    top: int = 20,
    seed: int = 0,
    device: str = "cpu",
    progress: bool | None = None,
    workers: int = 2,
    gallery: int = 4,
    gradients: bool = True,
    faithfulness: bool = True,
) -> DemoResult:
    """Run it all into ``out_dir``: ``coco/`` (data), ``cache/`` (detections), ``run/`` (the work directory).
    ``faithfulness``: also deletion and insertion curves and the randomisation check (after the area curves)."""
    from gradlens.figures.figure_a1 import render_figures_a1
    from gradlens.regions.run import run_area_curve

    out_dir = Path(out_dir)
    coco = make_synthetic_coco(out_dir / "coco", SyntheticConfig(num_images=num_images, seed=seed), progress=progress)
    a, b = (bundled_detector_path(name) for name in DEMO_MODELS)
    run = DetectorRun(device=device, workers=workers, batch_size=4, cache_dir=out_dir / "cache")
    result = run_selection(
        a, [b], coco=coco, workdir=out_dir / "run", top=top, device=device, progress=progress, detector_run=run,
    )  # fmt: skip
    detections = {name: Path(m["detections"]) for name, m in zip(DEMO_MODELS, result.manifest["models"])}
    demo = DemoResult(coco=coco, detections=detections, selection=result)
    if gradients and len(result.selection):
        demo.area_curve = run_area_curve(result.workdir, detector_run=run, progress=progress)
        if faithfulness:
            from gradlens.faithfulness.run import run_faithfulness

            demo.faithfulness = run_faithfulness(result.workdir, detector_run=run, randomise=True, progress=progress)
        demo.figures = render_figures_a1(result.workdir, top=min(gallery, len(result.selection)), detector_run=run,
                                         progress=progress)
        from gradlens.report import write_report

        demo.report = write_report(result.workdir, thumbnails=len(result.selection), progress=progress,
                                   figures_kwargs={"detector_run": run}).page
    return demo
