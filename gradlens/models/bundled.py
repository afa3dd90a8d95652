"""The two small detectors shipped inside the package, for the demo and the tests.

Both are RetinaNets trained on gradlens' synthetic shapes by
``scripts/train_bundled.py`` (a small CEDNet-style and a small
ConvNeXt-style backbone, same data, same schedule). They are real detectors
of a toy world: their mAP on held-out synthetic images is in the README.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from gradlens.errors import GradlensError

BUNDLED = {
    "cednet": "small CEDNet-style RetinaNet (retinanet_cednet_mini)",
    "convnext": "small ConvNeXt-style RetinaNet (retinanet_convnext_mini)",
}


def bundled_detector_path(name: str) -> Path:
    """Path of a bundled checkpoint (``"cednet"`` or ``"convnext"``), in gradlens' own format."""
    if name not in BUNDLED:
        raise GradlensError(f"No bundled detector named {name!r}; there are {', '.join(BUNDLED)}.")
    path = Path(str(resources.files("gradlens") / "assets" / "detectors" / f"{name}.pth"))
    if not path.is_file():
        raise GradlensError(f"The bundled detector {path} is missing from this installation.")
    return path
