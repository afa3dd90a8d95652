"""ConvNeXt and Swin detection backbones against the CEDNet fork's own code.

``tests/data/backbone_reference.pt`` was produced from the fork's ``convnext.py`` and
``swin_transformer.py`` by ``scripts/make_backbone_reference.py``: the fork's ordered state-dict
keys and shapes for every variant, and for two tiny configurations the fork's weights, two inputs
and the fork's outputs, computed in float64. The value comparisons run here in float64 as well, so
that they do not depend on how a CPU orders its float32 arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradlens.models.backbones.convnext import (
    CONVNEXT_VARIANTS,
    ConvNeXtBackbone,
    convnext_base_backbone,
    convnext_small_backbone,
    convnext_tiny_backbone,
)
from gradlens.models.backbones.swin import (
    SWIN_VARIANTS,
    SwinBackbone,
    drop_relative_position_index,
    swin_base_backbone,
    swin_small_backbone,
    swin_tiny_backbone,
)

REFERENCE = Path(__file__).parent / "data" / "backbone_reference.pt"
RPI = "relative_position_index"
# Tolerance (atol and rtol) of the float64 comparisons: the fork's outputs and batch-vs-single.
# Machine independent: float64 rounds ~1e-16 per operation, so a different CPU's summation order
# (vector width, blocking) moves these tiny models' outputs by ~1e-15 (measured: at most 3.1e-15
# absolute against the fork with ATEN_CPU_CAPABILITY=default/avx2/avx512), orders of magnitude
# below 1e-10. Real defects move them by far more (measured: one weight off by 1e-3, 2e-5 to 1e-4;
# a 1e-6 leak of the batch mean into each item, 2e-6; a transposed kernel, 4), some of which the
# former float32 tolerance of 1e-5 let through.
TOL64 = 1e-10

CONSTRUCTORS = {
    "convnext_tiny": convnext_tiny_backbone,
    "convnext_small": convnext_small_backbone,
    "convnext_base": convnext_base_backbone,
    "swin_tiny": swin_tiny_backbone,
    "swin_small": swin_small_backbone,
    "swin_base": swin_base_backbone,
}


@pytest.fixture(scope="module")
def ref():
    return torch.load(REFERENCE, weights_only=True)


def _variant_names():
    return list(torch.load(REFERENCE, weights_only=True)["variants"])


def _constructor(variant: str):
    for name, fn in CONSTRUCTORS.items():
        if variant == name or variant.startswith(name + "_out"):
            return fn
    raise KeyError(variant)


def _tiny_model(ref, name: str) -> torch.nn.Module:
    """The tiny model with the fork's weights, in float64 (the weights are float16-exact)."""
    entry = ref["tiny"][name]
    cls = ConvNeXtBackbone if entry["family"] == "convnext" else SwinBackbone
    model = cls(**entry["config"]).double().eval()
    state = {k: (v.double() if v.is_floating_point() else v.long()) for k, v in entry["state_dict"].items()}
    model.load_state_dict(drop_relative_position_index(state), strict=True)
    return model


def test_fixture_is_small_and_complete(ref):
    assert REFERENCE.stat().st_size < 300 * 1024
    assert set(ref["variants"]) == {
        *(f"convnext_{s}_out{o}" for s in ("tiny", "small", "base") for o in ("123", "0123")),
        "swin_tiny",
        "swin_small",
        "swin_base",
    }
    assert set(ref["tiny"]) == {"tiny_convnext", "tiny_swin"}


@pytest.mark.parametrize("variant", _variant_names())
def test_keys_and_shapes_equal_the_fork(ref, variant):
    entry = ref["variants"][variant]
    cfg = entry["config"]
    # the variant tables hold the fork configs' architecture
    table = CONVNEXT_VARIANTS if entry["family"] == "convnext" else SWIN_VARIANTS
    ours_cfg = table[variant.split("_out")[0]]
    for k, v in ours_cfg.items():
        assert (list(v) if isinstance(v, tuple) else v) == cfg[k], k

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = _constructor(variant)(out_indices=tuple(cfg["out_indices"]))
    sd = model.state_dict()
    fork = [(k, tuple(s)) for k, s in zip(entry["keys"], entry["shapes"]) if not k.endswith(RPI)]
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == fork

    # the fork's relative_position_index buffers exist here too (recomputed, not persistent)
    buffers = dict(model.named_buffers())
    for k, s in zip(entry["keys"], entry["shapes"]):
        if k.endswith(RPI):
            assert tuple(buffers[k].shape) == tuple(s)
    assert entry["family"] == "convnext" or any(k.endswith(RPI) for k in entry["keys"])


def test_constructor_defaults():
    with torch.device("meta"):
        c = convnext_tiny_backbone()
        s = swin_small_backbone()
        c4 = convnext_base_backbone(out_indices=(0, 1, 2, 3), drop_path_rate=0.0)
    assert c.out_indices == (1, 2, 3) and c.out_channels == [192, 384, 768]
    assert c4.out_channels == [128, 256, 512, 1024]
    assert all(isinstance(b.drop_path, torch.nn.Identity) for st in c4.stages for b in st)
    assert s.out_indices == (1, 2, 3) and s.out_channels == [96, 192, 384, 768]  # all stages returned


@pytest.mark.parametrize("name", ["tiny_convnext", "tiny_swin"])
def test_tiny_reproduces_the_fork_outputs(ref, name):
    model = _tiny_model(ref, name)
    entry = ref["tiny"][name]
    for k, v in entry["state_dict"].items():
        if k.endswith(RPI):
            assert torch.equal(model.get_buffer(k), v.long()), k
    for x, expected in zip(ref["inputs"], entry["outputs"]):
        with torch.no_grad():
            got = model(x.double())
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.dtype == e.dtype == torch.float64
            torch.testing.assert_close(g, e, atol=TOL64, rtol=TOL64)


def test_tiny_swin_late_maps_are_within_one_window(ref):
    """The first input exercises the fork's shift-and-mask on maps no larger than the window."""
    sizes = [tuple(o.shape[-2:]) for o in ref["tiny"]["tiny_swin"]["outputs"][0]]
    window = ref["tiny"]["tiny_swin"]["config"]["window_size"]
    assert any(h <= window and w <= window for h, w in sizes[1:])
    assert any(h > window or w > window for h, w in sizes)


@pytest.mark.parametrize("name", ["tiny_convnext", "tiny_swin"])
def test_batch_independence(ref, name):
    model = _tiny_model(ref, name)
    x = ref["inputs"][1].double()
    assert x.shape[0] == 2
    with torch.no_grad():
        both = model(x)
        singles = [model(x[i : i + 1]) for i in range(2)]
    for level, out in enumerate(both):
        for i in range(2):
            torch.testing.assert_close(out[i : i + 1], singles[i][level], atol=TOL64, rtol=TOL64)


@pytest.mark.parametrize("name", ["tiny_convnext", "tiny_swin"])
def test_wrong_state_dicts_are_refused(ref, name):
    entry = ref["tiny"][name]
    model = _tiny_model(ref, name)
    state = drop_relative_position_index({k: v.float() if v.is_floating_point() else v.long() for k, v in entry["state_dict"].items()})

    key = next(k for k, v in state.items() if v.dim() == 2)  # a Linear weight
    bad = dict(state)
    bad[key] = bad[key].t().contiguous() if bad[key].shape[0] != bad[key].shape[1] else bad[key][:-1]
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(bad, strict=True)

    missing = dict(state)
    del missing[key]
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(missing, strict=True)


def test_swin_relative_position_index_must_be_dropped(ref):
    """The fork's checkpoints carry the index; it is recomputed here, so strict loading refuses it."""
    entry = ref["tiny"]["tiny_swin"]
    model = SwinBackbone(**entry["config"])
    state = {k: v.float() if v.is_floating_point() else v.long() for k, v in entry["state_dict"].items()}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict(state, strict=True)
    model.load_state_dict(drop_relative_position_index(state), strict=True)


def test_convnext_normed_output_feeds_the_next_stage(ref):
    """Fork behaviour: out_indices changes later stages (the normed map is what they receive)."""
    entry = ref["tiny"]["tiny_convnext"]
    state = {k: v.float() for k, v in entry["state_dict"].items()}
    full = ConvNeXtBackbone(**entry["config"]).eval()
    full.load_state_dict(state)
    cfg = {**entry["config"], "out_indices": (3,)}
    last = ConvNeXtBackbone(**cfg).eval()
    last.load_state_dict({k: v for k, v in state.items() if not k.startswith(("norm0.", "norm1.", "norm2."))})
    x = ref["inputs"][0].float()
    with torch.no_grad():
        assert not torch.allclose(full(x)[3], last(x)[0])
