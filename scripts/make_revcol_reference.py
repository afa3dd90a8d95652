"""Build ``tests/data/revcol_reference.pt`` from the official RevCol code (not run by the tests).

Needs a checkout (or a bare/mirror git directory) of https://github.com/megvii-research/RevCol and
``timm``, which its files import. Read: ``models/revcol.py``, ``models/modules.py``,
``models/revcol_function.py`` (ImageNet ``FullNet``), ``Detection/mmdet/models/backbones/revcol.py``,
``revcol_module.py``, ``revcol_function.py`` (detection ``RevCol``) and the detection configs
``Detection/configs/revcol/cascade_mask_rcnn_revcol_{tiny,small,base}_3x_in1k.py``. mmcv and mmdet
are *not* needed: the few names the detection file imports from them (``BaseModule``, the
``BACKBONES`` registry, init helpers, a logger) are stubbed, and every file's source is executed in
memory under the package names its relative imports expect. The official modules run with
``save_memory=False`` (their plain, non-reversible forward; the reversible function only changes the
backward pass).

    PYTHONPATH=/path/to/timm python scripts/make_revcol_reference.py --official-repo /path/to/RevCol

The fixture (plain tensors, lists, dicts and bytes; ``torch.load(path, weights_only=True)``) holds:

* ``variants[name]`` for ``revcol_tiny/small/base``: ``classifier_settings`` (what the official
  ``revcol_*`` constructor passes to ``FullNet``), ``backbone_settings`` (the detection config's
  ``model.backbone`` without ``type``/``init_cfg``), ``classifier_params`` (the official classifier's
  total parameter count, every head and decoder included) and the ordered keys and shapes of the
  state dicts of the official classifier (``inter_supv=True``, 1000 classes: the released checkpoints'
  layout) and detection backbone, as zlib-compressed text, one ``key<TAB>d0,d1,...`` line per entry;
* ``inputs``: float16-exact inputs (stored as float16; cast to float64 before use): ``classifier``
  (2x3x32x32), ``classifier_train`` (1x3x32x32, for the training-mode outputs, which include
  full-size reconstructions), ``backbone`` (a list: 1x3x64x32 and 1x3x33x67, whose sides are not
  multiples of 32 but give stride-4 maps divisible by 8, which the official code accepts) and
  ``backbone_bad`` (1x3x48x32: a stride-4 map of 12x8, on which the official code fails;
  ``configs[*]["backbone_bad_error"]`` records the exception's type name);
* ``configs[name]`` for two tiny configurations: ``classifier_kwargs`` and ``backbone_kwargs`` (the
  official constructors' arguments); the official classifier's random weights, float16-exact, as
  one flat float16 tensor ``weights`` holding the state dict's tensors in the order and shapes of
  ``classifier_keys`` (compressed as above; the detection backbone holds the same ``stem.*``/``subnet*``
  tensors, its keys in order in ``backbone_keys``); and the official float64 outputs: ``logits``
  (eval), ``train_logits`` and ``train_images`` (training mode; drop path 0) and
  ``backbone_outputs`` (one list of four maps per backbone input). A few ``alpha`` entries are
  below the official code's clamp (``|alpha| >= 1e-3``, applied in place at every forward) or zero;
  ``weights`` holds them unclamped, as they were before the official forward.

The outputs are float64: the official modules run in float64 (``.double()`` after loading the
float16-exact weights, which float64 holds exactly) on the inputs cast to float64. In float32 the same
function gives answers that differ between CPUs by ~1e-5 (the order of float32 sums depends on the
SIMD kernels: AVX2, AVX-512, ...), as much as the tests could allow; float64 rounding is ~1e-16 per
operation, so the tests compare gradlens in float64 with a tolerance far below any real defect, and
the comparison is independent of the CPU's float32 ordering. The official code runs in float64
unchanged (nothing on the path used here fixes a dtype; the alpha clamp works in place in the
parameters' dtype). The weights are recorded before the models are cast, so they are as before.

All inputs and weights are views of one float16 storage and all outputs of one float64 storage
(``torch.save`` writes a record per storage; hundreds of small ones would cost more than the data).

The official files are read at the mirror's ``HEAD`` (``official_source.read_file``), the commit
``commit_of`` records in ``source``; a bare mirror whose ``HEAD`` has moved must be reset to the
recorded commit first (or a work tree of that commit given).

The tests (``tests/test_revcol.py``) only read the fixture; they never run this script.
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
from official_source import Registry, commit_of, key_shapes, parse_args, read_file, save_fixture, stub_module  # noqa: E402

CLS_FILES = {  # module name -> path; executed in this order (revcol imports the other two)
    "models.modules": "models/modules.py",
    "models.revcol_function": "models/revcol_function.py",
    "models.revcol": "models/revcol.py",
}
DET_PACKAGE = "mmdet.models.backbones"
DET_FILES = {
    f"{DET_PACKAGE}.revcol_module": "Detection/mmdet/models/backbones/revcol_module.py",
    f"{DET_PACKAGE}.revcol_function": "Detection/mmdet/models/backbones/revcol_function.py",
    f"{DET_PACKAGE}.revcol": "Detection/mmdet/models/backbones/revcol.py",
}
DET_CONFIG = "Detection/configs/revcol/cascade_mask_rcnn_revcol_{size}_3x_in1k.py"
VARIANTS = {"revcol_tiny": "tiny", "revcol_small": "small", "revcol_base": "base"}

# Two tiny configurations. "tiny_supv": intermediate supervision with 8 columns (a head every 2
# columns, decoders with 1x-MLP blocks); "tiny_k5": one head, 3 columns, kernel 5, uneven widths.
TINY = {
    "tiny_supv": dict(channels=[4, 6, 8, 10], layers=[1, 1, 1, 1], num_subnet=8, kernel_size=3, num_classes=5, inter_supv=True),
    "tiny_k5": dict(channels=[6, 4, 8, 6], layers=[2, 1, 1, 1], num_subnet=3, kernel_size=5, num_classes=3, inter_supv=False),
}
INPUT_SHAPES = dict(classifier=(2, 3, 32, 32), classifier_train=(1, 3, 32, 32), backbone=[(1, 3, 64, 32), (1, 3, 33, 67)], backbone_bad=(1, 3, 48, 32))
SMALL_ALPHAS = (2e-4, -3e-4, 0.0, 1e-3, -5e-4)  # below / at the official clamp, planted into some columns


# ----------------------------------------------------------------------------- loading the official code


class _BaseModule(nn.Module):
    """mmcv's ``BaseModule`` as far as the constructor goes (stores ``init_cfg``)."""

    def __init__(self, init_cfg=None) -> None:
        super().__init__()
        self.init_cfg = init_cfg


def _install_stubs() -> None:
    stub_module("mmcv", package=True)
    stub_module("mmcv.cnn", constant_init=lambda *a, **k: None, trunc_normal_init=lambda *a, **k: None)
    stub_module("mmcv.runner", BaseModule=_BaseModule, _load_checkpoint=lambda *a, **k: {})
    stub_module("mmdet", package=True)
    stub_module("mmdet.utils", get_root_logger=lambda *a, **k: None)
    stub_module("mmdet.models", package=True)
    stub_module("mmdet.models.builder", BACKBONES=Registry())
    stub_module(DET_PACKAGE, package=True)
    stub_module("models", package=True)


def _exec(name: str, relpath: str, source: str) -> types.ModuleType:
    package = name.rpartition(".")[0]
    m = stub_module(name, __package__=package, __file__=relpath)
    exec(compile(source, relpath, "exec"), m.__dict__)
    setattr(sys.modules[package], name.rpartition(".")[2], m)
    return m


def load_official(repo: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """(``models.revcol``, ``mmdet.models.backbones.revcol``) of the official code, executed in memory."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # timm.models.layers
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # modules.py imports 'imp'
    _install_stubs()
    for name, rel in {**CLS_FILES, **DET_FILES}.items():
        _exec(name, rel, read_file(repo, rel))
    cls_mod, det_mod = sys.modules["models.revcol"], sys.modules[f"{DET_PACKAGE}.revcol"]
    cls_mod.trunc_normal_ = lambda t, *a, **k: t  # layouts only: skip the slow init of the full-size models
    return cls_mod, det_mod


def classifier_settings(cls_mod, name: str) -> dict:
    """The arguments the official ``revcol_*`` constructor passes to ``FullNet`` (defaults filled in)."""
    captured = {}
    real = cls_mod.FullNet

    def capture(channels, layers, num_subnet, **kw):
        kw.pop("save_memory")
        captured.update(channels=list(channels), layers=list(layers), num_subnet=num_subnet, **kw)

    cls_mod.FullNet = capture
    try:
        getattr(cls_mod, name)(save_memory=False)
    finally:
        cls_mod.FullNet = real
    return captured


def backbone_settings(repo: Path, size: str) -> dict:
    """``model.backbone`` of the official Cascade Mask R-CNN config (a plain Python file of dicts)."""
    scope: dict = {}
    exec(compile(read_file(repo, DET_CONFIG.format(size=size)), DET_CONFIG.format(size=size), "exec"), scope)
    cfg = dict(scope["model"]["backbone"])
    cfg.pop("init_cfg", None)
    cfg.pop("type", None)
    return cfg


def official_classifier(cls_mod, **kw) -> nn.Module:
    kw = dict(kw)
    kw["channels"] = list(kw["channels"])  # FullNet reverses the list it is given
    return cls_mod.FullNet(save_memory=False, **kw)


def official_backbone(det_mod, **kw) -> nn.Module:
    return det_mod.RevCol(**{**kw, "save_memory": False})


# ----------------------------------------------------------------------------- tiny models


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Random, float16-exact weights of a sensible scale; alphas in [0.3, 1.2] with random signs, and a few
    entries below the official clamp (or zero) in every column but the first."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("alpha"):
            v = torch.empty(p.shape).uniform_(0.3, 1.2, generator=g) * torch.where(torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0)
            if not name.startswith("subnet0."):
                flat = v.view(-1)
                for j, small in enumerate(SMALL_ALPHAS[: flat.numel()]):
                    flat[(j * 3 + int(leaf[-1])) % flat.numel()] = small
        elif p.dim() > 1:
            v = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
        elif leaf == "gamma":
            v = torch.empty(p.shape).uniform_(0.2, 1.0, generator=g)
        elif leaf == "weight":  # norms
            v = 1 + 0.2 * torch.randn(p.shape, generator=g)
        else:
            v = 0.1 * torch.randn(p.shape, generator=g)
        p.copy_(v.half().float())


def share_storage(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The tensors as views of one flat ``dtype`` storage (``torch.save`` writes one record per storage,
    which for many small tensors costs more than their data)."""
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def tiny_config(cls_mod, det_mod, name: str, kw: dict, inputs: dict, seed: int) -> dict:
    cls_kw = dict(kw, drop_path=0.0)
    det_kw = {k: v for k, v in cls_kw.items() if k not in ("num_classes", "inter_supv")}
    det_kw["out_indices"] = [0, 1, 2, 3]
    net = official_classifier(cls_mod, **cls_kw)
    det = official_backbone(det_mod, **det_kw)
    randomize_(net, seed)
    state = {k: v.clone() for k, v in net.state_dict().items()}  # before the forward clamps the alphas
    det.load_state_dict({k: v for k, v in state.items() if k.startswith(("stem.", "subnet"))}, strict=True)
    # The answers in float64 (module docstring): the float16-exact weights cast exactly to float64, the
    # inputs likewise; ``state`` above keeps the weights as loaded (float32, unclamped).
    net.double()
    det.double()
    x64 = {k: [t.double() for t in v] if isinstance(v, list) else v.double() for k, v in inputs.items()}
    with torch.no_grad():
        net.eval()
        det.eval()
        logits = net(x64["classifier"])[0][-1]  # the official evaluation reads outputs[-1]
        feats = [[t.clone() for t in det(x)] for x in x64["backbone"]]
        try:
            det(x64["backbone_bad"])
            bad_error = ""
        except Exception as err:  # the official code fails inside a broadcasting add
            bad_error = type(err).__name__
        net.train()
        train_logits, train_images = net(x64["classifier_train"])
        net.eval()
    return dict(
        classifier_kwargs=cls_kw,
        backbone_kwargs=det_kw,
        state_dict=state,
        backbone_keys=key_shapes(det.state_dict()),
        logits=logits.clone(),
        train_logits=[t.clone() for t in train_logits],
        train_images=[t.clone() for t in (train_images or [])],
        backbone_outputs=feats,
        backbone_bad_error=bad_error,
    )


# ----------------------------------------------------------------------------- main


def make_fixture(repo: Path) -> dict:
    cls_mod, det_mod = load_official(repo)
    torch.manual_seed(0)

    variants = {}
    for name, size in VARIANTS.items():
        cls_kw = classifier_settings(cls_mod, name)
        det_kw = backbone_settings(repo, size)
        net = official_classifier(cls_mod, **cls_kw)
        det = official_backbone(det_mod, **det_kw)
        variants[name] = dict(
            classifier_settings=cls_kw,
            backbone_settings=det_kw,
            classifier_params=sum(p.numel() for p in net.parameters()),
            classifier=key_shapes(net.state_dict()),
            backbone=key_shapes(det.state_dict()),
        )
        del net, det

    g = torch.Generator().manual_seed(1)

    def rand(shape):
        return torch.randn(shape, generator=g).half().float()

    inputs = {k: [rand(s) for s in v] if isinstance(v, list) else rand(v) for k, v in INPUT_SHAPES.items()}
    configs = {name: tiny_config(cls_mod, det_mod, name, kw, inputs, seed) for seed, (name, kw) in enumerate(TINY.items())}

    # Storage: one float16 buffer for the inputs and all weights, one float64 buffer for all outputs.
    flat_inputs = [inputs["classifier"], inputs["classifier_train"], *inputs["backbone"], inputs["backbone_bad"]]
    for cfg in configs.values():
        state = cfg.pop("state_dict")
        cfg["classifier_keys"] = key_shapes(state)
        cfg["weights"] = torch.cat([v.reshape(-1) for v in state.values()])
    halves = share_storage(flat_inputs + [cfg["weights"] for cfg in configs.values()], torch.float16)
    inputs = dict(classifier=halves[0], classifier_train=halves[1], backbone=halves[2:4], backbone_bad=halves[4])
    for cfg, w in zip(configs.values(), halves[5:]):
        cfg["weights"] = w
    out_keys = ("logits", "train_logits", "train_images", "backbone_outputs")
    outs = []
    for cfg in configs.values():
        outs += [cfg["logits"], *cfg["train_logits"], *cfg["train_images"], *[m for maps in cfg["backbone_outputs"] for m in maps]]
    assert all(t.dtype == torch.float64 for t in outs)
    it = iter(share_storage(outs, torch.float64))
    for cfg in configs.values():
        cfg["logits"] = next(it)
        cfg["train_logits"] = [next(it) for _ in cfg["train_logits"]]
        cfg["train_images"] = [next(it) for _ in cfg["train_images"]]
        cfg["backbone_outputs"] = [[next(it) for _ in maps] for maps in cfg["backbone_outputs"]]
    assert next(it, None) is None and all(k in cfg for k in out_keys)
    return dict(variants=variants, inputs=inputs, configs=configs)


def main(argv=None) -> None:
    args = parse_args(__doc__, "checkout or bare mirror of github.com/megvii-research/RevCol", "revcol_reference.pt", argv)
    fixture = dict(
        source=f"github.com/megvii-research/RevCol@{commit_of(args.official_repo)}",
        torch_version=str(torch.__version__),
        **make_fixture(args.official_repo),
    )
    save_fixture(fixture, args.out)


if __name__ == "__main__":
    main()
