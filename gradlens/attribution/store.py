"""On-disk store of gradient magnitude maps: one compressed file per image, written as computed.

Layout of a store folder::

    store.json          what made these maps (checkpoint hash, method, settings): the store's key
    <image_id>.npz      one map: values / max as float16 (or float32), the max, the shape,
                        and a fine histogram of the values (see gradlens.regions.histogram)

Why this shape:

- **resumable** — each map is renamed into place only when complete, so a
  killed run leaves whole maps only, and the next run computes just the
  missing ones;
- **small and faithful** — storing ``map / max`` in float16 keeps 11
  significant bits at every magnitude (relative error <= 2**-11 down to
  6e-5 of the map's max, absolute <= 3e-8 of the max below that), where raw
  float16 would flush typical gradient values (1e-6) to zero;
- **cheap summaries** — the max and the histogram sit in the same file as
  small arrays and are read without inflating the map, so the threshold grid
  (which needs the largest value over all maps) and approximate curves cost
  almost nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from gradlens._version import __version__
from gradlens.errors import GradlensError, InputFileError
from gradlens.fileio import atomic_path, write_json
from gradlens.regions.histogram import value_histogram

STORE_FORMAT = 1
STORE_FILE = "store.json"
MAP_DTYPES = ("float16", "float32")


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class MapSummary:
    image_id: int
    height: int
    width: int
    max: float
    hist_bins: np.ndarray
    hist_counts: np.ndarray

    def as_dict(self) -> dict:
        return {"image_id": self.image_id, "height": self.height, "width": self.width, "max": self.max,
                "hist_bins": self.hist_bins, "hist_counts": self.hist_counts}

    def __getitem__(self, name):  # so a summary can be used where a dict is expected
        return getattr(self, name)


class MapStore:
    """A folder of per-image maps made with one set of settings (``key``)."""

    def __init__(self, folder: str | os.PathLike, key: dict | None = None, map_dtype: str = "float16",
                 overwrite: bool = False, remedy: str = "choose another folder or pass --overwrite"):
        """Open (``key=None``: read only, the key on disk is used) or create a store.

        A folder holding maps made with another key is refused unless
        ``overwrite``, which deletes those maps first; ``remedy`` ends the
        refusal (what the calling command offers the user).
        """
        self.folder = Path(folder)
        if map_dtype not in MAP_DTYPES:
            raise GradlensError(f"Unknown map dtype {map_dtype!r}; use float16 or float32.")
        self.map_dtype = map_dtype
        meta_path = self.folder / STORE_FILE
        existing = None
        if meta_path.is_file():
            try:
                existing = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                existing = None
            if not isinstance(existing, dict) or existing.get("format") != STORE_FORMAT:
                existing = None
        if key is None:
            if existing is None:
                raise InputFileError(f"{self.folder} is not a gradlens map store (no readable {STORE_FILE}).")
            self.key = existing["key"]
            self.map_dtype = existing.get("map_dtype", map_dtype)
            return
        key = json.loads(json.dumps(key))  # as it reads back from disk
        if existing is not None and (existing.get("key") != key or existing.get("map_dtype") != map_dtype):
            if not overwrite:
                raise GradlensError(
                    f"{self.folder} holds maps made with other settings; {remedy}."
                )
            self.clear()
        elif existing is None and self.folder.is_dir() and any(self.folder.glob("*.npz")):
            if not overwrite:
                raise GradlensError(f"{self.folder} holds maps of unknown origin; {remedy}.")
            self.clear()
        self.key = key
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(meta_path, {"format": STORE_FORMAT, "gradlens_version": __version__, "map_dtype": map_dtype, "key": key})

    # -- contents --------------------------------------------------------------------------------

    def path(self, image_id: int) -> Path:
        return self.folder / f"{int(image_id)}.npz"

    def has(self, image_id: int) -> bool:
        return self.path(image_id).is_file()

    def image_ids(self) -> list[int]:
        ids = []
        for p in self.folder.glob("*.npz"):
            try:
                ids.append(int(p.stem))
            except ValueError:
                continue
        return sorted(ids)

    def clear(self) -> None:
        for p in self.folder.glob("*.npz"):
            p.unlink()
        (self.folder / STORE_FILE).unlink(missing_ok=True)

    # -- writing ---------------------------------------------------------------------------------

    def write(self, image_id: int, magnitude: Tensor | np.ndarray) -> MapSummary:
        """Store one ``[H, W]`` non-negative map atomically; returns its summary (of the stored values)."""
        m = torch.as_tensor(magnitude).detach().to("cpu", torch.float32)
        if m.ndim != 2:
            raise GradlensError(f"A gradient map must be 2-D; got shape {tuple(m.shape)}.")
        if not bool(torch.isfinite(m).all()):
            raise GradlensError(
                f"The gradient map of image {image_id} has NaN or infinite values (the loss or its gradient overflowed; "
                "with --precision fp16 use fp32, tf32 or bf16)."
            )
        peak = float(m.max()) if m.numel() else 0.0
        # torch's float16 conversion (vectorised; the same round-to-nearest-even as NumPy's, 5x faster)
        scaled_t = (m / peak if peak > 0 else m).to(getattr(torch, self.map_dtype))
        scaled = scaled_t.numpy()
        stored = scaled_t.float() * torch.tensor(peak if peak > 0 else 1.0, dtype=torch.float32)
        bins, counts = value_histogram(stored)
        summary = MapSummary(int(image_id), int(m.shape[0]), int(m.shape[1]), float(stored.max()) if m.numel() else 0.0,
                             bins, counts)
        arrays = {"scaled": scaled, "scale": np.float64(peak if peak > 0 else 1.0), "max": np.float64(summary.max),
                  "shape": np.array(m.shape, dtype=np.int64), "hist_bins": bins, "hist_counts": counts,
                  "key": np.array(key_digest(self.key))}  # so a map file moved in from another store is recognised
        with atomic_path(self.path(image_id)) as tmp:
            # an .npz (NumPy reads it with np.load) deflated at level 1: 3-4x faster to write than
            # np.savez_compressed's level 6, for a few percent more bytes on noisy gradient maps
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
                for name, value in arrays.items():
                    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
        return summary

    # -- reading ---------------------------------------------------------------------------------

    def _open(self, image_id: int):
        path = self.path(image_id)
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise InputFileError(f"{self.folder} has no map for image {image_id}.") from None
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise InputFileError(f"The map file {path} is damaged ({exc}); delete it to have it computed again.") from None

    def read(self, image_id: int) -> np.ndarray:
        """The map as float32 ``[H, W]`` (as stored: float16 maps carry <= 2**-11 relative error)."""
        with self._open(image_id) as data:
            try:
                return data["scaled"].astype(np.float32) * np.float32(data["scale"])
            except (KeyError, ValueError, zipfile.BadZipFile, OSError) as exc:
                raise InputFileError(f"The map file {self.path(image_id)} is damaged ({exc}).") from None

    def read_codes(self, image_id: int) -> tuple[np.ndarray, np.float32]:
        """A float16 map's raw 16-bit codes and its scale: ``read() == codes.view(float16) * scale``.

        There are only 65,536 codes, so per-threshold counts can be had from a
        histogram of codes (see :func:`gradlens.regions.area.area_curve_from_store`).
        """
        if self.map_dtype != "float16":
            raise GradlensError("Only float16 map stores have 16-bit codes.")
        with self._open(image_id) as data:
            try:
                return data["scaled"].view(np.uint16), np.float32(data["scale"])
            except (KeyError, ValueError, zipfile.BadZipFile, OSError) as exc:
                raise InputFileError(f"The map file {self.path(image_id)} is damaged ({exc}).") from None

    def summary(self, image_id: int) -> MapSummary:
        """Max, shape and histogram of one map, without inflating the map itself."""
        with self._open(image_id) as data:
            try:
                h, w = (int(v) for v in data["shape"])
                return MapSummary(int(image_id), h, w, float(data["max"]), data["hist_bins"], data["hist_counts"])
            except (KeyError, ValueError, zipfile.BadZipFile, OSError) as exc:
                raise InputFileError(f"The map file {self.path(image_id)} is damaged ({exc}).") from None

    def maps(self, image_ids) -> Iterator[np.ndarray]:
        """Maps one at a time (memory stays at one map whatever the number of images)."""
        for i in image_ids:
            yield self.read(i)

    def summaries(self, image_ids) -> Iterator[MapSummary]:
        for i in image_ids:
            yield self.summary(i)

    def problem(self, image_id: int, shape: tuple[int, int] | None = None) -> str | None:
        """Why the stored map of ``image_id`` cannot be used (None if it can): damaged, made with other
        settings (another store's file), or of another shape than its image (``shape`` = (h, w))."""
        try:
            with np.load(self.path(image_id), allow_pickle=False) as data:
                stored = tuple(int(v) for v in data["shape"])
                scaled = data["scaled"]
                if tuple(scaled.shape) != stored or scaled.dtype != np.dtype(self.map_dtype):
                    return "damaged"
                if "key" in data.files and str(data["key"]) != key_digest(self.key):
                    return "made with other settings"
                float(data["scale"]), float(data["max"])
        except FileNotFoundError:
            return "missing"
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
            return "damaged"
        if shape is not None and stored != tuple(shape):
            return f"of shape {stored[0]}x{stored[1]}, not its image's {shape[0]}x{shape[1]}"
        return None

    def missing(self, image_ids) -> list[int]:
        return [int(i) for i in image_ids if not self.has(i)]
