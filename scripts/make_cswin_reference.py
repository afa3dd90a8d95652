"""Build ``tests/data/cswin_reference.pt`` from the CEDNet fork's own CSWin code (not run by the tests).

Needs a checkout (or a bare/mirror git directory) of https://github.com/zhanggang001/CEDNet, and
``timm`` and ``einops`` on ``PYTHONPATH`` (the fork's ``cswin.py`` imports ``timm.models.layers`` and
``einops.layers.torch``; ``cednet.py`` imports timm), e.g. installed into a private directory::

    pip install --no-deps --target /tmp/refpkgs timm einops
    PYTHONPATH=/tmp/refpkgs python scripts/make_cswin_reference.py --official-repo /path/to/CEDNet

Two files are read, at the commit recorded in the fixture's ``source`` (``git rev-parse HEAD`` of
the checkout or mirror): ``ced-mmdet/mmdet/models/backbones/cswin.py`` (``CSwinTransformer``) and
``ced-mmdet/mmdet/models/backbones/cednet.py`` (for its own ``LePEAttention``). mmcv, mmdet and
mmcv_custom are *not* needed: both files are imported in memory with the stubs of
``make_cednet_reference.py`` (its ``_stub_modules``, under their ``mmdet.models.backbones`` names so
that ``from ..builder import BACKBONES`` resolves to the stub).

The fixture (plain tensors, lists and dicts; ``torch.load(..., weights_only=True)``) holds:

* ``variants[name]``: ``config`` and the fork's ordered state-dict keys and shapes (zlib-compressed
  ``key<TAB>d0,d1,...`` lines, ``official_source.key_shapes``) of CSwin-T as the fork's configs
  build it (``out_indices`` [0, 1, 2, 3]) and with ``out_indices`` [1, 2, 3], and of CSwin-S/B
  (the fork's class with the official repository's settings; the fork has no configs for them);
* ``inputs``: two float16 inputs (cast to float64 before use), shared by the tiny models: 1x3x37x53
  and, batch 2, 2x3x45x30. Through the 7x7/4 stem and the stride-2 merges their stage maps are
  9x13, 5x7, 3x4, 2x2 and 11x7, 6x4, 3x2, 2x1: odd sizes, and sizes that are not multiples of
  the stripe widths, so the centred padding of ``LePEAttention`` runs with one and with several
  padded rows / columns (also split before and after), and stripes wider than the map;
* ``tiny[name]`` for two tiny configurations (``tiny_a``: four outputs, ``split_size``
  [1, 2, 2, 2]; ``tiny_b``: ``out_indices`` [3, 2, 1] (three outputs, norms registered in that
  order), ``split_size`` [2, 3, 5, 7], ``mlp_ratio`` 2, ``qk_scale`` 0.25, two last-stage blocks):
  ``config`` (the fork's keyword arguments), the fork's ``state_dict`` (random weights made
  float16-exact, stored as float16: cast to float64) and the fork's float64 eval ``outputs``, one
  list of maps per input;
* ``lepe``: for ``idx`` -1, 0 and 1 one tiny ``LePEAttention`` of the fork's ``cednet.py``:
  ``config`` (``dim``, ``idx``, ``split_size``, ``num_heads``, ``qk_scale``), its ``state_dict``
  (``get_v``, float16), ``H``, ``W``, its input ``qkv`` in ``cednet.py``'s layout
  ``(3, B, H*W, C)`` (float16) and ``output`` (float64, ``(B, H*W, C)``) of ``cednet.py``'s
  ``forward(qkv, H, W)``. The script checks that ``cswin.py``'s ``LePEAttention`` (same weights,
  input re-laid as its ``(B, 3, C, H, W)``) gives the same answer to 1e-12, so the tests'
  comparison covers both forks' versions.

The outputs are computed in float64 (the fork's modules ``.double()``, inputs ``.double()``): a
float32 result depends on how the CPU orders its float32 sums, which moves values by ~1e-5 between
machines; in float64 that ordering moves them by ~1e-15, so the tests compare with a tight
tolerance on any CPU. The fork's code runs in float64 unchanged (nothing in it fixes a dtype).

The tests (``tests/test_cswin.py``) only read the fixture; they never run this script.
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import torch
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_cednet_reference import _import, _stub_modules, official_text  # noqa: E402
from official_source import commit_of, key_shapes, share_storage, simple_main  # noqa: E402

CSWIN_FILE = Path("ced-mmdet/mmdet/models/backbones/cswin.py")
CEDNET_FILE = Path("ced-mmdet/mmdet/models/backbones/cednet.py")

# The fork's config (retinanet_cswin_tiny_*) for tiny; small/base: the official repository's settings.
FULL = {
    "cswin_tiny": dict(embed_dim=64, depth=[1, 2, 21, 1], num_heads=[2, 4, 8, 16], split_size=[1, 2, 7, 7], drop_path_rate=0.1),
    "cswin_small": dict(embed_dim=64, depth=[2, 4, 32, 2], num_heads=[2, 4, 8, 16], split_size=[1, 2, 7, 7], drop_path_rate=0.4),
    "cswin_base": dict(embed_dim=96, depth=[2, 4, 32, 2], num_heads=[4, 8, 16, 32], split_size=[1, 2, 7, 7], drop_path_rate=0.6),
}
# Small enough that the fixture stays well under 300 KB (weights are stored as float16).
TINY = {
    "tiny_a": dict(
        embed_dim=4,
        depth=[1, 1, 2, 1],
        num_heads=[2, 2, 4, 4],
        split_size=[1, 2, 2, 2],
        mlp_ratio=4.0,
        drop_path_rate=0.1,
        out_indices=[0, 1, 2, 3],
    ),
    "tiny_b": dict(
        embed_dim=4,
        depth=[1, 2, 1, 2],
        num_heads=[2, 4, 4, 8],
        split_size=[2, 3, 5, 7],
        mlp_ratio=2.0,
        qk_scale=0.25,
        drop_path_rate=0.1,
        out_indices=[3, 2, 1],
    ),
}
TINY_INPUT_SHAPES = [(1, 3, 37, 53), (2, 3, 45, 30)]
# cednet.py's LePEAttention, one per idx; 5x7 maps: idx 0 with split 3 pads W by 2 (1 left, 1 right),
# idx 1 with split 4 pads H by 3 (1 top, 2 bottom); idx -1 attends over the whole map.
LEPE = [
    dict(dim=8, idx=-1, split_size=3, num_heads=2, qk_scale=None),
    dict(dim=8, idx=0, split_size=3, num_heads=2, qk_scale=None),
    dict(dim=6, idx=1, split_size=4, num_heads=3, qk_scale=0.5),
]
LEPE_BATCH, LEPE_H, LEPE_W = 2, 5, 7


def load_fork(repo: Path, commit: str) -> dict[str, types.ModuleType]:
    """The fork's ``cswin`` and ``cednet`` backbone modules, executed in memory with stubs."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # timm.models.layers deprecation
    _stub_modules()
    return {
        "cswin": _import("mmdet.models.backbones.cswin", CSWIN_FILE, official_text(repo, CSWIN_FILE, commit)),
        "cednet": _import("mmdet.models.backbones.cednet", CEDNET_FILE, official_text(repo, CEDNET_FILE, commit)),
    }


def fork_cswin(fork, **cfg) -> nn.Module:
    full = dict(in_chans=3, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, use_chk=False)
    full["out_indices"] = [0, 1, 2, 3]
    full.update(cfg)
    return fork["cswin"].CSwinTransformer(**full)


def randomize_(model: nn.Module, seed: int) -> None:
    """Random, float16-exact weights (norm weights near 1, everything else ~N(0, 0.2))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            v = torch.randn(p.shape, generator=g) * 0.2
            if name.endswith("weight") and p.dim() == 1:  # norms
                v = 1.0 + v
            p.copy_(v.half().float())


def _half_state(model: nn.Module) -> dict:
    state = {k: v.half() for k, v in model.state_dict().items()}  # exact: randomize_ made every weight float16-representable
    assert all(torch.equal(state[k].float(), v) for k, v in model.state_dict().items())
    return state


def make_fixture(repo: Path) -> dict:
    commit = commit_of(repo)
    fork = load_fork(repo, commit)

    variants = {}
    for name, cfg in FULL.items():
        for oi in ([0, 1, 2, 3], [1, 2, 3]) if name == "cswin_tiny" else ([0, 1, 2, 3],):
            full_cfg = {**cfg, "out_indices": oi}
            key = name if oi == [0, 1, 2, 3] else f"{name}_out123"
            variants[key] = {"config": full_cfg, "keys": key_shapes(fork_cswin(fork, **full_cfg).state_dict())}

    g = torch.Generator().manual_seed(100)
    inputs = [torch.randn(shape, generator=g).half() for shape in TINY_INPUT_SHAPES]  # stored as float16
    tiny = {}
    for seed, (name, cfg) in enumerate(TINY.items()):
        torch.manual_seed(seed)
        model = fork_cswin(fork, **cfg).eval()
        randomize_(model, seed)
        state = _half_state(model)
        # float64 outputs: independent of the CPU's float32 summation order (see the docstring)
        model.double()
        with torch.no_grad():
            outputs = [[o.contiguous() for o in model(x.double())] for x in inputs]
        assert all(o.dtype == torch.float64 for outs in outputs for o in outs)
        assert all(len(outs) == (4 if 0 in cfg["out_indices"] else 3) for outs in outputs)
        flat = share_storage({(i, j): o for i, outs in enumerate(outputs) for j, o in enumerate(outs)})
        outputs = [[flat[i, j] for j in range(len(outs))] for i, outs in enumerate(outputs)]
        tiny[name] = {"config": dict(cfg), "state_dict": share_storage(state), "outputs": outputs}

    lepe = []
    for seed, cfg in enumerate(LEPE, start=10):
        torch.manual_seed(seed)
        attn = fork["cednet"].LePEAttention(**cfg).eval()
        randomize_(attn, seed)
        state = _half_state(attn)
        c = cfg["dim"]
        qkv = torch.randn(3, LEPE_BATCH, LEPE_H * LEPE_W, c, generator=g).half()
        with torch.no_grad():
            out = copy.deepcopy(attn).double()(qkv.double(), LEPE_H, LEPE_W)
            # the same answer from cswin.py's LePEAttention, whose forward takes (B, 3, C, H, W)
            twin = fork["cswin"].LePEAttention(
                c, cfg["idx"], split_size=cfg["split_size"], num_heads=cfg["num_heads"], qk_scale=cfg["qk_scale"]
            )
            twin.load_state_dict(attn.state_dict(), strict=True)
            temp = qkv.double().transpose(-2, -1).reshape(3, LEPE_BATCH, c, LEPE_H, LEPE_W).permute(1, 0, 2, 3, 4)
            out_cswin = twin.double().eval()(temp)
        assert out.shape == (LEPE_BATCH, LEPE_H * LEPE_W, c) and out.dtype == torch.float64
        torch.testing.assert_close(out_cswin, out, rtol=1e-12, atol=1e-12)
        lepe.append({"config": dict(cfg), "state_dict": state, "H": LEPE_H, "W": LEPE_W, "qkv": qkv, "output": out.contiguous()})

    return {
        "format": 1,
        "source": f"zhanggang001/CEDNet@{commit}: {CSWIN_FILE.as_posix()}, {CEDNET_FILE.as_posix()} (LePEAttention)",
        "torch_version": str(torch.__version__),
        "variants": variants,
        "inputs": inputs,
        "tiny": tiny,
        "lepe": lepe,
    }


def main(argv=None) -> None:
    simple_main(__doc__, "CEDNet checkout or git directory", "cswin_reference.pt", make_fixture, argv)


if __name__ == "__main__":
    main()
