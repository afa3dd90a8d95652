"""Input attributions of the total detection loss, computed exactly per image and in batches.

The paper's map is the plain gradient of an image's total detection loss
w.r.t. its RGB pixels in [0, 1] at original resolution (DESIGN: input
gradient map). gradlens computes it, and three other attributions, through
captum on a *forward function that returns one loss per image*:

- ``gradient`` (captum ``Saliency`` with ``abs=False``) — the paper's;
- ``input_x_gradient`` (captum ``InputXGradient``);
- ``integrated_gradients`` (captum ``IntegratedGradients``; baseline black,
  white, the detector's normalisation mean, or a blurred copy);
- ``smoothgrad`` — the mean gradient over noisy copies. Not captum's
  ``NoiseTunnel``: that draws one noise tensor for the whole batch, so an
  image's map would depend on its batch mates; here every image draws its
  noise from its own generator, seeded by the seed and the image's content.

Why it is fast, and still exact:

- parameters are frozen for the call (no weight gradient is computed or
  stored), and every module is in inference mode (normalisation statistics,
  no dropout or drop-path) — and both are restored afterwards;
- images are batched only with images padded to the same canvas, so the
  batch gives each image precisely the loss it has alone; the gradient of
  the *sum* of independent per-image losses w.r.t. each image is then that
  image's own gradient (checked against one-image calls in the tests);
- resize and normalisation are part of the graph (``detector.prepare``), so
  the gradient lands on the original pixel grid.
"""

from __future__ import annotations

import contextlib
import math
import os
import hashlib
import zlib
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gradlens.errors import GradlensError
from gradlens.inference import InferenceSettings
from gradlens.precision import PRECISIONS, PrecisionScope
from gradlens.models.interface import Detector, total_loss
from gradlens.models.preprocessing.transform import canvas_groups

METHODS = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad")
BASELINES = ("black", "white", "mean", "blur")
CHANNEL_REDUCTIONS = ("max", "l1", "l2")
TARGETS = ("total", "object")  # the image's total loss, or one map per ground-truth object (its part of that loss)
BLUR_SIGMA = 8.0  # pixels of the original image, for the 'blur' baseline


MAX_COPIES = 100_000  # integration steps or noisy samples per image


@dataclass(frozen=True)
class AttributionConfig:
    """Which attribution, how it is reduced to one value per pixel, and its method's knobs."""

    method: str = "gradient"
    channel_reduce: str = "max"
    steps: int = 32  # integrated gradients: points on the path (Gauss-Legendre, captum's default rule)
    baseline: str = "black"  # integrated gradients: black | white | mean | blur
    samples: int = 16  # smoothgrad: noisy copies per image
    noise: float = 0.15  # smoothgrad: noise standard deviation, in units of the [0, 1] pixel range
    seed: int = 0  # smoothgrad
    precision: str = "fp32"
    target: str = "total"

    def check(self, device: torch.device | None = None) -> "AttributionConfig":
        if self.method not in METHODS:
            raise GradlensError(f"Unknown attribution method {self.method!r}; use one of {', '.join(METHODS)}.")
        if self.channel_reduce not in CHANNEL_REDUCTIONS:
            raise GradlensError(f"Unknown channel reduction {self.channel_reduce!r}; use one of {', '.join(CHANNEL_REDUCTIONS)}.")
        if self.target not in TARGETS:
            raise GradlensError(f"Unknown attribution target {self.target!r}; use one of {', '.join(TARGETS)}.")
        if self.baseline not in BASELINES:
            raise GradlensError(f"Unknown baseline {self.baseline!r}; use one of {', '.join(BASELINES)}.")
        if self.steps < 1 or self.samples < 1:
            raise GradlensError("--steps and --samples must be at least 1.")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise GradlensError("--noise must be a finite, non-negative number.")
        if self.steps > MAX_COPIES or self.samples > MAX_COPIES:
            raise GradlensError(f"--steps and --samples can be at most {MAX_COPIES:,} (each is a full gradient pass).")
        if device is not None:
            InferenceSettings(precision=self.precision).check(device)
        elif self.precision not in PRECISIONS:
            raise GradlensError(f"Unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}.")
        return self

    def to_dict(self) -> dict:
        """The settings that change this method's maps (others are left out, so they do not split caches)."""
        d = asdict(self)
        if self.method != "integrated_gradients":
            d.pop("steps"), d.pop("baseline")
        if self.method != "smoothgrad":
            d.pop("samples"), d.pop("noise"), d.pop("seed")
        if self.target == "total":  # the paper's maps: stores made before targets existed keep their key
            d.pop("target")
        return d


def reduce_channels(attribution: Tensor, how: str = "max") -> Tensor:
    """One value per pixel from ``[..., 3, H, W]``: max |a| over channels (DESIGN's), or the L1 / L2 norm."""
    if how == "max":
        return attribution.abs().amax(dim=-3)
    if how == "l1":
        return attribution.abs().sum(dim=-3)
    if how == "l2":
        return torch.linalg.vector_norm(attribution, ord=2, dim=-3)
    raise GradlensError(f"Unknown channel reduction {how!r}; use one of {', '.join(CHANNEL_REDUCTIONS)}.")


# -------------------------------------------------------------------------------------------------
# the forward function captum differentiates


def _require_finite(losses: Tensor, what: str, box: str) -> None:
    """A silent inf would still give a finite, meaningless map: one sentence instead."""
    if not bool(torch.isfinite(losses).all()):
        raise GradlensError(
            f"{what} is not finite: {box} has no area inside the image as decoded (with --exif-orientation apply, the "
            "annotations must describe the turned images), or the loss overflowed (with --precision fp16, use fp32, "
            "tf32 or bf16)."
        )


class TotalLoss:
    """captum forward function over a group of images that share one padded canvas.

    Called with one tensor per image, each ``[S, 3, H_k, W_k]`` (S copies: 1 for
    a plain gradient, integration steps or noisy samples otherwise); returns
    ``[S]``: for each copy index, the sum over images of their own total loss
    (focal classification + L1 box regression, DESIGN: total detection loss).
    """

    def __init__(self, detector: Detector, targets: Sequence[dict], precision: str = "fp32"):
        self.detector = detector
        self.targets = list(targets)
        self.precision = precision
        self.device = next(detector.parameters()).device
        self.first: list[float] | None = None  # each image's loss in the first call (the map's own loss for gradients)

    def __call__(self, *inputs: Tensor) -> Tensor:
        copies = inputs[0].shape[0]
        images = [inp[s] for s in range(copies) for inp in inputs]
        with PrecisionScope(self.precision, self.device):
            losses = self.detector.image_losses(images, self.targets * copies)
        total = total_loss(self.detector, losses, torch.float32)
        _require_finite(total, "The total detection loss of an image", "a ground-truth box")
        if self.first is None and copies == 1:
            self.first = [float(v) for v in total.detach().double().cpu()]
        return total.view(copies, len(inputs)).sum(dim=1)


@contextlib.contextmanager
def frozen_inference_mode(detector: torch.nn.Module) -> Iterator[None]:
    """Eval mode for every submodule and no parameter requiring grad, restored on exit.

    Inference mode (not just the top-level flag) is what DESIGN asks of the
    loss: batch-norm running statistics, no dropout, no stochastic depth.
    Freezing the parameters makes autograd skip every weight gradient.
    """
    modes = [(m, m.training) for m in detector.modules()]
    frozen = [p for p in detector.parameters() if p.requires_grad]
    detector.eval()
    for p in frozen:
        p.requires_grad_(False)
    # cuDNN's fastest backward kernels may add in a varying order (atomics): deterministic ones keep a map
    # bit-identical from run to run, so a resumed run matches an uninterrupted one on a GPU too. gradlens's own
    # operations are deterministic by construction (the resize's and CEDNet's upsampling's backward); PyTorch's
    # deterministic mode stays on as a safety net (it warns, never fails, on an op without such a kernel).
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, cudnn_benchmark()
    if torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
        if torch.cuda.is_available():
            torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        for p in frozen:
            p.requires_grad_(True)
        for m, mode in modes:
            m.training = mode


def cudnn_benchmark() -> bool:
    """``GRADLENS_CUDNN_BENCHMARK=1``: let cuDNN time its deterministic algorithms and keep the fastest.

    Off by default: the choice is made per process by timing, so two runs may pick different (each
    deterministic) algorithms and differ in the last bits, which a resumed map store must not.
    """
    raw = os.environ.get("GRADLENS_CUDNN_BENCHMARK", "0").strip().lower()
    if raw in ("0", "", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise GradlensError(f"GRADLENS_CUDNN_BENCHMARK is {raw!r}; set it to 1 or 0 (or unset it).")


def _generator_for(image: Tensor, seed: int) -> torch.Generator:
    """A generator seeded by the seed and the image's bytes: same image, same noise, whatever its batch."""
    data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.sha256(f"{int(seed)}:{zlib.crc32(data)}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def _baseline(image: Tensor, kind: str, mean: Sequence[float]) -> Tensor:
    if kind == "black":
        return torch.zeros_like(image)
    if kind == "white":
        return torch.ones_like(image)
    if kind == "mean":  # the detector's normalisation mean: zero after normalisation
        return torch.tensor(mean, dtype=image.dtype, device=image.device)[:, None, None].expand_as(image).clone()
    radius = int(3 * BLUR_SIGMA)
    size = 2 * radius + 1
    x = torch.arange(size, dtype=image.dtype, device=image.device) - radius
    kernel = torch.exp(-0.5 * (x / BLUR_SIGMA) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, size).expand(3, 1, 1, size), groups=3)
    return F.conv2d(blurred, kernel.view(1, 1, size, 1).expand(3, 1, size, 1), groups=3)[0]


def _attribute_group(detector: Detector, images: list[Tensor], targets: list[dict], config: AttributionConfig,
                     batch_size: int) -> tuple[list[Tensor], list[float]]:
    """Attributions ``[3, H, W]`` of images that share one padded canvas (one or several forward passes), and
    each image's loss at the image itself where the method evaluates it there (NaN otherwise)."""
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    forward = TotalLoss(detector, targets, config.precision)
    inputs = tuple(im.detach()[None].requires_grad_(True) for im in images)
    copies_per_pass = max(1, batch_size // len(images))
    if config.method == "gradient":
        out = Saliency(forward).attribute(inputs, abs=False)
    elif config.method == "input_x_gradient":
        out = InputXGradient(forward).attribute(inputs)
    elif config.method == "integrated_gradients":
        mean = detector.preprocess.mean
        baselines = tuple(_baseline(im.detach(), config.baseline, mean)[None] for im in images)
        out = IntegratedGradients(forward).attribute(
            inputs, baselines=baselines, n_steps=config.steps,
            internal_batch_size=min(config.steps, copies_per_pass),
        )  # fmt: skip
    else:
        out = _smoothgrad(forward, images, config, copies_per_pass)
    if not isinstance(out, tuple):
        out = (out,)
    # plain gradients and input x gradient take the loss at the image; integrated gradients and SmoothGrad
    # evaluate it on a path or on noisy copies, never at the image alone
    at_image = config.method in ("gradient", "input_x_gradient") and forward.first is not None
    losses = forward.first if at_image else [float("nan")] * len(images)
    return [a[0].detach() for a in out], losses


def _smoothgrad(forward: TotalLoss, images: list[Tensor], config: AttributionConfig, copies_per_pass: int) -> tuple[Tensor, ...]:
    generators = [_generator_for(im, config.seed) for im in images]
    sums = [torch.zeros_like(im) for im in images]
    done = 0
    while done < config.samples:
        n = min(copies_per_pass, config.samples - done)
        noisy = []
        for im, g in zip(images, generators):
            # one draw per copy, so the noise of copy k does not depend on how copies are split into passes
            noise = torch.stack([torch.randn(im.shape, generator=g, dtype=torch.float32) for _ in range(n)])
            noise = noise.to(im.device, im.dtype)
            noisy.append((im.detach()[None] + config.noise * noise).requires_grad_(True))
        grads = torch.autograd.grad(forward(*noisy).sum(), noisy)
        for s, g in zip(sums, grads):
            s += g.sum(dim=0)
        done += n
    return tuple(s[None] / config.samples for s in sums)


def _as_target(t) -> dict:
    if hasattr(t, "as_dict"):
        return t.as_dict()
    out = {"boxes": t["boxes"], "labels": t["labels"]}
    if t.get("masks") is not None:  # instance masks, for a detector with a mask loss (Mask R-CNN)
        out["masks"] = t["masks"]
    if t.get("object") is not None:  # one object's part of the loss (RetinaNetDetector.object_losses)
        out["object"] = int(t["object"])
    return out


def input_gradients(
    detector: Detector,
    images: Sequence[Tensor],
    targets: Sequence,
    method: str = "gradient",
    *,
    batch_size: int = 4,
    config: AttributionConfig | None = None,
    **options,
) -> list[Tensor]:
    """Attribution of each image's total detection loss to its pixels, ``[3, H, W]`` per image.

    ``images`` are RGB float tensors in [0, 1] at original size, on the
    detector's device; ``targets`` hold ``boxes`` (xyxy, original pixels) and
    contiguous ``labels`` per image (or :class:`~gradlens.attribution.targets.ImageTargets`).
    ``method`` is one of :data:`METHODS`; ``options`` set the other fields of
    :class:`AttributionConfig` (``steps``, ``baseline``, ``samples``, ``noise``,
    ``seed``, ``precision``). Images are grouped by padded canvas internally, so
    each result is the image's own, whatever else was passed with it. Plain
    gradients of objects' parts (``target["object"]``) passed with the same
    image tensor share one forward pass (:func:`shared_forward_gradients`).
    """
    if len(images) != len(targets):
        raise GradlensError(f"{len(images)} images but {len(targets)} targets were given.")
    if batch_size < 1:
        raise GradlensError("batch_size must be at least 1.")
    config = (config or AttributionConfig(method=method, **options)).check()
    for im in images:
        if im.ndim != 3 or im.shape[0] != 3:
            raise GradlensError(f"Images must be [3, H, W] RGB tensors; got shape {tuple(im.shape)}.")
    if torch.is_inference_mode_enabled():
        raise GradlensError("Input gradients cannot be computed inside torch.inference_mode(); call input_gradients outside it.")
    with frozen_inference_mode(detector):
        return attribute_frozen(detector, images, targets, config, batch_size)


def attribute_frozen(detector: Detector, images: Sequence[Tensor], targets: Sequence, config: AttributionConfig,
                     batch_size: int) -> list[Tensor]:
    """:func:`input_gradients` for a detector already inside :func:`frozen_inference_mode` (safe to call from threads)."""
    return attribute_with_losses(detector, images, targets, config, batch_size)[0]


def attribute_with_losses(detector: Detector, images: Sequence[Tensor], targets: Sequence,
                          config: AttributionConfig, batch_size: int) -> tuple[list[Tensor], list[float]]:
    """:func:`attribute_frozen` and the loss each attribution was taken of (the image's total loss, or the
    object's part), from the same forward pass: the map's scale depends on it. NaN where the method never
    evaluates the loss at the image itself (integrated gradients, SmoothGrad)."""
    targets = [_as_target(t) for t in targets]
    results: list[Tensor | None] = [None] * len(images)
    losses = [float("nan")] * len(images)
    with torch.enable_grad():  # grad mode is per thread
        if config.method == "gradient" and targets and all("object" in t for t in targets):
            return shared_forward_gradients(detector, images, targets, config.precision, losses)
        for group in canvas_groups([tuple(im.shape[-2:]) for im in images], detector.preprocess, batch_size):
            attributions, group_losses = _attribute_group(
                detector, [images[i] for i in group], [targets[i] for i in group], config, batch_size
            )
            for i, a, loss in zip(group, attributions, group_losses):
                results[i], losses[i] = a, loss
    return results, losses  # type: ignore[return-value]


def shared_forward_gradients(detector: Detector, images: Sequence[Tensor], targets: Sequence[dict],
                             precision: str = "fp32", losses: list[float] | None = None):
    """Plain gradients of objects' parts of the loss (``target["object"]``), one forward pass per image.

    An image with K objects asked for costs one forward pass and K backward
    passes through the retained graph, instead of K forward and backward
    passes of copies: about 3K / (1 + 2K) less work (1.4x at COCO's 7 objects
    per image). Entries that pass the same image tensor with the same target
    boxes and labels share the pass; each result is exactly the autograd
    gradient of that object's loss (:meth:`RetinaNetDetector.object_losses`). Given a list ``losses``, returns
    ``(gradients, losses)`` with each object's loss written into it.
    """
    device = next(detector.parameters()).device
    shared: dict[tuple[int, int, int], list[int]] = {}
    for k, (im, t) in enumerate(zip(images, targets)):
        shared.setdefault((id(im), id(t["boxes"]), id(t["labels"])), []).append(k)
    results: list[Tensor | None] = [None] * len(images)
    for entries in shared.values():
        x = images[entries[0]].detach().requires_grad_(True)
        target = _as_target({k: v for k, v in targets[entries[0]].items() if k != "object"})
        with PrecisionScope(precision, device):
            parts = detector.object_losses([x], [target])[0]
        owners = total_loss(detector, parts, torch.float32)  # [1 + K]: background, objects
        wanted = [int(targets[k]["object"]) + 1 for k in entries]
        _require_finite(owners[wanted], "The loss of an object", "its box")
        for n, (k, j) in enumerate(zip(entries, wanted)):
            (grad,) = torch.autograd.grad(owners[j], x, retain_graph=n < len(entries) - 1)
            results[k] = grad
            if losses is not None:
                losses[k] = float(owners[j].detach().double())
    return results if losses is None else (results, losses)  # type: ignore[return-value]


def gradient_maps(detector: Detector, images: Sequence[Tensor], targets: Sequence, method: str = "gradient",
                  channel_reduce: str = "max", **kwargs) -> list[Tensor]:
    """Per-pixel magnitude maps ``[H, W]``: :func:`input_gradients` reduced over channels (DESIGN: max |g|)."""
    return [reduce_channels(a, channel_reduce) for a in input_gradients(detector, images, targets, method, **kwargs)]
