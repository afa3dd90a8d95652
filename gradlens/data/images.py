"""Image decoding that keeps COCO's pixel grid.

COCO boxes refer to the pixels as stored in the file, so the EXIF orientation
tag is *not* applied by default (Pillow leaves it alone unless asked); with
``exif_orientation="apply"`` the image is turned as the tag says, as OpenCV's
``IMREAD_COLOR`` in mmdetection's loader does. The tag is read by one function,
:func:`orientation_value`, for decoding, for image sizes and for the count
``score`` reports, so every step sees the same orientation. Pillow and OpenCV decode
JPEGs to the same pixels (both libjpeg-turbo, tested). And
every colour model — grayscale, palette, CMYK, with or without alpha — is
converted to 8-bit RGB so that every detector sees three channels.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from gradlens.errors import InputFileError


EXIF_ORIENTATIONS = ("ignore", "apply")
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transposition that shows the image upright (Pillow's ImageOps.exif_transpose table).
_TRANSPOSITIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
DEFAULT_MAX_PIXELS = 100_000_000  # 10000 x 10000; COCO's largest image has 0.4 million
ENV_MAX_PIXELS = "GRADLENS_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    """The largest image (in pixels) gradlens decodes: ``$GRADLENS_MAX_IMAGE_PIXELS``, else 100 million.

    A small file can claim a huge size (a "decompression bomb"); decoding it would
    exhaust memory in every loader worker, so such images are refused first.
    """
    raw = os.environ.get(ENV_MAX_PIXELS)
    if raw is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        raise InputFileError(f"{ENV_MAX_PIXELS} is {raw!r}; set it to a whole number of pixels.") from None
    if value < 1:
        raise InputFileError(f"{ENV_MAX_PIXELS} is {value}; it must be positive.")
    if Image.MAX_IMAGE_PIXELS is not None and value > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = value  # the user's explicit choice also lifts Pillow's own bomb check
    return value


def _check_size(img: Image.Image, path: Path) -> None:
    width, height = img.size
    limit = max_image_pixels()
    if width * height > limit:
        raise InputFileError(
            f"The image {path} is {width} x {height} pixels, more than the {limit:,} gradlens decodes "
            f"(set {ENV_MAX_PIXELS} to allow it)."
        )


def orientation_value(value) -> int:
    """The EXIF orientation (1 to 8) that a stored orientation tag value means; 1, the identity, for any other.

    The standard stores the tag as one whole number (SHORT). A file may store it otherwise; gradlens reads
    every kind the same way in every step (decoding, image sizes, the count ``score`` reports): a whole
    number from 1 to 8 is that orientation however it is stored (6, 6.0, the rational 12/2); anything
    else (6.5, 0, 9, NaN, a division by zero, text, several values) is 1, and the image is used as stored.
    """
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        return 1  # IFDRational is a numbers.Rational; text and tuples are not orientations
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return 1
    return int(number) if number.is_integer() and 1 <= number <= 8 else 1


def _orientation(img: Image.Image) -> int:
    """The orientation an opened image's EXIF tag means (1 when it has none or its EXIF cannot be read)."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError, IndexError, struct.error):
        return 1
    return orientation_value(value)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """The image file opened (header only) and checked against the pixel limit; every failure one sentence."""
    try:
        with Image.open(path) as img:
            _check_size(img, path)
            yield img
    except FileNotFoundError:
        raise InputFileError(f"The image {path} does not exist.") from None
    except Image.DecompressionBombError:
        raise InputFileError(f"The image {path} claims more pixels than Pillow decodes safely "
                             f"(set {ENV_MAX_PIXELS} to allow it).") from None
    except UnidentifiedImageError:
        raise InputFileError(f"The file {path} is not an image that can be decoded.") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputFileError(f"The image {path} cannot be decoded ({exc}).") from None


def read_image(path: str | os.PathLike, exif_orientation: str = "ignore") -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array (stored pixel order unless told to apply EXIF)."""
    path = Path(path)
    with _opened(path) as img:
        img.load()
        turn = _TRANSPOSITIONS.get(_orientation(img)) if exif_orientation == "apply" else None
        if turn is not None:
            img = img.transpose(turn)
        if img.mode.startswith("I;16"):
            # 16-bit grayscale: the high byte, as OpenCV's 8-bit read (what mmcv's pipeline sees) keeps it;
            # Pillow's convert("RGB") would clip every value above 255 to white
            grey = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2).copy()
        if img.mode in ("I", "F"):
            raise InputFileError(f"The image {path} holds {'32-bit integer' if img.mode == 'I' else 'floating-point'} "
                                 "pixels; detectors read 8-bit (or 16-bit) images.")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Composite on black rather than letting convert() drop alpha inconsistently per mode.
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8).copy()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 to a ``(3, H, W)`` float tensor in [0, 1] — the space input gradients live in."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def exif_orientation_of(path: str | os.PathLike) -> int:
    """The EXIF orientation of an image file, read by :func:`orientation_value` (1, the identity, when it has
    none, an unusable value, or cannot be read)."""
    try:
        with Image.open(path) as img:
            return _orientation(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 1


def count_exif_turned(paths, progress: bool | None = None) -> int:
    """How many of the image files carry an EXIF orientation other than the identity (read from headers only;
    ``None`` entries, images that cannot be located, count as not turned)."""
    from gradlens.progress import track

    return sum(p is not None and exif_orientation_of(p) != 1
               for p in track(list(paths), "reading EXIF orientation tags", progress, unit="image"))


def image_size(path: str | os.PathLike, exif_orientation: str = "ignore") -> tuple[int, int]:
    """(height, width) of the decoded image, from the file's header only (turned when EXIF is applied)."""
    path = Path(path)
    with _opened(path) as img:
        width, height = img.size
        turned = exif_orientation == "apply" and _orientation(img) in (5, 6, 7, 8)
    return (width, height) if turned else (height, width)
