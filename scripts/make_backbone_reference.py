"""Build ``tests/data/backbone_reference.pt`` from the CEDNet fork's own backbone code.

Needs a checkout (or a bare/mirror git directory) of https://github.com/zhanggang001/CEDNet and
``timm`` (the fork's files import ``timm.models.layers``); mmcv and mmdet are *not* needed: the
few names the two files import from them are stubbed here, and the files' source is executed in
memory with the relative ``..builder`` import replaced.

    python scripts/make_backbone_reference.py --official-repo /path/to/CEDNet

The fixture (plain tensors, lists and dicts; ``torch.load(..., weights_only=True)``) holds:

* ``variants[name]``: ``config`` and the fork's ordered state-dict ``keys`` and ``shapes`` for
  ConvNeXt-T/S/B with ``out_indices`` (1, 2, 3) and (0, 1, 2, 3), and Swin-T/S/B;
* ``inputs``: two float16 inputs (cast to float64 before use), shared by the tiny models: one
  where the late Swin maps are smaller than the 7x7 window, one with batch 2 and a size that is
  not a multiple of the patch size;
* ``tiny[name]`` for one tiny ConvNeXt and one tiny Swin: ``config``, the fork's full
  ``state_dict`` (random weights made float16-exact and stored as float16: cast floats to float64;
  the ``relative_position_index`` buffers are stored as uint8: cast to int64) and the fork's
  float64 eval ``outputs`` (one float64 storage per model), one list of maps per input.

The outputs are computed in float64 (the fork's model ``.double()``, inputs ``.double()``): a
float32 result depends on how the CPU orders its float32 sums (vector width, blocking), which
moves values by ~1e-5 between machines; in float64 that ordering moves them by ~1e-15, so the
tests can compare the same function with a tight tolerance on any CPU. The fork's code runs in
float64 unchanged: its only float32 tensor, Swin's shift mask (``torch.zeros`` in
``BasicLayer.forward``, values 0 and -100, both exact), is promoted to float64 when added to the
float64 attention logits.

The tests (``tests/test_backbones.py``) only read the fixture; they never run this script.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_source import Registry, commit_of, read_file, share_storage, simple_main, stub_module  # noqa: E402

FORK_FILES = {
    "convnext": "ced-mmdet/mmdet/models/backbones/convnext.py",
    "swin": "ced-mmdet/mmdet/models/backbones/swin_transformer.py",
}

CONVNEXT = {
    "convnext_tiny": dict(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768], drop_path_rate=0.4, layer_scale_init_value=1.0),
    "convnext_small": dict(depths=[3, 3, 27, 3], dims=[96, 192, 384, 768], drop_path_rate=0.6, layer_scale_init_value=1.0),
    "convnext_base": dict(depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024], drop_path_rate=0.7, layer_scale_init_value=1.0),
}
SWIN = {
    "swin_tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.2),
    "swin_small": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.2),
    "swin_base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7, drop_path_rate=0.2),
}
# Small enough that the fixture stays under 300 KB (weights are stored as float16).
TINY_CONVNEXT = dict(depths=[1, 1, 2, 1], dims=[8, 12, 16, 24], drop_path_rate=0.1, layer_scale_init_value=1.0, out_indices=[0, 1, 2, 3])
TINY_SWIN = dict(
    embed_dim=4, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=7, mlp_ratio=4.0, drop_path_rate=0.1, out_indices=[1, 2, 3]
)
# Swin stage maps for 1x36x52: 9x13, 5x7, 3x4, 2x2 (odd sizes; late maps no larger than the 7x7
# window). For 2x38x61 (not a multiple of the patch size): 10x16 (padded to 14x21: 6 windows),
# 5x8, 3x4, 2x2. (ConvNeXt, which does not pad, needs at least 32 pixels a side.)
TINY_INPUT_SHAPES = [(1, 3, 36, 52), (2, 3, 38, 61)]


# ----------------------------------------------------------------------------- loading the fork


def _install_stubs() -> Registry:
    norm_layers = Registry({"LN": nn.LayerNorm})

    def build_norm_layer(cfg, num_features, postfix=""):
        # mmcv 1.x semantics: pop 'type' and 'requires_grad', eps defaults to 1e-5
        cfg_ = dict(cfg)
        layer_type = cfg_.pop("type")
        requires_grad = cfg_.pop("requires_grad", True)
        cfg_.setdefault("eps", 1e-5)
        layer = norm_layers.get(layer_type)(num_features, **cfg_)
        for p in layer.parameters():
            p.requires_grad = requires_grad
        return "ln" + str(postfix), layer

    stub_module("mmcv")
    stub_module("mmcv.cnn", build_norm_layer=build_norm_layer)
    stub_module("mmcv.cnn.bricks")
    stub_module("mmcv.cnn.bricks.registry", NORM_LAYERS=norm_layers)
    stub_module("mmcv_custom", load_checkpoint=lambda *a, **k: None)
    stub_module("mmdet")
    stub_module("mmdet.utils", get_root_logger=lambda *a, **k: None)
    stub_module("_fork_builder", BACKBONES=Registry())
    return norm_layers


def load_fork(repo: Path) -> dict[str, types.ModuleType]:
    """The fork's ``convnext`` and ``swin_transformer`` modules, executed in memory."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # timm.models.layers deprecation
    _install_stubs()
    modules = {}
    for key, rel in FORK_FILES.items():
        src = read_file(repo, rel)
        assert "from ..builder import BACKBONES" in src, rel
        src = src.replace("from ..builder import BACKBONES", "from _fork_builder import BACKBONES")
        m = types.ModuleType(f"_fork_{key}")
        m.__file__ = rel
        exec(compile(src, rel, "exec"), m.__dict__)
        modules[key] = m
    return modules


def fork_convnext(fork, **cfg) -> nn.Module:
    return fork["convnext"].ConvNeXt(in_chans=3, **cfg)


def fork_swin(fork, **cfg) -> nn.Module:
    full = dict(qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, ape=False, patch_norm=True, use_checkpoint=False)
    full.update(cfg)
    return fork["swin"].SwinTransformer(**full)


def variant_configs():
    """(name, family, config) for every full-size variant."""
    for name, cfg in CONVNEXT.items():
        for oi in ([1, 2, 3], [0, 1, 2, 3]):
            yield f"{name}_out{''.join(map(str, oi))}", "convnext", {**cfg, "out_indices": oi}
    for name, cfg in SWIN.items():
        yield name, "swin", {**cfg, "out_indices": [1, 2, 3]}


def build_fork(fork, family: str, cfg: dict) -> nn.Module:
    return fork_convnext(fork, **cfg) if family == "convnext" else fork_swin(fork, **cfg)


# ----------------------------------------------------------------------------- the fixture


def randomize_(model: nn.Module, seed: int) -> None:
    """Random, float16-exact weights (norm weights near 1, everything else ~N(0, 0.2))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            v = torch.randn(p.shape, generator=g) * 0.2
            if name.endswith("weight") and p.dim() == 1:  # norms
                v = 1.0 + v
            p.copy_(v.half().float())


def make_fixture(repo: Path) -> dict:
    fork = load_fork(repo)
    variants = {}
    for name, family, cfg in variant_configs():
        sd = build_fork(fork, family, cfg).state_dict()
        variants[name] = {
            "family": family,
            "config": cfg,
            # interned: pickle then stores each distinct key once across variants
            "keys": [sys.intern(k) for k in sd.keys()],
            "shapes": [tuple(v.shape) for v in sd.values()],
        }

    g = torch.Generator().manual_seed(100)
    inputs = [torch.randn(shape, generator=g).half() for shape in TINY_INPUT_SHAPES]  # stored as float16
    tiny = {}
    for seed, (name, family, cfg) in enumerate([("tiny_convnext", "convnext", TINY_CONVNEXT), ("tiny_swin", "swin", TINY_SWIN)]):
        torch.manual_seed(seed)
        model = build_fork(fork, family, dict(cfg))
        model.eval()  # not chained: the fork's SwinTransformer.train() returns None
        randomize_(model, seed)
        state = {}
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                state[k] = v.half()  # exact: randomize_ made every weight float16-representable
            else:  # relative_position_index: values < 256 (window <= 8)
                assert int(v.max()) < 256
                state[k] = v.to(torch.uint8)
        # float64 outputs: independent of the CPU's float32 summation order (see the docstring)
        model.double()
        with torch.no_grad():
            outputs = [[o.contiguous() for o in model(x.double())] for x in inputs]
        assert all(o.dtype == torch.float64 for outs in outputs for o in outs)
        flat_outputs = share_storage({(i, j): o for i, outs in enumerate(outputs) for j, o in enumerate(outs)})
        outputs = [[flat_outputs[i, j] for j in range(len(outs))] for i, outs in enumerate(outputs)]
        tiny[name] = {"family": family, "config": dict(cfg), "state_dict": share_storage(state), "outputs": outputs}

    return {
        "format": 1,
        "source": f"zhanggang001/CEDNet@{commit_of(repo)}: " + ", ".join(FORK_FILES.values()),
        "torch_version": str(torch.__version__),
        "variants": variants,
        "inputs": inputs,
        "tiny": tiny,
    }


def main(argv=None) -> None:
    simple_main(__doc__, "CEDNet checkout or git directory", "backbone_reference.pt", make_fixture, argv)


if __name__ == "__main__":
    main()
