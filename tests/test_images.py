"""Photo loading: every PIL mode and orientation becomes a correct RGB image; unusable files raise ImageError."""

import numpy as np
import pytest
import torch
from PIL import Image

from dynamicrafter.images import ImageError, cover_size, load_image, prepare_image


def save(tmp_path, name, image, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "mode,make",
    [
        ("L", lambda: Image.new("L", (40, 30), 128)),
        ("P", lambda: Image.new("RGB", (40, 30), (200, 10, 10)).convert("P", palette=Image.ADAPTIVE)),
        ("I;16", lambda: Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16))),
        ("RGBA", lambda: Image.new("RGBA", (40, 30), (0, 0, 255, 255))),
        ("CMYK", lambda: Image.new("CMYK", (40, 30), (0, 255, 255, 0))),
    ],
)
def test_modes_become_rgb(tmp_path, mode, make):
    image = make()
    suffix = "jpg" if mode == "CMYK" else "png"
    rgb = load_image(save(tmp_path, f"x.{suffix}", image))
    assert rgb.mode == "RGB" and rgb.size == (40, 30)
    pixel = rgb.getpixel((5, 5))
    expected = {"L": (128,) * 3, "P": (200, 10, 10), "I;16": (255,) * 3, "RGBA": (0, 0, 255), "CMYK": (255, 0, 0)}[mode]
    assert np.abs(np.subtract(pixel, expected)).max() <= 3


def test_transparent_pixels_become_white(tmp_path):
    rgb = load_image(save(tmp_path, "t.png", Image.new("RGBA", (8, 8), (0, 0, 0, 0))))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_respected(tmp_path):
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    rgb = load_image(save(tmp_path, "r.jpg", image, exif=exif))
    assert rgb.size == (20, 60)
    assert rgb.getpixel((10, 2))[2] > 200  # the left stripe is now at the top


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "not a readable image"),
        (b"hello, not an image", "not a readable image"),
    ],
)
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        load_image(path)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_files(tmp_path, suffix):
    noise = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    full = save(tmp_path, f"full.{suffix}", noise)
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(cut)


def test_missing_directory_tiny_and_huge(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="too small"):
        load_image(save(tmp_path, "one.png", Image.new("RGB", (1, 1))))
    with pytest.raises(ImageError, match="too large"):
        load_image(save(tmp_path, "bomb.png", Image.new("1", (9000, 9000))))


def test_cover_crop_never_pads():
    # 4:3 into 320x512 (the original pads ~43 px black bars each side): we cover, so no black columns remain.
    image = Image.new("RGB", (400, 300), (255, 255, 255))
    x = prepare_image(image, 320, 512)
    assert x.shape == (1, 3, 320, 512) and torch.all(x == 1.0)
    assert cover_size((400, 300), 320, 512) == (512, 384)
    assert cover_size((1920, 1080), 320, 512) == (568, 320)  # wide photos: identical to Resize(min) + CenterCrop


def test_target_size_is_untouched_and_scaled():
    arr = np.random.default_rng(1).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    x = prepare_image(Image.fromarray(arr), 64, 128)
    assert torch.allclose(x[0].permute(1, 2, 0), torch.from_numpy(arr).float() / 127.5 - 1.0, atol=1e-6)
