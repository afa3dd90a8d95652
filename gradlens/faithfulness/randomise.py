"""The model-parameter randomisation test: do a method's maps depend on what the detector learned?

Adebayo et al., "Sanity Checks for Saliency Maps" (NeurIPS 2018), cascading version: re-initialise the
network's top layers, then cumulatively each earlier part, recompute the maps and compare each with the
trained model's. A map that explains the *detector* must change once the weights it explains are gone; a map
that stays put (an edge detector does) shows the image rather than the model.

**The cascade** (:func:`randomisation_steps`), top first, every parameter of the detector in exactly one step:

- ``"head"``: the RetinaNet head (classification and box subnets), plus any other top-level child of the
  detector that holds parameters, other than the backbone;
- ``"neck"``: what turns the backbone's maps into the pyramid P3..P7: the FPN with its P6/P7 convolutions
  (``backbone.fpn``), or, for CEDNet (whose detectors have no FPN), its ``reduce_convs`` (1x1 projections to
  the pyramid width) and ``add_blocks`` (the stride-2 extra levels), which play that part;
- ``"stage N"`` .. ``"stage 1"``: the backbone's stages, last first, each with what it owns in the forward
  pass. ConvNeXt: ``downsample_layers[i]`` (i > 0), ``stages[i]`` and its output norm ``norm{i}``. Swin,
  FocalNet and MSG-Transformer: ``layers[i]`` (whose patch merging at its end feeds the next stage) and
  ``norm{i}``. CEDNet: ``stages[i]``, stage 1 being its "p2" stage (p2 blocks and the patch merge to stride 8),
  the others its encoder-decoder stages. HRNet: ``layer1``, then ``transition{s-1}`` with ``stage{s}``.
  ResNet: ``layer1..4``. RevCol: its columns ``subnet{i}`` (each runs all four levels);
- ``"stem"``: the layers before the first stage (ConvNeXt's ``downsample_layers[0]``, ``patch_embed``,
  ``stem``, ResNet's ``conv1``/``bn1``, HRNet's ``conv1``/``bn1``/``conv2``/``bn2``) and the parameters the
  backbone holds itself rather than through a submodule (MSG's ``msg_tokens``, the messenger tokens the
  first stage starts from).

A backbone of another layout falls back to a generic rule: its top-level children that hold parameters in
registration order (``ModuleList`` / ``ModuleDict`` containers opened into their items); the first, with the
backbone's own parameters, is the stem, each later one a stage.

**Re-initialisation** (:func:`randomise`), step ``k`` (0-based) under its own seed ``seed + k``, drawn inside
``torch.random.fork_rng`` so the caller's random streams (CPU, and the CUDA devices the detector is on) are
untouched, and so that step ``k``'s new values are the same whether or not later steps follow:

1. every submodule with a ``reset_parameters()`` (convolutions, linear layers, ``nn.LayerNorm``, BatchNorm,
   GroupNorm) calls it: PyTorch's default initialisation; BatchNorm's also resets its running statistics;
2. a normalisation layer without one (gradlens' channels-first ``LayerNorm``, torchvision's
   ``FrozenBatchNorm2d``; any class whose name contains "Norm") gets its initial values: ``weight`` 1,
   ``bias`` 0, ``running_mean`` 0, ``running_var`` 1, ``num_batches_tracked`` 0 (parameters or buffers);
3. any other parameter that no submodule resets (layer-scale ``gamma``, Swin/MSG relative-position tables,
   MSG's ``msg_tokens`` and ``rel_pos_msg``, RevCol's ``alpha``) is **shuffled**: its entries are randomly
   permuted. There is no generic initialiser for these, and their constructors' values (constants, zeros)
   would switch whole branches off or on; a permutation keeps the tensor's scale and sign mix, so the network
   still runs in its trained range, and destroys which entry learned what. A constant tensor (what these are
   before training) is left as it is: it holds nothing learned;
4. the RetinaNet head is then initialised as torchvision initialises it: convolution weights normal(0, 0.01),
   biases 0, the classification logits' bias ``-log((1 - 0.01) / 0.01)`` (prior probability 0.01).

Other buffers (index tables, anchors) are not learned and stay as they are.

**Similarity** (:func:`map_similarity`) of two ``[H, W]`` magnitude maps: the Spearman rank correlation of
the flattened maps (``scipy.stats.spearmanr``, ties averaged; NaN when either map is constant), and SSIM
(``skimage.metrics.structural_similarity``) of the two maps each divided by its own maximum, so both lie in
[0, 1] (``data_range=1.0``; skimage's defaults otherwise: a 7x7 uniform window; NaN when a map is all
zero). Both are unchanged by multiplying a map by a positive number: a randomised model's gradients have
another scale, and only where they point is compared.

**Flag** (:func:`flagged`): a model whose median Spearman correlation over images, with only the head
randomised (``randomised == 1``), is still at least :data:`FLAG_LEVEL`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

RANDOMISATION_COLUMNS = ["role", "label", "image_id", "step", "randomised", "spearman", "ssim"]
SUMMARY_COLUMNS = ["role", "label", "step", "randomised", "spearman_median", "spearman_iqr", "spearman_q25",
                   "spearman_q75", "ssim_median", "ssim_iqr", "ssim_q25", "ssim_q75", "num_images"]
# Why 0.5: a map unrelated to the weights (an edge detector, the image itself) keeps a rank correlation near 1
# with its trained version, whereas Adebayo et al. report plain gradients falling well below 0.5 as soon as the
# top layers are re-initialised. A median still at or above 0.5 after the head alone is randomised means that
# more than half of the map's ordering survived the loss of the weights that turn features into detections.
FLAG_LEVEL = 0.5
RANDOMISATION_RULES = 1  # the re-initialisation rules' version: stores of maps made under other rules are not reused

HEAD_INIT_STD = 0.01  # torchvision's RetinaNet head: conv weights normal(0, 0.01)
PRIOR_PROBABILITY = 0.01  # torchvision's RetinaNet classification head: logit bias -log((1 - p) / p)
NORM_INITIAL = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}
CEDNET_NECK = ("reduce_convs", "add_blocks")  # CEDNet's projections to the pyramid and its extra levels


class OwnParameters(nn.Module):
    """The parameters a module holds itself rather than through a submodule, as a module a step can list.

    A step is a list of modules; MSG's ``msg_tokens`` sit on the backbone itself, so they need a module of
    their own. The tensors are shared, not copied: re-initialising them here changes the detector's.
    """

    def __init__(self, owner: nn.Module):
        super().__init__()
        for name, parameter in owner.named_parameters(recurse=False):
            self.register_parameter(name, parameter)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _split_backbone(backbone: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """(the body whose stages are randomised one by one, the neck's modules)."""
    body = getattr(backbone, "body", None)
    if not isinstance(body, nn.Module):
        return backbone, []
    neck = [child for name, child in backbone.named_children() if name != "body" and _has_parameters(child)]
    neck += [getattr(body, name) for name in CEDNET_NECK if isinstance(getattr(body, name, None), nn.Module)]
    return body, [m for m in neck if _has_parameters(m)]


def _numbered(body: nn.Module, prefix: str, start: int) -> list[nn.Module]:
    """``body.<prefix><start>``, ``body.<prefix><start + 1>``, ... while they exist."""
    out = []
    while isinstance(getattr(body, f"{prefix}{start + len(out)}", None), nn.Module):
        out.append(getattr(body, f"{prefix}{start + len(out)}"))
    return out


def _optional(body: nn.Module, name: str) -> list[nn.Module]:
    module = getattr(body, name, None)
    return [module] if isinstance(module, nn.Module) else []


def _known_layout(body: nn.Module) -> tuple[list[nn.Module], list[list[nn.Module]]] | None:
    """Stem and stages (first to last) of the backbones gradlens builds, recognised by their attribute names."""
    def has(*names: str) -> bool:
        return all(isinstance(getattr(body, n, None), nn.Module) for n in names)

    if has("conv1", "bn1", "conv2", "bn2", "layer1", "transition1"):  # HRNet
        stages = [[body.layer1]]
        for s, stage in enumerate(_numbered(body, "stage", 2), start=2):
            stages.append(_optional(body, f"transition{s - 1}") + [stage])
        return [body.conv1, body.bn1, body.conv2, body.bn2], stages
    if has("conv1", "bn1", "layer1"):  # ResNet (gradlens' ResNet50Features, torchvision's IntermediateLayerGetter)
        return [body.conv1, body.bn1], [[layer] for layer in _numbered(body, "layer", 1)]
    if has("downsample_layers", "stages"):  # ConvNeXt
        down, stages = list(body.downsample_layers), list(body.stages)
        if len(down) != len(stages):
            return None
        return [down[0]], [([down[i]] if i else []) + [stages[i]] + _optional(body, f"norm{i}")
                           for i in range(len(stages))]
    if has("patch_embed", "layers"):  # Swin, FocalNet, MSG-Transformer
        return [body.patch_embed], [[layer] + _optional(body, f"norm{i}") for i, layer in enumerate(body.layers)]
    if has("stem", "stages"):  # CEDNet
        return [body.stem], [[stage] for stage in body.stages]
    if has("stem", "subnet0"):  # RevCol: its columns
        return [body.stem], [[column] for column in _numbered(body, "subnet", 0)]
    return None


def _generic_layout(body: nn.Module, skip: list[nn.Module]) -> tuple[list[nn.Module], list[list[nn.Module]]]:
    """Top-level children holding parameters, in registration order, containers opened: the first is the stem."""
    units: list[nn.Module] = []
    for child in body.children():
        if any(child is s for s in skip) or not _has_parameters(child):
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            units += [item for item in child.children() if _has_parameters(item)]
        else:
            units.append(child)
    if not units:
        return [], []
    return [units[0]], [[unit] for unit in units[1:]]


def _parameter_ids(modules: Sequence[nn.Module]) -> list[int]:
    return [id(p) for m in modules for p in m.parameters()]


def _is_partition(groups: Sequence[Sequence[nn.Module]], everything: nn.Module) -> bool:
    ids = [i for group in groups for i in _parameter_ids(group)]
    return len(ids) == len(set(ids)) and set(ids) == {id(p) for p in everything.parameters()}


def randomisation_steps(detector: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The cascade, top first: ``("head", [...])``, ``("neck", [...])``, ``("stage 4", [...])``, ...,
    ``("stem", [...])`` (as many stages as the backbone has).

    Each step lists the modules it re-initialises; together the steps hold every parameter of the detector
    exactly once (a step without parameters, e.g. a backbone without a neck, is left out). The layouts are in
    the module docstring.
    """
    head = [detector.head] + [child for name, child in detector.named_children()
                              if name not in ("head", "backbone") and _has_parameters(child)]
    body, neck = _split_backbone(detector.backbone)
    own = [OwnParameters(body)]
    own = own if _has_parameters(own[0]) else []
    layout = _known_layout(body)
    if layout is not None:
        stem, stages = layout
        stem = stem + own
        if not _is_partition([neck, stem, *stages], detector.backbone):
            layout = None
    if layout is None:
        stem, stages = _generic_layout(body, neck)
        stem = stem + own
    steps = [("head", head), ("neck", neck)]
    steps += [(f"stage {i + 1}", stages[i]) for i in reversed(range(len(stages)))]
    steps.append(("stem", stem))
    steps = [(name, modules) for name, modules in steps if modules and _parameter_ids(modules)]
    if not _is_partition([modules for _, modules in steps], detector):
        raise ValueError(f"The randomisation steps of this {type(detector.backbone).__name__} backbone do not hold "
                         "every parameter of the detector exactly once.")
    return steps


def _is_norm(module: nn.Module) -> bool:
    return any("Norm" in cls.__name__ for cls in type(module).__mro__ if cls is not nn.Module)


def _shuffle(parameter: torch.Tensor) -> None:
    """Permute the entries (the permutation drawn on the CPU, so it is the same on every device)."""
    order = torch.randperm(parameter.numel()).to(parameter.device)
    parameter.copy_(parameter.detach().reshape(-1)[order].reshape(parameter.shape))


def _reinitialise(modules: Sequence[nn.Module]) -> None:
    """Rules 1-3 of the module docstring, on every parameter (and norm buffer) under ``modules``."""
    done: set[int] = set()
    visited: set[int] = set()
    for root in modules:
        for module in root.modules():
            if id(module) in visited:
                continue
            visited.add(id(module))
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and not isinstance(module, OwnParameters):
                reset()
                done.update(id(t) for t in module.parameters(recurse=False))
                done.update(id(t) for t in module.buffers(recurse=False))
    for root in modules:
        for module in root.modules():
            norm = _is_norm(module)
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if id(tensor) in done:
                    continue
                is_parameter = isinstance(tensor, nn.Parameter)
                if norm and name in NORM_INITIAL:
                    tensor.fill_(NORM_INITIAL[name])
                elif is_parameter:
                    _shuffle(tensor)
                else:
                    continue  # a buffer that is not learned (index tables, anchors)
                done.add(id(tensor))


def _torchvision_head_init(head: nn.Module) -> None:
    """torchvision's RetinaNet head initialisation (rule 4)."""
    for module in head.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=HEAD_INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    logits = getattr(getattr(head, "classification_head", None), "cls_logits", None)
    if isinstance(logits, nn.Conv2d) and logits.bias is not None:
        nn.init.constant_(logits.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))


def _seed_all(seed: int, cuda_devices: Sequence[int]) -> None:
    """Seed the CPU generator and those of the detector's CUDA devices only (``torch.manual_seed`` would also
    queue a seed for CUDA devices not yet started, reaching past ``fork_rng``)."""
    torch.default_generator.manual_seed(seed)
    for index in cuda_devices:
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)


def randomise(detector: nn.Module, steps: int, seed: int) -> None:
    """Re-initialise, in place, the parameters (and buffers such as BatchNorm running statistics, to their initial
    values) of the first ``steps`` entries of :func:`randomisation_steps`; deterministic given ``seed``.

    Step ``k`` draws under seed ``seed + k`` (cumulative models share their earlier steps' weights), inside
    ``torch.random.fork_rng``: the global random state is the same after the call as before it.
    """
    cascade = randomisation_steps(detector)
    steps = int(steps)
    if not 0 <= steps <= len(cascade):
        raise ValueError(f"steps must be in 0..{len(cascade)} (this detector's cascade: "
                         f"{', '.join(name for name, _ in cascade)}); got {steps}.")
    tensors = [*detector.parameters(), *detector.buffers()]
    cuda_devices = sorted({torch.cuda.current_device() if t.device.index is None else t.device.index
                           for t in tensors if t.device.type == "cuda"})
    from torchvision.models.detection.retinanet import RetinaNetHead

    with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
        for k, (name, modules) in enumerate(cascade[:steps]):
            _seed_all(int(seed) + k, cuda_devices)
            _reinitialise(modules)
            if name == "head" and isinstance(detector.head, RetinaNetHead):
                _torchvision_head_init(detector.head)


def _as_map(values, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"The {what} map must be [H, W]; got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"The {what} map holds values that are not finite.")
    if (array < 0).any():
        raise ValueError(f"The {what} map has negative values; compare magnitude maps (e.g. max |gradient|).")
    return array


def map_similarity(reference, other) -> tuple[float, float]:
    """(Spearman rank correlation, SSIM) of two ``[H, W]`` non-negative magnitude maps (numpy or torch).

    Rank correlation says whether the pixels keep their order of importance; SSIM whether the map keeps its
    local structure (both are the measures of Adebayo et al.). NaN where a measure is undefined: Spearman for a
    constant map, SSIM for an all-zero one or one narrower than SSIM's 7x7 window.
    """
    a, b = _as_map(reference, "reference"), _as_map(other, "other")
    if a.shape != b.shape:
        raise ValueError(f"The maps differ in shape: {a.shape} and {b.shape}.")
    if a.min() == a.max() or b.min() == b.max():
        spearman = math.nan
    else:
        from scipy.stats import spearmanr

        spearman = float(spearmanr(a.reshape(-1), b.reshape(-1))[0])
    a_max, b_max = a.max(), b.max()
    if a_max == 0 or b_max == 0:
        return spearman, math.nan
    if min(a.shape) < 7:  # SSIM's 7x7 window does not fit: no SSIM for this image, as for a zero map
        return spearman, math.nan
    from skimage.metrics import structural_similarity  # slow to import: only when a map is compared

    return spearman, float(structural_similarity(a / a_max, b / b_max, data_range=1.0))


def randomisation_table(role: str, label: str, image_ids: Sequence, reference_maps: Sequence,
                        randomised_maps: Sequence[Sequence], step_names: Sequence[str]) -> pd.DataFrame:
    """One row per image and step: ``reference_maps[i]`` is image i's trained map, ``randomised_maps[k][i]`` its map
    after step k (k = 0 .. len(step_names)-1, cumulative); ``randomised`` = how many steps are randomised (1-based).

    Columns :data:`RANDOMISATION_COLUMNS`, rows in cascade order, images in the given order within a step.
    """
    image_ids, step_names = list(image_ids), [str(s) for s in step_names]
    if len(reference_maps) != len(image_ids):
        raise ValueError(f"{len(image_ids)} image ids but {len(reference_maps)} reference maps.")
    if len(randomised_maps) != len(step_names):
        raise ValueError(f"{len(step_names)} step names but maps for {len(randomised_maps)} steps.")
    rows = []
    for k, (step, maps) in enumerate(zip(step_names, randomised_maps)):
        if len(maps) != len(image_ids):
            raise ValueError(f"Step {step!r} has {len(maps)} maps for {len(image_ids)} images.")
        for image_id, reference, other in zip(image_ids, reference_maps, maps):
            spearman, ssim = map_similarity(reference, other)
            rows.append((role, label, image_id, step, k + 1, spearman, ssim))
    table = pd.DataFrame(rows, columns=RANDOMISATION_COLUMNS)
    return table.astype({"randomised": "int64", "spearman": "float64", "ssim": "float64"})


def _quartiles(values: pd.Series) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile) of the finite values (NaN without any)."""
    finite = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=np.float64)
    if not finite.size:
        return math.nan, math.nan, math.nan
    q1, median, q3 = np.percentile(finite, [25, 50, 75])
    return float(q1), float(median), float(q3)


def _median_iqr(values: pd.Series) -> tuple[float, float]:
    q1, median, q3 = _quartiles(values)
    return median, q3 - q1


def _require_columns(table: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"The randomisation table lacks the column(s) {', '.join(missing)}.")


def randomisation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per role, label and step: median, quartiles and interquartile range of spearman and ssim, num_images.

    Medians and IQRs (``q75 - q25``) leave out the NaN values of constant or zero maps; ``num_images`` counts
    the step's images. Columns :data:`SUMMARY_COLUMNS`, models in order of appearance, steps in cascade order.
    """
    _require_columns(table, RANDOMISATION_COLUMNS)
    rows = []
    for (role, label, randomised, step), group in table.groupby(["role", "label", "randomised", "step"], sort=False):
        s1, s_median, s3 = _quartiles(group["spearman"])
        q1, q_median, q3 = _quartiles(group["ssim"])
        num_images = int(group["image_id"].nunique())
        rows.append((role, label, step, int(randomised), s_median, s3 - s1, s1, s3, q_median, q3 - q1, q1, q3,
                     num_images))
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    order = {key: i for i, key in enumerate(dict.fromkeys(zip(summary["role"], summary["label"])))}
    summary["_model"] = [order[key] for key in zip(summary["role"], summary["label"])]
    summary = summary.sort_values(["_model", "randomised"], kind="stable").drop(columns="_model")
    return summary.reset_index(drop=True)


def flagged(table: pd.DataFrame, level: float = FLAG_LEVEL) -> list[str]:
    """One sentence per model whose median Spearman correlation after the head alone is randomised is still
    ``>= level`` (empty list: nothing flagged).

    Such a model's maps barely change when the weights that make its detections are replaced: they may owe
    more to the image than to the detector. Models whose first-step correlations are all NaN are not flagged.
    """
    level = float(level)
    if math.isnan(level):
        raise ValueError("The flag level must be a number.")
    _require_columns(table, RANDOMISATION_COLUMNS)
    first = table[pd.to_numeric(table["randomised"], errors="coerce") == 1]
    sentences = []
    for (role, label), rows in first.groupby(["role", "label"], sort=False):
        median, _ = _median_iqr(rows["spearman"])
        if math.isnan(median) or median < level:
            continue
        name = f"{label} ({role})" if str(label) and str(label) != str(role) else str(role)
        sentences.append(f"{name}: its maps keep a median Spearman correlation of {median:.2f} with the trained "
                         f"model's after the {rows['step'].iloc[0]} is randomised (>= {level:g}): they may show the "
                         "image more than what the detector learned.")
    return sentences
