"""HRNet (high-resolution network), W32, in plain PyTorch: ImageNet classifier and detection backbone.

Two reference implementations are rebuilt here, sharing their building blocks:

* the ImageNet classifier ``HighResolutionNet`` of the official classification code
  (github.com/HRNet/HRNet-Image-Classification, ``lib/models/cls_hrnet.py`` with
  ``experiments/cls_hrnet_w32_sgd_lr5e-2_wd1e-4_bs32_x100.yaml``): the released
  ``hrnetv2_w32_imagenet_pretrained.pth`` is that model's bare ``state_dict()`` (no wrapper dict) and
  loads into :func:`hrnet_w32` with ``strict=True``;
* mmdetection 2.x's ``HRNet`` backbone (the CEDNet fork's ``ced-mmdet/mmdet/models/backbones/hrnet.py``
  with the ``extra`` of ``ced-mmdet/configs/hrnet/*_hrnetv2p_w32_*.py``): :class:`HRNetBackbone`'s
  state-dict keys are the ``backbone.*`` keys of an mmdetection checkpoint without the prefix.

Both share the trunk: a stride-4 stem (two 3x3 stride-2 convs, 64 channels, hard-wired as in both
references), ``layer1`` (stage 1, one branch of bottlenecks), then stages 2-4, each a sequence of
multi-branch modules (``HRModule``: parallel residual branches at strides 4, 8, 16, 32, then every
output branch sums all branches, resampled by 1x1 conv + nearest upsampling or by chains of 3x3
stride-2 convs), entered through ``transition{1,2,3}`` layers. mmdetection's BasicBlock/Bottleneck
name their norms ``bn1``/``bn2``/``bn3`` (mmcv's BN abbreviation) and its stem ``bn1``/``bn2``, so the
two references have the same trunk keys; the backbone simply has no classification head. Everything
is ``BatchNorm2d(eps=1e-5, momentum=0.1)`` and bias-free convs, as in both references.

Behaviour that is the references', kept on purpose:

* a transition that changes the channels of an *existing* branch is applied to the previous stage's
  *last* branch (both references index ``y_list[-1]``), not to that branch; in HRNet-W32 every
  existing branch keeps its channels, so only new branches have transitions;
* fusion sums the terms in branch order, then applies ReLU; upsampling is ``nn.Upsample`` (nearest)
  by ``2**(j-i)``, so the stride-4 map's sides must be multiples of ``2**(branches-1)`` (8 for W32:
  true for every input whose sides are multiples of 32, and for some others, e.g. 61x93). The
  references then fail inside a tensor addition; here such inputs raise ``ValueError`` up front;
* the classifier head (``incre_modules``, ``downsamp_modules``, ``final_layer``, ``classifier``) is
  the official one: bottlenecks to 128/256/512/1024 channels, stride-2 3x3 convs (with bias) adding
  each resolution into the next, 1x1 conv to 2048, global average pooling, ``Linear(2048, 1000)``;
  the widths are arguments here only so that tests can build tiny models;
* mmdetection's ``norm_eval=True`` (default) keeps every BatchNorm in eval mode when the backbone is
  put into training mode; its ``multiscale_output=False`` (only the stride-4 map, the last module of
  stage 4 fusing into branch 0 only) is supported.

mmdetection's ``with_cp``, ``conv_cfg``, ``norm_cfg``, ``zero_init_residual``, ``pretrained`` and
``init_cfg`` are not (they do not change an eval forward pass or the state dict); ``out_indices``
(which mmdetection's HRNet lacks: it always returns every branch) selects branches to return, and
``drop_path_rate`` is accepted for interface parity and must be 0 (HRNet has no stochastic depth).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens.errors import CheckpointError

__all__ = [
    "HRNET_VARIANTS",
    "TINY_HRNET",
    "BasicBlock",
    "Bottleneck",
    "HRModule",
    "HRNetBackbone",
    "HighResolutionNet",
    "hrnet_w32",
    "hrnet_w32_backbone",
    "is_hrnet_checkpoint",
    "recognise",
]

_STEM_WIDTH = 64  # hard-wired in both references
_BN_MOMENTUM = 0.1
_HEAD_CHANNELS = (32, 64, 128, 256)  # official classifier head: bottleneck planes per resolution
_HEAD_WIDTH = 2048
_STAGE_KEYS = ("num_modules", "num_branches", "block", "num_blocks", "num_channels")


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=_BN_MOMENTUM)


def _conv(c_in: int, c_out: int, kernel_size: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size, stride, padding=kernel_size // 2, bias=bias)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN, residual, ReLU (``conv1``/``bn1``/``conv2``/``bn2``/``downsample``)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride)
        self.bn1 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = _bn(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride, "pytorch" style) -> 1x1 to ``4 * planes``, residual, ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 1)
        self.bn1 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = _bn(planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1)
        self.bn3 = _bn(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def _make_layer(block: type, inplanes: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """``blocks`` residual blocks; the first gets a 1x1 conv + BN shortcut when shape changes."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(_conv(inplanes, planes * block.expansion, 1, stride), _bn(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class HRModule(nn.Module):
    """Parallel branches, then multi-resolution fusion (the references' ``HRModule`` / ``HighResolutionModule``).

    ``fuse_layers[i][j]`` brings branch ``j`` to branch ``i``'s resolution and channels: for
    ``j > i`` 1x1 conv + BN + nearest upsampling by ``2**(j-i)``; for ``j < i`` ``i-j`` 3x3 stride-2
    conv + BN (ReLU after all but the last); ``None`` for ``j == i``. With ``multiscale_output=False``
    only branch 0 is fused and returned. ``forward`` takes and returns a list of maps.
    """

    def __init__(
        self,
        num_branches: int,
        block: type,
        num_blocks: Sequence[int],
        in_channels: Sequence[int],
        num_channels: Sequence[int],
        multiscale_output: bool = True,
    ) -> None:
        super().__init__()
        for what, seq in (("num_blocks", num_blocks), ("num_channels", num_channels), ("in_channels", in_channels)):
            if len(seq) != num_branches:
                raise ValueError(f"HRModule with {num_branches} branches got {len(seq)} {what}: {list(seq)}")
        self.num_branches = num_branches
        self.multiscale_output = multiscale_output
        self.branches = nn.ModuleList(
            [_make_layer(block, in_channels[i], num_channels[i], num_blocks[i]) for i in range(num_branches)]
        )
        # The branches' output channels (the references update their in_channels list the same way).
        self.out_channels = [c * block.expansion for c in num_channels]
        self.fuse_layers = self._make_fuse_layers() if num_branches > 1 else None

    def _make_fuse_layers(self) -> nn.ModuleList:
        ch = self.out_channels
        fuse_layers = nn.ModuleList()
        for i in range(self.num_branches if self.multiscale_output else 1):
            row = []
            for j in range(self.num_branches):
                if j > i:
                    row.append(nn.Sequential(_conv(ch[j], ch[i], 1), _bn(ch[i]), nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")))
                elif j == i:
                    row.append(None)
                else:
                    steps = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            steps.append(nn.Sequential(_conv(ch[j], ch[i], 3, 2), _bn(ch[i])))
                        else:
                            steps.append(nn.Sequential(_conv(ch[j], ch[j], 3, 2), _bn(ch[j]), nn.ReLU(inplace=False)))
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(nn.ModuleList(row))
        return fuse_layers

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = None
            for j in range(self.num_branches):  # summed in branch order, as both references do
                term = x[j] if j == i else row[j](x[j])
                y = term if y is None else y + term
            out.append(F.relu(y))
        return out


def _stage_settings(extra: Mapping, stage: int) -> dict:
    """``extra['stage<stage>']`` checked and normalised (mmdetection's lower-case keys)."""
    name = f"stage{stage}"
    if name not in extra:
        raise ValueError(f"HRNet extra needs stage1..stage4; {name!r} is missing")
    cfg = dict(extra[name])
    missing = [k for k in _STAGE_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"HRNet {name} settings lack {', '.join(missing)}")
    if cfg["block"] not in _BLOCKS:
        raise ValueError(f"HRNet {name} block must be one of {', '.join(_BLOCKS)}, got {cfg['block']!r}")
    if cfg.get("fuse_method", "SUM") != "SUM":
        raise ValueError(f"HRNet {name} fuse_method must be 'SUM' (the only one the references implement)")
    nb = int(cfg["num_branches"])
    blocks, chans = [int(b) for b in cfg["num_blocks"]], [int(c) for c in cfg["num_channels"]]
    if len(blocks) != nb or len(chans) != nb:
        raise ValueError(f"HRNet {name}: num_blocks {blocks} and num_channels {chans} must both have num_branches={nb} entries")
    if stage == 1 and nb != 1:
        raise ValueError(f"HRNet stage1 has one branch, got num_branches={nb}")
    if int(cfg["num_modules"]) < 1:
        raise ValueError(f"HRNet {name} needs num_modules >= 1")
    return dict(num_modules=int(cfg["num_modules"]), num_branches=nb, block=cfg["block"], num_blocks=blocks, num_channels=chans)


def _make_transition(pre: Sequence[int], cur: Sequence[int]) -> nn.ModuleList:
    """Entry into the next stage: existing branches keep (``None``) or 3x3-convert their channels;
    each new branch is a chain of 3x3 stride-2 conv + BN + ReLU from the last existing branch."""
    layers = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(None if c == pre[i] else nn.Sequential(_conv(pre[i], c, 3), _bn(c), nn.ReLU(inplace=True)))
        else:
            steps = []
            for j in range(i + 1 - len(pre)):
                c_in = pre[-1]
                c_out = c if j == i - len(pre) else c_in
                steps.append(nn.Sequential(_conv(c_in, c_out, 3, 2), _bn(c_out), nn.ReLU(inplace=True)))
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


class _HRNetTrunk(nn.Module):
    """Stem, ``layer1``, ``transition1..3`` and ``stage2..4`` in the references' registration order."""

    def __init__(self, extra: Mapping, in_channels: int = 3, multiscale_output: bool = True) -> None:
        super().__init__()
        stages = [_stage_settings(extra, s) for s in (1, 2, 3, 4)]
        self.extra = {f"stage{s + 1}": cfg for s, cfg in enumerate(stages)}

        self.conv1 = _conv(in_channels, _STEM_WIDTH, 3, 2)
        self.bn1 = _bn(_STEM_WIDTH)
        self.conv2 = _conv(_STEM_WIDTH, _STEM_WIDTH, 3, 2)
        self.bn2 = _bn(_STEM_WIDTH)

        s1 = stages[0]
        block = _BLOCKS[s1["block"]]
        self.layer1 = _make_layer(block, _STEM_WIDTH, s1["num_channels"][0], s1["num_blocks"][0])
        pre = [s1["num_channels"][0] * block.expansion]

        for s, cfg in enumerate(stages[1:], start=2):
            block = _BLOCKS[cfg["block"]]
            cur = [c * block.expansion for c in cfg["num_channels"]]
            self.add_module(f"transition{s - 1}", _make_transition(pre, cur))
            modules = []
            for m in range(cfg["num_modules"]):
                last = s == 4 and m == cfg["num_modules"] - 1
                modules.append(
                    HRModule(cfg["num_branches"], block, cfg["num_blocks"], cur, cfg["num_channels"], multiscale_output or not last)
                )
                cur = modules[-1].out_channels
            self.add_module(f"stage{s}", nn.Sequential(*modules))
            pre = cur
        self.branch_channels = list(pre)  # channels of stage 4's branches
        self._size_multiple = 2 ** (max(cfg["num_branches"] for cfg in stages) - 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # Both references: Kaiming-normal (fan_out, relu) convs, BN weight 1 / bias 0; conv biases (the
        # classifier head's) and the Linear keep PyTorch's defaults.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _check_size(self, x: Tensor) -> None:
        h4, w4 = ((s - 1) // 2 // 2 + 1 for s in x.shape[-2:])  # two 3x3 stride-2 convs: ceil(ceil(s/2)/2)
        if h4 % self._size_multiple or w4 % self._size_multiple:
            raise ValueError(
                f"HRNet needs input sides whose stride-4 maps are multiples of {self._size_multiple} (multiples of "
                f"{4 * self._size_multiple} always are), so that upsampled branches line up; input "
                f"{x.shape[-2]}x{x.shape[-1]} gives {h4}x{w4}"
            )

    def forward_branches(self, x: Tensor) -> list[Tensor]:
        """Stage 4's branch maps (strides 4, 8, 16, 32; only stride 4 with ``multiscale_output=False``)."""
        self._check_size(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        for s in (2, 3, 4):
            transition, stage = getattr(self, f"transition{s - 1}"), getattr(self, f"stage{s}")
            # a transition, where there is one, reads the previous stage's last branch (as the references do)
            xs = [ys[i] if t is None else t(ys[-1]) for i, t in enumerate(transition)]
            ys = stage(xs)
        return ys


class HighResolutionNet(_HRNetTrunk):
    """HRNet ImageNet classifier (the official ``cls_hrnet.py::HighResolutionNet``; 224x224 inputs in training).

    ``extra`` uses mmdetection's lower-case stage settings (as :data:`HRNET_VARIANTS`); the official
    YAML's ``STAGE1..4`` / ``NUM_MODULES``... are the same values. ``head_channels``, ``head_width``
    and ``num_classes`` default to the official (hard-wired) 32/64/128/256, 2048 and 1000.
    ``forward(x)`` returns ``(N, num_classes)`` logits; ``features(x)`` stage 4's branch maps.
    """

    def __init__(
        self,
        extra: Mapping,
        head_channels: Sequence[int] = _HEAD_CHANNELS,
        head_width: int = _HEAD_WIDTH,
        num_classes: int = 1000,
    ) -> None:
        super().__init__(extra, in_channels=3, multiscale_output=True)
        head_channels = [int(c) for c in head_channels]
        if len(head_channels) != len(self.branch_channels):
            raise ValueError(f"head_channels needs one entry per stage-4 branch ({len(self.branch_channels)}), got {head_channels}")
        expansion = Bottleneck.expansion
        self.incre_modules = nn.ModuleList(
            [_make_layer(Bottleneck, c, h, 1) for c, h in zip(self.branch_channels, head_channels)]
        )
        self.downsamp_modules = nn.ModuleList(
            [
                nn.Sequential(_conv(h * expansion, h_next * expansion, 3, 2, bias=True), _bn(h_next * expansion), nn.ReLU(inplace=True))
                for h, h_next in zip(head_channels[:-1], head_channels[1:])
            ]
        )
        self.final_layer = nn.Sequential(
            _conv(head_channels[-1] * expansion, head_width, 1, bias=True), _bn(head_width), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Linear(head_width, num_classes)
        self.num_classes = num_classes
        for m in (*self.incre_modules.modules(), *self.downsamp_modules.modules(), *self.final_layer.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: Tensor) -> list[Tensor]:
        return self.forward_branches(x)

    def forward(self, x: Tensor) -> Tensor:
        ys = self.forward_branches(x)
        y = self.incre_modules[0](ys[0])
        for i, down in enumerate(self.downsamp_modules):
            y = self.incre_modules[i + 1](ys[i + 1]) + down(y)
        y = self.final_layer(y)
        y = F.avg_pool2d(y, kernel_size=y.shape[2:]).flatten(1)  # global average, as the official code
        return self.classifier(y)


class HRNetBackbone(_HRNetTrunk):
    """mmdetection's ``HRNet`` detection backbone (state-dict and output compatible).

    Args:
        extra: the four stages' settings (mmdetection's ``extra``; :data:`HRNET_VARIANTS`).
        in_channels: input channels.
        multiscale_output: ``False`` returns only the stride-4 map (mmdetection's option).
        norm_eval: keep BatchNorms in eval mode in ``train()`` (mmdetection's default ``True``).
        out_indices: branches to return (strides ``4 * 2**i``); mmdetection's HRNet has no such
            argument and returns all of them, the default here.
        drop_path_rate: must be 0 (interface parity; HRNet has no stochastic depth).

    ``forward(x)`` returns a tuple with the selected branch maps in branch order; ``out_channels``
    and ``strides`` describe them. The state dict has no classifier head, so an ImageNet
    checkpoint (mmdetection's ``open-mmlab://msra/hrnetv2_w32``) loads only with ``strict=False``.
    """

    def __init__(
        self,
        extra: Mapping,
        in_channels: int = 3,
        multiscale_output: bool = True,
        norm_eval: bool = True,
        out_indices: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        if drop_path_rate:
            raise ValueError(f"HRNet has no stochastic depth; drop_path_rate must be 0, got {drop_path_rate}")
        super().__init__(extra, in_channels=in_channels, multiscale_output=multiscale_output)
        n_out = len(self.branch_channels) if multiscale_output else 1
        out_indices = list(range(n_out)) if out_indices is None else [int(i) for i in out_indices]
        if not out_indices or any(i not in range(n_out) for i in out_indices) or len(set(out_indices)) != len(out_indices):
            raise ValueError(f"out_indices must be distinct branch indices in 0..{n_out - 1}, got {out_indices}")
        self.out_indices = tuple(sorted(out_indices))
        self.multiscale_output = multiscale_output
        self.norm_eval = norm_eval
        self.out_channels = [self.branch_channels[i] for i in self.out_indices]
        self.strides = tuple(4 * 2**i for i in self.out_indices)

    def train(self, mode: bool = True) -> HRNetBackbone:
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        ys = self.forward_branches(x)
        return tuple(ys[i] for i in self.out_indices)


def _stage(num_modules: int, num_branches: int, block: str, num_blocks: tuple, num_channels: tuple) -> dict:
    return dict(num_modules=num_modules, num_branches=num_branches, block=block, num_blocks=num_blocks, num_channels=num_channels)


HRNET_VARIANTS: dict[str, dict] = {
    # ced-mmdet/configs/hrnet/*_hrnetv2p_w32_*.py (extra), = experiments/cls_hrnet_w32_*.yaml (MODEL.EXTRA)
    "hrnet_w32": dict(
        extra=dict(
            stage1=_stage(1, 1, "BOTTLENECK", (4,), (64,)),
            stage2=_stage(1, 2, "BASIC", (4, 4), (32, 64)),
            stage3=_stage(4, 3, "BASIC", (4, 4, 4), (32, 64, 128)),
            stage4=_stage(3, 4, "BASIC", (4, 4, 4, 4), (32, 64, 128, 256)),
        )
    ),
}
# Not a detection variant: the classifier whose size Table A1 prints for "HRNet-w32" (experiments/cls_hrnet_w30_*.yaml).
_HRNET_W30_EXTRA = dict(
    stage1=_stage(1, 1, "BOTTLENECK", (4,), (64,)),
    stage2=_stage(1, 2, "BASIC", (4, 4), (30, 60)),
    stage3=_stage(4, 3, "BASIC", (4, 4, 4), (30, 60, 120)),
    stage4=_stage(3, 4, "BASIC", (4, 4, 4, 4), (30, 60, 120, 240)),
)

# A tiny HRNet (same topology, 1 block per branch, narrow branches) for fast pipeline tests:
# forward + backward at 64x64 in a few milliseconds on CPU; maps of 4/8/12/16 channels.
TINY_HRNET: dict = dict(
    extra=dict(
        stage1=_stage(1, 1, "BOTTLENECK", (1,), (4,)),
        stage2=_stage(1, 2, "BASIC", (1, 1), (4, 8)),
        stage3=_stage(1, 3, "BASIC", (1, 1, 1), (4, 8, 12)),
        stage4=_stage(1, 4, "BASIC", (1, 1, 1, 1), (4, 8, 12, 16)),
    )
)


def _variant(name: str) -> dict:
    if name not in HRNET_VARIANTS:
        raise ValueError(f"unknown HRNet variant {name!r}; known: {', '.join(HRNET_VARIANTS)}")
    return dict(HRNET_VARIANTS[name])


def hrnet_w32(**kwargs) -> HighResolutionNet:
    """HRNet-W32-C ImageNet classifier (branches 32/64/128/256; 41.23M parameters, 8.92G MACs at 224x224,
    which the official README gives as 41.2M / 8.31 "GFLOPs": its counter divides multiply-adds by 1024**3).

    The released ``hrnetv2_w32_imagenet_pretrained.pth`` is a bare state dict that loads with ``strict=True``.
    """
    return HighResolutionNet(**{**_variant("hrnet_w32"), **kwargs})


def hrnet_w30(**kwargs) -> HighResolutionNet:
    """HRNet-W30-C ImageNet classifier (37.71M parameters, 8.11G MACs = the official README's 7.55 in units of 1024**3):
    the size Table A1 prints for its HRNet-w32 row."""
    return HighResolutionNet(**{"extra": _HRNET_W30_EXTRA, **kwargs})


def hrnet_w32_backbone(**overrides) -> HRNetBackbone:
    """HRNet-W32 detection backbone (mmdetection's ``HRNet``); returns 4 maps at strides 4..32 with 32/64/128/256 channels."""
    return HRNetBackbone(**{**_variant("hrnet_w32"), **overrides})


# ---------------------------------------------------------------------------------------------
# recognising mmdetection checkpoints

_PREFIX = "backbone."


def is_hrnet_checkpoint(sd: Mapping[str, object]) -> bool:
    """True for a state dict whose ``backbone.*`` keys are an HRNet's (its ``transition1`` and
    ``stage2`` multi-branch modules; no other supported backbone has those names)."""
    keys = [k for k in sd if isinstance(k, str)]
    return any(k.startswith("backbone.transition1.") for k in keys) and any(k.startswith("backbone.stage2.0.branches.") for k in keys)


def _count(keys: Sequence[str], prefix: str) -> int:
    """How many numbered children ``prefix.<n>.`` exist."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _layout(sd: Mapping[str, Tensor]) -> dict:
    """The four stages' settings (and ``multiscale_output``) read off an HRNet backbone's keys and shapes."""
    keys = [k[len(_PREFIX):] for k in sd if isinstance(k, str) and k.startswith(_PREFIX)]
    keyset = set(keys)

    def block_of(prefix: str) -> str:
        return "BOTTLENECK" if f"{prefix}.conv3.weight" in keyset else "BASIC"

    def planes(prefix: str) -> int:
        return int(sd[f"{_PREFIX}{prefix}.conv1.weight"].shape[0])

    stages = {"stage1": dict(num_modules=1, num_branches=1, block=block_of("layer1.0"), num_blocks=[_count(keys, "layer1")], num_channels=[planes("layer1.0")])}
    multiscale = True
    for s in (2, 3, 4):
        nb = _count(keys, f"stage{s}.0.branches")
        nm = _count(keys, f"stage{s}")
        stages[f"stage{s}"] = dict(
            num_modules=nm,
            num_branches=nb,
            block=block_of(f"stage{s}.0.branches.0.0"),
            num_blocks=[_count(keys, f"stage{s}.0.branches.{b}") for b in range(nb)],
            num_channels=[planes(f"stage{s}.0.branches.{b}.0") for b in range(nb)],
        )
        if s == 4 and nb > 1:
            multiscale = _count(keys, f"stage4.{nm - 1}.fuse_layers") == nb
    return dict(extra=stages, multiscale_output=multiscale)


def _normalised(extra: Mapping) -> dict:
    return {f"stage{s}": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in _stage_settings(extra, s).items()} for s in (1, 2, 3, 4)}


def recognise(sd: Mapping[str, Tensor]) -> tuple[str, dict]:
    """``(f"retinanet_{variant}", backbone options)`` of an mmdetection RetinaNet state dict with an HRNet backbone.

    Options are ``{}`` (the default ``out_indices=(0, 1, 2, 3)``: mmdetection's HRNet returns every
    branch and its FPN reads the last three with ``start_level=1``; the weights do not depend on it).
    """
    if not is_hrnet_checkpoint(sd):
        raise CheckpointError("The checkpoint's backbone has no HRNet transition1/stage2 weights, so it is not an HRNet.")
    try:
        layout = _layout(sd)
    except KeyError as exc:  # a tensor of another shape is named by the caller (mmdet.recognise)
        raise CheckpointError(f"The checkpoint's HRNet backbone is incomplete (missing {exc}).") from None
    if not layout["multiscale_output"]:
        raise CheckpointError("The checkpoint's HRNet backbone was built with multiscale_output=False (one output map), "
                              "which cannot feed a RetinaNet FPN.")
    found = layout["extra"]
    for variant, settings in HRNET_VARIANTS.items():
        if _normalised(settings["extra"]) == found:
            return f"retinanet_{variant}", {}
    summary = "; ".join(
        f"{name}: {cfg['num_modules']}x{cfg['block']} blocks {cfg['num_blocks']} channels {cfg['num_channels']}" for name, cfg in found.items()
    )
    raise CheckpointError(f"The checkpoint's HRNet backbone ({summary}) matches none of {', '.join(HRNET_VARIANTS)}.")
