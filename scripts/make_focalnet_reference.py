"""Build ``tests/data/focalnet_reference.pt`` from the official FocalNet code (not run by the tests).

Needs a checkout (or a bare/mirror git directory) of https://github.com/microsoft/FocalNet (only
``classification/focalnet.py``, ``detection/mmdet/models/backbones/focalnet.py`` and the
ImageNet ``configs/focalnet_{tiny,small,base}_{srf,lrf}.yaml`` are read) and ``timm``, which the
two files import. mmcv, mmdet and mmcv_custom are *not* needed: the three names the detection file
imports from them (``load_checkpoint``, ``get_root_logger``, ``BACKBONES``) are stubbed, and the
files' source runs in memory (timm's ``register_model`` is replaced by the identity so that timm's
own ``focalnet_*`` registrations stay untouched).

    PYTHONPATH=/path/to/timm python scripts/make_focalnet_reference.py --official-repo /path/to/FocalNet

The fixture (plain tensors, lists, dicts and bytes; ``torch.load(..., weights_only=True)``) holds:

* ``classifiers[name]`` for the six released ImageNet models ``focalnet_{tiny,small,base}_{srf,lrf}``:
  ``config`` (the yaml's ``EMBED_DIM``/``DEPTHS``/``FOCAL_LEVELS``/``FOCAL_WINDOWS``/``DROP_PATH_RATE``,
  passed to the official registration as ``classification/build.py`` does) and ``keys``: the
  official ordered state-dict keys and shapes, zlib-compressed text, one ``key<TAB>d0,d1,...`` line each;
* ``backbones[name]``: the same for the detection backbone built with the backbone settings of
  the official detection configs: ``mask_rcnn_{tiny,small,base}_{srf,lrf}`` (focal windows 9,
  ``out_indices`` (0, 1, 2, 3)), ``atss_tiny_{srf,lrf}`` (windows [11, 9, 9, 7], ``out_indices``
  (1, 2, 3)) and ``mask_rcnn_tiny_deeper`` (embed 64, depths [3, 3, 16, 3]: a FocalNet that is none
  of T/S/B);
* ``tiny_classifiers[name]`` / ``tiny_backbones[name]`` for two tiny configurations each:
  ``config``, the official random weights (``state_dict``, float16-exact and stored as float16:
  cast to float64) and the official float64 eval ``outputs`` (logits; for a backbone, one list of
  maps; one float64 storage per model) for every input of ``inputs``: 1x3x36x52 and
  2x3x38x61, float16 (cast to float64), not multiples of 32 (the second not of 4): the backbone
  pads them, the classifier floors odd sizes. The official modules run in float64
  (``model.double()`` after the float16-exact weights are set, inputs ``.double()``): float32
  results depend on the order a CPU's kernels add in (AVX2 vs AVX-512, thread count) by ~1e-5,
  float64 ones only by ~1e-15, so the tests can compare tightly on any machine. The official
  code needs no change for this (it creates no float32 tensors of its own in ``forward``).

The tests (``tests/test_focalnet.py``) only read the fixture; they never run this script.
"""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import torch
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_source import Registry, commit_of, key_shapes, read_file, share_storage, simple_main, stub_module  # noqa: E402

CLS_FILE = "classification/focalnet.py"
DET_FILE = "detection/mmdet/models/backbones/focalnet.py"
SIZES = ("tiny", "small", "base")

# Backbone settings of the official detection configs (detection/configs/focalnet/*.py).
_DET_ARCH = {"tiny": dict(embed_dim=96, depths=[2, 2, 6, 2]), "small": dict(embed_dim=96, depths=[2, 2, 18, 2]),
             "base": dict(embed_dim=128, depths=[2, 2, 18, 2])}
_DET_DPR = {"tiny": 0.1, "small": 0.2, "base": 0.3}  # the 1x configs
_LEVELS = {"srf": [2, 2, 2, 2], "lrf": [3, 3, 3, 3]}
BACKBONES = {
    **{
        f"mask_rcnn_{size}_{rf}": dict(
            _DET_ARCH[size], drop_path_rate=_DET_DPR[size], patch_norm=True, out_indices=[0, 1, 2, 3],
            focal_windows=[9, 9, 9, 9], focal_levels=_LEVELS[rf], use_conv_embed=False,
        )
        for size in SIZES
        for rf in ("srf", "lrf")
    },
    **{
        f"atss_tiny_{rf}": dict(
            _DET_ARCH["tiny"], drop_path_rate=0.3, patch_norm=True, out_indices=[1, 2, 3],
            focal_windows=[11, 9, 9, 7], focal_levels=_LEVELS[rf], use_conv_embed=False,
        )
        for rf in ("srf", "lrf")
    },
    "mask_rcnn_tiny_deeper": dict(
        embed_dim=64, depths=[3, 3, 16, 3], drop_path_rate=0.2, patch_norm=True, out_indices=[0, 1, 2, 3],
        focal_windows=[9, 9, 9, 9], focal_levels=[3, 3, 3, 3], use_conv_embed=False,
    ),
}

# Tiny configurations: plain (varied levels and windows per stage), and one with every option on.
TINY_CLASSIFIERS = {
    "plain": dict(
        embed_dim=3, depths=[1, 2, 1, 1], focal_levels=[2, 3, 1, 2], focal_windows=[3, 5, 3, 1], mlp_ratio=2.0,
        drop_path_rate=0.1, num_classes=5,
    ),
    "options": dict(
        embed_dim=3, depths=[2, 1, 1, 1], focal_levels=[3, 2, 2, 1], focal_windows=[3, 3, 1, 3], mlp_ratio=1.5,
        drop_path_rate=0.1, num_classes=3, patch_norm=False, use_conv_embed=True, use_layerscale=True,
        layerscale_value=0.5, use_postln=True, use_postln_in_modulation=True, normalize_modulator=True,
    ),
}
TINY_BACKBONES = {
    "plain": dict(
        embed_dim=3, depths=[1, 2, 1, 1], focal_levels=[2, 2, 3, 1], focal_windows=[11, 9, 3, 3], mlp_ratio=2.0,
        drop_path_rate=0.1, out_indices=[0, 1, 2, 3],
    ),
    "options": dict(
        embed_dim=3, depths=[2, 1, 1, 1], focal_levels=[3, 2, 2, 2], focal_windows=[3, 5, 3, 1], mlp_ratio=1.5,
        drop_path_rate=0.1, out_indices=[3, 1, 2], patch_norm=False, use_conv_embed=True, use_layerscale=True,
    ),
}
# Shared by all tiny models. Backbone stage maps: 9x13, 5x7, 3x4, 2x2 and (padded to 40x64) 10x16, 5x8,
# 3x4, 2x2; the classifier floors instead: 9x13, 4x6, 2x3, 1x1 and 9x15, 4x7, 2x3, 1x1.
INPUT_SHAPES = [(1, 3, 36, 52), (2, 3, 38, 61)]


# ----------------------------------------------------------------------------- the official code


def _exec(name: str, relpath: str, src: str) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__file__ = relpath
    exec(compile(src, relpath, "exec"), m.__dict__)
    return m


def load_official(repo: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """(classification module, detection module) of the official code, executed in memory."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # timm.models.layers / registry deprecations

    stub_module("mmcv_custom", load_checkpoint=lambda *a, **k: None)
    stub_module("mmdet")
    stub_module("mmdet.utils", get_root_logger=lambda *a, **k: None)
    stub_module("_focalnet_builder", BACKBONES=Registry())

    cls_src = read_file(repo, CLS_FILE)
    line = "from timm.models.registry import register_model"
    assert line in cls_src, CLS_FILE
    cls_src = cls_src.replace(line, "register_model = lambda fn: fn  # stubbed: keep timm's registry untouched")
    det_src = read_file(repo, DET_FILE)
    line = "from ..builder import BACKBONES"
    assert line in det_src, DET_FILE
    det_src = det_src.replace(line, "from _focalnet_builder import BACKBONES")
    return _exec("_focalnet_official_cls", CLS_FILE, cls_src), _exec("_focalnet_official_det", DET_FILE, det_src)


def imagenet_configs(repo: Path) -> dict[str, dict]:
    """``focalnet_<size>_<rf>`` -> the yaml's model settings (the keys build.py passes on)."""
    import yaml

    out = {}
    for size in SIZES:
        for rf in ("srf", "lrf"):
            name = f"focalnet_{size}_{rf}"
            cfg = yaml.safe_load(read_file(repo, f"configs/{name}.yaml"))["MODEL"]
            assert cfg["TYPE"] == name
            focal = cfg["FOCAL"]
            out[name] = dict(
                embed_dim=focal["EMBED_DIM"], depths=focal["DEPTHS"], focal_levels=focal["FOCAL_LEVELS"],
                focal_windows=focal["FOCAL_WINDOWS"], drop_path_rate=cfg["DROP_PATH_RATE"],
            )
    return out


def official_classifier(cls_mod, name: str, cfg: dict) -> nn.Module:
    """The official registration ``name`` (which fixes depths/embed_dim) with the yaml's other settings."""
    kw = {k: v for k, v in cfg.items() if k not in ("embed_dim", "depths")}
    model = getattr(cls_mod, name)(**kw)
    assert model.embed_dim[0] == cfg["embed_dim"] and [len(l.blocks) for l in model.layers] == cfg["depths"], name
    return model


# ----------------------------------------------------------------------------- the fixture


def randomize_(model: nn.Module, seed: int) -> None:
    """Random, float16-exact weights (norm weights near 1, everything else ~N(0, 0.25))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            v = torch.randn(p.shape, generator=g) * 0.25
            parts = name.split(".")
            if parts[-1] == "weight" and len(parts) > 1 and parts[-2].startswith(("norm", "ln")):  # LayerNorms
                v = 1.0 + v
            p.copy_(v.half().float())


def tiny_entry(model: nn.Module, cfg: dict, inputs, seed: int, backbone: bool) -> dict:
    model.eval()
    randomize_(model, seed)
    model.double()  # the float16-exact weights, exactly; float64 outputs do not depend on the CPU's float32 ordering
    with torch.no_grad():
        outs = [model(x.double()) for x in inputs]
    assert all(o.dtype == torch.float64 for out in outs for o in (out if backbone else [out]))
    if backbone:
        flat = share_storage({(i, j): o.contiguous() for i, maps in enumerate(outs) for j, o in enumerate(maps)})
        outputs = [[flat[i, j] for j in range(len(maps))] for i, maps in enumerate(outs)]
    else:
        flat = share_storage({i: o.contiguous() for i, o in enumerate(outs)})
        outputs = [flat[i] for i in range(len(outs))]
    state = model.state_dict()
    assert all(v.is_floating_point() for v in state.values())
    return {"config": dict(cfg), "state_dict": share_storage({k: v.half() for k, v in state.items()}), "outputs": outputs}


def make_fixture(repo: Path) -> dict:
    cls_mod, det_mod = load_official(repo)
    torch.manual_seed(0)

    classifiers = {}
    for name, cfg in imagenet_configs(repo).items():
        classifiers[name] = {"config": cfg, "keys": key_shapes(official_classifier(cls_mod, name, cfg).state_dict())}
    backbones = {name: {"config": cfg, "keys": key_shapes(det_mod.FocalNet(**cfg).state_dict())} for name, cfg in BACKBONES.items()}

    g = torch.Generator().manual_seed(7)
    inputs = [torch.randn(s, generator=g).half() for s in INPUT_SHAPES]  # stored as float16
    tiny_classifiers = {
        name: tiny_entry(cls_mod.FocalNet(**cfg), cfg, inputs, seed, backbone=False)
        for seed, (name, cfg) in enumerate(TINY_CLASSIFIERS.items())
    }
    tiny_backbones = {
        name: tiny_entry(det_mod.FocalNet(**cfg), cfg, inputs, 10 + seed, backbone=True)
        for seed, (name, cfg) in enumerate(TINY_BACKBONES.items())
    }

    return {
        "format": 1,
        "source": f"microsoft/FocalNet@{commit_of(repo)}: {CLS_FILE}, {DET_FILE}",
        "torch_version": str(torch.__version__),
        "classifiers": classifiers,
        "backbones": backbones,
        "inputs": inputs,
        "tiny_classifiers": tiny_classifiers,
        "tiny_backbones": tiny_backbones,
    }


def main(argv=None) -> None:
    simple_main(__doc__, "FocalNet checkout or git directory", "focalnet_reference.pt", make_fixture, argv)


if __name__ == "__main__":
    main()
