"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Literal, Optional

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
        help="Skip (and count) detections with negative box sizes, NaN, or scores outside [0, 1] instead of stopping.",
    ),
]
_EXIF_HELP = ("ignore: decode the stored pixels, which COCO boxes refer to; apply: turn images as their EXIF tag says, "
              "as mmdetection's OpenCV loader does")
ExifOrientation = Annotated[
    Optional[Literal["ignore", "apply"]], typer.Option("--exif-orientation", help=_EXIF_HELP + " [default: ignore]."),
]
ExifOrientationRecorded = Annotated[
    Optional[Literal["ignore", "apply"]],
    typer.Option("--exif-orientation", help=_EXIF_HELP + " [default: what 'select' recorded for the selection, else ignore]."),
]
Device = Annotated[
    Literal["auto", "cpu", "cuda"], typer.Option("--device", help="Where to compute (auto: CUDA when present).")
]
Workdir = Annotated[Path, typer.Option("--workdir", help="Work directory holding manifest.json and the outputs.")]
Progress = Annotated[
    Optional[bool], typer.Option("--progress/--no-progress", help="Progress bars [default: only on a terminal].")
]

# -- detectors -----------------------------------------------------------------------------------
Arch = Annotated[
    Optional[str],
    typer.Option("--arch", help="Architecture of a plain (torchvision) state dict; see 'gradlens models'."),
]
TrustCheckpoint = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow a checkpoint that needs arbitrary code to unpickle (only for files from a source you trust).",
    ),
]
BatchSize = Annotated[
    int, typer.Option("--batch-size", min=1, help="Images per batch; batches only mix images padded to the same canvas.")
]
Workers = Annotated[int, typer.Option("--workers", min=0, help="DataLoader processes decoding JPEGs.")]
Precision = Annotated[
    Literal["auto", "fp32", "tf32", "bf16", "fp16"],
    typer.Option("--precision", help="Arithmetic: auto is tf32 on CUDA (area curve within 0.005 of fp32's) and fp32 "
                                     "on the CPU; fp32 for exactness; tf32/fp16 need CUDA."),
]
CacheDir = Annotated[
    Optional[Path],
    typer.Option(
        "--cache-dir", envvar="GRADLENS_CACHE_DIR", show_envvar=True,
        help="Where detections of checkpoints are cached [default: ~/.cache/gradlens].",
    ),
]

# -- attribution ---------------------------------------------------------------------------------
Method = Annotated[
    Literal["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad"],
    typer.Option("--method", help="Attribution of the total detection loss (gradient: the paper's)."),
]
ChannelReduce = Annotated[
    Literal["max", "l1", "l2"],
    typer.Option("--channel-reduce", help="One value per pixel: max |g| over RGB (the paper's), or the L1 / L2 norm."),
]
Target = Annotated[
    Literal["total", "object"],
    typer.Option("--target", help="total: the image's total loss (the paper's); object: one map per ground-truth object, "
                                  "its own part of that loss (files named by annotation id)."),
]
Steps = Annotated[int, typer.Option("--steps", min=1, help="integrated_gradients: points on the path.")]
Baseline = Annotated[
    Literal["black", "white", "mean", "blur"],
    typer.Option("--baseline", help="integrated_gradients: the path's start (mean: the detector's normalisation mean)."),
]
Samples = Annotated[int, typer.Option("--samples", min=1, help="smoothgrad: noisy copies per image.")]
Noise = Annotated[float, typer.Option("--noise", min=0.0, help="smoothgrad: noise std in units of the [0, 1] pixel range.")]
Seed = Annotated[int, typer.Option("--seed", help="smoothgrad: noise seed (each image's noise also depends on its pixels).")]
MapDtype = Annotated[
    Literal["float16", "float32"],
    typer.Option("--map-dtype", help="Stored map precision (float16: map/max, <= 2^-11 relative error, half the disk)."),
]
Checkpoint = Annotated[
    Optional[List[str]],
    typer.Option("--checkpoint", metavar="ROLE=PATH",
                 help="Checkpoint of a model that 'select' got as results or scores (e.g. b=convnext.pth); repeatable."),
]
Bootstrap = Annotated[
    int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples of the images for bands and intervals (0: none).")
]
BootstrapSeed = Annotated[int, typer.Option("--bootstrap-seed", help="Seed of the image resamples.")]
Level = Annotated[float, typer.Option("--level", min=0.5, max=0.999, help="Confidence level of bands and intervals.")]
