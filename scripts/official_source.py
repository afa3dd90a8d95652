"""Helpers shared by the ``make_*_reference.py`` fixture builders (not run by the tests).

Each builder runs an official repository's source in memory and writes what it computes to
``tests/data/<name>_reference.pt``. What they all do the same way lives here: reading the official
files from a work tree or a bare mirror, recording the commit, stubbing mmcv/mmdet modules and
registries, compressing state-dict layouts, packing tensors into few storages, and the common
command line. What differs per family (the stubs' behaviour, random weights, the fixture's layout)
stays in each builder.

The builders import this module as ``official_source``; each puts its own directory on
``sys.path`` first, so that the import also works when a builder is loaded by file path (importlib)
rather than run as ``python scripts/make_<name>_reference.py``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
import zlib
from pathlib import Path
from typing import Callable

import torch

DATA_DIR = Path(__file__).resolve().parents[1] / "tests" / "data"


# ----------------------------------------------------------------------------- the official repository


def read_file(repo: Path, relpath: str) -> str:
    """A file of the official repository: from the work tree when there is one, else
    ``git show HEAD:<path>`` (the mirrors used here are bare git directories)."""
    path = Path(repo) / relpath
    if path.is_file():
        return path.read_text()
    out = subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{relpath}"], check=True, capture_output=True, text=True)
    return out.stdout


def commit_of(repo: Path) -> str:
    """``git rev-parse HEAD`` of the repository, recorded in a fixture's ``source``; ``"unknown"``
    when git cannot tell (not a git directory)."""
    res = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = res.stdout.strip()
    return commit if res.returncode == 0 and commit else "unknown"


# ----------------------------------------------------------------------------- stubs for mmcv / mmdet


def stub_module(name: str, package: bool = False, **attrs) -> types.ModuleType:
    """Register an empty module ``name`` holding ``attrs`` in ``sys.modules``, so that the official
    files' ``import mmcv...`` / ``from mmdet... import X`` find the stubbed names without mmcv/mmdet
    installed; ``package=True`` gives it a ``__path__`` so that submodules and relative imports resolve."""
    m = types.ModuleType(name)
    if package:
        m.__path__ = []
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


class Registry:
    """The part of mmcv's ``Registry`` the official files use (``NORM_LAYERS``, ``BACKBONES``):
    ``register_module`` as a decorator or with ``module=`` (``force`` accepted, re-registration
    always allowed), and ``get``."""

    def __init__(self, modules: dict | None = None) -> None:
        self.modules: dict[str, type] = dict(modules or {})

    def register_module(self, name=None, force=False, module=None):
        def register(cls):
            self.modules[name or cls.__name__] = cls
            return cls

        return register if module is None else register(module)

    def get(self, name):
        return self.modules[name]


# ----------------------------------------------------------------------------- fixture contents


def key_shapes(state_dict) -> bytes:
    """The state dict's ordered keys and shapes, one ``key<TAB>d0,d1,...`` line each, zlib-compressed
    (the full-size models' key lists would otherwise dominate the fixtures' size)."""
    text = "\n".join(f"{k}\t{','.join(map(str, v.shape))}" for k, v in state_dict.items())
    return zlib.compress(text.encode(), 9)


def share_storage(tensors: dict) -> dict:
    """The same tensors (same keys, same order) as views of one storage per dtype: ``torch.save``
    writes one zip record per storage, which for ~100 small tensors costs more than their data."""
    out = {}
    for dtype in {v.dtype for v in tensors.values()}:
        keys = [k for k, v in tensors.items() if v.dtype == dtype]
        flat = torch.cat([tensors[k].reshape(-1) for k in keys])
        start = 0
        for k in keys:
            n = tensors[k].numel()
            out[k] = flat[start : start + n].view(tensors[k].shape)
            start += n
    return {k: out[k] for k in tensors}


# ----------------------------------------------------------------------------- command line


def parse_args(doc: str, repo_help: str, out_name: str, argv=None, add_arguments: Callable | None = None) -> argparse.Namespace:
    """The builders' common options: ``--official-repo`` (required), any of the builder's own
    (``add_arguments(parser)``, listed between the two) and ``--out`` (default ``tests/data/<out_name>``).
    The description is the first line of the builder's docstring."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--official-repo", type=Path, required=True, help=repo_help)
    if add_arguments is not None:
        add_arguments(ap)
    ap.add_argument("--out", type=Path, default=DATA_DIR / out_name)
    return ap.parse_args(argv)


def save_fixture(fixture: dict, out: Path) -> None:
    """``torch.save`` the fixture to ``out`` (creating its directory) and print its size."""
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


def simple_main(doc: str, repo_help: str, out_name: str, make_fixture: Callable[[Path], dict], argv=None) -> None:
    """``main`` of a builder whose fixture needs only ``--official-repo``: parse, build, save."""
    args = parse_args(doc, repo_help, out_name, argv)
    save_fixture(make_fixture(args.official_repo), args.out)
