"""CSWin Transformer detection backbone against the CEDNet fork's own code.

``tests/data/cswin_reference.pt`` was produced from the fork's ``cswin.py`` (and, for
``LePEAttention``, its ``cednet.py``) by ``scripts/make_cswin_reference.py``: the fork's ordered
state-dict keys and shapes of CSwin-T/S/B, and for two tiny configurations the fork's weights, two
inputs and the fork's outputs, computed in float64; and the outputs of the ``cednet.py``
``LePEAttention`` for each ``idx``. The value comparisons run here in float64 as well, so that they
do not depend on how a CPU orders its float32 arithmetic. Nothing here needs timm, einops or mmcv.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradlens.models.backbones.cswin import (
    CSWIN_VARIANTS,
    CSwinBackbone,
    LePEAttention,
    cswin_base_backbone,
    cswin_small_backbone,
    cswin_tiny_backbone,
)
from tests.fixture_keys import decode_keys, key_shapes

REFERENCE = Path(__file__).parent / "data" / "cswin_reference.pt"
# Tolerance (atol and rtol) of the float64 comparisons: the fork's outputs and batch-vs-single.
# Machine independent: float64 rounds ~1e-16 per operation, so a different CPU's summation order
# (vector width, blocking) moves these tiny models' outputs by ~1e-15, orders of magnitude below
# 1e-10; in float32 the same reordering moves them by ~1e-5, which is as much as a real defect
# (a weight off by 1e-6) would, so float32 could not tell the two apart. Real defects (a wrong
# padding side, a transposed stripe, a missing positional term) move the outputs by far more.
TOL64 = dict(atol=1e-10, rtol=1e-10)

CONSTRUCTORS = {"cswin_tiny": cswin_tiny_backbone, "cswin_small": cswin_small_backbone, "cswin_base": cswin_base_backbone}
TINY = ["tiny_a", "tiny_b"]


@pytest.fixture(scope="module")
def ref():
    return torch.load(REFERENCE, weights_only=True)


def _variant_names():
    return list(torch.load(REFERENCE, weights_only=True)["variants"])


def _state64(state: dict) -> dict:
    return {k: v.double() for k, v in state.items()}


def _tiny_model(ref, name: str) -> CSwinBackbone:
    """The tiny model with the fork's weights (strict load), in float64 (the weights are float16-exact)."""
    entry = ref["tiny"][name]
    model = CSwinBackbone(**entry["config"]).double().eval()
    model.load_state_dict(_state64(entry["state_dict"]), strict=True)
    return model


def test_fixture_is_small_and_complete(ref):
    assert REFERENCE.stat().st_size < 300 * 1024
    assert set(ref["variants"]) == {"cswin_tiny", "cswin_tiny_out123", "cswin_small", "cswin_base"}
    assert set(ref["tiny"]) == set(TINY)
    assert sorted(e["config"]["idx"] for e in ref["lepe"]) == [-1, 0, 1]


@pytest.mark.parametrize("variant", _variant_names())
def test_keys_and_shapes_equal_the_fork(ref, variant):
    entry = ref["variants"][variant]
    cfg = entry["config"]
    name = variant.removesuffix("_out123")
    for k, v in CSWIN_VARIANTS[name].items():  # the variant table holds the fork's architecture
        if k in cfg:
            assert (list(v) if isinstance(v, tuple) else v) == cfg[k], k
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = CONSTRUCTORS[name](out_indices=tuple(cfg["out_indices"]))
    assert key_shapes(model) == decode_keys(entry["keys"])


def test_tiny_variant_is_the_fork_config():
    assert CSWIN_VARIANTS["cswin_tiny"] == dict(
        embed_dim=64, depth=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7), mlp_ratio=4.0, drop_path_rate=0.1
    )


def test_constructor_defaults():
    with torch.device("meta"):
        t = cswin_tiny_backbone()
        t3 = cswin_tiny_backbone(out_indices=(1, 2, 3))
        b = cswin_base_backbone(drop_path_rate=0.0)
        no_bias_arg = cswin_tiny_backbone(qkv_bias=False)
    assert t.out_indices == (0, 1, 2, 3) and t.out_channels == [64, 128, 256, 512]
    assert t3.out_channels == [128, 256, 512]
    assert b.out_channels == [96, 192, 384, 768]
    assert all(isinstance(blk.drop_path, torch.nn.Identity) for i in range(1, 5) for blk in getattr(b, f"stage{i}"))
    assert not isinstance(t.stage3[-1].drop_path, torch.nn.Identity)
    # the fork ignores qkv_bias (its blocks' qkv always has a bias)
    assert key_shapes(no_bias_arg) == key_shapes(t)
    # the last stage attends over the whole map with one branch, the others with two stripe branches
    assert [a.idx for a in t.stage4[0].attns] == [-1] and [a.idx for a in t.stage1[0].attns] == [0, 1]


def test_out_indices_without_stages_1_to_3_are_refused():
    cfg = dict(embed_dim=4, depth=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), split_size=(1, 1, 1, 1))
    for bad in [(0, 1, 2), (2, 3), (1, 2, 3, 3), (1, 2, 3, 4)]:
        with pytest.raises(ValueError, match="out_indices"):
            CSwinBackbone(**cfg, out_indices=bad)


@pytest.mark.parametrize("name", TINY)
def test_tiny_reproduces_the_fork_outputs(ref, name):
    model = _tiny_model(ref, name)
    entry = ref["tiny"][name]
    assert len(entry["outputs"][0]) == (4 if 0 in entry["config"]["out_indices"] else 3)
    for x, expected in zip(ref["inputs"], entry["outputs"]):
        with torch.no_grad():
            got = model(x.double())
        assert len(got) == len(expected) == len(model.out_channels)
        for g, e, c in zip(got, expected, model.out_channels):
            assert g.dtype == e.dtype == torch.float64 and g.shape[1] == c
            torch.testing.assert_close(g, e, **TOL64)


def test_inputs_exercise_odd_sizes_and_padding(ref):
    """Odd, non-multiple stage sizes (the stem floors, merges ceil-halve) and stripes that need
    centred padding of more than one row/column, or are wider than the map."""
    entry = ref["tiny"]["tiny_a"]
    for x, outs in zip(ref["inputs"], entry["outputs"]):
        h, w = (x.shape[-2] - 3) // 4 + 1, (x.shape[-1] - 3) // 4 + 1
        sizes = []
        for _ in range(4):
            sizes.append((h, w))
            h, w = (h + 1) // 2, (w + 1) // 2
        assert [tuple(o.shape[-2:]) for o in outs] == sizes
        assert any(s % 2 for hw in sizes for s in hw)
    split = ref["tiny"]["tiny_b"]["config"]["split_size"]
    pads = [(-s) % split[i] for outs in entry["outputs"] for i, o in enumerate(outs[:3]) for s in o.shape[-2:]]
    assert max(pads) >= 2  # tiny_b pads some stripes on both sides (centred)
    assert any(split[i] > min(o.shape[-2:]) for outs in entry["outputs"] for i, o in enumerate(outs[:3]))


@pytest.mark.parametrize("name", TINY)
def test_batch_independence(ref, name):
    model = _tiny_model(ref, name)
    x = ref["inputs"][1].double()
    assert x.shape[0] == 2
    with torch.no_grad():
        both = model(x)
        singles = [model(x[i : i + 1]) for i in range(2)]
    for level, out in enumerate(both):
        for i in range(2):
            torch.testing.assert_close(out[i : i + 1], singles[i][level], **TOL64)


@pytest.mark.parametrize("name", TINY)
def test_backward_gives_finite_input_gradients(ref, name):
    model = _tiny_model(ref, name).float().train()  # train mode: drop path active
    x = ref["inputs"][0].float().requires_grad_(True)
    loss = sum(o.square().mean() for o in model(x))
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_wrong_state_dicts_are_refused(ref, name):
    model = _tiny_model(ref, name)
    state = _state64(ref["tiny"][name]["state_dict"])
    key = next(k for k, v in state.items() if v.dim() == 2 and v.shape[0] != v.shape[1])  # a Linear weight
    bad = dict(state)
    bad[key] = bad[key].t().contiguous()
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(bad, strict=True)
    missing = dict(state)
    del missing[key]
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(missing, strict=True)


@pytest.mark.parametrize("i", range(3))
def test_lepe_attention_reproduces_both_forks(ref, i):
    """gradlens' LePEAttention(q, k, v) against the CEDNet fork's ``cednet.py`` LePEAttention
    (the builder checked that ``cswin.py``'s gives the same answer on the same weights)."""
    entry = ref["lepe"][i]
    cfg = entry["config"]
    attn = LePEAttention(cfg["dim"], cfg["idx"], cfg["split_size"], cfg["num_heads"], qk_scale=cfg["qk_scale"]).double()
    attn.load_state_dict(_state64(entry["state_dict"]), strict=True)
    qkv = entry["qkv"].double()  # (3, B, H*W, C), cednet.py's layout
    three, b, n, c = qkv.shape
    q, k, v = qkv.transpose(-2, -1).reshape(3, b, c, entry["H"], entry["W"]).unbind(0)
    with torch.no_grad():
        got = attn(q, k, v)
    assert got.shape == (b, n, c)
    torch.testing.assert_close(got, entry["output"], **TOL64)


def test_lepe_attention_checks_its_arguments():
    with pytest.raises(ValueError, match="idx"):
        LePEAttention(8, 2, 7, 2)
    with pytest.raises(ValueError, match="multiple"):
        LePEAttention(8, 0, 7, 3)
    attn = LePEAttention(8, 0, 7, 2)
    x = torch.zeros(1, 8, 3, 5)
    assert attn(x, x, x).shape == (1, 15, 8)
    with pytest.raises(ValueError, match="channels"):
        attn(*(torch.zeros(1, 4, 3, 5),) * 3)
    with pytest.raises(ValueError, match="one shape"):
        attn(x, x, torch.zeros(1, 8, 3, 4))


@pytest.mark.parametrize("idx", [-1, 0, 1])
def test_lepe_attention_accepts_strided_inputs(idx):
    """Channel slices and channels-last maps (how blocks hand over q, k, v) give the contiguous answer."""
    attn = LePEAttention(6, idx, 3, 2).double()
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 2, 7, 5, 12, generator=g, dtype=torch.float64).permute(0, 1, 4, 2, 3)[:, :, 3:9]  # 3, B, C, H, W views
    with torch.no_grad():
        strided = attn(*qkv.unbind(0))
        contiguous = attn(*(t.contiguous() for t in qkv.unbind(0)))
    torch.testing.assert_close(strided, contiguous, **TOL64)
