"""Build ``tests/data/ced_blocks_reference.pt``: the CEDNet fork's CED-ResNet, CED-Swin and CED-CSwin backbones.

The fork's RetinaNet configs ``resnet/retinanet_ced_resnet_50_…``, ``swin/retinanet_ced_swin_tiny_…`` and
``cswin/retinanet_ced_cswin_tiny_…`` build ``CEDNetWrapper`` (``ced-mmdet/mmdet/models/backbones/cednet.py``)
with other blocks than the NeXt ones: ``Bottleneck``/``DBottleneck`` with SyncBN and ReLU, ``SwinBlock``/
``DSwinBlock``, and ``CSwinBlock`` under ``CSwinEncoder``. This script runs that file (read from a checkout or
a bare mirror, with mmcv/mmdet names stubbed as ``make_cednet_reference.py`` does, plus mmcv's ``SyncBN`` and
``BN``) and records what gradlens' :mod:`gradlens.models.backbones.cednet` must reproduce:

* ``configs[name]``: the backbone settings of each of the three configs, read from the config text with
  gradlens' safe reader (nothing is executed), and the fork's ordered state-dict keys and shapes of
  ``CEDNetWrapper`` built with them (zlib-compressed ``key<TAB>d0,d1,…`` lines);
* ``tiny[name]``: one small configuration per block family (``kwargs``), the fork's full state dict
  (random weights and batch-norm statistics made float16-exact and stored as float16; cast to float64),
  and the fork's float64 eval outputs on ``inputs`` (two float16 inputs: one whose stride-8 map is not a
  multiple of the Swin window or the CSwin stripes, one with batch 2).

The outputs are float64 (the fork's module ``.double()`` on the inputs ``.double()``), so the tests compare
the same function with a tolerance far below any real defect on any CPU (float32 sums move by ~1e-5 between
machines). The fork's code runs in float64 unchanged: its only float32 tensor, the Swin shift mask (values 0
and -100), is promoted when added to the float64 logits.

    PYTHONPATH=/path/to/timm python scripts/make_ced_blocks_reference.py --official-repo /path/to/CEDNet
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_source import commit_of, key_shapes, read_file, share_storage, simple_main, stub_module  # noqa: E402

import make_cednet_reference as ced  # noqa: E402  (the stubs and the loader of the fork's cednet.py)

CONFIGS = {
    "ced_resnet_50": "ced-mmdet/configs/cednet/resnet/retinanet_ced_resnet_50_copy_paste_lsj_adamw_3x_coco_in1k.py",
    "ced_swin_tiny": "ced-mmdet/configs/cednet/swin/retinanet_ced_swin_tiny_copy_paste_lsj_adamw_3x_coco_in1k.py",
    "ced_cswin_tiny": "ced-mmdet/configs/cednet/cswin/retinanet_ced_cswin_tiny_copy_paste_lsj_adamw_3x_coco_in1k.py",
}
# Small configurations with every path of each family: a decoder, two p2 blocks (Swin's shifted
# windows at widx 1), focal blocks, several heads where the family has them. The inputs give stride-8 maps of
# 12x20 and 8x12: not multiples of the 7x7 window or of the 7-wide stripes, so both pad.
_TINY_COMMON = dict(in_chans=3, num_stages=2, encoder_type="Encoder", decoder_type="Decoder", p2_block=2,
                    drop_path_rate=0.0, out_chans=8, num_add_blocks=2)
TINY = {
    "ced_resnet": dict(_TINY_COMMON, base_block="Bottleneck", focal_block="DBottleneck", p2_dim=8, dims=[8, 12, 16],
                       blocks=[1, 2, 1], layer_scale_init_value=1e-6, norm_cfg=dict(type="SyncBN", requires_grad=True),
                       act_type="relu"),
    # one stage with the wrapper's last_decoder (Swin blocks are large; two heads at stride 16)
    "ced_swin": dict(_TINY_COMMON, num_stages=1, last_decoder=True, base_block="SwinBlock", focal_block="DSwinBlock",
                     p2_dim=32, dims=[32, 64, 32], blocks=[1, 1, 2], layer_scale_init_value=1e-6,
                     norm_cfg=dict(type="LN", eps=1e-6, data_format="channels_first"), act_type="gelu"),
    "ced_cswin": dict(_TINY_COMMON, encoder_type="CSwinEncoder", base_block="CSwinBlock", focal_block="CSwinBlock",
                      p2_dim=8, dims=[8, 16, 20], blocks=[2, 2, 1], layer_scale_init_value=1.0,
                      norm_cfg=dict(type="LN", eps=1e-6, data_format="channels_first"), act_type="gelu"),
}
TINY_INPUT_SHAPES = [(1, 3, 96, 160), (2, 3, 64, 96)]


def _install_norms() -> None:
    """mmcv's ``build_norm_layer`` for what these configs use: LN (the registry's class), SyncBN and BN
    (``nn.SyncBatchNorm``/``nn.BatchNorm2d``); eps defaults to 1e-5, as in mmcv."""
    ced._stub_modules()
    registry = sys.modules["mmcv.cnn.bricks.registry"].NORM_LAYERS
    registry.register_module("SyncBN", module=nn.SyncBatchNorm)
    registry.register_module("BN", module=nn.BatchNorm2d)

    def build_norm_layer(cfg, num_features, postfix=""):
        cfg = dict(cfg)
        layer_type = cfg.pop("type")
        requires_grad = cfg.pop("requires_grad", True)
        cfg.setdefault("eps", 1e-5)
        layer = registry.get(layer_type)(num_features, **cfg)
        for p in layer.parameters():
            p.requires_grad = requires_grad
        return ("bn" if "BN" in layer_type else "ln") + str(postfix), layer

    sys.modules["mmcv.cnn"].build_norm_layer = build_norm_layer


def load_fork(repo: Path):
    _install_norms()
    build_norm_layer = sys.modules["mmcv.cnn"].build_norm_layer
    mod = ced._import("mmdet.models.backbones.cednet", ced.DET_FILE, read_file(repo, ced.DET_FILE.as_posix()))
    mod.build_norm_layer = build_norm_layer  # the file imported the name before the stub was extended
    return mod


def backbone_settings(repo: Path, relpath: str) -> dict:
    """``model.backbone`` of a config, read as data by gradlens' config reader (``_delete_``/``type`` dropped)."""
    from gradlens.models.formats.config_text import read_config

    backbone = json.loads(json.dumps(read_config(read_file(repo, relpath))["model"]["backbone"]))  # plain dicts
    for key in ("_delete_", "type"):
        backbone.pop(key, None)
    return backbone


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Random float16-exact weights and batch-norm statistics (the fork's init leaves norms at 1/0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            v = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
        elif name.endswith("weight"):
            v = 1 + 0.2 * torch.randn(p.shape, generator=g)
        else:
            v = 0.1 * torch.randn(p.shape, generator=g)
        p.copy_(v.half().float())
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_((0.2 * torch.randn(b.shape, generator=g)).half().float())
        elif name.endswith("running_var"):
            b.copy_((0.5 + torch.rand(b.shape, generator=g)).half().float())


def make_fixture(repo: Path) -> dict:
    fork = load_fork(repo)
    commit = commit_of(repo)
    configs = {}
    for name, relpath in CONFIGS.items():
        settings = backbone_settings(repo, relpath)
        configs[name] = dict(settings=settings, keys=key_shapes(fork.CEDNetWrapper(**settings).state_dict()))

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=g).half() for shape in TINY_INPUT_SHAPES]
    tiny = {}
    for i, (name, kwargs) in enumerate(TINY.items()):
        model = fork.CEDNetWrapper(**copy.deepcopy(kwargs))
        randomize_(model, seed=i + 1)
        model64 = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            outputs = [[f.clone() for f in model64(x.double())] for x in inputs]
        state = {}
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                state[k] = v.half()  # exact: randomize_ made every value float16-representable
            elif k.endswith("relative_position_index"):
                state[k] = v.to(torch.uint8)  # indices < 169: cast to int64
            else:
                state[k] = v  # num_batches_tracked
        flat = {f"{j}.{k}": t for j, maps in enumerate(outputs) for k, t in enumerate(maps)}
        tiny[name] = dict(kwargs=kwargs, state_dict=share_storage(state), outputs=share_storage(flat))
    return dict(source=f"github.com/zhanggang001/CEDNet@{commit}", torch_version=str(torch.__version__),
                configs=configs, inputs=inputs, tiny=tiny)


def main(argv=None) -> None:
    simple_main(__doc__, "checkout (or bare mirror) of github.com/zhanggang001/CEDNet", "ced_blocks_reference.pt",
                make_fixture, argv)


if __name__ == "__main__":
    main()
