"""gradlens.models.backbones.focalnet against answers recorded from the official FocalNet code.

``tests/data/focalnet_reference.pt`` comes from ``scripts/make_focalnet_reference.py``, which runs
the official ``classification/focalnet.py`` and ``detection/mmdet/models/backbones/focalnet.py``;
see its docstring for the layout. Nothing here needs timm, mmcv or the official code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradlens.errors import CheckpointError
from gradlens.models.backbones import focalnet as F
from gradlens.profile import count
from tests.fixture_keys import decode_keys, key_shapes

FIXTURE = Path(__file__).parent / "data" / "focalnet_reference.pt"
# gradlens and the official outputs (recorded in float64) are compared in float64. Float64 rounds at
# ~1e-16 per operation, so the order a CPU's kernels add in (AVX2 vs AVX-512, threads) moves these
# outputs (|values| < 5) by ~1e-14 at most: four orders of magnitude below TOL64 on any machine, while
# a real defect (one weight off by 1e-3, a transposed kernel) moves them by 3e-5 and more. Measured
# (ATEN_CPU_CAPABILITY avx512/avx2/default, 1-2 threads): gradlens vs official <= 4.3e-15 absolute,
# batch vs single <= 3.2e-15. (Float32 agreed to 1e-5 only on the recording CPU.)
TOL64 = dict(rtol=1e-10, atol=1e-10)
SIZES = ("tiny", "small", "base")
PAPER_RF = {"tiny": "srf", "small": "srf", "base": "lrf"}  # Table A1's rows (by ImageNet top-1)
LEVELS = {"srf": [2, 2, 2, 2], "lrf": [3, 3, 3, 3]}


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURE, weights_only=True)




def as_lists(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def tiny_classifier(ref, name: str) -> F.FocalNet:
    """In float64, as the fixture's outputs were computed (the float16 weights cast exactly)."""
    entry = ref["tiny_classifiers"][name]
    model = F.FocalNet(**entry["config"]).double()
    model.load_state_dict({k: v.double() for k, v in entry["state_dict"].items()}, strict=True)
    return model.eval()


def tiny_backbone(ref, name: str) -> F.FocalNetBackbone:
    """In float64, as the fixture's outputs were computed (the float16 weights cast exactly)."""
    entry = ref["tiny_backbones"][name]
    model = F.FocalNetBackbone(**entry["config"]).double()
    model.load_state_dict({k: v.double() for k, v in entry["state_dict"].items()}, strict=True)
    return model.eval()


def mmdet_state_dict(layout) -> dict[str, torch.Tensor]:
    """A RetinaNet-shaped mmdetection state dict (meta tensors) with the given backbone layout."""
    sd = {f"backbone.{k}": torch.empty(s, device="meta") for k, s in layout}
    sd["neck.lateral_convs.0.conv.weight"] = torch.empty(256, 192, 1, 1, device="meta")
    sd["bbox_head.retina_cls.weight"] = torch.empty(720, 256, 3, 3, device="meta")
    return sd


# --------------------------------------------------------------------------- fixture


def test_fixture_is_small_and_complete(ref):
    assert FIXTURE.stat().st_size < 300 * 1024
    assert set(ref["classifiers"]) == {f"focalnet_{s}_{rf}" for s in SIZES for rf in ("srf", "lrf")}
    assert set(ref["backbones"]) == {
        *(f"mask_rcnn_{s}_{rf}" for s in SIZES for rf in ("srf", "lrf")), "atss_tiny_srf", "atss_tiny_lrf", "mask_rcnn_tiny_deeper"
    }
    assert [tuple(x.shape) for x in ref["inputs"]] == [(1, 3, 36, 52), (2, 3, 38, 61)]


# --------------------------------------------------------------------------- names and shapes


@pytest.mark.parametrize("size", SIZES)
def test_default_settings_are_the_papers_rows(ref, size):
    official = ref["classifiers"][f"focalnet_{size}_{PAPER_RF[size]}"]["config"]
    assert as_lists(F.FOCALNET_CLASSIFIERS[f"focalnet_{size}"]) == official
    det = ref["backbones"][f"mask_rcnn_{size}_{PAPER_RF[size]}"]["config"]
    mine = as_lists(F.FOCALNET_VARIANTS[f"focalnet_{size}"])
    assert all(det[k] == v for k, v in mine.items()), mine


@pytest.mark.parametrize("name", [f"focalnet_{s}_{rf}" for s in SIZES for rf in ("srf", "lrf")])
def test_classifier_state_dict_layout_matches_official(ref, name):
    entry = ref["classifiers"][name]
    size, rf = name.split("_")[1:]
    with torch.device("meta"):  # layout only
        model = getattr(F, f"focalnet_{size}")(focal_levels=LEVELS[rf])
    assert key_shapes(model) == decode_keys(entry["keys"])
    assert model.focal_levels == entry["config"]["focal_levels"] and model.focal_windows == entry["config"]["focal_windows"]
    assert model.depths == entry["config"]["depths"] and model.embed_dim == entry["config"]["embed_dim"]


@pytest.mark.parametrize("name", [f"mask_rcnn_{s}_{rf}" for s in SIZES for rf in ("srf", "lrf")] + ["atss_tiny_srf", "atss_tiny_lrf"])
def test_backbone_state_dict_layout_matches_official(ref, name):
    entry = ref["backbones"][name]
    cfg = entry["config"]
    size = name.split("_")[-2]
    overrides = {k: cfg[k] for k in ("focal_levels", "focal_windows", "out_indices")}
    with torch.device("meta"):
        model = getattr(F, f"focalnet_{size}_backbone")(**overrides)
        generic = F.FocalNetBackbone(**cfg)
    assert key_shapes(model) == decode_keys(entry["keys"]) == key_shapes(generic)
    assert model.out_channels == [cfg["embed_dim"] * 2**i for i in range(4) if i in cfg["out_indices"]]


def test_constructor_defaults():
    with torch.device("meta"):
        t = F.focalnet_tiny_backbone()
        b = F.focalnet_base_backbone(drop_path_rate=0.0, out_indices=(1, 2, 3))
        c = F.focalnet_small()
    assert t.out_indices == (0, 1, 2, 3) and t.out_channels == [96, 192, 384, 768]
    assert t.focal_levels == [2, 2, 2, 2] and t.focal_windows == [9, 9, 9, 9]
    assert b.out_channels == [256, 512, 1024] and b.focal_levels == [3, 3, 3, 3]
    assert all(isinstance(blk.drop_path, torch.nn.Identity) for layer in b.layers for blk in layer.blocks)
    assert c.focal_windows == [3, 3, 3, 3] and c.num_classes == 1000
    assert F.imagenet_state_dict({"model": {"a": 1}, "epoch": 300}) == {"a": 1}
    assert F.imagenet_state_dict({"a": 1}) == {"a": 1}


@pytest.mark.parametrize(
    "kwargs",
    [dict(focal_levels=(2, 2, 2)), dict(focal_windows=(3, 3, 3, 3, 3)), dict(out_indices=(4,)), dict(out_indices=(1, 1)),
     dict(out_indices=()), dict(focal_levels=(0, 2, 2, 2))],
)
def test_bad_settings_raise_value_error(kwargs):
    with pytest.raises(ValueError), torch.device("meta"):
        F.focalnet_tiny_backbone(**kwargs)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("name", ["plain", "options"])
def test_classifier_reproduces_official_logits(ref, name):
    model = tiny_classifier(ref, name)
    entry = ref["tiny_classifiers"][name]
    assert list(model.state_dict()) == list(entry["state_dict"])  # gamma_1/gamma_2 before a block's modules
    for x, want in zip(ref["inputs"], entry["outputs"]):
        with torch.no_grad():
            got = model(x.double())
        assert got.shape == (x.shape[0], entry["config"]["num_classes"])
        torch.testing.assert_close(got, want, **TOL64)  # both float64 (assert_close checks dtypes)


@pytest.mark.parametrize("name", ["plain", "options"])
def test_backbone_reproduces_official_maps(ref, name):
    model = tiny_backbone(ref, name)
    entry = ref["tiny_backbones"][name]
    assert list(model.state_dict()) == list(entry["state_dict"])  # norm{i} in the order out_indices gives
    for x, want in zip(ref["inputs"], entry["outputs"]):
        with torch.no_grad():
            got = model(x.double())
        assert isinstance(got, tuple) and len(got) == len(want) == len(model.out_channels)
        for g, w, c in zip(got, want, model.out_channels):
            assert g.shape[1] == c
            torch.testing.assert_close(g, w, **TOL64)  # both float64 (assert_close checks dtypes)


def test_backbone_pads_and_classifier_floors(ref):
    x = ref["inputs"][1].double()  # 38 x 61
    with torch.no_grad():
        maps = tiny_backbone(ref, "plain")(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(10, 16), (5, 8), (3, 4), (2, 2)]
    assert [tuple(m.shape[-2:]) for m in ref["tiny_backbones"]["plain"]["outputs"][1]] == [(10, 16), (5, 8), (3, 4), (2, 2)]


@pytest.mark.parametrize("name", ["plain", "options"])
def test_batch_items_are_independent(ref, name):
    model, backbone = tiny_classifier(ref, name), tiny_backbone(ref, name)
    x = ref["inputs"][1].double()  # float64 like the models: batched and single runs may add in other orders
    with torch.no_grad():
        logits, maps = model(x), backbone(x)
        for i in range(x.shape[0]):
            torch.testing.assert_close(logits[i : i + 1], model(x[i : i + 1]), **TOL64)
            for m_batch, m_alone in zip(maps, backbone(x[i : i + 1])):
                torch.testing.assert_close(m_batch[i : i + 1], m_alone, **TOL64)


def test_tiny_config_gradient_reaches_the_input():
    torch.manual_seed(0)
    model = F.FocalNetBackbone(**F.TINY_FOCALNET).eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    maps = model(x)  # ~20 ms forward + backward on one core
    sum(m.square().mean() for m in maps).backward()
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 8), (4, 4), (2, 2)]  # strides 8, 16, 32
    assert [m.shape[1] for m in maps] == model.out_channels
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# Table A1: FocalNet-T 28M / 4.5G, -S 50M / 8.6G, -B 89M / 15.4G. Measured here (gradlens.profile.count,
# MACs): T (SRF) 28.43M / 4.40G; the 4.5G is the LRF model's (4.47G; README: SRF 4.4, LRF 4.5).
@pytest.mark.parametrize(
    "size,params_m,macs_g", [("tiny", 28.43, 4.40), ("small", 49.89, 8.60), ("base", 88.75, 15.40)]
)
def test_classifier_params_and_macs_at_224(size, params_m, macs_g):
    with torch.device("meta"):  # counting needs no initialisation (the values do not matter): ~1 s per model
        model = getattr(F, f"focalnet_{size}")()
    model = model.to_empty(device="cpu").eval()
    x = torch.zeros(1, 3, 224, 224)
    params, macs = count(model, lambda: model(x))
    assert round(params / 1e6, 2) == params_m
    assert round(macs / 1e9, 2) == macs_g


# --------------------------------------------------------------------------- checkpoints

EXPECTED = {
    "mask_rcnn_tiny_srf": ("retinanet_focalnet_tiny", {}),
    "mask_rcnn_tiny_lrf": ("retinanet_focalnet_tiny", {"focal_levels": [3, 3, 3, 3]}),
    "mask_rcnn_small_srf": ("retinanet_focalnet_small", {}),
    "mask_rcnn_small_lrf": ("retinanet_focalnet_small", {"focal_levels": [3, 3, 3, 3]}),
    "mask_rcnn_base_srf": ("retinanet_focalnet_base", {"focal_levels": [2, 2, 2, 2]}),
    "mask_rcnn_base_lrf": ("retinanet_focalnet_base", {}),
    "atss_tiny_srf": ("retinanet_focalnet_tiny", {"focal_windows": [11, 9, 9, 7], "out_indices": [1, 2, 3]}),
    "atss_tiny_lrf": (
        "retinanet_focalnet_tiny", {"focal_levels": [3, 3, 3, 3], "focal_windows": [11, 9, 9, 7], "out_indices": [1, 2, 3]}
    ),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_recognise_official_layouts(ref, name):
    layout = decode_keys(ref["backbones"][name]["keys"])
    sd = mmdet_state_dict(layout)
    assert F.is_focalnet_checkpoint(sd)
    arch, options = F.recognise(sd)
    assert (arch, options) == EXPECTED[name]
    with torch.device("meta"):  # the options rebuild exactly the stored backbone
        rebuilt = getattr(F, arch.removeprefix("retinanet_") + "_backbone")(**options, drop_path_rate=0.0)
    assert key_shapes(rebuilt) == layout


def test_recognise_refuses_other_focalnets(ref):
    with pytest.raises(CheckpointError, match="matches none of FocalNet-T/S/B"):
        F.recognise(mmdet_state_dict(decode_keys(ref["backbones"]["mask_rcnn_tiny_deeper"]["keys"])))
    tiny = [(k, tuple(v.shape)) for k, v in ref["tiny_backbones"]["plain"]["state_dict"].items()]
    with pytest.raises(CheckpointError, match="matches none"):
        F.recognise(mmdet_state_dict(tiny))
    layout = decode_keys(ref["backbones"]["mask_rcnn_tiny_srf"]["keys"])
    broken = [(k, (s[0] + 1, *s[1:]) if k == "layers.2.blocks.3.mlp.fc1.weight" else s) for k, s in layout]
    with pytest.raises(CheckpointError, match="layers.2.blocks.3.mlp.fc1"):
        F.recognise(mmdet_state_dict(broken))
    missing = [(k, s) for k, s in layout if not k.startswith("layers.1.blocks.1.modulation.focal_layers.1.")]
    with pytest.raises(CheckpointError, match="layers.1.blocks.1.modulation.focal_layers.1"):
        F.recognise(mmdet_state_dict(missing))
    no_norms = [(k, s) for k, s in layout if not k.startswith("norm")]
    with pytest.raises(CheckpointError, match="cannot be rebuilt"):
        F.recognise(mmdet_state_dict(no_norms))
    with pytest.raises(CheckpointError, match="no FocalNet"):
        F.recognise({"backbone.layer1.0.conv1.weight": torch.empty(1, device="meta")})


OTHER_FAMILIES = {
    "convnext": ["backbone.downsample_layers.0.0.weight", "backbone.stages.0.0.dwconv.weight", "backbone.norm3.weight"],
    "swin": ["backbone.patch_embed.proj.weight", "backbone.layers.0.blocks.0.attn.relative_position_bias_table",
             "backbone.layers.0.blocks.0.attn.qkv.weight", "backbone.layers.0.blocks.0.mlp.fc1.weight", "backbone.norm1.weight"],
    "cednet": ["backbone.reduce_convs.0.0.weight", "backbone.stem.0.weight"],
    "resnet": ["backbone.conv1.weight", "backbone.layer1.0.conv1.weight"],
    "hrnet": ["backbone.conv1.weight", "backbone.transition1.0.0.weight", "backbone.stage2.0.branches.0.0.conv1.weight"],
    "msg": ["backbone.patch_embed.proj.weight", "backbone.layers.0.blocks.0.attn.qkv.weight",
            "backbone.layers.0.blocks.0.attn.rel_pos_msg", "backbone.layers.0.downsample.reduction.weight"],
    "revcol": ["backbone.stem.0.weight", "backbone.subnet0.level0.blocks.0.dwconv.weight", "backbone.subnet0.alpha0"],
}


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_is_focalnet_checkpoint_is_false_for_other_families(family):
    sd = {k: torch.empty(1, device="meta") for k in OTHER_FAMILIES[family]}
    sd["bbox_head.retina_cls.weight"] = torch.empty(1, device="meta")
    assert not F.is_focalnet_checkpoint(sd)
