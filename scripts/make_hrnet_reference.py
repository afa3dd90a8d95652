"""Build ``tests/data/hrnet_reference.pt`` from the official HRNet code (not run by the tests).

Needs the official classification code (github.com/HRNet/HRNet-Image-Classification: only
``lib/models/cls_hrnet.py`` and ``experiments/cls_hrnet_w32_sgd_lr5e-2_wd1e-4_bs32_x100.yaml`` are
read) and mmdetection 2.x's HRNet backbone as the CEDNet fork ships it (github.com/zhanggang001/CEDNet:
``ced-mmdet/mmdet/models/backbones/hrnet.py`` and the ``BasicBlock``/``Bottleneck`` of ``resnet.py``
next to it). Either may be a work tree or a bare/mirror git directory (files are then read with
``git show HEAD:<path>``: ``official_source.read_file`` reads the mirror's ``HEAD``, the commit that
``commit_of`` records in ``source``; a mirror whose ``HEAD`` has moved must be reset to the recorded
commit first, or a work tree of that commit given). PyYAML reads the experiment file
(``PYTHONPATH=/work/refpkgs`` provides it here). mmcv and mmdet are *not* needed: the names the two
mmdet files import are stubbed here with what they do for these files (mmcv's ``build_norm_layer``
for ``type='BN'`` returns ``("bn" + postfix, nn.BatchNorm2d(c, eps=1e-5))``,
``build_conv_layer(None, ...)`` is ``nn.Conv2d``, ``BaseModule``/``ModuleList``/``Sequential`` are
the torch classes with an ignored ``init_cfg``).

    PYTHONPATH=/work/refpkgs python scripts/make_hrnet_reference.py \\
        --official-repo /path/to/HRNet-Image-Classification --mmdet-repo /path/to/CEDNet

The fixture (``torch.load(path, weights_only=True)``; plain tensors, lists, dicts, bytes) holds:

* ``variants["hrnet_w32"]``: ``extra`` (the stage settings, from the official YAML, lower-cased as
  mmdetection's ``extra``), and the ordered state-dict keys and shapes of the official classifier
  (``classifier``) and of mmdetection's ``HRNet`` with that ``extra`` (``backbone``), each as
  zlib-compressed text, one ``key<TAB>d0,d1,...`` line per entry;
* ``inputs``: float16 inputs (cast to float64 before use): 0 is 2x3x32x32; 1 is 1x3x29x61, whose
  sides are not multiples of 32 but whose stride-4 map (8x16) still is a multiple of 8, so the
  official code runs;
* ``official_rejects``: input shapes the official detection backbone fails on (stride-4 maps not
  multiples of 8; the second only at stage 4);
* ``tiny[name]`` for two tiny configurations: ``extra``, ``classifier_kwargs`` (head widths),
  ``backbone_kwargs`` (``multiscale_output``), the official classifier's ordered ``classifier_keys``
  (compressed as above) and its random weights and BN running statistics (float16-exact): the
  hard-wired 64-channel stem's entries (``conv1.``/``bn1.``/``conv2.``/``bn2.``), shared by both
  configurations, in ``tiny_stem`` (float16), every other floating entry concatenated in key order in
  ``weights`` (float16), and every ``num_batches_tracked`` equal to ``num_batches_tracked``;
  ``backbone_keys`` (mmdetection's ordered keys and shapes, compressed; its weights are the
  classifier's entries of the same names, which is checked here), ``logits`` (official float64 eval
  logits on input 0) and ``backbone_outputs`` (official float64 eval maps, one list per input).

The outputs are float64: the official modules run in float64 (``.double()`` after loading the
float16-exact weights, which float64 holds exactly; the weights above are recorded before the cast, so
they are as before) on the inputs cast to float64. In float32 the same function gives answers that
differ between CPUs by ~1e-5 (the order of float32 sums depends on the SIMD kernels: AVX2, AVX-512,
...), as much as the tests could allow; float64 rounding is ~1e-16 per operation, so the tests compare
gradlens in float64 with a tolerance far below any real defect, independent of the CPU's float32
ordering. The official code runs in float64 unchanged (neither file fixes a dtype anywhere: convs, BN,
nearest ``nn.Upsample``, ReLU, pooling and the linear head all follow the input's). All outputs are
views of one float64 storage (``torch.save`` writes a record per storage; the inputs and weights are
stored as before).

The official classifier head's widths are literals in ``cls_hrnet.py`` (bottleneck planes
32/64/128/256, 2048 final channels, 1000 classes), far too large for a fixture; for the tiny
classifiers only, those literals are replaced by names before the source is executed (each
replacement is asserted to hit exactly once); the full-size layout comes from the unmodified source.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_source import Registry, commit_of, key_shapes, parse_args, read_file, save_fixture, share_storage, stub_module  # noqa: E402

CLS_FILE = "lib/models/cls_hrnet.py"
CLS_YAML = {"hrnet_w32": "experiments/cls_hrnet_w32_sgd_lr5e-2_wd1e-4_bs32_x100.yaml"}
DET_FILES = {"resnet": "ced-mmdet/mmdet/models/backbones/resnet.py", "hrnet": "ced-mmdet/mmdet/models/backbones/hrnet.py"}
W32_MMDET_CONFIG = "ced-mmdet/configs/hrnet/faster_rcnn_hrnetv2p_w32_1x_coco.py"
HEAD_LITERALS = [  # (official text, replacement) for the tiny classifiers' head widths
    ("head_channels = [32, 64, 128, 256]", "head_channels = HEAD_CHANNELS"),
    ("out_channels=2048,", "out_channels=HEAD_WIDTH,"),
    ("nn.BatchNorm2d(2048, momentum=BN_MOMENTUM)", "nn.BatchNorm2d(HEAD_WIDTH, momentum=BN_MOMENTUM)"),
    ("self.classifier = nn.Linear(2048, 1000)", "self.classifier = nn.Linear(HEAD_WIDTH, NUM_CLASSES)"),
]


def _stage(num_modules, num_branches, block, num_blocks, num_channels):
    return dict(num_modules=num_modules, num_branches=num_branches, block=block, num_blocks=list(num_blocks), num_channels=list(num_channels))


# Two tiny configurations. "tiny_w32like": W32's topology (1/2/3/4 branches), one block per branch,
# two modules in stages 3 and 4. "tiny_mixed": everything else the code can do: a BASIC stage 1 with
# a projection shortcut, a BOTTLENECK stage 2 (expansion 4 inside multi-branch modules), stage 2
# opening *two* new branches at once (a chain of two stride-2 convs in transition1), a channel change
# of an existing branch in transition2 (a 3x3 stride-1 conv, which both references apply to the last
# branch -- here also the same branch), and a detection backbone with multiscale_output=False.
TINY = {
    "tiny_w32like": dict(
        extra=dict(
            stage1=_stage(1, 1, "BOTTLENECK", [1], [4]),
            stage2=_stage(1, 2, "BASIC", [1, 1], [4, 6]),
            stage3=_stage(2, 3, "BASIC", [1, 1, 1], [4, 6, 8]),
            stage4=_stage(1, 4, "BASIC", [1, 2, 1, 1], [4, 6, 8, 10]),
        ),
        classifier_kwargs=dict(head_channels=[1, 2, 2, 3], head_width=12, num_classes=5),
        backbone_kwargs=dict(multiscale_output=True),
    ),
    "tiny_mixed": dict(
        extra=dict(
            stage1=_stage(1, 1, "BASIC", [2], [4]),
            stage2=_stage(1, 3, "BOTTLENECK", [1, 1, 1], [1, 2, 2]),
            stage3=_stage(1, 3, "BASIC", [1, 1, 1], [4, 8, 4]),
            stage4=_stage(2, 4, "BASIC", [1, 1, 1, 1], [4, 8, 4, 4]),
        ),
        classifier_kwargs=dict(head_channels=[1, 1, 2, 2], head_width=10, num_classes=3),
        backbone_kwargs=dict(multiscale_output=False),
    ),
}
NUM_BATCHES_TRACKED = 7  # every BN's (not used in eval; only so that it is not the default 0)
STEM_KEYS = ("conv1.", "bn1.", "conv2.", "bn2.")  # the hard-wired 64-channel stem: same weights in both (stored once)
INPUT_SHAPES = [(2, 3, 32, 32), (1, 3, 29, 61)]
REJECTED_SHAPES = [(1, 3, 50, 50), (1, 3, 64, 80)]  # stride-4 maps 13x13 and 16x20


# ----------------------------------------------------------------------------- loading the official code


def _install_mmdet_stubs() -> None:
    def build_norm_layer(cfg, num_features, postfix=""):
        cfg = dict(cfg)
        layer_type = cfg.pop("type")
        requires_grad = cfg.pop("requires_grad", True)
        cfg.setdefault("eps", 1e-5)
        if layer_type != "BN":
            raise NotImplementedError(f"stub build_norm_layer: {layer_type}")
        layer = nn.BatchNorm2d(num_features, **cfg)
        for p in layer.parameters():
            p.requires_grad = requires_grad
        return "bn" + str(postfix), layer

    def build_conv_layer(cfg, *args, **kwargs):
        if cfg is not None:
            raise NotImplementedError(f"stub build_conv_layer: {cfg}")
        return nn.Conv2d(*args, **kwargs)

    class BaseModule(nn.Module):
        def __init__(self, init_cfg=None):
            super().__init__()
            self.init_cfg = init_cfg

    class ModuleList(nn.ModuleList):
        def __init__(self, modules=None, init_cfg=None):
            super().__init__(modules)

    class Sequential(nn.Sequential):
        def __init__(self, *args, init_cfg=None):
            super().__init__(*args)

    def unused(*a, **k):
        raise NotImplementedError("stubbed")

    stub_module("mmcv", package=True)
    stub_module("mmcv.cnn", build_norm_layer=build_norm_layer, build_conv_layer=build_conv_layer, build_plugin_layer=unused, ConvModule=unused)
    stub_module("mmcv.runner", BaseModule=BaseModule, ModuleList=ModuleList, Sequential=Sequential)
    stub_module("mmcv_custom", load_checkpoint=unused)
    stub_module("mmdet", package=True)
    stub_module("mmdet.utils", get_root_logger=lambda *a, **k: None)
    stub_module("mmdet.models", package=True)
    stub_module("mmdet.models.builder", BACKBONES=Registry())
    stub_module("mmdet.models.utils", ResLayer=unused)
    stub_module("mmdet.models.backbones", package=True)


def _exec_module(name: str, source: str, filename: str, package: str | None = None, **globals_) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__file__ = filename
    if package:
        m.__package__ = package
    m.__dict__.update(globals_)
    sys.modules[name] = m
    exec(compile(source, filename, "exec"), m.__dict__)
    return m


def load_official(cls_repo: Path, det_repo: Path):
    """(classification module, classification module with named head widths, mmdet hrnet module)."""
    cls_src = read_file(cls_repo, CLS_FILE)
    cls_mod = _exec_module("hrnet_official_cls", cls_src, CLS_FILE)
    tiny_src = cls_src
    for old, new in HEAD_LITERALS:
        assert tiny_src.count(old) == 1, old
        tiny_src = tiny_src.replace(old, new)
    tiny_mod = _exec_module("hrnet_official_cls_tiny", tiny_src, CLS_FILE)

    _install_mmdet_stubs()
    pkg = "mmdet.models.backbones"
    _exec_module(f"{pkg}.resnet", read_file(det_repo, DET_FILES["resnet"]), DET_FILES["resnet"], package=pkg)
    det_mod = _exec_module(f"{pkg}.hrnet", read_file(det_repo, DET_FILES["hrnet"]), DET_FILES["hrnet"], package=pkg)
    return cls_mod, tiny_mod, det_mod


def yaml_extra(cls_repo: Path, relpath: str) -> dict:
    """The experiment YAML's ``MODEL.EXTRA`` as mmdetection-style lower-case stage settings."""
    import yaml

    raw = yaml.safe_load(read_file(cls_repo, relpath))["MODEL"]["EXTRA"]
    extra = {}
    for s in (1, 2, 3, 4):
        st = raw[f"STAGE{s}"]
        nb = st.get("NUM_BRANCHES", 1)  # the YAML misspells stage 1's as NUM_RANCHES; the code never reads it
        extra[f"stage{s}"] = _stage(st["NUM_MODULES"], nb, st["BLOCK"], st["NUM_BLOCKS"], st["NUM_CHANNELS"])
        assert st.get("FUSE_METHOD", "SUM") == "SUM"
    return extra


def mmdet_config_extra(det_repo: Path) -> dict:
    """``model.backbone.extra`` of the fork's W32 config (plain dict literals; ``_base_`` is not needed)."""
    ns: dict = {}
    exec(compile(read_file(det_repo, W32_MMDET_CONFIG), W32_MMDET_CONFIG, "exec"), ns)
    extra = ns["model"]["backbone"]["extra"]
    return {k: _stage(v["num_modules"], v["num_branches"], v["block"], v["num_blocks"], v["num_channels"]) for k, v in extra.items()}


def official_cfg(extra: dict) -> dict:
    """The official code's ``cfg['MODEL']['EXTRA']`` (upper-case keys) for mmdetection-style ``extra``."""
    stages = {}
    for s in (1, 2, 3, 4):
        st = extra[f"stage{s}"]
        stages[f"STAGE{s}"] = dict(
            NUM_MODULES=st["num_modules"], NUM_BRANCHES=st["num_branches"], BLOCK=st["block"],
            NUM_BLOCKS=list(st["num_blocks"]), NUM_CHANNELS=list(st["num_channels"]), FUSE_METHOD="SUM",
        )
    return {"MODEL": {"EXTRA": stages}}


def mmdet_extra(extra: dict) -> dict:
    return {k: dict(v, num_blocks=tuple(v["num_blocks"]), num_channels=tuple(v["num_channels"])) for k, v in extra.items()}


def official_classifier(cls_mod, extra: dict, head_channels=None, head_width=None, num_classes=None) -> nn.Module:
    if head_channels is not None:
        cls_mod.HEAD_CHANNELS, cls_mod.HEAD_WIDTH, cls_mod.NUM_CLASSES = list(head_channels), head_width, num_classes
    return cls_mod.HighResolutionNet(official_cfg(extra))


def official_backbone(det_mod, extra: dict, multiscale_output: bool = True) -> nn.Module:
    return det_mod.HRNet(mmdet_extra(extra), multiscale_output=multiscale_output)


# ----------------------------------------------------------------------------- the fixture


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Random, float16-exact weights and BN statistics of a sensible scale."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            v = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
        elif name.endswith("weight"):  # BN scale
            v = 0.5 + 0.5 * torch.rand(p.shape, generator=g)
        else:  # BN shift, conv / linear bias
            v = 0.1 * torch.randn(p.shape, generator=g)
        p.copy_(v.half().float())
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_((0.1 * torch.randn(b.shape, generator=g)).half().float())
        elif name.endswith("running_var"):
            b.copy_((0.5 + torch.rand(b.shape, generator=g)).half().float())
        elif name.endswith("num_batches_tracked"):
            b.fill_(NUM_BATCHES_TRACKED)


def make_fixture(cls_repo: Path, det_repo: Path) -> dict:
    cls_mod, tiny_mod, det_mod = load_official(cls_repo, det_repo)

    variants = {}
    for name, yaml_path in CLS_YAML.items():
        extra = yaml_extra(cls_repo, yaml_path)
        assert mmdet_config_extra(det_repo) == extra  # the mmdet W32 config's extra is the YAML's
        with torch.device("meta"):
            cls_sd = official_classifier(cls_mod, extra).state_dict()
            det_sd = official_backbone(det_mod, extra).state_dict()
        head = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
        assert list(det_sd) == [k for k in cls_sd if not k.startswith(head)]  # same trunk, same order
        variants[name] = dict(extra=extra, classifier=key_shapes(cls_sd), backbone=key_shapes(det_sd))

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=g).half() for shape in INPUT_SHAPES]

    tiny = {}
    stem = None
    for seed, (name, spec) in enumerate(TINY.items(), start=1):
        net = official_classifier(tiny_mod, spec["extra"], **spec["classifier_kwargs"])
        det = official_backbone(det_mod, spec["extra"], **spec["backbone_kwargs"])
        randomize_(net, seed)
        if stem is None:
            stem = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(STEM_KEYS)}
        net.load_state_dict({**net.state_dict(), **stem})  # every configuration has the same stem
        missing, unexpected = det.load_state_dict(net.state_dict(), strict=False)
        assert not missing, missing  # the detection backbone's weights are the classifier's namesakes
        assert all(k.startswith(("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.", "stage4.")) for k in unexpected)
        sd = {k: v.clone() for k, v in net.state_dict().items()}  # the float16-exact weights, before the cast
        assert all(int(v) == NUM_BATCHES_TRACKED for k, v in sd.items() if k.endswith("num_batches_tracked"))
        rest = [v.reshape(-1) for k, v in sd.items() if v.is_floating_point() and not k.startswith(STEM_KEYS)]
        # The answers in float64 (module docstring): weights and inputs cast exactly to float64.
        net.double().eval()
        det.double()
        det.eval()  # mmdet's HRNet.train() returns None, so no chaining
        with torch.no_grad():
            logits = net(inputs[0].double())
            outputs = [[t.clone() for t in det(x.double())] for x in inputs]
        for t in (logits, *[t for o in outputs for t in o]):
            assert t.dtype == torch.float64 and torch.isfinite(t).all() and 0.01 < t.abs().max() < 1e3
        tiny[name] = dict(
            extra=spec["extra"],
            classifier_kwargs=spec["classifier_kwargs"],
            backbone_kwargs=spec["backbone_kwargs"],
            classifier_keys=key_shapes(sd),
            weights=torch.cat(rest).half(),
            backbone_keys=key_shapes(det.state_dict()),
            logits=logits,
            backbone_outputs=outputs,
        )

    # Storage: all outputs as views of one float64 buffer.
    outs = [t for cfg in tiny.values() for t in (cfg["logits"], *[m for maps in cfg["backbone_outputs"] for m in maps])]
    assert {t.dtype for t in outs} == {torch.float64}
    it = iter(share_storage(dict(enumerate(outs))).values())
    for cfg in tiny.values():
        cfg["logits"] = next(it)
        cfg["backbone_outputs"] = [[next(it) for _ in maps] for maps in cfg["backbone_outputs"]]
    assert next(it, None) is None

    det = official_backbone(det_mod, TINY["tiny_w32like"]["extra"]).double()  # as the outputs above
    det.eval()  # mmdet's HRNet.train() returns None, so no chaining
    rejects = []
    for shape in REJECTED_SHAPES:
        try:
            with torch.no_grad():
                det(torch.zeros(shape, dtype=torch.float64))
        except RuntimeError:
            rejects.append(list(shape))
    assert len(rejects) == len(REJECTED_SHAPES), rejects

    return dict(
        source=f"github.com/HRNet/HRNet-Image-Classification@{commit_of(cls_repo)} ({CLS_FILE}); "
        f"github.com/zhanggang001/CEDNet@{commit_of(det_repo)} ({DET_FILES['hrnet']})",
        torch_version=str(torch.__version__),
        variants=variants,
        inputs=inputs,
        official_rejects=rejects,
        tiny_stem={k: v.half() if v.is_floating_point() else v for k, v in stem.items()},
        num_batches_tracked=NUM_BATCHES_TRACKED,
        tiny=tiny,
    )


def add_mmdet_repo_argument(ap) -> None:
    ap.add_argument("--mmdet-repo", type=Path, default=Path("/work/.mirror/zhanggang001+CEDNet/repo"), help="CEDNet (mmdetection fork) checkout or mirror")


def main(argv=None) -> None:
    args = parse_args(__doc__, "HRNet-Image-Classification checkout or mirror", "hrnet_reference.pt", argv, add_mmdet_repo_argument)
    save_fixture(make_fixture(args.official_repo, args.mmdet_repo), args.out)


if __name__ == "__main__":
    main()
