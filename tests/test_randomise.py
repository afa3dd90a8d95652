"""The model-parameter randomisation test: the cascade, seeded re-initialisation, map similarity, table and flag."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import rankdata, spearmanr
from skimage.metrics import structural_similarity

import gradlens
from gradlens.faithfulness.randomise import (
    FLAG_LEVEL,
    RANDOMISATION_COLUMNS,
    flagged,
    map_similarity,
    randomisation_steps,
    randomisation_summary,
    randomisation_table,
    randomise,
)
from gradlens.models.bundled import bundled_detector_path
from gradlens.models.backbones.hrnet import TINY_HRNET
from gradlens.models.backbones.msg import TINY_MSG
from gradlens.models.backbones.revcol import TINY_REVCOL


@lru_cache(maxsize=None)
def _bundled(name: str):
    return gradlens.load_detector(bundled_detector_path(name), device="cpu")


def bundled(name: str):
    """A private copy of a bundled (trained) detector, loaded once per session."""
    return copy.deepcopy(_bundled(name))


# a few small registry detectors: MSG holds a parameter on the backbone itself, RevCol's columns hold theirs,
# HRNet has BatchNorm running statistics
REGISTRY = {
    "retinanet_msg_tiny": {**TINY_MSG, "out_chans": 16},
    "retinanet_revcol_tiny": {**TINY_REVCOL, "out_chans": 16},
    "retinanet_hrnet_w32": {**TINY_HRNET, "out_chans": 16},
}


def registry(name: str):
    torch.manual_seed(0)
    return gradlens.build_detector(name, 3, options=REGISTRY[name])


def step_of(detector) -> dict[str, str]:
    """Parameter name -> the step holding it (by identity, independent of how the steps were built)."""
    owner = {id(p): step for step, modules in randomisation_steps(detector) for m in modules for p in m.parameters()}
    return {name: owner[id(p)] for name, p in detector.named_parameters()}


# -- the cascade --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bundled:cednet", "bundled:convnext", *REGISTRY])
def test_steps_partition_the_parameters(which):
    kind, _, name = which.rpartition(":")
    detector = bundled(name) if kind == "bundled" else registry(name)
    steps = randomisation_steps(detector)
    ids = [id(p) for _, modules in steps for m in modules for p in m.parameters()]
    assert len(ids) == len(set(ids)), "a parameter in two steps"
    assert set(ids) == {id(p) for p in detector.parameters()}
    names = [name for name, _ in steps]
    stages = [n for n in names if n.startswith("stage ")]
    assert names == ["head", "neck", *stages, "stem"]
    assert stages == [f"stage {i}" for i in range(len(stages), 0, -1)] and len(stages) >= 2


def test_steps_follow_the_forward_pass():
    owner = step_of(bundled("convnext"))
    expected = {"head.": "head", "backbone.fpn.": "neck", "backbone.body.downsample_layers.0.": "stem",
                "backbone.body.downsample_layers.1.": "stage 2", "backbone.body.stages.0.": "stage 1",
                "backbone.body.stages.3.": "stage 4", "backbone.body.norm3.": "stage 4",
                "backbone.body.norm1.": "stage 2"}
    for prefix, step in expected.items():
        hits = [s for n, s in owner.items() if n.startswith(prefix)]
        assert hits and set(hits) == {step}, prefix
    owner = step_of(bundled("cednet"))
    expected = {"backbone.body.reduce_convs.": "neck", "backbone.body.add_blocks.": "neck",
                "backbone.body.stem.": "stem",
                "backbone.body.stages.0.": "stage 1", "backbone.body.stages.2.": "stage 3"}
    for prefix, step in expected.items():
        hits = [s for n, s in owner.items() if n.startswith(prefix)]
        assert hits and set(hits) == {step}, prefix
    assert step_of(registry("retinanet_msg_tiny"))["backbone.body.msg_tokens"] == "stem"


# -- re-initialisation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_randomise_changes_exactly_the_first_steps(k):
    trained = bundled("cednet")
    randomised = copy.deepcopy(trained)
    randomise(randomised, k, seed=7)
    first = {name for name, _ in randomisation_steps(trained)[:k]}
    owner = step_of(trained)
    after = dict(randomised.named_parameters())
    for name, p in trained.named_parameters():
        if owner[name] in first:
            assert not torch.equal(p, after[name]), f"{name} ({owner[name]}) kept its trained values"
        else:
            assert torch.equal(p, after[name]), f"{name} ({owner[name]}) changed"
    for (name, b), (_, b2) in zip(trained.named_buffers(), randomised.named_buffers()):
        assert torch.equal(b, b2), name


def test_randomise_is_seeded_and_leaves_the_global_rng_alone():
    trained = bundled("convnext")
    n = len(randomisation_steps(trained))
    a, b, c = (copy.deepcopy(trained) for _ in range(3))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    randomise(a, n, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    randomise(b, n, seed=0)
    randomise(c, n, seed=1)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    # the cascade is cumulative: step k's new values do not depend on how many steps follow
    two = copy.deepcopy(trained)
    randomise(two, 2, seed=0)
    owner = step_of(trained)
    for (name, p2), (_, pn) in zip(two.named_parameters(), a.named_parameters()):
        if owner[name] in ("head", "neck"):
            assert torch.equal(p2, pn), name


def test_randomise_initial_values_of_norms_and_head():
    detector = registry("retinanet_hrnet_w32")
    with torch.no_grad():
        for m in detector.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(2, 3)
    randomise(detector, len(randomisation_steps(detector)), seed=0)
    norms = [m for m in detector.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for m in norms:
        assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        assert torch.equal(m.running_var, torch.ones_like(m.running_var))
    bias = detector.head.classification_head.cls_logits.bias
    assert torch.allclose(bias, torch.full_like(bias, -math.log(99.0)))
    box_bias = detector.head.regression_head.bbox_reg.bias
    assert torch.equal(box_bias, torch.zeros_like(box_bias))
    # gradlens' channels-first LayerNorm has no reset_parameters: back to weight 1, bias 0
    cednet = bundled("cednet")
    randomise(cednet, len(randomisation_steps(cednet)), seed=0)
    stem_norm = cednet.backbone.body.stem[1]
    assert torch.equal(stem_norm.weight, torch.ones_like(stem_norm.weight))
    assert torch.equal(stem_norm.bias, torch.zeros_like(stem_norm.bias))


def test_randomise_rejects_a_step_count_outside_the_cascade():
    detector = bundled("cednet")
    with pytest.raises(ValueError, match="steps must be in"):
        randomise(detector, len(randomisation_steps(detector)) + 1, seed=0)


# -- similarity ---------------------------------------------------------------------------------------------


def _maps(seed: int, shape=(24, 32)):
    rng = np.random.default_rng(seed)
    a = rng.random(shape) ** 2
    b = np.clip(a + rng.normal(0, 0.1, shape), 0, None)
    b[0, :4] = b[0, 4]  # ties
    return a, b


def _pearson_of_ranks(a, b) -> float:
    ra, rb = rankdata(a.ravel()), rankdata(b.ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra * ra).sum() * (rb * rb).sum()))


def test_map_similarity_matches_direct_computations():
    a, b = _maps(0)
    spearman, ssim = map_similarity(a, torch.from_numpy(b).float())
    assert spearman == pytest.approx(_pearson_of_ranks(a, b.astype(np.float32)), abs=1e-12)
    assert spearman == pytest.approx(spearmanr(a.ravel(), b.astype(np.float32).ravel())[0], abs=1e-12)
    b32 = b.astype(np.float32).astype(np.float64)
    assert ssim == pytest.approx(structural_similarity(a / a.max(), b32 / b32.max(), data_range=1.0), abs=1e-12)
    assert -1.0 <= ssim <= 1.0 and 0.0 < spearman < 1.0


def test_map_similarity_is_scale_invariant_and_one_for_identical_maps():
    a, b = _maps(1)
    base = map_similarity(a, b)
    for c in (1e-6, 3.0, 1e4):
        assert map_similarity(a * c, b) == pytest.approx(base, abs=1e-12)
        assert map_similarity(a, b * c) == pytest.approx(base, abs=1e-12)
    assert map_similarity(a, a) == pytest.approx((1.0, 1.0), abs=1e-12)
    assert map_similarity(torch.from_numpy(a), 2.0 * a) == pytest.approx((1.0, 1.0), abs=1e-12)


def test_map_similarity_nan_cases_and_bad_input():
    a, _ = _maps(2)
    zero, constant = np.zeros_like(a), np.full_like(a, 0.5)
    spearman, ssim = map_similarity(a, zero)
    assert math.isnan(spearman) and math.isnan(ssim)
    spearman, ssim = map_similarity(constant, a)
    assert math.isnan(spearman) and not math.isnan(ssim)
    with pytest.raises(ValueError, match="shape"):
        map_similarity(a, a[:, :-1])
    with pytest.raises(ValueError, match="negative"):
        map_similarity(a, -a)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        map_similarity(a[None], a[None])
    thin = a[:5] + 0.1  # narrower than SSIM's 7x7 window: Spearman only
    spearman, ssim = map_similarity(thin, thin * 2)
    assert spearman == pytest.approx(1.0) and math.isnan(ssim)


# -- table, summary, flag -----------------------------------------------------------------------------------


def test_table_summary_and_flag_on_made_up_maps():
    rng = np.random.default_rng(3)
    reference = [rng.random((16, 16)) for _ in range(3)]
    same = [r * 2 for r in reference]  # a map that ignores the weights: unchanged
    other = [rng.random((16, 16)) for _ in range(3)]
    table = pd.concat([
        randomisation_table("a", "blind", [1, 2, 3], reference, [same, other], ["head", "stem"]),
        randomisation_table("b", "faithful", [1, 2, 3], reference, [other, other], ["head", "stem"]),
    ], ignore_index=True)
    assert list(table.columns) == RANDOMISATION_COLUMNS and len(table) == 12
    blind_head = table.loc[(table["role"] == "a") & (table["randomised"] == 1), "spearman"]
    assert blind_head.tolist() == pytest.approx([1.0] * 3)
    summary = randomisation_summary(table)
    assert summary[["role", "randomised"]].values.tolist() == [["a", 1], ["a", 2], ["b", 1], ["b", 2]]
    assert summary["num_images"].tolist() == [3] * 4
    first = table[(table["role"] == "b") & (table["randomised"] == 1)]["spearman"]
    assert summary.loc[2, "spearman_median"] == pytest.approx(float(np.median(first)))
    q1, q3 = np.percentile(first, [25, 75])
    assert summary.loc[2, "spearman_iqr"] == pytest.approx(q3 - q1)
    sentences = flagged(table)
    assert len(sentences) == 1
    assert sentences[0].startswith("blind (a): its maps keep a median Spearman correlation of 1.00")
    assert f"(>= {FLAG_LEVEL:g})" in sentences[0]
    with pytest.raises(ValueError, match="step names"):
        randomisation_table("a", "x", [1], reference[:1], [same[:1]], ["head", "stem"])


def test_end_to_end_on_the_bundled_cednet():
    detector = bundled("cednet")
    detector.preprocess = replace(detector.preprocess, min_size=64, max_size=96)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 64, 96, generator=g)
    boxes = torch.tensor([[10.0, 8.0, 50.0, 40.0], [40.0, 20.0, 90.0, 60.0]])
    target = {"boxes": boxes, "labels": torch.tensor([0, 1])}
    reference = gradlens.gradient_maps(detector, [image], [target])
    steps = [name for name, _ in randomisation_steps(detector)]
    randomised = []
    for k in range(1, len(steps) + 1):
        copy_k = copy.deepcopy(detector)
        randomise(copy_k, k, seed=0)
        randomised.append(gradlens.gradient_maps(copy_k, [image], [target]))
    assert reference[0].shape == (64, 96)
    table = randomisation_table("a", "cednet", [5], reference, randomised, steps)
    assert list(table.columns) == RANDOMISATION_COLUMNS and len(table) == len(steps)
    assert table["randomised"].tolist() == list(range(1, len(steps) + 1)) and table["step"].tolist() == steps
    assert table["spearman"].notna().all() and table["ssim"].notna().all()
    summary = randomisation_summary(table)
    assert len(summary) == len(steps) and (summary["num_images"] == 1).all()
    assert summary["step"].tolist() == steps
    sentences = flagged(table, level=-1.0)
    assert len(sentences) == 1 and sentences[0].startswith("cednet (a):")
    assert "after the head is randomised" in sentences[0]
    assert flagged(table, level=1.01) == []
