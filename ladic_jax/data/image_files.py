"""Reading image files for captioning: any common format and mode, EXIF orientation applied.

A file that cannot be read raises ``ImageReadError`` naming the file and the reason, so that a batch
job can report it and go on with the rest.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff")


class ImageReadError(ValueError):
    pass


def iter_image_paths(paths: Sequence[str]) -> Iterator[str]:
    """Files as given, and image files (by extension) found in directories, sorted, recursively."""
    for p in paths:
        if os.path.isdir(p):
            for root, _, files in sorted(os.walk(p)):
                for f in sorted(files):
                    if f.lower().endswith(EXTENSIONS):
                        yield os.path.join(root, f)
        else:
            yield p


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale -> "L" by scaling, where ``convert`` would clip at 255."""
    a = np.asarray(im)
    if im.mode == "F":
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
    elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
        a = a / 257.0  # 16-bit range -> 8-bit
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> tuple[np.ndarray, tuple[str, ...]]:
    """uint8 (H, W, 3) of an opened image's current frame, and the conversions that took (in order):
    "16bit" (16/32-bit integer and float samples scaled to 8 bits), "grayscale" (replicated to RGB),
    "palette" (looked up), "alpha" (transparency composited on white), "cmyk" (inks converted)."""
    done = []
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_8bit(im)
        done.append("16bit")
    if im.mode in ("1", "L", "LA", "La"):
        done.append("grayscale")
    if im.mode in ("P", "PA"):
        done.append("palette")
    if im.mode == "CMYK":
        done.append("cmyk")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
        done.append("alpha")
    return np.asarray(im.convert("RGB"), dtype=np.uint8), tuple(done)


def read_rgb(path: str) -> np.ndarray:
    """uint8 (H, W, 3): first frame of animations, EXIF orientation applied, any mode converted to RGB
    (transparency composited on white, CMYK and palettes converted, 16-bit grayscale scaled)."""
    if os.path.isdir(path):
        raise ImageReadError(f"{path}: is a directory")
    if not os.path.exists(path):
        raise ImageReadError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.seek(0)
            return to_rgb(ImageOps.exif_transpose(im))[0]
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: refused, too many pixels ({e})") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem; the batch goes on
        raise ImageReadError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def resize_bicubic(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3) by PIL's bicubic resize (aspect not kept), as torchvision's
    `Resize` does on a PIL image (the LaDiC release's preprocessing); the image itself when it already has
    that size (PIL would copy it unchanged). Also the input pipeline's `config.input.resize="pil_bicubic"`."""
    if rgb.shape[:2] == (size, size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))


def preprocess(rgb: np.ndarray, image_size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Resize (`resize_bicubic`, to image_size x image_size) and normalise: ((x / 255) - mean) / std, float32."""
    rgb = resize_bicubic(rgb, image_size)
    x = rgb.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
