"""Which pixels a deletion or insertion step changes, and what it puts there.

A *deletion* at fraction q replaces the top q of the pixels (ranked by the model's own map, or in a
seeded random order) with a *fill*; an *insertion* starts from the filled image and restores the top q.
Images are the detector's own input, 8-bit RGB (``[3, H, W]`` uint8, as decoded from the JPEG): a fill
is rounded to 8 bits like every image the detector reads, so an unperturbed image is exactly the one
``score`` ran on.

- **Ranking** (:func:`map_order`): pixels by magnitude, largest first; equal magnitudes in row-major
  order, top-left first (a stable sort). The stored float16 maps tie often, so the rule matters.
- **Count** (:func:`pixel_count`): the top q of n pixels is ``floor(q n + 1/2)`` pixels.
- **Random order** (:func:`random_order`): a permutation drawn from NumPy's PCG64 seeded with
  ``(seed, image id)``: the same for every model of an image, so the baseline is paired.
- **Fills** (:func:`fill_image`): ``mean``, the detector's normalisation mean (what the network sees as
  zero after normalisation, up to the 8-bit rounding); ``blur``, a Gaussian blur of the image with
  sigma 2 % of its longer side, kernel +-3 sigma, reflected at the borders (on an image narrower than
  the kernel, the kernel is cut to it; under 3 pixels there is no blur); ``noise``, uniform 8-bit noise
  from PCG64 seeded with ``(seed, image id, 1)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

FILLS = ("mean", "blur", "noise")
MODES = ("deletion", "insertion")
ORDERS = ("map", "random")
DEFAULT_FRACTIONS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
BLUR_SIGMA = 0.02  # of the image's longer side


def check_fractions(fractions) -> tuple[float, ...]:
    """The q grid: distinct numbers in [0, 1], ascending, starting at 0 (the image itself), or one sentence."""
    try:
        q = tuple(float(v) for v in fractions)
    except (TypeError, ValueError):
        raise ValueError("The fractions must be numbers in [0, 1].") from None
    if not q or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in q):
        raise ValueError("The fractions must be numbers in [0, 1].")
    if list(q) != sorted(set(q)):
        raise ValueError("The fractions must be distinct and in ascending order.")
    if q[0] != 0.0 or len(q) < 2:
        raise ValueError("The fractions must start at 0 (the image itself) and hold at least one more.")
    return q


def check_fill(fill: str) -> str:
    if fill not in FILLS:
        raise ValueError(f"Unknown fill {fill!r}; use one of {', '.join(FILLS)}.")
    return fill


def pixel_count(q: float, pixels: int) -> int:
    """How many pixels the top ``q`` of ``pixels`` is: ``floor(q * pixels + 1/2)``."""
    return min(int(pixels), int(math.floor(float(q) * int(pixels) + 0.5)))


def map_order(magnitude) -> np.ndarray:
    """Row-major pixel indices, largest magnitude first, equal magnitudes top-left first.

    ``magnitude`` is a ``[H, W]`` map: float values, or a float16 store's raw uint16 codes (non-negative
    float16 values sort as their codes do, so the order is the map's own, without decoding it).
    """
    m = np.asarray(magnitude)
    flat = m.reshape(-1)
    if flat.dtype == np.uint16:
        key = np.uint16(0xFFFF) - flat  # descending codes, as an ascending key (no overflow)
    else:
        key = -flat.astype(np.float64)
    return np.argsort(key, kind="stable")


def random_order(pixels: int, seed: int, image_id: int) -> np.ndarray:
    """A permutation of ``range(pixels)`` from ``(seed, image id)``: reproducible, shared by every model."""
    rng = np.random.default_rng([int(seed) % 2**64, int(image_id) % 2**64])
    return rng.permutation(int(pixels))


def ranks(order: np.ndarray) -> np.ndarray:
    """``ranks[pixel]`` = the pixel's position in ``order`` (0: removed or restored first)."""
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.arange(len(order), dtype=np.int64)
    return out


def fill_image(image: torch.Tensor, fill: str, mean, seed: int = 0, image_id: int = 0) -> torch.Tensor:
    """What replaces the deleted pixels of ``image`` (``[3, H, W]`` uint8): the same shape and dtype."""
    check_fill(fill)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError("An image to perturb is a [3, H, W] uint8 tensor.")
    _, h, w = image.shape
    if fill == "mean":
        value = torch.tensor([round(float(v) * 255.0) for v in mean], dtype=torch.uint8, device=image.device)
        return value.view(3, 1, 1).expand(3, h, w).clone()
    if fill == "noise":
        rng = np.random.default_rng([int(seed) % 2**64, int(image_id) % 2**64, 1])
        return torch.from_numpy(rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)).to(image.device)
    from torchvision.transforms.v2.functional import gaussian_blur

    sigma = BLUR_SIGMA * max(h, w)
    size = 2 * math.ceil(3 * sigma) + 1
    size = min(size, 2 * ((min(h, w) - 1) // 2) + 1)  # reflection needs a kernel narrower than the image
    if size < 3:
        return image.clone()
    return gaussian_blur(image, [size, size], [sigma, sigma])


def perturbed(image: torch.Tensor, filled: torch.Tensor, pixel_ranks: np.ndarray, q: float, mode: str) -> torch.Tensor:
    """The ``mode`` image at fraction ``q``: ``deletion`` puts ``filled`` on the top-q pixels of ``pixel_ranks``,
    ``insertion`` puts ``image`` there on the filled image."""
    _, h, w = image.shape
    k = pixel_count(q, h * w)
    top = torch.from_numpy(pixel_ranks.reshape(h, w) < k).to(image.device)
    if mode == "deletion":
        return torch.where(top, filled, image)
    if mode == "insertion":
        return torch.where(top, image, filled)
    raise ValueError(f"Unknown mode {mode!r}; use deletion or insertion.")
