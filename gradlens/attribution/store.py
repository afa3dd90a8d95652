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
from gradlens.fileio import atomic_path, short_repr, write_json
from gradlens.regions.histogram import NUM_BINS, SHIFT, value_histogram

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
    loss: float = float("nan")  # the loss the map is the gradient of (NaN: not recorded, as in older stores)

    def as_dict(self) -> dict:
        return {"image_id": self.image_id, "height": self.height, "width": self.width, "max": self.max,
                "hist_bins": self.hist_bins, "hist_counts": self.hist_counts, "loss": self.loss}

    def __getitem__(self, name):  # so a summary can be used where a dict is expected
        return getattr(self, name)


# -- checks of stored values -------------------------------------------------------------------------
#
# A map is stored as ``map / max`` (values in [0, 1]) and a scale. Seen as unsigned integers, the stored
# values of a magnitude map are at most the code of 1.0: infinities, NaNs and anything with the sign bit
# (negative numbers, -0.0, which no map written here holds) are all above it. So one ``max`` over the
# codes checks a whole map; only a map that fails it is looked at again, to say why.
_CODES = {np.dtype(np.float16): (np.uint16, 0x3C00, 0x7C00, 0x8000), np.dtype(np.float32): (np.uint32, 0x3F800000, 0x7F800000, 0x80000000)}
# every float16 code as the float32 value it stands for (what MapStore.read computes before scaling)
_FLOAT16_VALUES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _values_problem(scaled: np.ndarray) -> str | None:
    """Why stored ``map / max`` values cannot be a magnitude map (None: they can)."""
    if scaled.dtype not in _CODES:
        return "damaged (values of another type)"
    if scaled.size == 0:
        return None
    unsigned, one, infinity, sign = _CODES[scaled.dtype]
    codes = scaled.view(unsigned)
    if codes.max() <= one:  # the usual case: one reduction
        return None
    odd = codes[codes > one]
    if np.any((odd & (sign - 1)) >= infinity):
        return "damaged (NaN or infinite values)"
    if np.any(odd >= sign):
        return "damaged (negative values)"
    return "damaged (values above its scale)"


def _scalar(data, name: str) -> np.float64:
    """One number of a map file (a ValueError, reported as damage, for anything else)."""
    value = data[name]
    if value.shape != () or value.dtype.kind not in "iuf":
        raise ValueError(f"its {name} is not one number")
    return np.float64(value)


def _loss(data) -> float:
    """The recorded loss of a map file: NaN when absent (stores written before gradlens recorded it)."""
    if "loss" not in data.files:
        return float("nan")
    loss = float(_scalar(data, "loss"))
    if not (np.isnan(loss) or (np.isfinite(loss) and loss >= 0)):
        raise ValueError("its loss is not a non-negative number")
    return loss


def _scale_problem(scale) -> str | None:
    """The scale is the map's max, a positive float32 (an all-zero map's is 1), or the map is damaged."""
    if not (0 < scale <= np.finfo(np.float32).max and float(np.float32(scale)) == scale):
        return "damaged (its scale is not a positive float32 number)"
    return None


def _summary_problem(shape, maximum, scale, bins, counts) -> str | None:
    """Why a map's recorded shape, max and histogram cannot describe one map (without reading the map)."""
    shape = np.asarray(shape)
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or np.any(shape < 0):
        return "damaged (its shape is not two sizes)"
    if not (np.isfinite(maximum) and 0 <= maximum <= scale):
        return "damaged (its maximum is not a finite number between 0 and its scale)"
    bins, counts = np.asarray(bins), np.asarray(counts)
    if (bins.ndim != 1 or counts.shape != bins.shape or bins.dtype.kind not in "iu" or counts.dtype.kind not in "iu"):
        return "damaged (a histogram that is not bins and their counts)"
    if len(bins) and (bins.min() < 0 or bins.max() >= NUM_BINS or np.any(np.diff(bins.astype(np.int64)) <= 0)):
        return "damaged (histogram bins out of order or range)"
    if len(counts) and counts.min() <= 0:
        return "damaged (a histogram with counts that are not positive)"
    if int(counts.sum(dtype=np.int64)) != int(shape[0]) * int(shape[1]):
        return "damaged (a histogram that does not count its pixels)"
    if maximum > 0 and int(np.float32(maximum).view(np.int32)) >> SHIFT != int(bins[-1]):
        return "damaged (a histogram that does not end at its maximum)"
    return None


def _histogram_problem(scaled: np.ndarray, scale, maximum, bins, counts) -> str | None:
    """Whether the recorded max and histogram are exactly those of the stored values (as :meth:`MapStore.write`
    made them: of ``scaled * float32(scale)`` in float32)."""
    if scaled.size == 0:
        return None if len(bins) == 0 and maximum == 0 else "damaged (a summary of pixels it does not have)"
    if scaled.dtype == np.float16:  # from the histogram of the codes: the stored values are sorted by code
        per_code = np.bincount(scaled.view(np.uint16).reshape(-1))  # codes <= 1.0's (checked before)
        used = np.flatnonzero(per_code)
        values = _FLOAT16_VALUES[used] * np.float32(scale)  # ascending: the codes of [0, 1] are
        value_bins = values.view(np.int32) >> SHIFT
        starts = np.flatnonzero(np.diff(value_bins, prepend=-1))
        mine_bins, mine_counts = value_bins[starts], np.add.reduceat(per_code[used], starts)
        top = values[-1]
    else:
        values = scaled.astype(np.float32) * np.float32(scale)
        per_bin = np.bincount((values.view(np.int32) >> SHIFT).reshape(-1), minlength=NUM_BINS)
        mine_bins = np.flatnonzero(per_bin)
        mine_counts, top = per_bin[mine_bins], values.max()
    if float(top) != float(maximum):
        return "damaged (its recorded maximum is not its values')"
    if not (np.array_equal(mine_bins, np.asarray(bins, dtype=np.int64)) and np.array_equal(mine_counts, counts)):
        return "damaged (a histogram that does not match its values)"
    return None


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
            if not isinstance(existing.get("key"), dict):
                raise InputFileError(f"{meta_path} records no settings key (an object); it is not a gradlens map store.")
            if existing.get("map_dtype", map_dtype) not in MAP_DTYPES:
                raise InputFileError(f"{meta_path} records the map dtype {short_repr(existing.get('map_dtype'))}, "
                                     "not float16 or float32.")
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

    def write(self, image_id: int, magnitude: Tensor | np.ndarray, loss: float = float("nan")) -> MapSummary:
        """Store one ``[H, W]`` non-negative map atomically, with the loss it is the gradient of (NaN: unknown);
        returns its summary (of the stored values). The loss is the map's scale's cause: the selection picks
        images where A's loss is lower, and with it A's gradients."""
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
        loss = float(loss)
        if not (np.isnan(loss) or (np.isfinite(loss) and loss >= 0)):
            raise GradlensError(f"The loss of image {image_id}'s map is {loss}; a total detection loss is a non-negative number.")
        summary = MapSummary(int(image_id), int(m.shape[0]), int(m.shape[1]), float(stored.max()) if m.numel() else 0.0,
                             bins, counts, loss)
        arrays = {"scaled": scaled, "scale": np.float64(peak if peak > 0 else 1.0), "max": np.float64(summary.max),
                  "shape": np.array(m.shape, dtype=np.int64), "hist_bins": bins, "hist_counts": counts, "loss": np.float64(loss),
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
    #
    # A map file is data anyone can edit or send: every read checks that it is this store's (its key)
    # and that its values can be a magnitude map (finite, non-negative, at most its scale), in one
    # reduction over the stored codes; ``problem`` (run on every stored map before a command uses it)
    # also checks the max and the histogram against the values, exactly.

    def _open(self, image_id: int):
        path = self.path(image_id)
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise InputFileError(f"{self.folder} has no map for image {image_id}.") from None
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise InputFileError(f"The map file {path} is damaged ({exc}); delete it to have it computed again.") from None

    def _key_problem(self, data) -> str | None:
        if "key" not in data.files:
            return "without a store key (a map of unknown origin)"
        if str(data["key"]) != key_digest(self.key):
            return "made with other settings"
        return None

    def _refuse(self, image_id: int, problem: str) -> None:
        raise InputFileError(f"The map file {self.path(image_id)} is {problem}; delete it to have it computed again.")

    def _checked_scaled(self, image_id: int, data) -> tuple[np.ndarray, np.float32]:
        """The stored ``map / max`` values and their scale, or one sentence naming the file."""
        problem = self._key_problem(data)
        scaled, scale = data["scaled"], _scalar(data, "scale")
        if problem is None and (scaled.ndim != 2 or scaled.dtype != np.dtype(self.map_dtype)):
            problem = "damaged (not a 2-D map of this store's dtype)"
        problem = problem or _scale_problem(scale) or _values_problem(scaled)
        if problem is not None:
            self._refuse(image_id, problem)
        return scaled, np.float32(scale)

    def read(self, image_id: int) -> np.ndarray:
        """The map as float32 ``[H, W]`` (as stored: float16 maps carry <= 2**-11 relative error)."""
        with self._open(image_id) as data:
            try:
                scaled, scale = self._checked_scaled(image_id, data)
                return scaled.astype(np.float32) * scale
            except (KeyError, ValueError, TypeError, zipfile.BadZipFile, OSError, EOFError) as exc:
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
                scaled, scale = self._checked_scaled(image_id, data)
                return scaled.view(np.uint16), scale
            except (KeyError, ValueError, TypeError, zipfile.BadZipFile, OSError, EOFError) as exc:
                raise InputFileError(f"The map file {self.path(image_id)} is damaged ({exc}).") from None

    def loss(self, image_id: int) -> float:
        """The loss the stored map is the gradient of (NaN where it was not recorded), without inflating the map."""
        with self._open(image_id) as data:
            try:
                problem = self._key_problem(data)
                if problem is not None:
                    self._refuse(image_id, problem)
                return _loss(data)
            except (KeyError, ValueError, TypeError, zipfile.BadZipFile, OSError, EOFError) as exc:
                raise InputFileError(f"The map file {self.path(image_id)} is damaged ({exc}).") from None

    def summary(self, image_id: int) -> MapSummary:
        """Max, shape and histogram of one map, without inflating the map itself (checked against each other)."""
        with self._open(image_id) as data:
            try:
                problem = self._key_problem(data)
                shape, bins, counts = data["shape"], data["hist_bins"], data["hist_counts"]
                maximum, scale = _scalar(data, "max"), _scalar(data, "scale")
                problem = problem or _scale_problem(scale) or _summary_problem(shape, maximum, scale, bins, counts)
                if problem is not None:
                    self._refuse(image_id, problem)
                h, w = (int(v) for v in shape)
                return MapSummary(int(image_id), h, w, float(maximum), bins, counts, _loss(data))
            except (KeyError, ValueError, TypeError, zipfile.BadZipFile, OSError, EOFError) as exc:
                raise InputFileError(f"The map file {self.path(image_id)} is damaged ({exc}).") from None

    def maps(self, image_ids) -> Iterator[np.ndarray]:
        """Maps one at a time (memory stays at one map whatever the number of images)."""
        for i in image_ids:
            yield self.read(i)

    def summaries(self, image_ids) -> Iterator[MapSummary]:
        for i in image_ids:
            yield self.summary(i)

    def problem(self, image_id: int, shape: tuple[int, int] | None = None) -> str | None:
        """Why the stored map of ``image_id`` cannot be used (None if it can): missing, damaged (unreadable, NaN,
        infinite or negative values, a max or histogram that does not match them), made with other settings (another
        store's file, or one without a store key), or of another shape than its image (``shape`` = (h, w))."""
        try:
            with np.load(self.path(image_id), allow_pickle=False) as data:
                problem = self._key_problem(data)
                if problem is not None:
                    return problem
                stored = tuple(int(v) for v in data["shape"])
                scaled = data["scaled"]
                if tuple(scaled.shape) != stored or scaled.dtype != np.dtype(self.map_dtype):
                    return "damaged"
                scale, maximum = _scalar(data, "scale"), _scalar(data, "max")
                bins, counts = data["hist_bins"], data["hist_counts"]
                _loss(data)
        except FileNotFoundError:
            return "missing"
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
            return "damaged"
        problem = (_scale_problem(scale) or _summary_problem(stored, maximum, scale, bins, counts)
                   or _values_problem(scaled) or _histogram_problem(scaled, scale, maximum, bins, counts))
        if problem is not None:
            return problem
        if shape is not None and stored != tuple(shape):
            return f"of shape {stored[0]}x{stored[1]}, not its image's {shape[0]}x{shape[1]}"
        return None

    def missing(self, image_ids) -> list[int]:
        return [int(i) for i in image_ids if not self.has(i)]
