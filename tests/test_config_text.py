"""Config text read as data (issue 25, item 7): the forms mmcv's and mmengine's pretty_text write are read, anything
else is kept as its source and refused where a reader needs it, and nothing in the text ever runs."""

from __future__ import annotations

import pytest

from gradlens.errors import CheckpointError
from gradlens.models.formats import mmdet
from gradlens.models.formats.config_text import Opaque, read_config, settings

PRETTY = """
img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=(1333, 800),
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='Normalize', **img_norm_cfg),
            dict(type='Pad', size_divisor=32),
        ])
]
data = dict(samples_per_gpu=2, test=dict(type='CocoDataset', pipeline=test_pipeline))
model = dict(type='RetinaNet', backbone=dict(type='CEDNet', depths=[2, 2, 6, 2], drop_path_rate=-0.0),
             bbox_head=dict(type='RetinaHead', num_classes=80, anchor_generator={'octave_base_scale': 4}))
load_from = None
resume = list((1, 2))
"""


def test_the_forms_pretty_text_writes_are_read():
    config = read_config(PRETTY)
    assert list(config) == ["img_norm_cfg", "test_pipeline", "data", "model", "load_from", "resume"]
    assert config["img_norm_cfg"] == {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "to_rgb": True}
    normalize = config["test_pipeline"][1]["transforms"][1]
    assert normalize == {"type": "Normalize", **config["img_norm_cfg"]}  # **name merged in order
    assert config["data"]["test"]["pipeline"] == config["test_pipeline"]  # a name assigned earlier
    assert config["model"]["backbone"]["drop_path_rate"] == 0.0 and config["model"]["bbox_head"]["anchor_generator"] == {
        "octave_base_scale": 4}
    assert config["load_from"] is None and config["resume"] == [1, 2]
    assert config["test_pipeline"][1].sources["img_scale"] == "(1333, 800)"  # how each value was written
    assert [(v, w) for v, w, _ in settings(config["test_pipeline"], "size_divisor")] == [(32, "32")]
    assert mmdet.preprocess_hints(PRETTY) == {"size_divisor": 32, "min_size": 800, "max_size": 1333,
                                              "mean": pytest.approx((0.485, 0.456, 0.406)),
                                              "std": pytest.approx((0.229, 0.224, 0.225))}
    assert mmdet.backbone_type_hint(PRETTY) == "CEDNet"


@pytest.mark.parametrize("written", [
    "128*2", "2**5", "__import__('os').system('true')", "[x for x in range(3)]", "os.environ", "lambda: 1",
    "f'{1}'", "[1, 2 + 3]", "dict(1, a=2)", "{**other}", "unknown_name", "open('x').read()",
])  # fmt: skip
def test_anything_else_is_kept_as_its_source(written):
    config = read_config(f"value = {written}\n")
    assert config["value"] == Opaque(written)


def test_code_in_config_text_never_runs(tmp_path):
    marker = tmp_path / "ran"
    text = (f"import os\nos.system('touch {marker}')\n"
            f"def f():\n    open('{marker}', 'w')\nf()\n"
            f"size_divisor = __import__('os').system('touch {marker}')\n"
            f"class C:\n    x = open('{marker}', 'w')\n"
            f"test_pipeline = [dict(type='Pad', size_divisor=exec(\"open('{marker}', 'w')\"))]\n")
    config = read_config(text)
    assert not marker.exists()
    assert set(config) == {"size_divisor", "test_pipeline"}  # other statements are not data: ignored
    with pytest.raises(CheckpointError, match=r"sets size_divisor=exec\(.*which is not a literal value"):
        mmdet.preprocess_hints(text)
    assert not marker.exists()


def test_text_that_is_not_python_is_one_sentence():
    for text in ("model = dict(\n", "\x00", "def (:"):
        with pytest.raises(CheckpointError, match="is not Python") as info:
            read_config(text)
        assert "\n" not in str(info.value)
    assert mmdet.backbone_type_hint("model = dict(") is None  # a hint only: none from unreadable text
    with pytest.raises(CheckpointError, match="characters long"):
        read_config("x = 1\n" * 1_000_000)
    deep = "x = " + "[" * 5000 + "]" * 5000
    with pytest.raises(CheckpointError):  # deeper than Python's parser goes: refused, not a crash
        read_config(deep)
