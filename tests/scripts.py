"""The repository's maintenance scripts (``scripts/``), loaded by file path for tests that use them."""

from __future__ import annotations

from importlib import util
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).parents[1] / "scripts"


def make_mmdet_checkpoints() -> ModuleType:
    """``scripts/make_mmdet_checkpoints.py`` as a module (it writes mmdetection checkpoints of the zoo)."""
    spec = util.spec_from_file_location("make_mmdet", SCRIPTS / "make_mmdet_checkpoints.py")
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
