"""Build ``tests/data/cednet_reference.pt`` from the official CEDNet code (not run by the tests).

Needs a checkout of https://github.com/zhanggang001/CEDNet (only ``models/cednet.py`` and
``ced-mmdet/mmdet/models/backbones/cednet.py`` are read) and ``timm``, which those files import.
``--official-repo`` may also be a bare mirror: the two files are then read at the commit recorded in
the fixture's ``source`` (``--commit``, default the mirror's ``HEAD``), ``git show <commit>:<path>``.
mmcv, mmdet and mmcv_custom are *not* needed: the few names the files import from them are stubbed
here, reproducing what they do for these files (mmcv's ``build_norm_layer`` instantiates the
class registered under the config's ``type`` with the remaining keys, defaulting ``eps`` to 1e-5;
mmcv registers ``nn.LayerNorm`` as ``'LN'`` until CEDNet re-registers its own ``LayerNorm``).

The fixture holds only the official code's answers, so gradlens' tests can check its own CEDNet
without timm or the official code (``torch.load(path, weights_only=True)`` reads it):

* ``variants[name]``: for the six NeXt variants, the official registration's ``settings`` and the
  ordered keys and shapes of the state dicts of the classifier (``CEDNet_next_*``) and of
  ``CEDNetWrapper`` with the same settings (``out_chans=256, num_add_blocks=2``), as zlib-compressed
  text, one ``key<TAB>d0,d1,...`` line per entry (uncompressed, these lists alone exceed 300 KB);
* ``configs[name]``: two tiny configurations (``classifier_kwargs``, ``backbone_kwargs``) with
  the official weights (float32) and the official outputs (float64, see below) on ``input``
  (float32): ``logits`` (eval), ``train_logits`` (training mode, one per stage,
  ``drop_path_rate=0``) and ``backbone_outputs``.
  The detection wrapper's weights are ``classifier_state_dict``'s ``stem.*``/``stages.*`` plus
  ``backbone_extra_state_dict``; ``backbone_keys`` lists its keys in order (compressed as above).

The outputs are float64: the official modules run in float64 (``.double()`` copies of the float32
weights, which float64 holds exactly) on ``input.double()``. In float32 the same function gives
answers that differ between CPUs by ~1e-5 (summation order depends on the SIMD kernels), as much as
the tests could allow; float64 rounding is ~1e-16 per operation, so gradlens' tests can compare
in float64 with a tolerance far below any real defect and still be independent of the CPU. The
official code runs in float64 unchanged (nothing in the path used here fixes a dtype).

Size (< 300 KB) shapes the tiny configurations: the classifier's heads are 2048 wide whatever
``dims`` are, so the heads of all stages, and of both configurations, are tied (identical values,
stored once) before the official outputs are computed; all tensors are views into two buffers, one
float32 (input and weights) and one float64 (outputs).

Usage::

    python scripts/make_cednet_reference.py --official-repo /path/to/CEDNet [--out tests/data/cednet_reference.pt]
"""

from __future__ import annotations

import copy
import subprocess
import sys
import types
from pathlib import Path

import torch
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_source import Registry, commit_of, key_shapes, parse_args, save_fixture, stub_module  # noqa: E402

CLS_FILE = Path("models/cednet.py")
DET_FILE = Path("ced-mmdet/mmdet/models/backbones/cednet.py")
VARIANTS = ("next_tiny", "next_small", "next_base", "next_tiny_fpn", "next_tiny_unet", "next_tiny_hourglass")

# Two tiny configurations: the main design (Encoder + Decoder, as CEDNet-NeXt-T/S/B) and one that
# exercises everything else that changes numbers: EncoderFPN's use of the previous stage's c4/c5,
# the hourglass decoder (lateral blocks, decoder blocks), no layer scale, and the detection
# wrapper's last_decoder. Level widths all differ, so a wiring mix-up changes shapes; dims[-1] and
# num_classes are shared so that the 2048-wide classifier heads can be tied (module docstring).
TINY_COMMON = dict(num_stages=2, p2_dim=4, p2_block=1, num_classes=2, drop_path_rate=0.0)
TINY = {
    "tiny_decoder": dict(
        cls=dict(TINY_COMMON, encoder_type="Encoder", decoder_type="Decoder", dims=[6, 8, 4], blocks=[1, 1, 1]),
        det=dict(out_chans=4, num_add_blocks=2, last_decoder=False),
    ),
    "tiny_hourglass": dict(
        cls=dict(
            TINY_COMMON, encoder_type="EncoderFPN", decoder_type="DecoderHourglass", dims=[8, 6, 4], blocks=[3, 2, 1], layer_scale_init_value=0.0
        ),
        det=dict(out_chans=6, num_add_blocks=1, last_decoder=True),
    ),
}
HEAD_GROUPS = ("final_layers", "norms", "heads")


def _stub_modules() -> None:
    norm_layers = Registry()
    norm_layers.register_module("LN", module=nn.LayerNorm)  # mmcv's own registration

    def build_norm_layer(cfg, num_features, postfix=""):
        cfg = dict(cfg)
        layer_type = cfg.pop("type")
        requires_grad = cfg.pop("requires_grad", True)
        cfg.setdefault("eps", 1e-5)
        if layer_type != "LN":
            raise NotImplementedError(f"stub build_norm_layer: {layer_type}")
        layer = norm_layers.get(layer_type)(num_features, **cfg)
        for p in layer.parameters():
            p.requires_grad = requires_grad
        return "ln" + str(postfix), layer

    def build_conv_layer(cfg, *args, **kwargs):
        assert cfg is None
        return nn.Conv2d(*args, **kwargs)

    stub_module("mmcv", package=True)
    stub_module("mmcv.cnn", package=True, build_norm_layer=build_norm_layer, build_conv_layer=build_conv_layer)
    stub_module("mmcv.cnn.bricks", package=True)
    stub_module("mmcv.cnn.bricks.registry", NORM_LAYERS=norm_layers)
    stub_module("mmcv_custom", load_checkpoint=lambda *a, **k: None)
    stub_module("mmdet", package=True)
    stub_module("mmdet.utils", get_root_logger=lambda *a, **k: None)
    stub_module("mmdet.models", package=True)
    stub_module("mmdet.models.builder", BACKBONES=Registry())
    stub_module("mmdet.models.backbones", package=True)


def official_text(repo: Path, relpath: Path, commit: str) -> str:
    """A file of the official repository: from the work tree when there is one, else from a bare
    mirror at ``commit`` (``git show <commit>:<path>``), the commit recorded in the fixture; not
    ``official_source.read_file``, which reads a mirror's ``HEAD`` whatever ``--commit`` says."""
    path = Path(repo) / relpath
    if path.is_file():
        return path.read_text()
    res = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{relpath.as_posix()}"], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"cannot read {relpath} at {commit} from {repo}: {res.stderr.strip()}")
    return res.stdout


def _import(name: str, relpath: Path, source: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__file__ = str(relpath)
    mod.__package__ = name.rpartition(".")[0]
    sys.modules[name] = mod
    exec(compile(source, str(relpath), "exec"), mod.__dict__)
    return mod


def load_official(repo: Path, commit: str):
    """(classification module, detection module) of the official code at ``commit``, imported with stubs."""
    _stub_modules()
    cls_mod = _import("cednet_official_cls", CLS_FILE, official_text(repo, CLS_FILE, commit))
    # Imported under its package name so that ``from ..builder import BACKBONES`` resolves to the stub.
    det_mod = _import("mmdet.models.backbones.cednet", DET_FILE, official_text(repo, DET_FILE, commit))
    return cls_mod, det_mod


def variant_settings(cls_mod, name: str) -> dict:
    """The keyword arguments the official ``CEDNet_<name>`` registration passes to ``CEDNet``."""
    captured = {}
    real = cls_mod.CEDNet
    cls_mod.CEDNet = lambda **kw: captured.update(kw)
    try:
        getattr(cls_mod, f"CEDNet_{name}")()
    finally:
        cls_mod.CEDNet = real
    return captured


def official_classifier(cls_mod, **kw):
    return cls_mod.CEDNet(**kw)


def official_backbone(det_mod, **kw):
    return det_mod.CEDNetWrapper(**kw)


@torch.no_grad()
def randomize(model: nn.Module) -> None:
    """Random weights of a sensible scale (the official init leaves norms at 1/0 and biases at 0)."""
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
        elif name.endswith("gamma"):
            p.uniform_(0.2, 1.0)
        elif name.endswith("weight"):  # norms
            p.copy_(1 + 0.2 * torch.randn_like(p))
        else:
            p.copy_(0.1 * torch.randn_like(p))


def pack(obj):
    """Replace every tensor in ``obj`` by a view into one flat buffer of its dtype (one stored blob per
    dtype, float32 and float64 here, not hundreds; tensors that are the same object stay shared)."""
    offsets: dict[int, int] = {}
    chunks: dict[torch.dtype, list] = {}

    def collect(o):
        if isinstance(o, torch.Tensor):
            if id(o) not in offsets:
                assert o.dtype in (torch.float32, torch.float64), o.dtype
                same = chunks.setdefault(o.dtype, [])
                offsets[id(o)] = sum(c.numel() for c in same)
                same.append(o.detach().reshape(-1))
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v)

    collect(obj)
    bufs = {dtype: torch.cat(same) for dtype, same in chunks.items()}

    def rebuild(o):
        if isinstance(o, torch.Tensor):
            return bufs[o.dtype][offsets[id(o)] : offsets[id(o)] + o.numel()].view(o.shape)
        if isinstance(o, dict):
            return {k: rebuild(v) for k, v in o.items()}
        if isinstance(o, list):
            return [rebuild(v) for v in o]
        if isinstance(o, tuple):
            return tuple(rebuild(v) for v in o)
        return o

    return rebuild(obj)


def add_commit_argument(ap) -> None:
    ap.add_argument(
        "--commit", default=None, help="commit recorded in the fixture; a bare mirror is read at it (default: git rev-parse HEAD)"
    )


def main(argv=None) -> None:
    args = parse_args(__doc__, "checkout of github.com/zhanggang001/CEDNet", "cednet_reference.pt", argv, add_commit_argument)
    commit = args.commit if args.commit is not None else commit_of(args.official_repo)

    cls_mod, det_mod = load_official(args.official_repo, commit)
    torch.manual_seed(0)

    variants = {}
    for name in VARIANTS:
        kw = variant_settings(cls_mod, name)
        variants[name] = dict(
            settings=kw,
            classifier=key_shapes(official_classifier(cls_mod, **kw).state_dict()),
            backbone=key_shapes(official_backbone(det_mod, out_chans=256, num_add_blocks=2, **kw).state_dict()),
        )

    x = torch.randn(1, 3, 32, 64)  # non-square: stride-32 maps are 1x2
    shared_heads: dict[str, torch.Tensor] = {}  # "final_layers.0.weight"-style key without the stage index
    configs = {}
    for name, spec in TINY.items():
        cls_kw = dict(spec["cls"])
        det_kw = {k: v for k, v in cls_kw.items() if k != "num_classes"}
        det_kw.update(spec["det"])
        net = official_classifier(cls_mod, **cls_kw)
        det = official_backbone(det_mod, **det_kw)
        randomize(net)
        randomize(det)
        with torch.no_grad():
            for key, value in net.state_dict().items():
                parts = key.split(".")
                if parts[0] in HEAD_GROUPS:
                    shared_key = ".".join(parts[:1] + parts[2:])
                    shared_heads.setdefault(shared_key, value.clone())
                    value.copy_(shared_heads[shared_key])  # every stage's head = the shared one
            det.load_state_dict(net.state_dict(), strict=False)  # same stem and stages as the classifier

            # The answers in float64 (module docstring): float64 copies of the float32 weights (exact)
            # run on the input in float64; the float32 models stay as they are and give the stored weights.
            net64, det64, x64 = copy.deepcopy(net).double().eval(), copy.deepcopy(det).double().eval(), x.double()
            logits = net64(x64)
            feats = det64(x64)
            net64.train()
            train_logits = net64(x64)

        net_sd, det_sd = net.state_dict(), det.state_dict()
        cls_sd = {}
        for key, value in net_sd.items():
            parts = key.split(".")
            cls_sd[key] = shared_heads[".".join(parts[:1] + parts[2:])] if parts[0] in HEAD_GROUPS else value.clone()
        assert all(torch.equal(cls_sd[k], v) for k, v in net_sd.items())
        assert all(torch.equal(det_sd[k], net_sd[k]) for k in det_sd if k in net_sd)
        configs[name] = dict(
            classifier_kwargs=cls_kw,
            backbone_kwargs=det_kw,
            classifier_state_dict=cls_sd,
            backbone_extra_state_dict={k: v.clone() for k, v in det_sd.items() if k not in net_sd},
            backbone_keys=key_shapes(det_sd),
            logits=logits.clone(),
            train_logits=[t.clone() for t in train_logits],
            backbone_outputs=[f.clone() for f in feats],
        )

    fixture = dict(
        source=f"github.com/zhanggang001/CEDNet@{commit}",
        torch_version=str(torch.__version__),
        variants=variants,
        **pack(dict(input=x, configs=configs)),
    )
    save_fixture(fixture, args.out)


if __name__ == "__main__":
    main()
