"""gradlens.models.backbones.msg against answers recorded from the official MSG-Transformer code.

``tests/data/msg_reference.pt`` comes from ``scripts/make_msg_reference.py``, which runs the
official ``models/msg_transformer.py`` (and, for detection, for which no official code exists, the
Swin-style adaptation documented in ``gradlens/models/backbones/msg.py``, written in that script on top of
the official modules); see its docstring for the layout. Nothing here needs timm or the official code.

Every comparison of values runs gradlens in float64 against outputs the script computed in float64
from the official code (the weights and inputs are float16-exact, so nothing is lost in the cast):
the comparison is then of the same function, not of two orders of float32 rounding, and holds on
any CPU with a tight tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gradlens.errors import CheckpointError
from gradlens.models.backbones import msg as M
from gradlens.profile import count
from tests.fixture_keys import decode_keys as decode, key_shapes

FIXTURE = Path(__file__).parent / "data" / "msg_reference.pt"
VARIANTS = ["msg_tiny", "msg_small", "msg_base"]
TINY = ["tiny_a", "tiny_b"]
RPI = "relative_position_index"
# float64 rounding is ~1e-16 per operation; these tiny models (outputs of order 1, a few dozen
# layers) differ from the official float64 outputs by ~1e-15 (measured: at most 4.4e-15 absolute,
# with ATEN_CPU_CAPABILITY avx512, avx2 and default alike), so a CPU's different ordering of the
# arithmetic stays orders of magnitude below 1e-10, while a real defect (a weight off by 1e-3, a
# transposed kernel, a missing pad) is far above it.
TOL64 = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURE, weights_only=True)




def official_state(entry: dict) -> dict[str, torch.Tensor]:
    return {k: (v.double() if v.is_floating_point() else v.long()) for k, v in entry["state_dict"].items()}


def tiny_classifier(entry: dict) -> M.MSGTransformer:
    """The tiny classifier in float64 with the fixture's weights."""
    model = M.MSGTransformer(**{k: v for k, v in entry["classifier_config"].items() if k != "img_size"}).double()
    model.load_state_dict(M.drop_relative_position_index(official_state(entry)), strict=True)
    return model.eval()


def tiny_backbone(entry: dict) -> M.MSGBackbone:
    """The tiny detection backbone in float64 with the fixture's weights."""
    model = M.MSGBackbone(**entry["backbone_config"]).double()
    trunk = {k: v for k, v in M.drop_relative_position_index(official_state(entry)).items() if not k.startswith(("norm.", "head."))}
    model.load_state_dict({**trunk, **{k: v.double() for k, v in entry["norms"].items()}}, strict=True)
    return model.eval()


def retinanet_sd(keys_shapes, drop=()) -> dict[str, torch.Tensor]:
    sd = {f"backbone.{k}": torch.empty(s, device="meta") for k, s in keys_shapes if not k.startswith(drop)}
    sd["neck.lateral_convs.0.conv.weight"] = torch.empty(256, 128, 1, 1, device="meta")
    sd["bbox_head.retina_cls.weight"] = torch.empty(720, 256, 3, 3, device="meta")
    return sd


# --------------------------------------------------------------------------- names and shapes


def test_fixture_is_small_and_complete(ref):
    assert FIXTURE.stat().st_size < 320 * 1024  # 305 KiB with its outputs in float64
    assert set(ref["variants"]) == set(VARIANTS)
    assert set(ref["tiny"]) == set(TINY)
    assert "logits" in ref["tiny"]["tiny_a"]


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_settings_are_the_official_configs(ref, name):
    cfg = ref["variants"][name]["config"]
    mine = M.MSG_VARIANTS[name]
    assert mine["embed_dim"] == cfg["EMBED_DIM"]
    assert list(mine["depths"]) == cfg["DEPTHS"]
    assert list(mine["num_heads"]) == cfg["NUM_HEADS"]
    assert mine["window_size"] == cfg["WINDOW_SIZE"]
    assert list(mine["shuffle_size"]) == cfg["SHUF_SIZE"]
    assert mine["drop_path_rate"] == cfg["DROP_PATH_RATE"]


@pytest.mark.parametrize("name", VARIANTS)
def test_classifier_state_dict_layout_matches_official(ref, name):
    with torch.device("meta"):
        model = getattr(M, name)()
    official = decode(ref["variants"][name]["classifier"])
    assert key_shapes(model) == [(k, s) for k, s in official if not k.endswith(RPI)]
    buffers = {k: tuple(v.shape) for k, v in model.named_buffers()}
    assert [(k, s) for k, s in official if k.endswith(RPI)] == [(k, s) for k, s in buffers.items() if k.endswith(RPI)]


@pytest.mark.parametrize("name", VARIANTS)
def test_backbone_state_dict_layout_matches_reference(ref, name):
    with torch.device("meta"):
        model = getattr(M, f"{name}_backbone")()
    reference = decode(ref["variants"][name]["backbone"])
    assert key_shapes(model) == [(k, s) for k, s in reference if not k.endswith(RPI)]
    # the classifier's keys minus norm/head, plus norm0..3: ImageNet weights load into it
    with torch.device("meta"):
        cls_keys = set(getattr(M, name)().state_dict())
    det_keys = set(model.state_dict())
    assert det_keys - cls_keys == {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert cls_keys - det_keys == {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_constructor_defaults():
    with torch.device("meta"):
        t = M.msg_tiny_backbone()
        s = M.msg_small_backbone(out_indices=(1, 2, 3), drop_path_rate=0.0)
        b = M.msg_base_backbone()
        c = M.msg_tiny(num_classes=10)
    assert t.out_indices == (0, 1, 2, 3) and t.out_channels == [64, 128, 256, 512]
    assert s.out_channels == [192, 384, 768] and "norm0.weight" not in s.state_dict()
    assert all(isinstance(blk.drop_path, torch.nn.Identity) for layer in s.layers for blk in layer.blocks)
    assert b.out_channels == [96, 192, 384, 768] and sum(len(layer.blocks) for layer in b.layers) == 38
    assert c.head.out_features == 10


# --------------------------------------------------------------------------- numbers


def test_classifier_reproduces_official_logits(ref):
    entry = ref["tiny"]["tiny_a"]
    model = tiny_classifier(entry)
    for k, v in entry["state_dict"].items():
        if k.endswith(RPI):
            assert torch.equal(model.get_buffer(k), v.long()), k
    with torch.no_grad():
        torch.testing.assert_close(model(entry["classifier_input"].double()), entry["logits"], **TOL64)


@pytest.mark.parametrize("name", TINY)
def test_classifier_stages_reproduce_official_tokens(ref, name):
    entry = ref["tiny"][name]
    model = tiny_classifier(entry)
    with torch.no_grad():
        stages = list(model.stages(entry["classifier_input"].double()))
    assert len(stages) == len(entry["classifier_stage_maps"])
    for (_, tokens, _), want in zip(stages, entry["classifier_stage_maps"]):
        torch.testing.assert_close(tokens.permute(0, 3, 1, 2), want, **TOL64)


def test_official_relative_position_index_must_be_dropped(ref):
    entry = ref["tiny"]["tiny_a"]
    model = M.MSGTransformer(**{k: v for k, v in entry["classifier_config"].items() if k != "img_size"})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict(official_state(entry), strict=True)


@pytest.mark.parametrize("name", TINY)
def test_backbone_equals_normed_classifier_stages_without_padding(ref, name):
    entry = ref["tiny"][name]
    model = tiny_backbone(entry)
    with torch.no_grad():
        outs = model(entry["classifier_input"].double())
    assert len(outs) == len(entry["classifier_stage_maps"]) == len(model.out_channels)
    for i, (got, stage) in enumerate(zip(outs, entry["classifier_stage_maps"])):
        norm = getattr(model, f"norm{i}")
        want = F.layer_norm(stage.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias).permute(0, 3, 1, 2)
        assert got.shape[1] == model.out_channels[i]
        torch.testing.assert_close(got, want, **TOL64)


@pytest.mark.parametrize("name", TINY)
def test_backbone_reproduces_reference_on_padded_inputs(ref, name):
    entry = ref["tiny"][name]
    model = tiny_backbone(entry)
    assert all(side % 32 and side % 4 for side in entry["backbone_inputs"][0].shape[-2:])
    for x, expected in zip(entry["backbone_inputs"], entry["backbone_outputs"]):
        with torch.no_grad():
            got = model(x.double())
        assert len(got) == len(expected)
        h, w = x.shape[-2:]
        for i, (g, e) in enumerate(zip(got, expected)):
            h, w = (-(-h // 4), -(-w // 4)) if i == 0 else (-(-h // 2), -(-w // 2))
            assert g.shape[-2:] == (h, w)
            torch.testing.assert_close(g, e, **TOL64)


@pytest.mark.parametrize("name", TINY)
def test_backbone_batch_items_are_independent(ref, name):
    model = tiny_backbone(ref["tiny"][name])
    x = torch.randn(2, 3, 38, 61, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        both = model(x)
        singles = [model(x[i : i + 1]) for i in range(2)]
    for level, out in enumerate(both):
        for i in range(2):
            torch.testing.assert_close(out[i : i + 1], singles[i][level], **TOL64)


def test_gradient_reaches_the_input_through_tiny_backbone():
    torch.manual_seed(0)
    model = M.MSGBackbone(**M.TINY_MSG).eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    outs = model(x)
    assert [o.shape[1] for o in outs] == model.out_channels and [o.shape[-1] for o in outs] == [16, 8, 4, 2]
    sum(o.square().mean() for o in outs[1:]).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("norm0"))


def test_shuffle_exchanges_channel_groups_within_regions():
    s, c = 2, 8
    msg = torch.arange(1 * 3 * 4 * c, dtype=torch.float32).view(1, 3, 4, c)
    out = M.shuffle_msg(msg, s)
    assert out.shape == msg.shape
    g = c // (s * s)
    # region (0, 0) holds windows (0,0), (0,1), (1,0), (1,1); window i receives group i of window j at group j
    windows = [(0, 0), (0, 1), (1, 0), (1, 1)]
    for i, (yi, xi) in enumerate(windows):
        for j, (yj, xj) in enumerate(windows):
            torch.testing.assert_close(out[0, yi, xi, j * g : (j + 1) * g], msg[0, yj, xj, i * g : (i + 1) * g])
    # the last row is half a region: the missing windows contribute zeros
    torch.testing.assert_close(out[0, 2, 0, 2 * g : 3 * g], torch.zeros(g))
    torch.testing.assert_close(out[0, 2, 0, 1 * g : 2 * g], msg[0, 2, 1, 0:g])
    assert torch.equal(M.shuffle_msg(msg, 1), msg)
    twice = M.shuffle_msg(M.shuffle_msg(msg[:, :2], s), s)  # a transposition: its own inverse
    assert torch.equal(twice, msg[:, :2])


def test_msg_tokens_tile_over_any_window_grid():
    model = M.MSGBackbone(**M.TINY_MSG)
    grid = model.initial_msg(2, 9, 13)  # 5x7 windows of 2x2, shuffle regions of 2x2 windows
    tokens = model.msg_tokens[0, :, 0]
    assert grid.shape == (2, 5, 7, 4)
    for i in range(5):
        for j in range(7):
            assert torch.equal(grid[1, i, j], tokens[(i % 2) * 2 + j % 2])


# --------------------------------------------------------------------------- Table A1


@pytest.mark.parametrize(
    "name, params_m, macs_g",
    # measured here; Table A1 / the official README: 25M 3.8G, 56M 8.4G, 84M 14.2G
    [("msg_tiny", 25.09, 3.82), ("msg_small", 55.97, 8.46), ("msg_base", 84.39, 14.24)],
)
def test_classifier_params_and_macs_at_224(name, params_m, macs_g):
    model = getattr(M, name)().eval()
    x = torch.zeros(1, 3, 224, 224)
    params, macs = count(model, lambda: model(x))
    assert round(params / 1e6, 2) == params_m
    assert round(macs / 1e9, 2) == macs_g


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", VARIANTS)
def test_recognise_every_variant(ref, name):
    layout = decode(ref["variants"][name]["backbone"])
    sd = retinanet_sd(layout)
    assert M.is_msg_checkpoint(sd)
    assert M.recognise(sd) == (f"retinanet_{name}", {})
    assert M.recognise(retinanet_sd(layout, drop=("norm0.",))) == (f"retinanet_{name}", {"out_indices": [1, 2, 3]})
    without_rpi = retinanet_sd([(k, s) for k, s in layout if not k.endswith(RPI)])
    assert M.recognise(without_rpi) == (f"retinanet_{name}", {})
    # the options rebuild the backbone: its keys are the checkpoint's
    with torch.device("meta"):
        model = getattr(M, f"{name}_backbone")(**M.recognise(sd)[1])
    assert {f"backbone.{k}" for k in model.state_dict()} == {k for k in without_rpi if k.startswith("backbone.")}


def test_recognise_refuses_unknown_layouts(ref):
    layout = decode(ref["variants"]["msg_tiny"]["backbone"])
    with pytest.raises(CheckpointError, match="matches none"):
        M.recognise(retinanet_sd(layout, drop=("layers.2.blocks.11.",)))  # 11 blocks in stage 2
    with pytest.raises(CheckpointError, match="output norms"):
        M.recognise(retinanet_sd(layout, drop=("norm0.", "norm1.", "norm2.", "norm3.")))
    with pytest.raises(CheckpointError, match="lacks backbone.msg_tokens"):
        M.recognise(retinanet_sd(layout, drop=("msg_tokens",)))


@pytest.mark.parametrize(
    "keys",
    [
        ["backbone.downsample_layers.0.0.weight", "backbone.stages.0.0.dwconv.weight"],  # ConvNeXt
        ["backbone.patch_embed.proj.weight", "backbone.layers.0.blocks.0.attn.relative_position_bias_table"],  # Swin
        ["backbone.reduce_convs.0.0.weight", "backbone.stem.0.weight"],  # CEDNet
        ["backbone.conv1.weight", "backbone.layer1.0.conv1.weight"],  # ResNet
        ["backbone.conv1.weight", "backbone.stage2.0.branches.0.0.conv1.weight", "backbone.transition1.0.0.weight"],  # HRNet
        ["backbone.patch_embed.proj.weight", "backbone.layers.0.blocks.0.modulation.f.weight"],  # FocalNet
        ["backbone.stem.0.weight", "backbone.subnet0.level0.blocks.0.dwconv.weight", "backbone.subnet0.alpha0"],  # RevCol
    ],
)
def test_is_msg_checkpoint_is_false_for_other_families(keys):
    sd = {k: torch.empty(1, device="meta") for k in keys}
    sd["bbox_head.retina_cls.weight"] = torch.empty(1, device="meta")
    assert not M.is_msg_checkpoint(sd)
    with pytest.raises(CheckpointError):
        M.recognise(sd)


# --------------------------------------------------------------------------- refusals


def test_invalid_configurations_and_inputs_raise_value_error(ref):
    with pytest.raises(ValueError, match="shuffle_size"):
        M.MSGBackbone(**{**M.TINY_MSG, "shuffle_size": (4, 2, 2, 1)})  # 4 channels, 16 groups
    with pytest.raises(ValueError, match="out_indices"):
        M.MSGBackbone(**{**M.TINY_MSG, "out_indices": (1, 4)})
    with pytest.raises(NotImplementedError):
        M.MSGBackbone(**{**M.TINY_MSG, "ape": True})
    model = tiny_classifier(ref["tiny"]["tiny_a"])
    with pytest.raises(ValueError, match="single MSG token"):
        model(torch.randn(1, 3, 96, 96, dtype=torch.float64))  # last stage 3x3 > one 2x2 window
