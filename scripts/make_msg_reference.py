"""Build ``tests/data/msg_reference.pt`` from the official MSG-Transformer code (not run by the tests).

Needs a checkout (or a bare/mirror git directory) of https://github.com/hustvl/MSG-Transformer
(only ``models/msg_transformer.py`` and ``configs/msg_{tiny,small,base}_p4_win7_224.yaml`` are
read) and ``timm`` and ``PyYAML``, which that file and this script import::

    PYTHONPATH=/path/to/timm python scripts/make_msg_reference.py --official-repo /path/to/MSG-Transformer

The official file is executed in memory, unchanged. The authors published no detection code, so
the "official" detection backbone here is the Swin-detection-style adaptation that
``gradlens/models/backbones/msg.py`` documents, written *in this script* on top of the official modules:
the official ``MSGTransformer``'s ``msg_tokens``, ``patch_embed`` and ``layers`` (their
``WindowAttention``, ``shuffle_msg``, ``Mlp``, LayerNorms and the ``PatchMerging`` convolution,
called with the official ``window_partition`` / ``window_reverse``), plus a LayerNorm ``norm{i}``
per output, with Swin's padding rules (input to a multiple of the patch size; normed patch tokens
to whole windows; MSG tokens to whole shuffle regions for the shuffle). At inputs that need no
padding the script asserts that its stage maps equal the official classifier's own stage tokens
(captured with hooks) and that its last MSG token gives the official logits, so the adaptation adds
padding and nothing else. gradlens' implementation shares no code with it.

Every output is computed in float64: the official modules (with their float16-exact weights) are
cast with ``.double()`` and run on the float16 inputs cast to float64, and the outputs are stored
in float64. The tests run gradlens in float64 too, so that their comparison is of the same
function and independent of how a CPU orders float32 arithmetic (differences are then ~1e-15,
orders of magnitude below the tests' tolerance, which a real defect exceeds by as much). The
official file needed no change for this: it builds no float32-only tensors (no attention masks;
its constants are parameters and integer buffers, which ``.double()`` casts or keeps).

The fixture (plain tensors, bytes, lists and dicts; ``torch.load(..., weights_only=True)``) holds:

* ``variants[name]`` for ``msg_tiny``/``msg_small``/``msg_base``: the official yaml ``config``
  (``EMBED_DIM``, ``DEPTHS``, ``NUM_HEADS``, ``WINDOW_SIZE``, ``SHUF_SIZE``, ``DROP_PATH_RATE``)
  and the ordered state-dict keys and shapes of the official classifier (``classifier``) and of
  the detection backbone with ``out_indices`` (0, 1, 2, 3) (``backbone``), as zlib-compressed
  text, one ``key<TAB>d0,d1,...`` line per entry (both include the official persistent
  ``relative_position_index`` buffers);
* ``tiny[name]`` for two tiny configurations (``TINY`` below): ``classifier_config`` (official
  ``MSGTransformer`` keyword arguments), ``backbone_config`` (``gradlens.models.backbones.msg.MSGBackbone``
  keyword arguments), ``state_dict`` (the official classifier's, random float16-exact weights
  stored as float16, ``relative_position_index`` as uint8: cast to float64 / int64), ``norms``
  (the detection ``norm{i}`` weights, float16), ``classifier_input`` (float16; a size that needs no
  padding) with the official classifier's per-stage patch tokens ``classifier_stage_maps``
  (``(N, C, H, W)``, float64, before any detection norm; the detection backbone's outputs on this
  input are ``norm{i}`` of them, which the script asserts) and, for ``tiny_a`` only (whose last
  stage has one MSG token), the official eval ``logits`` (float64); ``backbone_inputs`` (float16;
  sizes that need padding, the first not a multiple of 32 nor of 4) with the float64
  ``backbone_outputs`` (one list of maps per input). All float64 outputs of one configuration are
  views of one shared float64 storage.

The tests (``tests/test_msg.py``) only read the fixture; they never run this script.
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_source import commit_of, key_shapes, read_file, share_storage, simple_main  # noqa: E402

OFFICIAL_FILE = "models/msg_transformer.py"
CONFIG_FILES = {
    "msg_tiny": "configs/msg_tiny_p4_win7_224.yaml",
    "msg_small": "configs/msg_small_p4_win7_224.yaml",
    "msg_base": "configs/msg_base_p4_win7_224.yaml",
}

# Two tiny configurations (weights stay float16 and the fixture under 320 KiB):
# * tiny_a (= gradlens.models.backbones.msg.TINY_MSG): four stages, 2x2 windows, shuffle [2, 2, 2, 1];
#   its 64x64 classifier input needs no padding (window grids 8, 4, 2, 1) and ends in one MSG token;
# * tiny_b: two stages, 3x3 windows, shuffle [4, 1] (16 channel groups, as the released models'
#   first stages), MLP ratio 2, qk_scale set; 48x48 needs no padding (grids 4, 2). Its last stage
#   keeps 2x2 windows, so its official "logits" are one row per window: not stored.
TINY = {
    "tiny_a": dict(
        img_size=64, embed_dim=4, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=2, shuffle_size=[2, 2, 2, 1],
        mlp_ratio=4.0, qk_scale=None, num_classes=5,
    ),
    "tiny_b": dict(
        img_size=48, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=3, shuffle_size=[4, 1],
        mlp_ratio=2.0, qk_scale=0.3, num_classes=3,
    ),
}
# Detection inputs besides the (padding-free) classifier input: sizes that are not multiples of 32
# nor of the patch size, whose window grids are not whole shuffle regions (tiny_b's 21x30: a
# 2x3 grid, smaller than one 4x4 region).
BACKBONE_INPUTS = {
    "tiny_a": [(1, 3, 38, 61), (1, 3, 36, 52)],
    "tiny_b": [(1, 3, 38, 61), (1, 3, 21, 30)],
}


# ----------------------------------------------------------------------------- the official code


def load_official(repo: Path) -> types.ModuleType:
    import warnings

    warnings.filterwarnings("ignore")  # timm.models.layers deprecation, meshgrid indexing
    src = read_file(repo, OFFICIAL_FILE)
    mod = types.ModuleType("msg_official")
    mod.__file__ = OFFICIAL_FILE
    sys.modules[mod.__name__] = mod
    exec(compile(src, OFFICIAL_FILE, "exec"), mod.__dict__)
    return mod


def official_config(repo: Path, name: str) -> dict:
    import yaml

    msg = yaml.safe_load(read_file(repo, CONFIG_FILES[name]))["MODEL"]
    cfg = {k: msg["MSG"][k] for k in ("EMBED_DIM", "DEPTHS", "NUM_HEADS", "WINDOW_SIZE", "SHUF_SIZE")}
    cfg["DROP_PATH_RATE"] = msg["DROP_PATH_RATE"]
    return cfg


def official_classifier(off, **kw) -> nn.Module:
    return off.MSGTransformer(**kw)


# ----------------------------------------------------------------------------- detection adaptation


class DetectionAdaptation(nn.Module):
    """The official classifier's trunk with Swin-detection padding and an output norm per stage."""

    def __init__(self, off, classifier: nn.Module, out_indices=None) -> None:
        super().__init__()
        if out_indices is None:
            out_indices = tuple(range(len(classifier.layers)))
        self.off = off
        self.msg_tokens = classifier.msg_tokens  # registration order: msg_tokens, patch_embed, layers, norm{i}
        self.patch_embed = classifier.patch_embed
        self.layers = classifier.layers
        self.window_size = classifier.window_size
        self.shuffle_size = list(classifier.shuffle_size)
        self.out_indices = tuple(out_indices)
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(classifier.layers[i].dim))

    def block(self, blk, x, msg, shuffle_size):
        """The official ``MSGBlock.forward`` on a patch map ``(B, h, w, C)`` and a MSG map ``(B, gh, gw, C)``."""
        off, ws, s = self.off, self.window_size, shuffle_size
        B, h, w, C = x.shape
        gh, gw = msg.shape[1:3]
        Hp, Wp = gh * ws, gw * ws
        xn = F.pad(blk.norm1(x), (0, 0, 0, Wp - w, 0, Hp - h))
        windows = off.window_partition(xn, ws, 1)  # (B * gh * gw, 1, ws*ws, C)
        tokens = torch.cat((blk.norm1(msg).reshape(B * gh * gw, 1, 1, C), windows), dim=2)
        tokens = blk.attn(tokens)
        x = x + blk.drop_path(off.window_reverse(tokens[:, :, 1:], ws, 1, Hp, Wp)[:, :h, :w])
        msg = msg + blk.drop_path(tokens[:, 0, 0].reshape(B, gh, gw, C))
        if blk.manip_op:
            ghp, gwp = math.ceil(gh / s) * s, math.ceil(gw / s) * s
            regions = off.window_partition(F.pad(msg, (0, 0, 0, gwp - gw, 0, ghp - gh)), 1, s)  # (B * nR, s*s, 1, C)
            msg = off.window_reverse(blk.manip_op(regions), 1, s, ghp, gwp)[:, :gh, :gw]
        x = x + blk.drop_path(blk.mlp(blk.norm2(x)))
        msg = msg + blk.drop_path(blk.mlp(blk.norm2(msg)))
        return x, msg

    def trunk(self, img):
        """Yields (stage, patch map, MSG map) after each stage's blocks."""
        p = self.patch_embed.patch_size[0]
        H, W = img.shape[-2:]
        img = F.pad(img, (0, (-W) % p, 0, (-H) % p))
        x = self.patch_embed.norm(self.patch_embed.proj(img).permute(0, 2, 3, 1))
        B, h, w, C = x.shape
        ws, s0 = self.window_size, self.shuffle_size[0]
        gh, gw = math.ceil(h / ws), math.ceil(w / ws)
        rows = []
        for i in range(gh):
            rows.append(torch.stack([self.msg_tokens[0, (i % s0) * s0 + j % s0, 0] for j in range(gw)]))
        msg = torch.stack(rows).expand(B, -1, -1, -1)
        for li, layer in enumerate(self.layers):
            for blk in layer.blocks:
                x, msg = self.block(blk, x, msg, self.shuffle_size[li])
            yield li, x, msg
            if layer.downsample is not None:
                ds = layer.downsample
                x = ds.norm(ds.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
                msg = ds.norm(ds.reduction(msg.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    def forward(self, img):
        return [getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous() for i, x, _ in self.trunk(img) if i in self.out_indices]


def classifier_stage_maps(off, model, x):
    """The official classifier's per-stage patch tokens as ``(B, C, H, W)`` maps (hooks on each stage's last block)."""
    maps = {}
    hooks = []
    for li, layer in enumerate(model.layers):
        H, W = layer.input_resolution
        ws = layer.blocks[-1].window_size
        s = model.shuffle_size[li]

        def hook(_m, _inp, out, li=li, H=H, W=W, ws=ws, s=s):
            maps[li] = off.window_reverse(out[:, :, 1:], ws, s, H, W, nchw=True)

        hooks.append(layer.blocks[-1].register_forward_hook(hook))
    logits = model(x)
    for h in hooks:
        h.remove()
    return logits, [maps[i] for i in range(len(model.layers))]


# ----------------------------------------------------------------------------- the fixture


def randomize_(model: nn.Module, seed: int) -> None:
    """Random, float16-exact weights of a sensible scale (norm weights near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and not name.endswith(("relative_position_bias_table", "rel_pos_msg", "msg_tokens")):
                v = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
            elif name.endswith("weight") and p.dim() == 1:  # norms
                v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            else:  # biases, position biases, MSG tokens
                v = 0.5 * torch.randn(p.shape, generator=g)
            p.copy_(v.half().float())


def make_fixture(repo: Path) -> dict:
    off = load_official(repo)
    torch.manual_seed(0)

    variants = {}
    for name in CONFIG_FILES:
        cfg = official_config(repo, name)
        model = official_classifier(
            off, embed_dim=cfg["EMBED_DIM"], depths=cfg["DEPTHS"], num_heads=cfg["NUM_HEADS"], window_size=cfg["WINDOW_SIZE"],
            shuffle_size=cfg["SHUF_SIZE"], drop_path_rate=cfg["DROP_PATH_RATE"],
        )
        det = DetectionAdaptation(off, model)
        variants[name] = dict(config=cfg, classifier=key_shapes(model.state_dict()), backbone=key_shapes(det.state_dict()))
        del model, det

    tiny = {}
    for seed, (name, spec) in enumerate(TINY.items()):
        spec = dict(spec)
        model = official_classifier(off, drop_path_rate=0.0, **spec).eval()
        det = DetectionAdaptation(off, model).eval()
        randomize_(det, seed)  # the trunk's weights and the detection norms
        randomize_(model.norm, 100 + seed)
        randomize_(model.head, 200 + seed)
        g = torch.Generator().manual_seed(300 + seed)
        img = spec["img_size"]
        cls_input = torch.randn(1, 3, img, img, generator=g).half()
        det_inputs = [torch.randn(shape, generator=g).half() for shape in BACKBONE_INPUTS[name]]
        assert all(h % 32 and h % 4 for h in BACKBONE_INPUTS[name][0][2:])
        # outputs in float64 (see the docstring); the weights are float16-exact, so casting them
        # loses nothing, and the stored weights below are those same values (as float16)
        model.double()
        det.double()  # shares the trunk with model; also casts the detection norms
        with torch.no_grad():
            logits, stage_maps = classifier_stage_maps(off, model, cls_input.double())
            # the adaptation adds padding and nothing else: equal to the classifier where none is needed
            # (the same float64 operations in another grouping: float64 rounding, ~1e-15)
            trunk = list(det.trunk(cls_input.double()))
            for (i, x, msg), want in zip(trunk, stage_maps):
                torch.testing.assert_close(x.permute(0, 3, 1, 2), want, rtol=1e-12, atol=1e-12)
            single_token = trunk[-1][2].shape[1:3] == (1, 1)
            if single_token:
                torch.testing.assert_close(model.head(model.norm(trunk[-1][2][:, 0, 0])), logits, rtol=1e-12, atol=1e-12)
            for i, (got, want) in enumerate(zip(det(cls_input.double()), stage_maps)):
                want = getattr(det, f"norm{i}")(want.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            outputs = [[o.contiguous() for o in det(x.double())] for x in det_inputs]
        assert all(o.dtype == torch.float64 for outs in outputs for o in outs) and logits.dtype == torch.float64
        state = {}
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                state[k] = v.half()
            else:  # relative_position_index
                assert int(v.max()) < 256
                state[k] = v.to(torch.uint8)
        norms = {k: v.half() for k, v in det.state_dict().items() if k.split(".")[0] in {f"norm{i}" for i in det.out_indices}}
        flat = share_storage(
            {("o", i, j): o for i, outs in enumerate(outputs) for j, o in enumerate(outs)}
            | {("s", j): m.contiguous() for j, m in enumerate(stage_maps)}
            | ({("l",): logits} if single_token else {})
        )
        backbone_config = dict(
            embed_dim=spec["embed_dim"], depths=spec["depths"], num_heads=spec["num_heads"], window_size=spec["window_size"],
            shuffle_size=spec["shuffle_size"], mlp_ratio=spec["mlp_ratio"], qk_scale=spec["qk_scale"], drop_path_rate=0.0,
            out_indices=list(det.out_indices),
        )
        entry = dict(
            classifier_config={**spec, "drop_path_rate": 0.0},
            backbone_config=backbone_config,
            state_dict=share_storage(state),
            norms=share_storage(norms),
            classifier_input=cls_input,
            classifier_stage_maps=[flat[("s", j)] for j in range(len(stage_maps))],
            backbone_inputs=det_inputs,
            backbone_outputs=[[flat[("o", i, j)] for j in range(len(outs))] for i, outs in enumerate(outputs)],
        )
        if single_token:
            entry["logits"] = flat[("l",)]
        tiny[name] = entry

    return {
        "format": 1,
        "source": f"hustvl/MSG-Transformer@{commit_of(repo)}: {OFFICIAL_FILE}, " + ", ".join(CONFIG_FILES.values()),
        "torch_version": str(torch.__version__),
        "variants": variants,
        "tiny": tiny,
    }


def main(argv=None) -> None:
    simple_main(__doc__, "MSG-Transformer checkout or git directory", "msg_reference.pt", make_fixture, argv)


if __name__ == "__main__":
    main()
