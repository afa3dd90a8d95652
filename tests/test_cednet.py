"""gradlens.models.backbones.cednet against answers recorded from the official CEDNet code.

``tests/data/cednet_reference.pt`` comes from ``scripts/make_cednet_reference.py``, which runs the
official ``models/cednet.py`` and ``ced-mmdet/.../backbones/cednet.py``; see its docstring for the
layout. Nothing here needs timm, mmcv or the official code.

Comparisons of numbers run in float64 (the fixture's outputs are float64 answers of the official
code): float32 results of the same function differ between CPUs by ~1e-5, float64 ones by ~1e-14.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gradlens.models.backbones import cednet as C
from gradlens.models.backbones.layers import LayerNorm
from tests.fixture_keys import decode_keys, key_shapes

FIXTURE = Path(__file__).parent / "data" / "cednet_reference.pt"
VARIANTS = ["next_tiny", "next_small", "next_base", "next_tiny_fpn", "next_tiny_unet", "next_tiny_hourglass"]
CONFIGS = ["tiny_decoder", "tiny_hourglass"]
# Machine independent: float64 rounding is ~1e-16 per operation, so through these small networks
# (values of order 1) CPUs that order float32/float64 sums differently still agree to ~1e-14 (measured,
# ATEN_CPU_CAPABILITY default/avx2/avx512: gradlens vs official <= 1.2e-14, batched vs single <= 2e-14),
# four orders of magnitude below 1e-10, while a real defect is far above it (one weight off by 1e-3:
# >= 2.7e-4; even a 1e-9 leak in one norm: ~1e-8).
TOL64 = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def tiny_classifier(cfg: dict) -> C.CEDNet:
    model = C.CEDNet(**cfg["classifier_kwargs"])
    model.load_state_dict(cfg["classifier_state_dict"], strict=True)
    return model.eval()


def tiny_backbone(cfg: dict) -> C.CEDNetBackbone:
    model = C.CEDNetBackbone(**cfg["backbone_kwargs"])
    trunk = {k: v for k, v in cfg["classifier_state_dict"].items() if k.startswith(("stem.", "stages."))}
    model.load_state_dict({**trunk, **cfg["backbone_extra_state_dict"]}, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- names and shapes


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_settings_match_official_registrations(ref, name):
    for key, value in ref["variants"][name]["settings"].items():
        mine = C.CEDNET_VARIANTS[name][key]
        assert (list(mine) if isinstance(mine, tuple) else mine) == value, key


@pytest.mark.parametrize("name", VARIANTS)
def test_classifier_state_dict_layout_matches_official(ref, name):
    with torch.device("meta"):  # layout only: no memory, no initialisation cost
        model = getattr(C, f"cednet_{name}")()
    assert key_shapes(model) == decode_keys(ref["variants"][name]["classifier"])


@pytest.mark.parametrize("name", VARIANTS)
def test_backbone_state_dict_layout_matches_official(ref, name):
    with torch.device("meta"):
        model = C.cednet_backbone(name)  # out_chans=256, num_add_blocks=2, as in the fixture
    assert key_shapes(model) == decode_keys(ref["variants"][name]["backbone"])
    assert model.out_channels == 256


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("name", CONFIGS)
def test_classifier_reproduces_official_logits(ref, name):
    cfg = ref["configs"][name]
    model, x = tiny_classifier(cfg).double(), ref["input"].double()
    with torch.no_grad():
        torch.testing.assert_close(model(x), cfg["logits"], **TOL64)
        model.train()  # deep supervision: one logit tensor per stage
        train = model(x)
    assert isinstance(train, list) and len(train) == cfg["classifier_kwargs"]["num_stages"] == len(cfg["train_logits"])
    for got, want in zip(train, cfg["train_logits"]):
        torch.testing.assert_close(got, want, **TOL64)


@pytest.mark.parametrize("name", CONFIGS)
def test_backbone_reproduces_official_features(ref, name):
    cfg = ref["configs"][name]
    model = tiny_backbone(cfg)
    assert key_shapes(model) == decode_keys(cfg["backbone_keys"])
    model.double()
    with torch.no_grad():
        feats = model(ref["input"].double())
    assert isinstance(feats, tuple) and len(feats) == len(cfg["backbone_outputs"]) == 3 + cfg["backbone_kwargs"]["num_add_blocks"]
    for got, want in zip(feats, cfg["backbone_outputs"]):
        assert got.shape[1] == model.out_channels
        torch.testing.assert_close(got, want, **TOL64)


def test_eval_output_is_deterministic(ref):
    cfg = ref["configs"]["tiny_decoder"]
    model, backbone = tiny_classifier(cfg), tiny_backbone(cfg)
    with torch.no_grad():
        assert torch.equal(model(ref["input"]), model(ref["input"]))
        assert all(torch.equal(a, b) for a, b in zip(backbone(ref["input"]), backbone(ref["input"])))


@pytest.mark.parametrize("name", CONFIGS)
def test_batch_items_are_independent(ref, name):
    cfg = ref["configs"][name]
    model, backbone = tiny_classifier(cfg).double(), tiny_backbone(cfg).double()
    x = torch.cat([ref["input"], torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))]).double()
    with torch.no_grad():
        logits, feats = model(x), backbone(x)
        for i in range(len(x)):
            torch.testing.assert_close(logits[i : i + 1], model(x[i : i + 1]), **TOL64)
            for f_batch, f_alone in zip(feats, backbone(x[i : i + 1])):
                torch.testing.assert_close(f_batch[i : i + 1], f_alone, **TOL64)


def test_features_and_training_outputs_have_expected_shapes():
    model = C.CEDNet(num_stages=3, p2_dim=16, p2_block=1, dims=[24, 32, 48], blocks=[1, 1, 1], num_classes=7, drop_path_rate=0.2)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        c3, c4, c5 = model.features(x)
        assert [t.shape for t in (c3, c4, c5)] == [(2, 24, 8, 12), (2, 32, 4, 6), (2, 48, 2, 3)]
        train = model.train()(x)
        assert len(train) == 3 and all(t.shape == (2, 7) for t in train)
        assert model.eval()(x).shape == (2, 7)
    backbone = C.CEDNetBackbone(out_chans=16, num_add_blocks=2, num_stages=2, decoder_type="DecoderUNet", p2_dim=16, p2_block=1, dims=[24, 32, 48], blocks=[2, 2, 1])
    with torch.no_grad():
        feats = backbone(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 8, 12), (2, 16, 4, 6), (2, 16, 2, 3), (2, 16, 1, 2), (2, 16, 1, 1)]
    assert backbone.strides == (8, 16, 32, 64, 128)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base_block="ResBlock"),  # no such block in the reference
        dict(base_block="CSwinBlock"),  # CSwin blocks need CSwinEncoder (it passes their heads and stripes) ...
        dict(encoder_type="CSwinEncoder"),  # ... and that encoder needs them
        dict(base_block="CSwinBlock", focal_block="CSwinBlock", encoder_type="CSwinEncoder", decoder_type="DecoderUNet"),
        dict(base_block="SwinBlock", focal_block="DSwinBlock", norm_cfg=dict(type="SyncBN")),  # tokens need LN
        dict(act_type="silu"),
        dict(norm_cfg=dict(type="GN", num_groups=2)),
        dict(norm_cfg=dict(type="LN", data_format="channels_last")),
        dict(decoder_type="DecoderLSTM"),
        dict(dims=[8, 16, 32, 64]),
        dict(blocks=[[1, 1, 1]]),  # per-stage lists must cover num_stages
    ],
)
def test_unsupported_configurations_raise_value_error(kwargs):
    small = dict(num_stages=2, p2_dim=8, p2_block=1, dims=[8, 8, 8], blocks=[1, 1, 1], num_classes=2)
    with pytest.raises(ValueError):
        C.CEDNet(**{**small, **kwargs})
    with pytest.raises(ValueError):
        C.CEDNetBackbone(**{k: v for k, v in {**small, **kwargs}.items() if k != "num_classes"})


def test_unknown_variant_and_misaligned_input_raise_value_error(ref):
    with pytest.raises(ValueError, match="unknown CEDNet variant"):
        C.cednet_backbone("swin_huge")
    model = tiny_classifier(ref["configs"]["tiny_decoder"])
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 40, 64))  # stride-8 map 5x8: coarse maps would not line up


# --------------------------------------------------------------------------- LayerNorm


def test_layer_norm_formats():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4).double()  # the same function computed two ways: float64 (TOL64)
    ln = LayerNorm(5, eps=1e-6, data_format="channels_first").double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    want = F.layer_norm(x.permute(0, 2, 3, 1), (5,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), want, **TOL64)
    last = LayerNorm(4).double()
    assert last.data_format == "channels_last" and last.eps == 1e-6
    torch.testing.assert_close(last(x), F.layer_norm(x, (4,), eps=1e-6), **TOL64)
    assert list(dict(ln.named_parameters())) == ["weight", "bias"]
    with pytest.raises(ValueError):
        LayerNorm(5, data_format="channels_first_v3")
