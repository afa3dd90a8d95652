"""gradlens.models.backbones.revcol against answers recorded from the official RevCol code.

``tests/data/revcol_reference.pt`` comes from ``scripts/make_revcol_reference.py``, which runs the
official ``models/revcol.py`` (ImageNet ``FullNet``) and ``Detection/mmdet/models/backbones/revcol.py``
(detection ``RevCol``); see its docstring for the layout. Nothing here needs timm, mmcv or the
official code.

Comparisons of numbers run in float64 (the fixture's outputs are float64 answers of the official
code): float32 results of the same function differ between CPUs by ~1e-5 (up to 3e-5 in the
decoders' images), float64 ones by ~1e-13 at most.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from gradlens.errors import CheckpointError
from gradlens.models.backbones import revcol as R
from gradlens.profile import count
from tests.fixture_keys import decode_keys, key_shapes

FIXTURE = Path(__file__).parent / "data" / "revcol_reference.pt"
VARIANTS = ["revcol_tiny", "revcol_small", "revcol_base"]
CONFIGS = ["tiny_supv", "tiny_k5"]
# Machine independent: float64 rounding is ~1e-16 per operation, so however a CPU orders its sums the
# answers of the same function through these tiny networks (values of order 1, at most ~8) agree to
# ~1e-13. Measured, gradlens vs the official float64 answers: bit-identical on the recording CPU
# (AVX-512, and with ATEN_CPU_CAPABILITY=avx2), at most 1.0e-13 (decoder images; logits 2e-15, maps
# 2e-14) with ATEN_CPU_CAPABILITY=default; batched vs single at most 1.4e-14. A real defect is far above: one
# weight off by 1e-3 moves the outputs by 2e-5..6e-4 (off by 1e-6: 2e-8..6e-7). 1e-10 leaves three
# orders of magnitude below and more than two above even the 1e-6 defect.
TOL64 = dict(rtol=1e-10, atol=1e-10)

# gradlens.profile.count at 224x224 (eval forward: parameters it reaches, MACs). Table A1 / the
# official README: RevCol-T 30M / 4.5G, RevCol-S 60M / 9.0G, RevCol-B 138M / 16.6G.
PROFILE = {
    "revcol_tiny": (30_455_208, 4_517_355_520),
    "revcol_small": (60_567_464, 9_043_832_832),
    "revcol_base": (138_615_328, 16_585_449_984),
}


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURE, weights_only=True)




def official_weights(cfg: dict) -> dict[str, torch.Tensor]:
    """The official classifier's state dict, rebuilt from the flat float16 buffer (float32; exact)."""
    sd, start = {}, 0
    for key, shape in decode_keys(cfg["classifier_keys"]):
        n = int(torch.Size(shape).numel())
        sd[key] = cfg["weights"][start : start + n].view(shape).float()
        start += n
    assert start == cfg["weights"].numel()
    return sd


def classifier_kwargs(cfg: dict) -> dict:
    kw = dict(cfg["classifier_kwargs"])
    kw["drop_path_rate"] = kw.pop("drop_path")
    return kw


def backbone_kwargs(cfg: dict) -> dict:
    kw = dict(cfg["backbone_kwargs"])
    kw["drop_path_rate"] = kw.pop("drop_path")
    return kw


def tiny_classifier(cfg: dict) -> R.RevCol:
    model = R.RevCol(**classifier_kwargs(cfg))
    model.load_state_dict(official_weights(cfg), strict=True)
    return model.eval()


def tiny_backbone(cfg: dict) -> R.RevColBackbone:
    model = R.RevColBackbone(**backbone_kwargs(cfg))
    sd = official_weights(cfg)
    model.load_state_dict({k: v for k, v in sd.items() if k.startswith(("stem.", "subnet"))}, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- names and shapes


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_settings_match_official(ref, name):
    mine = R.REVCOL_VARIANTS[name]
    det = ref["variants"][name]["backbone_settings"]
    for key in ("channels", "layers", "num_subnet"):
        assert list(mine[key]) == det[key] if key != "num_subnet" else mine[key] == det[key], key
    assert mine["drop_path_rate"] == det["drop_path"]
    with torch.device("meta"):
        assert list(getattr(R, f"{name}_backbone")(drop_path_rate=0.0).out_indices) == det["out_indices"]
    cls = ref["variants"][name]["classifier_settings"]
    assert [list(mine["channels"]), list(mine["layers"]), mine["num_subnet"], mine["kernel_size"]] == [
        cls["channels"], cls["layers"], cls["num_subnet"], cls["kernel_size"]
    ]
    assert cls["inter_supv"] is True and cls["num_classes"] == 1000
    assert R._CLASSIFIER_DROP_PATH[name] == cls["drop_path"]


@pytest.mark.parametrize("name", VARIANTS)
def test_classifier_state_dict_layout_matches_official(ref, name):
    with torch.device("meta"):  # layout only: no memory, no initialisation cost
        model = getattr(R, name)()
    assert key_shapes(model) == decode_keys(ref["variants"][name]["classifier"])
    assert sum(p.numel() for p in model.parameters()) == ref["variants"][name]["classifier_params"]


@pytest.mark.parametrize("name", VARIANTS)
def test_backbone_state_dict_layout_matches_official(ref, name):
    with torch.device("meta"):
        model = getattr(R, f"{name}_backbone")(drop_path_rate=0.0)
    assert key_shapes(model) == decode_keys(ref["variants"][name]["backbone"])
    assert model.out_channels == list(R.REVCOL_VARIANTS[name]["channels"])
    assert model.out_indices == (0, 1, 2, 3)


# --------------------------------------------------------------------------- numbers


def test_fixture_exercises_the_alpha_clamp(ref):
    for name in CONFIGS:
        alphas = torch.cat([v.flatten() for k, v in official_weights(ref["configs"][name]).items() if ".alpha" in k and not k.startswith("subnet0.")])
        assert (alphas.abs() < 1e-3).any() and (alphas == 0).any() and (alphas < 0).any()


@pytest.mark.parametrize("name", CONFIGS)
def test_classifier_reproduces_official_logits(ref, name):
    cfg = ref["configs"][name]
    model = tiny_classifier(cfg).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(model(ref["inputs"]["classifier"].double()), cfg["logits"], **TOL64)
        model.train()  # the official training outputs: one logit tensor per head, one image per decoder
        logits, images = model(ref["inputs"]["classifier_train"].double())
    assert len(logits) == len(cfg["train_logits"]) == (4 if cfg["classifier_kwargs"]["inter_supv"] else 1)
    assert len(images) == len(cfg["train_images"])
    for got, want in zip(logits + images, cfg["train_logits"] + cfg["train_images"]):
        torch.testing.assert_close(got, want, **TOL64)
    # the clamp applies to the values used; unlike the official code it leaves the parameters as loaded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", CONFIGS)
def test_backbone_reproduces_official_features(ref, name):
    cfg = ref["configs"][name]
    model = tiny_backbone(cfg)
    assert key_shapes(model) == decode_keys(cfg["backbone_keys"])
    model.double()
    for x, wants in zip(ref["inputs"]["backbone"], cfg["backbone_outputs"]):
        with torch.no_grad():
            feats = model(x.double())
        assert isinstance(feats, tuple) and len(feats) == len(wants) == 4
        for got, want, c in zip(feats, wants, model.out_channels):
            assert got.shape[1] == c
            torch.testing.assert_close(got, want, **TOL64)


@pytest.mark.parametrize("name", CONFIGS)
def test_misaligned_input_raises_where_official_fails(ref, name):
    cfg = ref["configs"][name]
    assert cfg["backbone_bad_error"] == "RuntimeError"  # the official code: a broadcasting error
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny_backbone(cfg)(ref["inputs"]["backbone_bad"].float())


def test_batch_items_are_independent(ref):
    cfg = ref["configs"]["tiny_supv"]
    model, backbone = tiny_classifier(cfg).double(), tiny_backbone(cfg).double()
    x = torch.cat([ref["inputs"]["backbone"][0].float(), torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))]).double()
    with torch.no_grad():
        logits, feats = model(x), backbone(x)
        for i in range(len(x)):
            torch.testing.assert_close(logits[i : i + 1], model(x[i : i + 1]), **TOL64)
            for f_batch, f_alone in zip(feats, backbone(x[i : i + 1])):
                torch.testing.assert_close(f_batch[i : i + 1], f_alone, **TOL64)


def test_tiny_backbone_input_gradient_flows_fast():
    torch.manual_seed(0)
    model = R.RevColBackbone(**R.TINY_REVCOL).eval()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    start = time.perf_counter()
    feats = model(x)
    sum(f.square().mean() for f in feats[-3:]).backward()
    elapsed = time.perf_counter() - start
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 64 // s) for c, s in zip(R.TINY_REVCOL["channels"], (4, 8, 16, 32))]
    assert model.out_channels == list(R.TINY_REVCOL["channels"])
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert elapsed < 1.0


# --------------------------------------------------------------------------- parameters and FLOPs


@pytest.mark.parametrize("name", VARIANTS)  # ~0.7 s / 1 s / 2 s on 2 idle cores
def test_profile_matches_reported_numbers(name):
    with torch.device("meta"):
        model = getattr(R, name)()
    model = model.to_empty(device="cpu").eval()  # skip the initialisation; counts do not depend on values
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01)  # no uninitialised memory (denormals would only slow the count down)
    x = torch.zeros(1, 3, 224, 224)
    assert count(model, lambda: model(x)) == PROFILE[name]
    # Used in inference: everything but the first three heads, the decoders and the first column's alphas
    # (which multiply the reference's initial 0 and are skipped here).
    unused = sum(
        p.numel() for n, p in model.named_parameters()
        if n.startswith(("cls_blocks.0.", "cls_blocks.1.", "cls_blocks.2.", "decoder_blocks.", "subnet0.alpha"))
    )
    assert PROFILE[name][0] == sum(p.numel() for p in model.parameters()) - unused


# --------------------------------------------------------------------------- checkpoints


def detector_state_dict(backbone_keys: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    sd = {f"backbone.{k}": torch.empty(s, device="meta") for k, s in backbone_keys}
    sd.update({
        "neck.lateral_convs.0.conv.weight": torch.empty(256, 128, 1, 1, device="meta"),
        "bbox_head.retina_cls.weight": torch.empty(720, 256, 3, 3, device="meta"),
    })
    return sd


@pytest.mark.parametrize("name", VARIANTS)
def test_recognise_official_detection_layouts(ref, name):
    sd = detector_state_dict(decode_keys(ref["variants"][name]["backbone"]))
    assert R.is_revcol_checkpoint(sd)
    assert R.recognise(sd) == (f"retinanet_{name}", {})


def test_recognise_rejects_other_layouts(ref):
    keys = decode_keys(ref["variants"]["revcol_base"]["backbone"])
    fewer_columns = detector_state_dict([(k, s) for k, s in keys if not k.startswith("subnet15.")])
    with pytest.raises(CheckpointError, match="15 columns"):
        R.recognise(fewer_columns)
    sd = detector_state_dict(decode_keys(ref["variants"]["revcol_tiny"]["backbone"]))
    sd["backbone.subnet0.level0.blocks.0.dwconv.weight"] = torch.empty(64, 1, 7, 7, device="meta")
    with pytest.raises(CheckpointError, match="kernel 7"):
        R.recognise(sd)
    with pytest.raises(CheckpointError):
        R.recognise({"backbone.stages.0.0.dwconv.weight": torch.empty(1), "bbox_head.retina_cls.weight": torch.empty(1)})


OTHER_FAMILIES = {
    "convnext": ["backbone.downsample_layers.0.0.weight", "backbone.stages.0.0.dwconv.weight", "backbone.norm1.weight"],
    "swin": ["backbone.patch_embed.proj.weight", "backbone.layers.0.blocks.0.attn.relative_position_bias_table"],
    "cednet": ["backbone.stem.0.weight", "backbone.stages.1.0.encoder.0.0.dwconv.weight", "backbone.reduce_convs.0.0.weight"],
    "resnet": ["backbone.conv1.weight", "backbone.layer1.0.conv1.weight", "backbone.layer3.5.bn2.weight"],
    "hrnet": ["backbone.conv1.weight", "backbone.layer1.0.conv1.weight", "backbone.transition1.0.0.weight", "backbone.stage2.0.branches.0.0.conv1.weight"],
    "focalnet": ["backbone.patch_embed.proj.weight", "backbone.layers.0.blocks.0.modulation.f.weight", "backbone.layers.0.blocks.0.gamma_1"],
    "msg": ["backbone.patch_embed.proj.weight", "backbone.msg_tokens", "backbone.layers.0.blocks.0.attn.rel_pos_msg"],
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_is_revcol_checkpoint_false_for_other_families(family):
    sd = {k: torch.empty(1) for k in OTHER_FAMILIES[family]}
    sd.update({"neck.fpn_convs.0.conv.weight": torch.empty(1), "bbox_head.retina_cls.weight": torch.empty(1)})
    assert not R.is_revcol_checkpoint(sd)


# --------------------------------------------------------------------------- refusals


def test_invalid_settings_raise_value_error():
    small = dict(channels=(4, 4, 4, 4), layers=(1, 1, 1, 1), num_subnet=2)
    with pytest.raises(ValueError, match="multiple of 4"):
        R.RevCol(**small, inter_supv=True)
    with pytest.raises(ValueError, match="4 levels"):
        R.RevColBackbone(channels=(4, 4, 4), layers=(1, 1, 1), num_subnet=2)
    with pytest.raises(ValueError, match="out_indices"):
        R.RevColBackbone(**small, out_indices=(1, 4))
    with pytest.raises(ValueError, match="kernel_size"):
        R.RevColBackbone(**{**small, "kernel_size": 4})
    with pytest.raises(ValueError, match="unknown RevCol variant"):
        R._variant("revcol_large")
    assert R.RevCol(**small, inter_supv=False, num_classes=3).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)
