"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from gradlens.data.coco import ENV_COCO_ROOT

CocoRoot = Annotated[
    Optional[Path],
    typer.Option(
        "--coco-root",
        envvar=ENV_COCO_ROOT,
        help="COCO folder with annotations/instances_val2017.json and val2017/ [default: ./data/coco].",
        show_envvar=True,
    ),
]
Ann = Annotated[Optional[Path], typer.Option("--ann", help="Annotation file; overrides the one under --coco-root.")]
Images = Annotated[Optional[Path], typer.Option("--images", help="Image folder; overrides the one under --coco-root.")]
ClassAgnostic = Annotated[
    bool, typer.Option("--class-agnostic", help="Match objects to detections of any category (default: same category only).")
]
DropInvalid = Annotated[
    bool,
    typer.Option(
        "--drop-invalid",
        help="Skip (and count) detections with zero-size or negative boxes, NaN, or scores outside [0, 1] instead of stopping.",
    ),
]
Device = Annotated[
    Literal["auto", "cpu", "cuda"], typer.Option("--device", help="Where to compute (auto: CUDA when present).")
]
Workdir = Annotated[Path, typer.Option("--workdir", help="Work directory holding manifest.json and the outputs.")]
Progress = Annotated[
    Optional[bool], typer.Option("--progress/--no-progress", help="Progress bars [default: only on a terminal].")
]
