"""Which images to analyse: those where model A improves most over every baseline B."""

from gradlens.selection.improvement import select_images
from gradlens.selection.manifest import load_manifest
from gradlens.selection.run import run_selection

__all__ = ["load_manifest", "run_selection", "select_images"]
