"""Checkpoint formats, the mmdetection conversion, and one clear sentence for every bad checkpoint."""

from __future__ import annotations

import pickle

import pytest
import torch

from gradlens.errors import GradlensError
from gradlens.models.formats import mmdet
from gradlens.models.formats.checkpoints import CheckpointError, detector_from_object, load_detector, save_detector
from gradlens.models.registry import ARCHITECTURES, build_detector, with_preprocess

PAPER_CONFIGS = [n for n in ARCHITECTURES if n.startswith("retinanet_") and not n.endswith("_mini")]


def _mini(arch="retinanet_cednet_mini", seed=0, num_classes=5):
    torch.manual_seed(seed)
    det = build_detector(arch, num_classes)
    with torch.no_grad():
        for p in det.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        det.head.classification_head.cls_logits.bias.fill_(-1.0)  # random weights that still detect
    det.categories = [{"id": 10 + 3 * i, "name": f"c{i}"} for i in range(num_classes)]
    return det


def _images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 90, 120, generator=g), torch.rand(3, 130, 100, generator=g)]


def _same_detections(a, b, images):
    for x, y in zip(a.detect(images), b.detect(images)):
        assert len(x["boxes"]) > 0
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"]) and torch.equal(x["labels"], y["labels"])


@pytest.mark.parametrize("arch", ["retinanet_cednet_mini", "retinanet_convnext_mini"])
def test_native_round_trip(tmp_path, arch):
    det = _mini(arch)
    path = save_detector(det, tmp_path / "d.pth")
    # loads with weights_only=True: nothing but tensors and plain containers
    assert torch.load(path, weights_only=True)["arch"] == arch
    back = load_detector(path)
    assert back.categories == det.categories and back.preprocess == det.preprocess
    assert back.checkpoint_format == "gradlens"
    _same_detections(det, back, _images())


@pytest.mark.parametrize("arch", ["retinanet_cednet_mini", "retinanet_convnext_mini"])
def test_mmdet_layout_round_trip_in_memory(arch):
    """Mini detectors share the families' key layouts; the mmdetection recogniser must refuse their sizes."""
    det = _mini(arch)
    state = mmdet.to_mmdet(det.state_dict())
    assert mmdet.to_gradlens(state) .keys() == det.state_dict().keys()
    with pytest.raises(GradlensError, match="matches none"):
        detector_from_object({"meta": {}, "state_dict": state}, "mini.pth")


def test_every_paper_configuration_is_recognised_from_its_keys():
    """Built on the meta device (shapes only), converted to mmdetection keys, recognised back."""
    for name in PAPER_CONFIGS:
        with torch.device("meta"):
            det = build_detector(name, 80)
        state = mmdet.to_mmdet(det.state_dict())
        got, options = mmdet.recognise(state)
        assert got == name, name
        assert mmdet.num_classes_of(state) == 80
        assert set(mmdet.to_gradlens(state)) == set(det.state_dict()), name


def test_convnext_output_norms_are_read_from_the_keys():
    for out_indices in ([1, 2, 3], [0, 1, 2, 3]):
        with torch.device("meta"):
            det = build_detector("retinanet_convnext_tiny", 80, {"out_indices": out_indices})
        name, options = mmdet.recognise(mmdet.to_mmdet(det.state_dict()))
        assert name == "retinanet_convnext_tiny" and options["out_indices"] == out_indices


@pytest.fixture(scope="module")
def mmdet_cednet(tmp_path_factory):
    """A full-size CEDNet-NeXt-T RetinaNet written by the repository's script, in both layouts."""
    from tests.scripts import make_mmdet_checkpoints

    return make_mmdet_checkpoints().make("cednet_next_tiny", tmp_path_factory.mktemp("mmdet"))


def test_mmdet_checkpoint_detects_like_the_native_one(mmdet_cednet):
    mmdet_path, native_path = mmdet_cednet
    raw = torch.load(mmdet_path, weights_only=True)
    assert any(k.startswith("neck") for k in raw["state_dict"]) is False  # CEDNet has no neck
    assert "backbone.reduce_convs.0.0.weight" in raw["state_dict"]
    a, b = load_detector(mmdet_path), load_detector(native_path)
    assert a.checkpoint_format == "mmdetection" and a.arch_name == "retinanet_cednet_next_tiny"
    assert a.preprocess.size_divisor == 128 and (a.preprocess.min_size, a.preprocess.max_size) == (800, 1333)
    assert a.categories[0] == {"id": 1, "name": "person"} and a.categories[-1]["id"] == 90
    for d in (a, b):
        with_preprocess(d, min_size=96, max_size=160)
    _same_detections(a, b, _images())


def test_mmdet_arch_mismatch_is_refused(mmdet_cednet):
    with pytest.raises(CheckpointError, match="not the retinanet_swin_tiny named by --arch"):
        load_detector(mmdet_cednet[0], arch="retinanet_swin_tiny")


def test_torchvision_state_dict_needs_arch(tmp_path):
    det = _mini()
    path = tmp_path / "tv.pth"
    torch.save(det.state_dict(), path)
    with pytest.raises(CheckpointError, match="--arch"):
        load_detector(path)
    back = load_detector(path, arch="retinanet_cednet_mini")
    assert back.checkpoint_format == "torchvision"
    _same_detections(det, back, _images())


def test_torchvision_zoo_layout_loads():
    from torchvision.models.detection import retinanet_resnet50_fpn

    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
    det = detector_from_object(reference.state_dict(), "tv.pth", arch="torchvision_retinanet_resnet50_fpn")
    assert det.preprocess.convention == "torchvision" and det.framework == "torchvision"
    # same feature maps as torchvision's own model on the same batch
    x = torch.rand(1, 3, 128, 160)
    ours = det.backbone(x)
    theirs = list(reference.backbone(x).values())
    assert all(torch.allclose(o, t, atol=1e-5) for o, t in zip(ours, theirs))
    assert det.categories[1] == {"id": 1, "name": "person"} and det.categories[12]["id"] is None  # 'N/A'


class _Evil:
    def __reduce__(self):
        return (print, ("this would run arbitrary code",))


def test_pickle_needing_code_is_refused_unless_trusted(tmp_path):
    det = _mini()
    path = tmp_path / "evil.pth"
    torch.save({"format": "gradlens-detector", "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_detector(path)
    with pytest.raises(CheckpointError):  # trusted, unpickled, but not a usable checkpoint
        load_detector(path, trust=True)
    ok = tmp_path / "trusted.pth"
    payload = torch.load(save_detector(det, tmp_path / "x.pth"), weights_only=True)
    payload["note"] = _Evil()
    torch.save(payload, ok)
    assert load_detector(ok, trust=True).arch_name == "retinanet_cednet_mini"


def test_truncated_and_foreign_files(tmp_path):
    path = save_detector(_mini(), tmp_path / "d.pth")
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_detector(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_detector(tmp_path / "text.pth")
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"a": 1})[:5])
    with pytest.raises(CheckpointError):
        load_detector(tmp_path / "legacy.pth")
    with pytest.raises(GradlensError, match="does not exist"):
        load_detector(tmp_path / "missing.pth")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_detector(tmp_path / "other.pth")


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    det = _mini()
    payload = torch.load(save_detector(det, tmp_path / "d.pth"), weights_only=True)
    key = "head.regression_head.bbox_reg.weight"
    payload["state_dict"][key] = torch.zeros(3, 3)
    del payload["state_dict"]["head.classification_head.cls_logits.bias"]
    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(payload, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_detector(tmp_path / "bad.pth")
    message = str(info.value)
    assert "1 missing" in message and "cls_logits.bias" in message
    assert "1 unexpected" in message and "extra.weight" in message
    assert key in message and "(3, 3)" in message


def test_unknown_architectures(tmp_path):
    state = {"backbone.mystery.weight": torch.zeros(2), "bbox_head.retina_cls.weight": torch.zeros(9 * 80, 256, 3, 3)}
    torch.save({"meta": {"mmdet_version": "2.25.0"}, "state_dict": state}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="not one gradlens knows"):
        load_detector(tmp_path / "m.pth")
    with pytest.raises(GradlensError, match="Unknown architecture"):
        build_detector("retinanet_vgg16", 80)
    payload = torch.load(save_detector(_mini(), tmp_path / "d.pth"), weights_only=True)
    payload["arch"] = "retinanet_from_the_future"
    torch.save(payload, tmp_path / "future.pth")
    with pytest.raises(GradlensError, match="Unknown architecture 'retinanet_from_the_future'"):
        load_detector(tmp_path / "future.pth")


def test_config_text_hints():
    text = "test_pipeline = [dict(type='MultiScaleFlipAug', img_scale=(1333, 800), transforms=[dict(type='Pad', size_divisor=32)])]"
    assert mmdet.preprocess_hints(text) == {"size_divisor": 32, "min_size": 800, "max_size": 1333}
    assert mmdet.preprocess_hints(None) == {}
    # the normalisation in mmdetection's 0..255 units comes back exactly in those units
    from gradlens.models.preprocessing.transform import pixel_units

    norm = mmdet.preprocess_hints("img_norm_cfg = dict(\n    mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0], to_rgb=True)")
    assert pixel_units(norm["mean"]) == (103.53, 116.28, 123.675) and pixel_units(norm["std"]) == (1.0, 1.0, 1.0)
    with pytest.raises(CheckpointError, match="BGR"):
        mmdet.preprocess_hints("img_norm_cfg = dict(mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0], to_rgb=False)")
    assert mmdet.backbone_type_hint("model = dict(backbone=dict(type='ConvNeXt', depths=[3, 3, 9, 3]))") == "ConvNeXt"


class _Shell:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_calling_os_system_is_named_as_needing_code(tmp_path):
    path = tmp_path / "shell.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Shell()}, path)
    with pytest.raises(CheckpointError, match="needs arbitrary code.*--trust-checkpoint"):
        load_detector(path)


def test_table_a1_families_refuse_other_necks_and_small_padding():
    from dataclasses import replace

    from gradlens.models.registry import PAPER_PREPROCESS

    with torch.device("meta"):
        det = build_detector("retinanet_hrnet_w32", 80)
    state = mmdet.to_mmdet(det.state_dict())
    hrfpn = {k: v for k, v in state.items() if not k.startswith("neck.lateral_convs")}
    hrfpn["neck.reduction_conv.conv.weight"] = torch.empty(256, 480, 1, 1, device="meta")
    with pytest.raises(CheckpointError, match="HRFPN"):
        mmdet.recognise(hrfpn)
    two_levels = {k: v for k, v in state.items() if not k.startswith("neck.lateral_convs.2.")}
    with pytest.raises(CheckpointError, match="has 2 lateral convs"):
        mmdet.recognise(two_levels)
    for arch in ("retinanet_hrnet_w32", "retinanet_revcol_tiny"):
        with pytest.raises(GradlensError, match="multiple of 32 pixels; this one pads to 16"):
            build_detector(arch, 80, preprocess=replace(PAPER_PREPROCESS, size_divisor=16))


@pytest.mark.parametrize("arch", ["retinanet_focalnet_tiny", "retinanet_convnext_tiny"])
def test_output_stages_that_do_not_fit_the_fpn_are_one_sentence(arch):
    """A backbone whose out_indices give the FPN other maps than its laterals read, or fewer than three, is refused
    before any weight is loaded (FocalNet and ConvNeXt return only their out_indices stages)."""
    with torch.device("meta"):
        state = mmdet.to_mmdet(build_detector(arch, 80).state_dict())
    skipped = {k: v for k, v in state.items() if not k.startswith("backbone.norm1.")}  # out_indices (0, 2, 3)
    with pytest.raises(CheckpointError, match=r"its FPN reads maps of \[192, 384, 768\] channels, but the "
                                              rf"{arch} backbone it holds gives \[96, 384, 768\]"):
        detector_from_object({"meta": {}, "state_dict": skipped}, "det.pth")
    two = {k: v for k, v in skipped.items() if not k.startswith("backbone.norm0.")}  # out_indices (2, 3)
    with pytest.raises(CheckpointError, match=rf"det.pth: its {arch} backbone has 2 output stage\(s\) \[2, 3\], but "
                                              r"gradlens runs these RetinaNets with mmdetection's FPN on the last three"):
        detector_from_object({"meta": {}, "state_dict": two}, "det.pth")
    four = dict(state)  # an FPN from C2 (start_level 0): four laterals
    four["neck.lateral_convs.3.conv.weight"] = torch.empty(256, 768, 1, 1, device="meta")
    if arch == "retinanet_convnext_tiny":  # (the Table A1 families already refuse it while being recognised)
        with pytest.raises(CheckpointError, match="det.pth: its FPN has 4 lateral convs; gradlens runs"):
            detector_from_object({"meta": {}, "state_dict": four}, "det.pth")
    with torch.device("meta"):
        native = build_detector(arch, 80).state_dict()  # the torchvision layout (--arch)
    native = {k: v for k, v in native.items() if not k.startswith(("backbone.body.norm0.", "backbone.body.norm1."))}
    with pytest.raises(CheckpointError, match=rf"det.pth: its {arch} backbone has 2 output stage\(s\) \[2, 3\]"):
        detector_from_object(native, "det.pth", arch=arch)


def test_live_batch_norm_counters_may_be_absent(tmp_path):
    """HRNet keeps nn.BatchNorm2d: a file without num_batches_tracked (torch's loader accepts that) still loads."""
    torch.manual_seed(0)
    det = build_detector("retinanet_hrnet_w32", 80)
    state = {k: v for k, v in mmdet.to_mmdet(det.state_dict()).items() if not k.endswith("num_batches_tracked")}
    assert any(k.endswith("num_batches_tracked") for k in det.state_dict())
    back = detector_from_object({"meta": {}, "state_dict": state}, "hrnet.pth")
    assert back.arch_name == "retinanet_hrnet_w32"
    x, y = det.state_dict(), back.state_dict()
    assert all(torch.equal(x[k], y[k]) for k in x if not k.endswith("num_batches_tracked"))


def test_torchvision_state_dicts_of_the_new_families_carry_their_options(tmp_path):
    """--arch names the variant; the options (outputs, focal levels) are read from the weights, as for mmdetection files."""
    torch.manual_seed(0)
    det = build_detector("retinanet_focalnet_tiny", 80, {"out_indices": [1, 2, 3], "focal_levels": [3, 3, 3, 3]})
    path = tmp_path / "focalnet.pth"
    torch.save(det.state_dict(), path)
    back = load_detector(path, arch="retinanet_focalnet_tiny")
    assert back.arch_options["out_indices"] == [1, 2, 3] and list(back.arch_options["focal_levels"]) == [3, 3, 3, 3]
    with pytest.raises(CheckpointError, match="not the retinanet_focalnet_base named by --arch"):
        load_detector(path, arch="retinanet_focalnet_base")
    with pytest.raises(CheckpointError, match="not a msg backbone"):
        load_detector(path, arch="retinanet_msg_tiny")
