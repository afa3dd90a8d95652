"""Decoding keeps COCO's pixel grid and always yields RGB."""

import numpy as np
import pytest
import torch
from PIL import Image

from gradlens.data.images import read_image, to_tensor
from gradlens.errors import InputFileError


def test_rgb_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, pixels)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    Image.fromarray(np.full((12, 20), 77, np.uint8), mode="L").save(tmp_path / "g.jpg")
    out = read_image(tmp_path / "g.jpg")
    assert out.shape == (12, 20, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert abs(int(out[0, 0, 0]) - 77) <= 1


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # pure red in CMYK
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (8, 16, 3)
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 50 and b < 50


def test_exif_orientation_is_not_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (10, 30, 3)  # stored layout, as COCO boxes assume


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert abs(int(out[0, 0, 0]) - 100) <= 1 and out[0, 0, 1] == 0


def test_bad_files(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(InputFileError, match="not an image"):
        read_image(tmp_path / "x.jpg")
    with pytest.raises(InputFileError, match="does not exist"):
        read_image(tmp_path / "missing.jpg")


def test_to_tensor_is_chw_in_unit_range():
    t = to_tensor(np.array([[[0, 128, 255]]], np.uint8))
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    torch.testing.assert_close(t.flatten(), torch.tensor([0, 128 / 255, 1.0]))


def test_exif_orientation_ignored_by_default_and_applied_as_opencv_does(tmp_path):
    import cv2
    from PIL import Image

    from gradlens.data.images import count_exif_turned, exif_orientation_of

    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(turned, exif=exif, quality=95)
    plain = tmp_path / "plain.jpg"
    Image.fromarray(pixels).save(plain, quality=95)
    stored = read_image(turned)
    assert stored.shape == (30, 50, 3)
    applied = read_image(turned, exif_orientation="apply")
    assert applied.shape == (50, 30, 3)
    # mmdetection's loader: cv2.imdecode with IMREAD_COLOR turns the image (BGR)
    assert np.array_equal(applied, cv2.cvtColor(cv2.imread(str(turned), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    assert np.array_equal(read_image(plain, exif_orientation="apply"), read_image(plain))
    assert exif_orientation_of(turned) == 6 and exif_orientation_of(plain) == 1
    assert count_exif_turned([turned, plain, plain], progress=False) == 1
