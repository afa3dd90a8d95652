"""CED-ResNet, CED-Swin and CED-CSwin backbones against the CEDNet fork's own ``CEDNetWrapper``.

``tests/data/ced_blocks_reference.pt`` comes from ``scripts/make_ced_blocks_reference.py``, which runs the fork's
``ced-mmdet/mmdet/models/backbones/cednet.py`` with the settings read from its three RetinaNet configs: the
fork's key lists and shapes at full size, and for one small configuration per block family its weights and its
float64 outputs on two inputs whose maps pad (Swin windows, CSwin stripes). Nothing here needs the fork.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradlens.models.backbones import cednet as C
from tests.fixture_keys import decode_keys, key_shapes

FIXTURE = Path(__file__).parent / "data" / "ced_blocks_reference.pt"
VARIANT_OF = {"ced_resnet_50": "resnet_50", "ced_swin_tiny": "swin_tiny", "ced_cswin_tiny": "cswin_tiny"}
TINY = ["ced_resnet", "ced_swin", "ced_cswin"]
RPI = "relative_position_index"  # the fork's persistent buffer; gradlens recomputes it (non-persistent)
# float64 against float64: the same function agrees to ~1e-14 on any CPU (summation order moves float64 results
# by ~1e-16 per operation), far below 1e-10; a real defect (a weight off by 1e-3, a missing residual, a window
# shifted the other way, batch norm's eps 1e-6 for 1e-5) moves these outputs by far more than 1e-10.
TOL64 = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def _tiny(cfg: dict) -> C.CEDNetBackbone:
    model = C.CEDNetBackbone(**cfg["kwargs"]).double()
    state = {k: (v.double() if v.is_floating_point() else v) for k, v in cfg["state_dict"].items() if not k.endswith(RPI)}
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("name", list(VARIANT_OF))
def test_variants_are_the_forks_configs(ref, name):
    settings = dict(ref["configs"][name]["settings"])
    mine = C.CEDNET_VARIANTS[VARIANT_OF[name]]
    for key in ("num_stages", "encoder_type", "decoder_type", "base_block", "focal_block", "p2_dim", "p2_block",
                "dims", "blocks", "layer_scale_init_value", "norm_cfg", "act_type"):
        theirs = settings[key]
        ours = mine.get(key, {"layer_scale_init_value": 1e-6, "act_type": "gelu",
                              "norm_cfg": dict(type="LN", eps=1e-6, data_format="channels_first")}.get(key))
        if key == "norm_cfg":  # requires_grad is a training setting; gradlens reads type (and eps) only
            theirs, ours = {k: v for k, v in theirs.items() if k != "requires_grad"}, {k: v for k, v in ours.items() if k != "requires_grad"}
        assert (list(ours) if isinstance(ours, tuple) else ours) == theirs, key
    assert (settings["out_chans"], settings["num_add_blocks"]) == (256, 2)


@pytest.mark.parametrize("name", list(VARIANT_OF))
def test_full_size_state_dict_is_the_forks(ref, name):
    """Same keys in the same order with the same shapes, so a checkpoint of the config loads with strict=True."""
    theirs = [(k, s) for k, s in decode_keys(ref["configs"][name]["keys"]) if not k.endswith(RPI)]
    with torch.device("meta"):
        model = C.cednet_backbone(VARIANT_OF[name])
    assert key_shapes(model) == theirs


@pytest.mark.parametrize("name", TINY)
def test_outputs_are_the_forks(ref, name):
    model = _tiny(ref["tiny"][name])
    for i, x in enumerate(ref["inputs"]):
        with torch.no_grad():
            ours = model(x.double())
        theirs = [ref["tiny"][name]["outputs"][f"{i}.{k}"] for k in range(len(ours))]
        assert len(ours) == 5 and f"{i}.5" not in ref["tiny"][name]["outputs"]
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, **TOL64)


@pytest.mark.parametrize("name", TINY)
def test_batch_items_are_independent_and_gradients_flow(ref, name):
    model = _tiny(ref["tiny"][name])
    x = ref["inputs"][1].double().requires_grad_(True)
    batch = model(x)
    for j in range(2):
        single = model(x[j : j + 1])
        for a, b in zip(batch, single):
            torch.testing.assert_close(a[j : j + 1], b, **TOL64)
    sum(f.square().sum() for f in batch).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_batch_norm_runs_on_its_statistics(ref):
    """CED-ResNet's SyncBN is batch norm on the running statistics in eval (detectors run in eval): an item's
    output does not depend on the rest of the batch, and the statistics are the checkpoint's."""
    model = _tiny(ref["tiny"]["ced_resnet"])
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-5 and not m.training for m in bns)
    assert all(isinstance(m.act, torch.nn.ReLU) for m in model.modules() if isinstance(m, (C.Bottleneck, C.DBottleneck)))


def test_swin_blocks_alternate_their_shift_and_cswin_focal_attends_globally():
    model = C.CEDNetBackbone(**{**C.CEDNET_VARIANTS["swin_tiny"], "drop_path_rate": 0.0})
    p2 = [m for m in model.stages[0] if isinstance(m, C.SwinBlock)]
    assert [b.shift_size for b in p2] == [0, 3, 0]
    assert [b.attn.num_heads for b in model.stages[1][0].encoder[1]] == [288 // 32] * 4
    cswin = C.CEDNetBackbone(**{**C.CEDNET_VARIANTS["cswin_tiny"], "drop_path_rate": 0.0})
    focal = cswin.stages[1][0].encoder[2][0]
    assert len(focal.attns) == 1 and focal.attns[0].idx == -1 and focal.attns[0].num_heads == 10
    stripe = cswin.stages[1][0].encoder[1][0]
    assert [a.idx for a in stripe.attns] == [0, 1] and stripe.attns[0].split_size == 7 and stripe.attns[0].num_heads == 4


def test_a_bifpn_checkpoint_is_refused_in_one_sentence():
    """The fork's neck/retinanet_bifpn_… config cannot be built by the fork itself (see mmdet._BIFPN): say so."""
    from gradlens.errors import CheckpointError
    from gradlens.models.formats import mmdet
    from gradlens.models.registry import build_detector

    with torch.device("meta"):
        state = mmdet.to_mmdet(build_detector("retinanet_convnext_tiny", 80).state_dict())
    state = {k: v for k, v in state.items() if not k.startswith("neck.")}
    state["neck.bifpn.0.decoder.0.0.depthwise_conv.conv.weight"] = torch.zeros(256, 1, 3, 3)
    with pytest.raises(CheckpointError, match=r"BiFPN .*cannot be built or run as committed") as info:
        mmdet.recognise(state)
    assert str(info.value).count(". ") == 0 and "\n" not in str(info.value)


@pytest.mark.parametrize("name, paper", [("CSWin-T", (23, 4.3)), ("CSWin-S", (35, 6.9)), ("CSWin-B", (78, 15.0))])
def test_profile_counts_cswin_as_its_paper(name, paper):
    """The CSWin classifiers of `gradlens profile` have the CSWin paper's size (its Table 1, 224x224)."""
    from gradlens.profile import profile_classifier

    row = profile_classifier(name)
    assert abs(row.params / 1e6 - paper[0]) <= 1.0 and abs(row.macs / 1e9 - paper[1]) <= 0.1 + 1e-9
