"""Every image a user can throw at the resize stage decodes to clean RGB, or fails naming the file."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from figures import COUNTS
from lorabuild.images import ImageError, load_rgb


def _save(path, img, **kw):
    img.save(path, **kw)
    return path


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = _save(tmp_path / "phone.jpg", img, exif=exif.tobytes())
    out = load_rgb(path)
    assert out.size == (20, 40) and out.mode == "RGB"


def test_transparency_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = load_rgb(_save(tmp_path / "a.png", img))
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_rgb(_save(tmp_path / "la.png", la)).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    out = load_rgb(_save(tmp_path / "p.png", img, transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_greyscale_keeps_its_range(tmp_path):
    img = Image.new("I;16", (4, 4), 65535 // 2)
    out = load_rgb(_save(tmp_path / "g16.png", img))
    assert out.mode == "RGB"
    assert 120 <= out.getpixel((0, 0))[0] <= 135  # mid grey, not clipped to white


def test_cmyk_jpeg_and_webp_and_bmp(tmp_path):
    cmyk = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # red in CMYK
    r, g, b = load_rgb(_save(tmp_path / "c.jpg", cmyk)).getpixel((3, 3))
    assert r > 200 and g < 60 and b < 60
    rgb = Image.new("RGB", (6, 6), (0, 128, 0))
    assert load_rgb(_save(tmp_path / "w.webp", rgb, lossless=True)).getpixel((0, 0)) == (0, 128, 0)
    assert load_rgb(_save(tmp_path / "b.bmp", rgb)).getpixel((0, 0)) == (0, 128, 0)


def test_animated_gif_uses_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    r, g, b = load_rgb(path).getpixel((0, 0))
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    "name, data",
    [
        ("empty.png", b""),
        ("text.png", b"this is not an image"),
        ("truncated.png", None),
    ],
)
def test_broken_files_name_the_file(tmp_path, name, data):
    if data is None:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
        data = buf.getvalue()[:60]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageError) as exc:
        load_rgb(path)
    assert str(path) in str(exc.value)
    COUNTS["broken image files (empty, not an image, truncated)"] += 1


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = _save(tmp_path / "big.png", Image.new("RGB", (300, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)  # 300² is over twice the limit
    with pytest.raises(ImageError, match="decompression bomb"):
        load_rgb(path)
    COUNTS["decompression bombs"] += 1
