"""Reading the backbone fixtures' key lists (written by ``scripts/make_*_reference.py``)."""

from __future__ import annotations

import zlib

import torch


def decode_keys(blob: bytes) -> list[tuple[str, tuple[int, ...]]]:
    """The fixture's compressed ``key<TAB>d0,d1,...`` lines as (key, shape) pairs."""
    out = []
    for line in zlib.decompress(blob).decode().splitlines():
        key, shape = line.split("\t")
        out.append((key, tuple(int(d) for d in shape.split(",")) if shape else ()))
    return out


def key_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """A model's state dict as (key, shape) pairs, in order."""
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
