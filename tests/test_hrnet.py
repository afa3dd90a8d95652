"""gradlens.models.backbones.hrnet against answers recorded from the official HRNet code.

``tests/data/hrnet_reference.pt`` comes from ``scripts/make_hrnet_reference.py``, which runs the
official classification ``lib/models/cls_hrnet.py`` and mmdetection's ``backbones/hrnet.py`` (CEDNet
fork); see its docstring for the layout. Nothing here needs the official code, mmcv or mmdet.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradlens.errors import CheckpointError
from gradlens.models.backbones import hrnet as H
from gradlens.profile import count
from tests.fixture_keys import decode_keys, key_shapes

FIXTURE = Path(__file__).parent / "data" / "hrnet_reference.pt"
CONFIGS = ["tiny_w32like", "tiny_mixed"]
# gradlens against the official answers, both in float64. float64 rounds at ~1e-16 per operation, so the
# same function computed in another order (another CPU's SIMD kernels) differs by ~1e-15: measured here
# 1.8e-15 at most (ATEN_CPU_CAPABILITY=default against the AVX-512 recording; 0 on avx2 and avx512),
# five orders of magnitude below this tolerance, while a real defect moves the outputs far above it (one
# weight or BN statistic off by 1e-3: 5e-6 to 3e-4 measured; a transposed 3x3 kernel: 1e-2 and more).
# In float32 the CPU's ordering alone moved them by ~1e-5, as much as the smallest of those defects.
TOL64 = dict(rtol=1e-10, atol=1e-10)

# Measured with gradlens.profile.count at 224x224. The official README's HRNet-W32-C row is 41.2M / 8.31
# "GFLOPs": the official counter (lib/utils/modelsummary.py) sums conv/linear multiply-adds and divides
# by 1024**3 (8.92e9 / 2**30 = 8.31). Table A1's 38M / 7.6G is the README's HRNet-W30-C row (37.7M / 7.55).
W32_CLASSIFIER_PARAMS = 41_232_680
W32_CLASSIFIER_MACS_G = 8.92  # = 8.31 "GFLOPs" in the official counter, which divides by 1024**3


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURE, weights_only=True)




def tiny_state_dict(ref: dict, name: str) -> dict[str, torch.Tensor]:
    """The official tiny classifier's state dict, rebuilt from the fixture's flat storage."""
    cfg = ref["tiny"][name]
    flat, start, sd = cfg["weights"].float(), 0, {}
    for key, shape in decode_keys(cfg["classifier_keys"]):
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(ref["num_batches_tracked"])
        elif key in ref["tiny_stem"]:
            sd[key] = ref["tiny_stem"][key].float()
        else:
            n = int(torch.Size(shape).numel())
            sd[key] = flat[start : start + n].view(shape)
            start += n
    assert start == flat.numel()
    return sd


def tiny_classifier(ref: dict, name: str) -> H.HighResolutionNet:
    cfg = ref["tiny"][name]
    model = H.HighResolutionNet(cfg["extra"], **cfg["classifier_kwargs"])
    model.load_state_dict(tiny_state_dict(ref, name), strict=True)
    return model.eval()


def tiny_backbone(ref: dict, name: str) -> H.HRNetBackbone:
    cfg = ref["tiny"][name]
    model = H.HRNetBackbone(cfg["extra"], **cfg["backbone_kwargs"])
    sd = tiny_state_dict(ref, name)
    model.load_state_dict({k: sd[k] for k, _ in decode_keys(cfg["backbone_keys"])}, strict=True)
    return model.eval()


def meta_state_dict(pairs, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(shape, device="meta") for k, shape in pairs}


# --------------------------------------------------------------------------- names and shapes


def test_variant_settings_match_official_config(ref):
    assert set(H.HRNET_VARIANTS) == set(ref["variants"]) == {"hrnet_w32"}
    assert H._normalised(H.HRNET_VARIANTS["hrnet_w32"]["extra"]) == ref["variants"]["hrnet_w32"]["extra"]


def test_classifier_state_dict_layout_matches_official(ref):
    with torch.device("meta"):
        model = H.hrnet_w32()
    assert key_shapes(model) == decode_keys(ref["variants"]["hrnet_w32"]["classifier"])


def test_backbone_state_dict_layout_matches_mmdet(ref):
    with torch.device("meta"):
        model = H.hrnet_w32_backbone()
    assert key_shapes(model) == decode_keys(ref["variants"]["hrnet_w32"]["backbone"])
    assert model.out_indices == (0, 1, 2, 3) and model.out_channels == [32, 64, 128, 256]
    assert model.strides == (4, 8, 16, 32)
    with torch.device("meta"):
        last3 = H.hrnet_w32_backbone(out_indices=(1, 2, 3), drop_path_rate=0.0)
    assert key_shapes(last3) == key_shapes(model) and last3.out_channels == [64, 128, 256]


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_layouts_match_official(ref, name):
    cfg = ref["tiny"][name]
    with torch.device("meta"):
        cls = H.HighResolutionNet(cfg["extra"], **cfg["classifier_kwargs"])
        det = H.HRNetBackbone(cfg["extra"], **cfg["backbone_kwargs"])
    assert key_shapes(cls) == decode_keys(cfg["classifier_keys"])
    assert key_shapes(det) == decode_keys(cfg["backbone_keys"])


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("name", CONFIGS)
def test_classifier_reproduces_official_logits(ref, name):
    model = tiny_classifier(ref, name).double()
    with torch.no_grad():
        got = model(ref["inputs"][0].double())
    assert got.dtype == ref["tiny"][name]["logits"].dtype == torch.float64
    torch.testing.assert_close(got, ref["tiny"][name]["logits"], **TOL64)


@pytest.mark.parametrize("name", CONFIGS)
def test_backbone_reproduces_official_maps(ref, name):
    cfg = ref["tiny"][name]
    model = tiny_backbone(ref, name).double()
    assert len(ref["inputs"][1].shape) == 4 and ref["inputs"][1].shape[-1] % 32  # not a multiple of 32
    for x, want in zip(ref["inputs"], cfg["backbone_outputs"], strict=True):
        with torch.no_grad():
            got = model(x.double())
        assert isinstance(got, tuple) and len(got) == len(want)
        assert [t.shape[1] for t in got] == model.out_channels
        for g, w in zip(got, want):
            assert g.dtype == w.dtype == torch.float64
            torch.testing.assert_close(g, w, **TOL64)


def test_out_indices_select_branches(ref):
    cfg = ref["tiny"]["tiny_w32like"]
    full = tiny_backbone(ref, "tiny_w32like")
    last3 = H.HRNetBackbone(cfg["extra"], out_indices=(3, 1, 2))
    last3.load_state_dict(full.state_dict(), strict=True)
    last3.eval()
    x = ref["inputs"][0].float()
    with torch.no_grad():
        a, b = full(x), last3(x)
    assert last3.out_indices == (1, 2, 3) and last3.strides == (8, 16, 32)
    assert len(b) == 3 and all(torch.equal(u, v) for u, v in zip(a[1:], b))
    for bad in ((), (4,), (1, 1)):
        with pytest.raises(ValueError):
            H.HRNetBackbone(cfg["extra"], out_indices=bad)
    with pytest.raises(ValueError, match="0..0"):
        H.HRNetBackbone(cfg["extra"], multiscale_output=False, out_indices=(1,))
    with pytest.raises(ValueError, match="drop_path_rate"):
        H.HRNetBackbone(cfg["extra"], drop_path_rate=0.1)


def test_inputs_the_official_code_rejects_raise_value_error(ref):
    model = tiny_backbone(ref, "tiny_w32like")
    classifier = tiny_classifier(ref, "tiny_w32like")
    assert ref["official_rejects"]
    for shape in ref["official_rejects"]:
        with pytest.raises(ValueError, match="multiples of 8"):
            model(torch.zeros(shape))
        with pytest.raises(ValueError, match="multiples of 8"):
            classifier(torch.zeros(shape))


def test_norm_eval_keeps_running_statistics_in_training_mode(ref):
    model = tiny_backbone(ref, "tiny_w32like")
    x = ref["inputs"][0].float()
    with torch.no_grad():
        want = model(x)
        got = model.train()(x)  # norm_eval=True (mmdetection's default): BN stays in eval mode
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    cfg = ref["tiny"]["tiny_w32like"]
    plain = H.HRNetBackbone(cfg["extra"], norm_eval=False).train()
    assert all(m.training for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_gradient_flows_to_the_input_through_tiny_backbone():
    model = H.HRNetBackbone(**H.TINY_HRNET).eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    feats = model(x)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2] and [f.shape[1] for f in feats] == model.out_channels
    sum(f.square().mean() for f in feats[1:]).backward()  # what the FPN reads: strides 8..32
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------- recognising checkpoints


def retinanet_state_dict(backbone_pairs) -> dict[str, torch.Tensor]:
    sd = meta_state_dict(backbone_pairs, "backbone.")
    for i, c in enumerate((64, 128, 256)):
        sd[f"neck.lateral_convs.{i}.conv.weight"] = torch.empty(256, c, 1, 1, device="meta")
    sd["bbox_head.retina_cls.weight"] = torch.empty(720, 256, 3, 3, device="meta")
    return sd


def test_recognise_w32_from_official_key_layout(ref):
    sd = retinanet_state_dict(decode_keys(ref["variants"]["hrnet_w32"]["backbone"]))
    assert H.is_hrnet_checkpoint(sd)
    assert H.recognise(sd) == ("retinanet_hrnet_w32", {})
    name, options = H.recognise(sd)
    with torch.device("meta"):
        rebuilt = H.hrnet_w32_backbone(**options)
    assert set(rebuilt.state_dict()) == {k[len("backbone."):] for k in sd if k.startswith("backbone.")}


def test_recognise_rejects_other_hrnets(ref):
    # a tiny HRNet is an HRNet but not W32
    tiny = retinanet_state_dict(decode_keys(ref["tiny"]["tiny_w32like"]["backbone_keys"]))
    assert H.is_hrnet_checkpoint(tiny)
    with pytest.raises(CheckpointError, match="matches none of hrnet_w32"):
        H.recognise(tiny)
    # W32 with one module less in stage 3
    pairs = [(k, s) for k, s in decode_keys(ref["variants"]["hrnet_w32"]["backbone"]) if not k.startswith("stage3.3.")]
    with pytest.raises(CheckpointError, match="stage3: 3xBASIC"):
        H.recognise(retinanet_state_dict(pairs))
    # W32 with 48-channel branches' first conv
    wide = retinanet_state_dict(decode_keys(ref["variants"]["hrnet_w32"]["backbone"]))
    wide["backbone.stage2.0.branches.0.0.conv1.weight"] = torch.empty(48, 32, 3, 3, device="meta")
    with pytest.raises(CheckpointError):
        H.recognise(wide)
    # mmdetection's multiscale_output=False: one map only
    single = retinanet_state_dict(decode_keys(ref["tiny"]["tiny_mixed"]["backbone_keys"]))
    with pytest.raises(CheckpointError, match="multiscale_output=False"):
        H.recognise(single)


OTHER_FAMILIES = {
    "convnext": ["backbone.downsample_layers.0.0.weight", "backbone.stages.0.0.dwconv.weight", "backbone.norm1.weight"],
    "swin": ["backbone.patch_embed.proj.weight", "backbone.layers.0.blocks.0.attn.relative_position_bias_table"],
    "cednet": ["backbone.stem.0.weight", "backbone.stages.1.0.encoder.0.0.dwconv.weight", "backbone.reduce_convs.0.0.weight"],
    "resnet": ["backbone.conv1.weight", "backbone.bn1.weight", "backbone.layer1.0.conv1.weight", "backbone.layer3.5.conv3.weight"],
    "focalnet": ["backbone.patch_embed.proj.weight", "backbone.layers.0.blocks.0.modulation.focal_layers.0.0.weight"],
    "msg": ["backbone.patch_embed.proj.weight", "backbone.msg_tokens", "backbone.layers.0.blocks.0.attn.rel_pos_msg"],
    "revcol": ["backbone.stem.0.weight", "backbone.subnet0.alpha0", "backbone.subnet0.level0.down.0.weight"],
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families_are_not_hrnet(family):
    sd = {k: torch.empty(1, device="meta") for k in OTHER_FAMILIES[family]}
    sd["bbox_head.retina_cls.weight"] = torch.empty(720, 256, 3, 3, device="meta")
    assert not H.is_hrnet_checkpoint(sd)
    with pytest.raises(CheckpointError, match="not an HRNet"):
        H.recognise(sd)


# --------------------------------------------------------------------------- size (Table A1)


def test_w32_classifier_parameters_and_macs():
    model = H.hrnet_w32().eval()
    x = torch.zeros(1, 3, 224, 224)
    params, macs = count(model, lambda: model(x))
    assert params == W32_CLASSIFIER_PARAMS == sum(p.numel() for p in model.parameters())
    assert round(macs / 1e9, 2) == W32_CLASSIFIER_MACS_G
