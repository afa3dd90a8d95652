"""Image decoding that keeps COCO's pixel grid.

COCO boxes refer to the pixels as stored in the file, so the EXIF orientation
tag is *not* applied by default (Pillow leaves it alone unless asked); with
``exif_orientation="apply"`` the image is turned as the tag says, as OpenCV's
``IMREAD_COLOR`` in mmdetection's loader does. Pillow and OpenCV decode
JPEGs to the same pixels (both libjpeg-turbo, tested). And
every colour model — grayscale, palette, CMYK, with or without alpha — is
converted to 8-bit RGB so that every detector sees three channels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gradlens.errors import InputFileError


EXIF_ORIENTATIONS = ("ignore", "apply")
ORIENTATION_TAG = 0x0112


def read_image(path: str | os.PathLike, exif_orientation: str = "ignore") -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array (stored pixel order unless told to apply EXIF)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if exif_orientation == "apply":
                img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Composite on black rather than letting convert() drop alpha inconsistently per mode.
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(background, img)
            rgb = img.convert("RGB")
    except FileNotFoundError:
        raise InputFileError(f"The image {path} does not exist.") from None
    except UnidentifiedImageError:
        raise InputFileError(f"The file {path} is not an image that can be decoded.") from None
    except OSError as exc:
        raise InputFileError(f"The image {path} cannot be decoded ({exc}).") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 to a ``(3, H, W)`` float tensor in [0, 1] — the space input gradients live in."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def exif_orientation_of(path: str | os.PathLike) -> int:
    """The EXIF orientation tag of an image file (1, the identity, when it has none or cannot be read)."""
    try:
        with Image.open(path) as img:
            value = img.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError):
        return 1
    return int(value) if isinstance(value, int) else 1


def count_exif_turned(paths, progress: bool | None = None) -> int:
    """How many of the image files carry an EXIF orientation other than the identity (read from headers only)."""
    from gradlens.progress import track

    return sum(exif_orientation_of(p) != 1 for p in track(list(paths), "reading EXIF orientation tags", progress, unit="image"))


def image_size(path: str | os.PathLike, exif_orientation: str = "ignore") -> tuple[int, int]:
    """(height, width) of the decoded image, from the file's header only (turned when EXIF is applied)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            turned = exif_orientation == "apply" and img.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)
    except FileNotFoundError:
        raise InputFileError(f"The image {path} does not exist.") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputFileError(f"The image {path} cannot be decoded ({exc}).") from None
    return (width, height) if turned else (height, width)
