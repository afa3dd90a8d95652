"""Image decoding that keeps COCO's pixel grid.

COCO boxes refer to the pixels as stored in the file, so the EXIF orientation
tag is deliberately *not* applied (Pillow leaves it alone unless asked), and
every colour model — grayscale, palette, CMYK, with or without alpha — is
converted to 8-bit RGB so that every detector sees three channels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from gradlens.errors import InputFileError


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array in stored pixel order."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
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
