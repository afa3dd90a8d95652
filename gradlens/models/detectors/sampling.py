"""The expectation of a loss computed on a balanced random sample of candidates, in closed form.

Two-stage detectors train their proposal network and their RoI head on a sample: torchvision's
``BalancedPositiveNegativeSampler`` and mmdetection's ``RandomSampler`` (``neg_pos_ub=-1``) both draw
``min(n_pos, int(num * pos_fraction))`` positives uniformly without replacement, then
``min(n_neg, num - positives drawn)`` negatives the same way. The counts depend only on how many candidates of
each kind there are, so the loss's normaliser (the number drawn) is fixed, and each candidate is in the sample
with a known probability: ``positives drawn / n_pos`` for a positive, ``negatives drawn / n_neg`` for a
negative. The expectation of a normalised sum over the sample is therefore the sum over *every* candidate of
its term times that probability, over the same normaliser: gradlens' total loss for these detectors (DESIGN:
total detection loss), exact, with no random draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BalancedDraw:
    """How many candidates of each kind one draw takes, and the chance that a given one is among them."""

    positives: int  # positives drawn
    negatives: int  # negatives drawn
    p_positive: float  # probability that a given positive is drawn (0 when there is none)
    p_negative: float

    @property
    def drawn(self) -> int:
        return self.positives + self.negatives


def balanced_draw(n_positive: int, n_negative: int, num: int, pos_fraction: float) -> BalancedDraw:
    """The sampler's counts for ``n_positive`` and ``n_negative`` candidates (``num`` per image, at most
    ``int(num * pos_fraction)`` of them positive, the rest filled with negatives)."""
    positives = min(int(n_positive), int(num * pos_fraction))
    negatives = min(int(n_negative), int(num) - positives)
    return BalancedDraw(positives, negatives, positives / n_positive if n_positive else 0.0,
                        negatives / n_negative if n_negative else 0.0)


def inclusion_probabilities(labels: Tensor, num: int, pos_fraction: float) -> tuple[Tensor, BalancedDraw]:
    """Each candidate's probability of being drawn (``labels >= 1``: positive, ``== 0``: negative, anything else
    ignored, as both samplers read their labels), in the labels' floating dtype (float32 for integer labels)."""
    positive, negative = labels >= 1, labels == 0
    draw = balanced_draw(int(positive.sum()), int(negative.sum()), num, pos_fraction)
    dtype = labels.dtype if labels.is_floating_point() else torch.float32
    p = torch.zeros(labels.shape, dtype=dtype, device=labels.device)
    p[positive] = draw.p_positive
    p[negative] = draw.p_negative
    return p, draw


def expected_count_probabilities(labels: Tensor, weight: Tensor, num: int, pos_fraction: float) -> tuple[Tensor, float, float]:
    """:func:`inclusion_probabilities` for candidates that are each present with probability ``weight`` (the
    candidates reaching a Cascade R-CNN stage): the draw's counts from the weights' sums, the expected numbers of
    candidates of each kind. Exact when every weight is 0 or 1. Returns the probabilities (in ``weight``'s
    dtype), the number drawn and the positives drawn."""
    pos, neg = labels >= 1, labels == 0
    n_pos, n_neg = float(weight[pos].sum()), float(weight[neg].sum())
    positives = min(n_pos, float(int(num * pos_fraction)))
    negatives = min(n_neg, float(num) - positives)
    p = torch.zeros(labels.shape, dtype=weight.dtype, device=weight.device)
    if n_pos > 0:
        p[pos] = positives / n_pos
    if n_neg > 0:
        p[neg] = negatives / n_neg
    return p, positives + negatives, positives


def owner_sums(parts: dict[str, tuple[Tensor, Tensor]], objects: int) -> dict[str, Tensor]:
    """Each term's candidate contributions ``(values, owners)`` summed per owner: ``[1 + objects]`` per term,
    entry 0 the background and ``1 + j`` object ``j`` (the per-object loss of a detector with sampled terms)."""
    out = {}
    for name, (values, owners) in parts.items():
        total = torch.zeros(1 + objects, dtype=values.dtype, device=values.device)
        out[name] = total.index_add(0, owners, values) if values.numel() else total + values.sum()
    return out


def owner_terms(parts: dict[str, tuple[Tensor, Tensor]], target: dict) -> dict[str, Tensor]:
    """One image's loss terms from its parts: each term's sum, or with ``target["object"] = j`` object ``j``'s
    part (``-1``: the background's), as every detector's ``image_losses`` gives them."""
    if target.get("object") is None:
        return {name: values.sum() for name, (values, _) in parts.items()}
    split = owner_sums(parts, len(target["labels"]))
    return {name: owners[int(target["object"]) + 1] for name, owners in split.items()}
