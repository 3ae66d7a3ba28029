"""Reading image files for captioning: formats, modes, EXIF orientation, unreadable files.

Expected pixels are written down from what each format stores (a grey level, a palette entry, an alpha
blend on white, a CMYK ink mix, a rotation of the stored array), never read back through the code.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ladic_jax.data import image_files
from ladic_jax.data.image_files import ImageReadError, read_rgb

RED, BLUE = (220, 30, 30), (30, 30, 220)


def _quadrants(h=40, w=60) -> np.ndarray:
    """Blue image with a red top-left quadrant: any rotation or flip moves the red block."""
    a = np.empty((h, w, 3), np.uint8)
    a[:] = BLUE
    a[: h // 2, : w // 2] = RED
    return a


def _block_colours(a: np.ndarray) -> np.ndarray:
    """Mean colour of each quadrant (2, 2, 3), robust to JPEG ringing at the edges."""
    h, w = a.shape[:2]
    q = lambda r, c: a[r * h // 2 + 3:(r + 1) * h // 2 - 3, c * w // 2 + 3:(c + 1) * w // 2 - 3].reshape(-1, 3)  # noqa: E731
    return np.array([[q(r, c).mean(0) for c in range(2)] for r in range(2)])


@pytest.mark.parametrize("orientation,k", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied_to_the_pixels(tmp_path, orientation, k):
    stored = _quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation  # 3: rotate 180; 6: rotate 90 clockwise to display; 8: 90 counter-clockwise
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    shown = np.rot90(stored, k=k)
    out = read_rgb(str(path))
    assert out.shape == shown.shape
    np.testing.assert_allclose(_block_colours(out), _block_colours(shown), atol=8)


def test_modes_are_converted_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 30), np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    assert np.array_equal(read_rgb(str(tmp_path / "gray.png")), np.repeat(gray[..., None], 3, -1))

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (200, 100, 0)
    rgba[..., 3] = np.array([0, 128, 255, 255])[None, :]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = read_rgb(str(tmp_path / "rgba.png")).astype(float)
    alpha = rgba[0, :, 3][:, None] / 255.0
    expected = alpha * np.array([200, 100, 0]) + (1 - alpha) * 255  # composited on white
    np.testing.assert_allclose(out[0], expected, atol=1)

    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    idx = rng.integers(0, 3, (10, 10), np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette)
    p.save(tmp_path / "palette.png")
    colours = np.array(palette[:9]).reshape(3, 3)
    assert np.array_equal(read_rgb(str(tmp_path / "palette.png")), colours[idx])

    g16 = np.array([[0, 257 * 128, 65535]], np.uint16)
    Image.fromarray(g16).save(tmp_path / "gray16.png")
    assert read_rgb(str(tmp_path / "gray16.png"))[0, :, 0].tolist() == [0, 128, 255]  # scaled, not clipped


def test_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((32, 64, 4), np.uint8)
    cmyk[:, :32, 0] = 255                     # pure cyan ink
    cmyk[:, 32:, 3] = 255                     # pure black ink
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = read_rgb(str(tmp_path / "cmyk.jpg")).astype(float)
    np.testing.assert_allclose(out[8:24, 4:28].mean((0, 1)), (0, 255, 255), atol=6)
    np.testing.assert_allclose(out[8:24, 36:60].mean((0, 1)), (0, 0, 0), atol=6)


def test_gif_first_frame_and_webp(tmp_path):
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    np.testing.assert_allclose(read_rgb(str(tmp_path / "anim.gif")).reshape(-1, 3).mean(0), RED, atol=3)

    rgb = _quadrants(16, 16)
    Image.fromarray(rgb).save(tmp_path / "img.webp", lossless=True)
    assert np.array_equal(read_rgb(str(tmp_path / "img.webp")), rgb)


def test_unreadable_files_name_the_file_and_the_reason(tmp_path):
    Image.fromarray(_quadrants()).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    cases = {
        "empty.png": (b"", "empty file (0 bytes)"),
        "text.jpg": (b"hello, I am not a picture", "not a recognised image format"),
        "truncated.jpg": (data[: len(data) // 2], "unreadable image"),
        "corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ""),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageReadError) as e:
            read_rgb(str(tmp_path / name))
        assert str(e.value).startswith(str(tmp_path / name)) and reason in str(e.value)
    with pytest.raises(ImageReadError, match="no such file"):
        read_rgb(str(tmp_path / "absent.png"))


def test_directories_are_searched_recursively_by_extension(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.PNG", "a.jpg", "sub/c.webp", "notes.txt", "sub/d.gif"):
        (tmp_path / name).write_bytes(b"x")
    found = [p[len(str(tmp_path)) + 1:] for p in image_files.iter_image_paths([str(tmp_path)])]
    assert found == ["a.jpg", "b.PNG", "sub/c.webp", "sub/d.gif"]
